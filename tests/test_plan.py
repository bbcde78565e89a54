"""Memory planner: exact parameter/gradient/optimizer bytes against really built tiny models, the activation
model against what autograd saves, verdicts and suggestions whose own plans fit, and clear errors."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.errors import ConfigError
from vlm_finetune.plan import GiB, decoder_layer_bytes_per_token, main, plan_memory, vision_block_bytes_per_patch


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves for backward while `fn` runs (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _lora_layer_slope(tokens: tuple[int, int]) -> tuple[float, dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4vConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vTextDecoderLayer, Glm4vTextRotaryEmbedding

    from vlm_finetune.models.glm4v.family import LLM_LORA_PATTERN
    from vlm_finetune.trainability import keep_trainables_fp32

    text = Glm4vConfig().text_config
    text.update(dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2))
    text.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                            "partial_rotary_factor": 0.5}
    text._attn_implementation = "sdpa"

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Module()
            self.language_model.layers = torch.nn.ModuleList([Glm4vTextDecoderLayer(text, 0)])

    model = get_peft_model(Holder().to(torch.bfloat16), LoraConfig(r=16, lora_alpha=32, target_modules=LLM_LORA_PATTERN))
    keep_trainables_fp32(model)  # the bf16-mixed recipe: float32 LoRA under bf16 autocast
    layer = model.base_model.model.language_model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rotary = Glm4vTextRotaryEmbedding(text)
    saved = []
    for n in tokens:
        x = torch.randn(1, n, 256, dtype=torch.bfloat16, requires_grad=True)
        position = rotary(x, torch.arange(n)[None, None].expand(3, 1, n))

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x, position_embeddings=position, attention_mask=None)

        saved.append(_saved_bytes(run, params))
    dims = {"hidden": 256, "intermediate": 704, "heads": 4, "q_dim": 256, "kv_dim": 128, "rotary_dim": 32}
    return (saved[1] - saved[0]) / (tokens[1] - tokens[0]), dims


def test_decoder_layer_activation_model_matches_autograd():
    """Bytes per token one LoRA-adapted GLM-4.1V decoder layer keeps for backward under bf16 autocast,
    measured with saved_tensors_hooks (slope over two lengths, so per-layer constants cancel), equal the
    planner's model within 2%."""
    measured, dims = _lora_layer_slope((64, 192))
    predicted = decoder_layer_bytes_per_token(dims, act_bytes=2, liger=False, llm_trains=True, moe_layer=False,
                                              lora_rank=16, lora_linears=6)
    assert measured == pytest.approx(predicted, rel=0.02), (measured, predicted)


def test_vision_block_activation_model_matches_autograd():
    """Bytes per patch a fully trained ViT block keeps under bf16 autocast equal the planner's model within 3%."""
    from transformers import Glm4vConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vVisionBlock

    vision = Glm4vConfig().vision_config
    vision.update(dict(hidden_size=192, num_heads=4, out_hidden_size=512))
    vision._attn_implementation = "sdpa"
    block = Glm4vVisionBlock(vision)  # float32 master weights, all trainable
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = []
    for n in (64, 192):
        x = torch.randn(n, 192, dtype=torch.bfloat16, requires_grad=True)
        cos, sin = torch.randn(n, 48), torch.randn(n, 48)  # computed once per tower, shared by all blocks
        cu = torch.tensor([0, n], dtype=torch.int32)
        exclude = params | {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                block(x, cu_seqlens=cu, position_embeddings=(cos, sin))

        saved.append(_saved_bytes(run, exclude))
    measured = (saved[1] - saved[0]) / 128
    dims = {"vision_hidden": 192, "vision_intermediate": 512, "vision_heads": 4}
    assert measured == pytest.approx(vision_block_bytes_per_patch(dims, 2, full=True), rel=0.03)


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_parameter_gradient_optimizer_bytes_are_exact_for_the_tiny_model(precision, dtype, tmp_path):
    """The planner (meta device, nothing loaded) gives the bytes of a really built tiny GLM-4V: parameters as
    loaded and made trainable, gradients of the trainable ones, and AdamW's two states after a real step."""
    from vlm_finetune.models import get_family, parse_trainability
    from vlm_finetune.trainability import apply_trainability, keep_trainables_fp32, plan_trainability

    overrides = [f"precision={precision}"]
    plan = plan_memory(overrides)
    cfg = compose_cfg(overrides, tmp_path)
    family = get_family("glm4v")
    model = family.build_model(cfg.model, dtype=dtype)
    trainability = plan_trainability(family, model, parse_trainability(cfg.train), cfg.model, cfg.lora)
    model = apply_trainability(model, trainability, cfg.lora)
    if precision == "bf16-mixed":
        keep_trainables_fp32(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    assert plan.total("parameters") == params
    assert plan.total("gradients") == grads
    assert plan.total("optimizer") == states
    assert params > 0 and grads > 0 and states == 2 * grads
