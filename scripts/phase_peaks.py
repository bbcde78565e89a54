"""The plan's per-rank peak against the measured peak of live tensors, by phase (issue 35): tiny_mgm_moe widened
(default: 8 layers of 8 experts, hidden 512; `--wide` for the issue's 16 x 16 x 1024), trained 3 steps under
trainer=zero3 on two CPU ranks in float32 with a checkpoint at step 2, measured by
vlm_finetune.memory.phase_peaks.PhasePeaks (a census of live tensors, then every allocation and free) in four
variations: LoRA on the experts (the model's default), LoRA on attention, activation checkpointing, and the
whole model kept gathered (live parameters and reuse distance at DeepSpeed's own 1e9, above this model).

The plan is asked for the shapes the run really had: the measured step's padded length and the validation's
largest batch (`--seq`, `data.val_batch_size`). Phases: step (forward, backward, optimizer step), validation, save.

    python scripts/phase_peaks.py [--out /tmp/phase_peaks] [--wide] [--only NAME] [--markdown] [overrides ...]

About 3 minutes a variation on two cores (the default width). Prints a table; exits non-zero when a phase is
further than 15% from its plan."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NARROW = ["model.llm.hidden_size=512", "model.llm.intermediate_size=256", "model.llm.num_local_experts=8",
          "model.llm.num_hidden_layers=8"]
WIDE = ["model.llm.hidden_size=1024", "model.llm.intermediate_size=512", "model.llm.num_local_experts=16",
        "model.llm.num_hidden_layers=16"]
VARIATIONS = {
    "experts LoRA": [],
    "attention LoRA": ["lora.llm_modules=attention"],
    "checkpointing": ["model.activation_checkpointing=true"],
    "kept gathered": ["trainer.stage3_max_live_parameters=1e9", "trainer.stage3_max_reuse_distance=1e9"],
}
TOLERANCE = 0.15


def model_overrides(wide: bool) -> list[str]:
    return ["model=tiny_mgm_moe", *(WIDE if wide else NARROW), "model.llm.initializer_range=0.02",
            "precision=32-true", "trainer=zero3", "hardware=cpu", "hardware.devices=2", "data.micro_batch_size=2",
            "eval.generate=false", "data.num_val=8"]


def measure(out: Path, overrides: list[str]) -> list[dict]:
    """Run the training with PhasePeaks; each rank's peaks, census starts and batch shapes."""
    args = [*overrides, "trainer.max_steps=3", "data.num_train=32", "trainer.enable_progress_bar=false",
            "checkpoint.every_n_steps=2", "lora.dropout=0.0", "memory.monitor=false",
            "+callbacks.phase_peaks._target_=vlm_finetune.memory.phase_peaks.PhasePeaks",
            f"+callbacks.phase_peaks.path={out / 'peaks'}", f"hydra.run.dir={out / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "vlm_finetune", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise SystemExit(f"the run failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"peaks.{rank}.json").read_text()) for rank in (0, 1)]


def planned(overrides: list[str], ranks: list[dict]) -> dict[str, int]:
    """The plan's allocated bytes per phase at the measured shapes."""
    from vlm_finetune.plan import plan_memory

    step_tokens = max(r["shapes"]["step"][1] for r in ranks)
    val_samples, val_tokens = (max(r["shapes"]["validation"][i] for r in ranks) for i in (0, 1))
    step = plan_memory(overrides, seq=step_tokens)
    validation = plan_memory([*overrides, f"data.val_batch_size={val_samples}"], seq=val_tokens).validation
    return {"step": step.allocated_bytes, "validation": validation.allocated_bytes, "save": step.save_bytes}


def compare(overrides: list[str], ranks: list[dict]) -> dict[str, dict]:
    plan = planned(overrides, ranks)
    rows = {}
    for phase, predicted in plan.items():
        measured = max(r["peaks"][phase] for r in ranks)
        rows[phase] = {"plan_mib": predicted / 2**20, "measured_mib": measured / 2**20,
                       "ratio": predicted / measured, "within": abs(predicted / measured - 1) <= TOLERANCE}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/phase_peaks"))
    parser.add_argument("--wide", action="store_true", help="the issue's 1.6 GB model (about 10 minutes a run)")
    parser.add_argument("--only", choices=sorted(VARIATIONS), action="append")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("extra", nargs="*", help="overrides added to every variation (DeepSpeed settings to try)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    results = {}
    for name in args.only or VARIATIONS:
        overrides = model_overrides(args.wide) + VARIATIONS[name] + args.extra
        results[name] = compare(overrides, measure(args.out / name.replace(" ", "_"), overrides))
    ok = all(row["within"] for phases in results.values() for row in phases.values())
    if args.markdown:
        print("| variation | phase | plan (MiB) | measured peak of live tensors (MiB) | plan / measured |")
        print("|---|---|---:|---:|---:|")
        for name, phases in results.items():
            for phase, row in phases.items():
                print(f"| {name} | {phase} | {row['plan_mib']:.1f} | {row['measured_mib']:.1f} | {row['ratio']:.2f} |")
    else:
        print(json.dumps(results, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
