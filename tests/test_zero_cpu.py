"""DeepSpeed ZeRO rehearsed on two CPU processes (DeepSpeed's CPU backend, gloo): the tiny GLM-4V, MGM and
MGM-MoE train under ZeRO-2, ZeRO-3 (every parameter partitioned, MoE blocks as leaf modules) and ZeRO-3
with offload, validate with generation (ranks decode in step; at step 3 inside `fit` and at the end
outside it, where the engine is set up again for evaluation), and save a normal PEFT adapter that
equals the one DDP trains from the same data and reloads with PeftModel.from_pretrained.
SGD, so that the comparison is not at the mercy of Adam's normalisation of near-zero gradients. Under ZeRO-3,
MGM is built inside zero.Init (each rank holds half of it from the start, LoRA added unpartitioned).
And the memory planner's parameter and optimizer bytes per rank equal the tensors DeepSpeed holds."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, run_cli
from vlm_finetune.config import model_settings
from vlm_finetune.models.registry import get_family

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 4
COMMON = ["hardware=cpu", "hardware.devices=2", "precision=32-true", f"trainer.max_steps={STEPS}",
          "data.num_train=256", "data.num_val=8", "data.micro_batch_size=8", "data.val_batch_size=4",
          "lora.dropout=0.0", "optimizer=sgd", "optimizer.lr=0.2", "scheduler=constant", "trainer.val_every_n_steps=3", "trainer.enable_progress_bar=false",
          "trainer.log_every_n_steps=1"]
MODELS = {"tiny_glm41v": "glm4v", "tiny_mgm": "mgm", "tiny_mgm_moe": "mgm"}


def _run(run_dir: Path, model: str, trainer: str) -> Path:
    extra = ["trainer.stage3_param_persistence_threshold=0"] if trainer.startswith("zero3") else []
    args = [f"model={model}", f"trainer={trainer}", *COMMON, *extra, f"hydra.run.dir={run_dir}"]
    result = run_cli(args, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    built = re.search(r"ZeRO-3: built partitioned; this rank holds ([\d,]+) of the base's ([\d,]+)", result.stdout)
    if trainer.startswith("zero3") and get_family(MODELS[model]).builds_partitioned:
        # MGM is built inside zero.Init: rank 0 never held more than its half (and its padding)
        held, whole = (int(g.replace(",", "")) for g in built.groups())
        assert whole > 100_000 and whole / 2 <= held <= whole / 2 + 1000, (held, whole)
    else:
        assert built is None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == STEPS and "val_accuracy" in metrics, metrics
    with open(run_dir / "csv" / "metrics.csv") as handle:
        validations = [r for r in csv.DictReader(handle) if r.get("val_loss")]
    assert len(validations) == 2  # after step 3 (inside fit) and at the end (outside it)
    return run_dir / "adapter"


@pytest.fixture(scope="module")
def ddp_adapters(tmp_path_factory):
    """The reference: the same runs under DDP (whole weights on each rank), one per model, made on demand."""
    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in made:
            made[model] = _run(tmp_path_factory.mktemp(f"ddp-{model}"), model, "ddp")
        return made[model]
    return get


@pytest.mark.parametrize("model,trainer", [
    ("tiny_glm41v", "zero3_offload"),  # zero2 and zero3 on GLM: test_accumulation.py
    # zero3 of every family against one process: test_family_contract.py's two-rank case; ZeRO-2 on a MoE model:
    # tests/test_glm45v.py (zero2 and zero3 against one process, and nf4 under zero2)
    ("tiny_mgm", "zero2"),
])
def test_zero_on_cpu_ranks_trains_the_ddp_adapter_and_it_reloads(model, trainer, ddp_adapters, tmp_path):
    from peft import PeftModel

    adapter = _run(tmp_path / trainer, model, trainer)
    assert not list(adapter.glob("*.pt")) and not list(adapter.glob("**/zero_*"))  # no partitioned shards
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    reference = load_file(str(ddp_adapters(model) / "adapter_model.safetensors"))
    assert tensors.keys() == reference.keys() and len(tensors) > 0
    lora_b = [k for k in tensors if "lora_B" in k]
    assert lora_b and max(float(tensors[k].abs().max()) for k in lora_b) > 0  # trained away from zero
    for key, value in tensors.items():
        assert value.shape == reference[key].shape and value.numel() > 0, key  # whole, not ZeRO-3 slices
        scale = float(reference[key].abs().max())
        assert float((value - reference[key]).abs().max()) <= 1e-4 * max(scale, 1e-8) + 1e-7, key

    cfg = compose_cfg([f"model={model}"], tmp_path)
    family = get_family(MODELS[model])
    if MODELS[model] == "glm4v":
        from transformers import AutoModelForImageTextToText

        base = AutoModelForImageTextToText.from_pretrained(family.checkpoint_folder(model_settings(cfg.model)))
    else:
        base = family.build_model(model_settings(cfg.model))
    reloaded = PeftModel.from_pretrained(base, adapter)
    loaded = dict(reloaded.named_parameters())
    for key in lora_b:  # the saved B matrices are the ones now in the model
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), tensors[key]), key


@pytest.mark.parametrize("model,trainer,precision,extra", [
    ("tiny_glm41v", "zero2", "bf16-mixed", []),
    # small parameters kept whole as well as partitioned (float32 ZeRO-3 rows: tests/test_phase_peaks.py's census)
    ("tiny_glm41v", "zero3", "bf16-mixed", []),
    ("tiny_glm41v", "zero3", "bf16-mixed", ["trainer.stage3_param_persistence_threshold=0"]),
    ("tiny_mgm_moe", "zero3", "bf16-mixed", []),
])
def test_planner_bytes_per_rank_equal_what_deepspeed_holds(model, trainer, precision, extra, tmp_path):
    """The planner's parameter and optimizer bytes per GPU, from a meta-device build, against the tensors
    DeepSpeed really holds on each of two ranks after a step (zero_probe.py reads them)."""
    from vlm_finetune.plan import plan_memory

    overrides = [f"model={model}", f"trainer={trainer}", f"precision={precision}", "hardware=cpu",
                 "hardware.devices=2", *extra]
    probe = tmp_path / "probe"
    args = [*overrides, "trainer.max_steps=2", "eval.generate=false", "trainer.enable_progress_bar=false",
            "data.num_train=64", "data.num_val=4", "data.micro_batch_size=4", "+callbacks.probe._target_=zero_probe.Probe",
            f"+callbacks.probe.path={probe}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"),
                                                                               os.environ.get("PYTHONPATH", "")]))
    result = run_cli(args, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = plan_memory(overrides)
    for rank in (0, 1):
        held = json.loads((tmp_path / f"probe.{rank}.json").read_text())
        assert held["parameters"] == plan.total("parameters"), (rank, held, plan.total("parameters"))
        assert held["master"] + held["states"] == plan.total("optimizer"), (rank, held, plan.total("optimizer"))
        assert held["master"] > 0 and held["states"] == 2 * held["master"]  # AdamW: two fp32 states
        # the reduce bucket(s) as DeepSpeed allocates them, sized from the trainable parameters (trainer.*=auto)
        bucket_row = sum(r.bytes for r in plan.rows if "reduce bucket" in r.item)
        assert held["reduce_buckets"] == bucket_row > 0, (rank, held, bucket_row)


def test_bf16_zero3_built_partitioned_trains_as_zero2(tmp_path):
    """bf16-mixed with the default fully trained projector: ZeRO-3 builds inside zero.Init (its LoRA and projector
    copy cast to bf16 at the build) and logs the losses of ZeRO-2's whole build, to bf16's rounding."""
    losses = {}
    for trainer in ("zero2", "zero3"):
        run_dir = tmp_path / trainer
        args = ["model=tiny_mgm", f"trainer={trainer}", "precision=bf16-mixed", "hardware=cpu", "hardware.devices=2",
                "trainer.max_steps=3", "eval.generate=false", "trainer.enable_progress_bar=false", "data.num_train=64",
                "data.num_val=4", "data.micro_batch_size=4", "trainer.log_every_n_steps=1", "optimizer=sgd",
                "optimizer.lr=0.2", "scheduler=constant", f"hydra.run.dir={run_dir}"]
        result = run_cli(args, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("ZeRO-3: built partitioned" in result.stdout) == (trainer == "zero3")
        with open(run_dir / "csv" / "metrics.csv") as handle:
            losses[trainer] = [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]
    assert len(losses["zero3"]) == 3 and losses["zero3"][-1] < losses["zero3"][0]
    torch.testing.assert_close(torch.tensor(losses["zero3"]), torch.tensor(losses["zero2"]), rtol=2e-2, atol=0)
