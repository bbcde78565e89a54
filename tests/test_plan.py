"""Memory planner: exact parameter/gradient/optimizer bytes against really built tiny models, the activation
model against what autograd saves, verdicts and suggestions whose own plans fit, and clear errors."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune import plan as planner
from vlm_finetune.config import lora_settings, model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.activations import decoder_layer_bytes_per_token, vision_block_bytes_per_patch
from vlm_finetune.memory.report import GiB
from vlm_finetune.plan import main
from vlm_finetune.plan import plan_with_suggestions as plan_memory


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


def _lora_layer_slope(tokens: tuple[int, int], mlp_checkpointed: bool = False) -> tuple[float, dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4vConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vTextDecoderLayer, Glm4vTextRotaryEmbedding

    from vlm_finetune.models.glm4v.family import LLM_LORA_PATTERN
    from vlm_finetune.trainability import checkpoint_forward, keep_trainables_fp32

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
    held_inputs = []  # what a checkpoint keeps is its input (no saved-tensor hook sees it)
    if mlp_checkpointed:
        checkpoint_forward(layer.mlp)
        layer.mlp.register_forward_pre_hook(lambda module, args: held_inputs.append(args[0]))
    rotary = Glm4vTextRotaryEmbedding(text)
    saved = []
    for n in tokens:
        x = torch.randn(1, n, 256, dtype=torch.bfloat16, requires_grad=True)
        position = rotary(x, torch.arange(n)[None, None].expand(3, 1, n))
        held_inputs.clear()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(x, position_embeddings=position, attention_mask=None)

        seen = _saved_bytes(run, params)
        saved.append(seen + sum(t.untyped_storage().nbytes() for t in held_inputs[:1]))
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


def test_selective_layer_activation_model_matches_autograd():
    """With the MLP recomputed in backward (speed.checkpoint_scope=mlp) the layer keeps its attention side
    and the MLP's input only: the planner's bytes per token within 2% of what autograd and the checkpoint
    hold, and less than the whole layer's."""
    measured, dims = _lora_layer_slope((64, 192), mlp_checkpointed=True)
    predicted = decoder_layer_bytes_per_token(dims, act_bytes=2, liger=False, llm_trains=True, moe_layer=False,
                                              lora_rank=16, lora_linears=6, mlp_recomputed=True, mlp_lora_linears=2)
    whole = decoder_layer_bytes_per_token(dims, act_bytes=2, liger=False, llm_trains=True, moe_layer=False,
                                          lora_rank=16, lora_linears=6)
    assert measured == pytest.approx(predicted, rel=0.02), (measured, predicted)
    assert predicted < 0.7 * whole


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
    from vlm_finetune.models.registry import get_family, parse_trainability
    from vlm_finetune.trainability import apply_trainability, keep_trainables_fp32, plan_trainability

    overrides = [f"precision={precision}"]
    plan = plan_memory(overrides)
    cfg = compose_cfg(overrides, tmp_path)
    family = get_family("glm4v")
    model = family.build_model(model_settings(cfg.model), dtype=dtype)
    trainability = plan_trainability(family, model, parse_trainability(cfg.train), model_settings(cfg.model), lora_settings(cfg.lora))
    model = apply_trainability(model, trainability, lora_settings(cfg.lora))
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


BENCH = ["model=glm41v_9b", "precision=bf16-mixed", "train.projector=frozen", "hardware=1xh100",
         "data.micro_batch_size=1", "model.liger_kernels=true"]


@pytest.mark.parametrize("extra,measured_gib", [([], 24.31), (["loss.chunk_size=512"], 24.16),
                                                (["model.liger_kernels=false"], 24.74)])
def test_glm41v_9b_plan_matches_the_h100_benchmark_it_was_calibrated_on(extra, measured_gib):
    """docs/benchmarks.md, one H100: GLM-4.1V-9B, LoRA r=16, frozen ViT, one 672 px image, 8192 tokens,
    every layer checkpointed. The planner's peak allocated is within 2% of each measured figure."""
    plan = plan_memory(BENCH + extra, seq=8192, image_px=672)
    assert plan.allocated_bytes / GiB == pytest.approx(measured_gib, rel=0.02)
    assert plan.fits and plan.checkpointed_layers == 40 and plan.tokens == 8192


def test_glm41v_9b_on_one_a6000_does_not_fit_and_every_suggestion_fits_by_its_own_plan(capsys):
    """`python -m vlm_finetune.plan model=glm41v_9b trainer=single hardware=1xa6000` (float32 base, micro-batch
    32): a verdict with a breakdown and suggestions, cheapest first, each of which fits when planned anew."""
    overrides = ["model=glm41v_9b", "trainer=single", "hardware=1xa6000", "precision=32-true",
                 "data.micro_batch_size=32"]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in out and "parameters   llm frozen float32" in out
    plan = plan_memory(overrides)
    assert plan.fits is False and plan.suggestions
    kinds = [s.label for s in plan.suggestions]
    assert kinds[0].startswith("smaller micro-batch")  # one GPU: sharding cannot help, so it is not offered
    for suggestion in plan.suggestions:
        assert suggestion.command in out
        again = planner.plan_memory(suggestion.overrides)
        assert again.fits is True and again.peak_bytes == suggestion.plan.peak_bytes
    smaller = plan.suggestions[0].overrides  # same global batch: micro-batch x accumulation = 32
    mbs = int(next(o for o in smaller if o.startswith("data.micro_batch_size=")).split("=")[1])
    acc = int(next(o for o in smaller if o.startswith("trainer.accumulate_grad_batches=")).split("=")[1])
    assert mbs * acc == 32


def test_glm45v_moe_plans_with_zero3_sharding():
    """GLM-4.5V (MoE, 105 B) under ZeRO-3 on 8 x A100 80 GB: parameters sharded 8 ways, the MoE block
    gathered whole, a verdict."""
    plan = plan_memory(["model=glm45v", "trainer=zero3", "hardware=8xa100_80g", "precision=bf16-mixed"])
    params = plan.total("parameters")
    assert 100e9 * 2 / 8 < params < 110e9 * 2 / 8  # ~105 B bf16 parameters, one eighth each
    gathered = next(r for r in plan.rows if r.item.startswith("ZeRO-3 gathered"))
    assert gathered.bytes > 128 * 3 * 4096 * 1408 * 2  # at least one whole MoE block (128 experts) in bf16
    assert plan.fits is True


def test_activation_checkpointing_auto_takes_the_fewest_layers_that_fit():
    """On one H100 at 16384 tokens (8192 fit without any) the plan checkpoints some but not all of the 40
    layers, and one layer fewer would not fit."""
    assert plan_memory(BENCH + ["model.activation_checkpointing=auto"], seq=8192, image_px=672).checkpointed_layers == 0
    plan = plan_memory(BENCH + ["model.activation_checkpointing=auto"], seq=16384, image_px=672)
    n = plan.checkpointed_layers
    assert 0 < n < 40 and plan.fits
    fewer = plan_memory(BENCH + [f"model.activation_checkpointing={n - 1}"], seq=16384, image_px=672)
    assert fewer.fits is False


def test_activation_checkpointing_auto_takes_the_plan_with_the_least_recompute_that_fits():
    """auto weighs whole-layer against selective (MLP-only) checkpointing: at 9088 tokens on one H100 whole
    layers need 3 and selective 4, and recomputing 4 MLPs is less work than 3 whole layers; at 9216 tokens
    selective would need 5 MLPs, more work than 3 whole layers. In each case the chosen plan fits and one layer fewer does not; a
    scope fixed on the command line is kept."""
    from vlm_finetune.memory.activations import recompute_flops_per_token

    dims = {"hidden": 4096, "q_dim": 4096, "kv_dim": 256, "intermediate": 13696}
    auto = BENCH + ["model.activation_checkpointing=auto"]
    for seq, (layers, scope) in ((9088, (4, "mlp")), (9216, (3, "layer"))):
        plan = plan_memory(auto, seq=seq, image_px=672)
        assert (plan.checkpointed_layers, plan.checkpoint_scope) == (layers, scope) and plan.fits
        fewer = [f"model.activation_checkpointing={layers - 1}", f"speed.checkpoint_scope={scope}"]
        assert plan_memory(BENCH + fewer, seq=seq, image_px=672).fits is False
        other = "layer" if scope == "mlp" else "mlp"
        forced = plan_memory(auto + [f"speed.checkpoint_scope={other}"], seq=seq, image_px=672)
        assert forced.checkpoint_scope == other and forced.fits
        cost = {s: recompute_flops_per_token(dims, s, seq, False) for s in ("layer", "mlp")}
        assert layers * cost[scope] < forced.checkpointed_layers * cost[other]


def test_planner_errors_name_the_fix():
    from vlm_finetune.models.base import Family
    from vlm_finetune.models.glm4v.family import Glm4vFamily
    from vlm_finetune.models.registry import FAMILIES, register_family

    class NoDims(Glm4vFamily):  # a family that does not declare memory_dims (Family's default answers)
        name = "no_memory_dims"
        memory_dims = Family.memory_dims

    register_family(NoDims())
    try:
        with pytest.raises(ConfigError, match="does not declare memory_dims"):
            plan_memory(["model.family=no_memory_dims"])
    finally:
        FAMILIES.pop("no_memory_dims")  # the registry is shared: tests that walk every family come later
    with pytest.raises(ConfigError, match="activation_checkpointing='some'"):
        plan_memory(["model.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="do not compose"):
        plan_memory(["model=no_such_model"])
    assert main(["model=no_such_model"]) == 2
