"""The planner's `communication per optimizer step` equals the bytes counted by wrapping the collectives of real
runs (comm_probe.py) during 2 steps on two CPU ranks, within 10%, for DDP, ZeRO-2, ZeRO-3, FSDP2 and expert
parallel (tiny_mgm_moe)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from vlm_finetune.plan import plan_memory

STEPS = 2
MICRO = 4
COMMON = ["model=tiny_mgm_moe", "hardware=cpu", "hardware.devices=2", "precision=32-true", f"trainer.max_steps={STEPS}",
          "data.num_train=32", "data.num_val=4", f"data.micro_batch_size={MICRO}", "lora.dropout=0.0",
          "lora.llm_modules=all", "optimizer=sgd", "optimizer.lr=0.2", "scheduler=constant",
          "trainer.val_every_n_steps=null", "trainer.enable_progress_bar=false", "model.activation_checkpointing=false",
          "eval.generate=false"]
# the measured kinds of collective that make up each strategy's rows (scalar reductions of the loss ride along)
CASES = {
    "ddp": ["trainer=ddp"],
    "zero2": ["trainer=zero2"],
    "zero3": ["trainer=zero3"],
    "fsdp": ["trainer=fsdp"],
    "ep": ["trainer=ddp", "trainer.expert_parallel=2"],
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_communication_row_equals_the_bytes_counted_on_two_ranks(case, tmp_path):
    overrides = [*COMMON, *CASES[case]]
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    probe = tmp_path / "comm"
    result = run_cli([*overrides, "+callbacks.comm._target_=comm_probe.Count", f"+callbacks.comm.path={probe}",
                      f"hydra.run.dir={tmp_path / 'run'}"], timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(Path(f"{probe}.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["steps"] == STEPS for r in ranks)
    for rank in ranks:
        measured = sum(rank["bytes"].values()) / STEPS
        # the plan at the tokens this rank's MoE layers really saw per micro-batch (padding included)
        tokens = rank["moe_tokens"]
        assert len(tokens) == STEPS  # one training forward per step (no recompute here)
        seq = round(sum(tokens) / len(tokens) / MICRO)
        plan = plan_memory(overrides, seq=seq)
        predicted = plan.communication_bytes
        print(case, rank["bytes"], "measured per step", measured, "predicted", predicted,
              [(r.item, r.bytes) for r in plan.communication])
        assert predicted > 0 and abs(measured - predicted) <= 0.10 * predicted, (case, measured, predicted)
