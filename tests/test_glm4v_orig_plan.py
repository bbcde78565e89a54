"""The memory planner on the original GLM-4V-9B: the EVA2-CLIP block's activation model against what autograd
saves (SDPA and eager attention), and the seed case of the report behind this project, one 48 GB A6000 at
batch 1 with 1024 text tokens and one 1120 px image: the official recipe does not fit and the breakdown shows
the eager vision attention matrices (1.22 GiB each in bf16); the default recipe fits."""
from __future__ import annotations

import pytest
import torch
from test_plan import _saved_bytes

from vlm_finetune.memory.activations import eager_attention_matrix_bytes, eva_block_bytes_per_patch
from vlm_finetune.memory.report import GiB
from vlm_finetune.plan import plan_with_suggestions as plan_memory

SEED = ["model=glm4v_9b", "hardware=1xa6000", "precision=bf16-mixed", "data.micro_batch_size=1"]
# the official finetune_vision.py recipe: LoRA r=8 on query_key_value (both towers), the released code's
# materialised vision attention, no checkpointing
OFFICIAL = SEED + ["train.vision=lora", "lora.r=8", "lora.llm_modules=qkv",
                   r"lora.targets.vision=.*vision\.transformer\.layers\.\d+\.attention\.query_key_value",
                   "model.attn_implementation=eager", "model.activation_checkpointing=false"]


@pytest.mark.parametrize("eager", [False, True])
def test_eva_block_activation_model_matches_autograd(eager):
    """Bytes one EVA2-CLIP block keeps for backward with LoRA on query_key_value under bf16 autocast, per patch
    (the slope over two image lengths at a fixed length for the attention matrix term), equal the planner's
    model within 3% (the LayerNorms at CPU autocast's bf16)."""
    from peft import LoraConfig, get_peft_model

    from vlm_finetune.models.glm4v_orig.modeling import EvaTransformerLayer, VisionSettings
    from vlm_finetune.trainability import keep_trainables_fp32

    settings = VisionSettings(hidden_size=128, num_heads=4, intermediate_size=512)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = EvaTransformerLayer(settings)
            self.block.attention.attn_implementation = "eager" if eager else "sdpa"

    model = get_peft_model(Holder().to(torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules=r".*attention\.query_key_value"))
    keep_trainables_fp32(model)
    block = model.base_model.model.block
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    dims = {"vision_hidden": 128, "vision_intermediate": 512, "vision_heads": 4}
    lengths, measured = (64, 192), []
    for n in lengths:
        x = torch.randn(1, n, 128, dtype=torch.bfloat16, requires_grad=True)

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                block(x)

        measured.append(_saved_bytes(run, params))
    # CPU autocast keeps layer_norm in bf16 (CUDA's runs it in float32, the planner's default norm_bytes=4)
    predicted = [eva_block_bytes_per_patch(dims, 2, False, ("attention.query_key_value",), 8, eager, n,
                                           norm_bytes=2) * n for n in lengths]
    # the per-patch slope of the linear terms, and the whole amount (attention matrices grow with n^2)
    slope = (measured[1] - measured[0]) / (lengths[1] - lengths[0])
    assert slope == pytest.approx((predicted[1] - predicted[0]) / (lengths[1] - lengths[0]), rel=0.03)
    assert measured[1] == pytest.approx(predicted[1], rel=0.03)


def _row(plan, text: str):
    return [row for row in plan.rows if text in row.item]


def test_official_recipe_on_one_a6000_does_not_fit_and_shows_the_vision_attention():
    plan = plan_memory(OFFICIAL, seq=1024, image_px=1120)
    assert plan.fits is False
    rows = _row(plan, "eager attention")
    assert len(rows) == 1 and "1.22 GiB" in rows[0].item
    # 63 blocks x (float32 softmax + bf16 copy) of 16 x 6401^2
    one = eager_attention_matrix_bytes({"vision_heads": 16}, 6401, 2)
    assert one / GiB == pytest.approx(1.22, abs=0.005)
    assert rows[0].bytes == 63 * 3 * one
    assert rows[0].bytes == max(row.bytes for row in plan.rows)  # the largest item of the breakdown
    rendered = plan.render()
    assert "DOES NOT FIT" in rendered and "eager attention" in rendered


def test_default_recipe_on_one_a6000_fits_near_the_reported_28_gb():
    """Frozen ViT, LoRA on the LLM, SDPA: FITS, peak allocated 26-32 GiB (users report about 28 GB)."""
    plan = plan_memory(SEED, seq=1024, image_px=1120)
    assert plan.fits is True
    assert 26 <= plan.allocated_bytes / GiB <= 32, plan.allocated_bytes / GiB
    assert not _row(plan, "eager attention")
