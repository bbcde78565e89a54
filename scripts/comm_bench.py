"""Bytes moved and step time per strategy on two CPU ranks (issue 34): tiny_mgm_moe widened to 16 experts per MoE
layer (hidden 512, expert width 1024, 4 layers), LoRA on attention and on the experts, float32, 3 steps of 4
samples per rank, under trainer=zero3, trainer=fsdp (FSDP2), trainer=ddp with trainer.expert_parallel=2, and
trainer=ddp (every expert on every rank) as the reference. Each rank counts the collectives it calls while training
batches run (tests/comm_probe.py: ring cost per rank), and times each batch; the planner's row for the same run is
printed beside it.

    python scripts/comm_bench.py [--out /tmp/comm_bench] [--steps 3]

Prints one Markdown table (bytes sent per rank per step, measured and planned; median seconds per step after the
first). Timings on a shared 2-core machine are only a relative indication."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDE = ["model=tiny_mgm_moe", "model.llm.hidden_size=512", "model.llm.intermediate_size=1024",
        "model.llm.num_local_experts=16", "model.llm.num_hidden_layers=4", "model.llm.initializer_range=0.02"]
CASES = {"zero3": ["trainer=zero3"], "fsdp (FSDP2)": ["trainer=fsdp"],
         "ddp + expert_parallel=2": ["trainer=ddp", "trainer.expert_parallel=2"], "ddp (reference)": ["trainer=ddp"]}


def common(steps: int) -> list[str]:
    return [*WIDE, "hardware=cpu", "hardware.devices=2", "precision=32-true", f"trainer.max_steps={steps}",
            "data.num_train=64", "data.num_val=4", "data.micro_batch_size=4", "lora.llm_modules=all",
            "trainer.val_every_n_steps=null", "trainer.enable_progress_bar=false", "eval.generate=false",
            "model.activation_checkpointing=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/comm_bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(CASES), help="the cases to run (names as in CASES)")
    args = parser.parse_args()
    from vlm_finetune.plan import plan_memory

    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for name, extra in ((n, e) for n, e in CASES.items() if n in args.only):
        folder = args.out / ("ep" if "expert" in name else name.split()[0])
        overrides = [*common(args.steps), *extra]
        probe = folder / "comm"
        command = [sys.executable, "-m", "vlm_finetune", *overrides, "+callbacks.comm._target_=comm_probe.Count",
                   f"+callbacks.comm.path={probe}", f"hydra.run.dir={folder / 'run'}"]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: {done.stderr[-3000:]}")
        rank = json.loads(Path(f"{probe}.rank0.json").read_text())
        measured = sum(rank["bytes"].values()) / rank["steps"]
        tokens = rank["moe_tokens"]
        plan = plan_memory(overrides, seq=round(sum(tokens) / len(tokens) / 4))
        step = statistics.median(rank["seconds"][1:] or rank["seconds"])
        rows.append((name, measured, plan.communication_bytes, step))
    print("| run | sent per rank per step, measured (MiB) | planned (MiB) | median step (s) |")
    print("|---|---|---|---|")
    for name, measured, planned, step in rows:
        print(f"| {name} | {measured / 2**20:.2f} | {planned / 2**20:.2f} | {step:.2f} |")


if __name__ == "__main__":
    main()
