"""The tiny original GLM-4V-9B under DeepSpeed ZeRO-3 on two CPU ranks: it trains, and its adapter equals the one
DDP trains from the same data (SGD, as tests/test_zero_cpu.py, so near-zero gradients are compared as they are)."""
from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

from conftest import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 4
COMMON = ["model=tiny_glm4v", "hardware=cpu", "hardware.devices=2", "precision=32-true", f"trainer.max_steps={STEPS}",
          "data.num_train=256", "data.num_val=8", "data.micro_batch_size=8", "data.val_batch_size=4",
          "lora.dropout=0.0", "optimizer=sgd", "optimizer.lr=0.2", "scheduler=constant", "eval.generate=false",
          "trainer.enable_progress_bar=false"]


def _adapter(run_dir, trainer: str, extra: list[str] = ()):
    result = run_cli([f"trainer={trainer}", *COMMON, *extra, f"hydra.run.dir={run_dir}"], timeout=600,
                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    # under ZeRO-3 the model is built inside zero.Init, its folder streamed into each rank's half
    built = re.search(r"ZeRO-3: built partitioned; this rank holds ([\d,]+) of the base's ([\d,]+)", result.stdout)
    assert (built is not None) == (trainer == "zero3"), result.stdout[-2000:]
    if built:
        held, whole = (int(x.replace(",", "")) for x in built.groups())
        assert whole > 100_000 and whole / 2 <= held <= whole / 2 + 1000, (held, whole)  # and padding
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_zero3_on_two_cpu_ranks_trains_the_ddp_adapter(tmp_path):
    zero = _adapter(tmp_path / "zero3", "zero3", ["trainer.stage3_param_persistence_threshold=0"])
    reference = _adapter(tmp_path / "ddp", "ddp")
    assert zero.keys() == reference.keys()
    lora_b = [k for k in zero if "lora_B" in k]
    projector = [k for k in zero if "projector" in k]
    assert lora_b and projector  # LoRA on the LLM and the adapter trained in full, both saved
    assert max(float(zero[k].abs().max()) for k in lora_b) > 0  # trained away from zero
    for key, value in zero.items():
        assert value.shape == reference[key].shape and value.numel() > 0, key  # whole, not ZeRO-3 slices
        scale = float(reference[key].abs().max())
        assert float((value - reference[key]).abs().max()) <= 1e-4 * max(scale, 1e-8) + 1e-7, key
