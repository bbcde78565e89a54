"""Host memory per rank of FSDP2, FSDP2 + nf4, ZeRO-3 and ZeRO-3 + nf4 on two CPU ranks (gloo), measured as
scripts/load_memory.py measures it (its rank runner: resident size before the run, peak when training starts, peak
at the end) on the same widened tiny_mgm_moe read from its released-layout folder, with the planner's load row and
parameter rows beside each. CPU ranks hold their "GPU" state in host memory too, so the run growth is the sum of both.

    python scripts/fsdp_memory.py [--layers 12] [--out /tmp/fsdp_memory] [--report docs/benchmarks.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_memory  # noqa: E402  (the rank runner and the model of scripts/load_memory.py)

NOTE = ("FSDP2 here builds (or reads and quantises) the whole model on every rank before `fully_shard` splits it, so "
        "its load peak is the whole model per rank (as the planner's load row says), where ZeRO-3 in 32 bits builds "
        "partitioned; ZeRO-3 + nf4 too reads and quantises the whole 4-bit model on each rank (bitsandbytes "
        "quantises whole tensors), then partitions it before the engine starts. With nf4 the two ranks of the node "
        "do it one after the other (vlm_finetune/load_turns.py), so each rank's load peak below is its own turn's and "
        "the node never holds both whole 4-bit copies at once. After the shard the step holds 1/N of the "
        "parameters; nf4 holds about a quarter of fp32's bytes.")
SECTION = "## FSDP2, FSDP2 + nf4, ZeRO-3 and ZeRO-3 + nf4 per rank on the CPU (scripts/fsdp_memory.py)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fsdp_memory"))
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    from vlm_finetune.config import compose, model_settings
    from vlm_finetune.models.registry import get_family
    from vlm_finetune.plan import plan_memory

    base = load_memory.run_overrides(args.layers, args.steps) + ["hardware=cpu", "hardware.devices=2"]
    cfg = compose(base)
    folder = get_family(cfg.model.family).checkpoint_folder(model_settings(cfg.model))
    model_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    runs = {"zero3 32-true": [*base, "trainer=zero3", "trainer.stage3_param_persistence_threshold=0"],
            "fsdp 32-true": [*base, "trainer=fsdp"],
            "fsdp nf4": [*base, "trainer=fsdp", "precision=nf4"],
            "zero3 nf4": [*base, "trainer=zero3", "trainer.stage3_param_persistence_threshold=0", "precision=nf4"]}
    mib = 2**20
    lines = [SECTION, "", f"- command: `python scripts/fsdp_memory.py {' '.join(sys.argv[1:])}`",
             f"- hardware: CPU ({os.cpu_count()} cores, shared with other jobs), two gloo ranks; date "
             f"{time.strftime('%Y-%m-%d %H:%M')}",
             f"- model: tiny_mgm_moe widened to {args.layers} layers of 8 experts (hidden 512), float32 folder of "
             f"{model_bytes / 1e9:.2f} GB; LoRA on attention; {args.steps} steps; nf4 quantises the decoder's linear "
             "layers and experts as the folder is read, then FSDP shards the 4-bit codes",
             "- growth: each rank's resident peak (VmHWM) minus its size before the run; plan: `python -m "
             "vlm_finetune.plan` with the same overrides (host row of the load per rank; parameter rows per rank)",
             "",
             "| run | rank | load growth MiB | run growth MiB | plan: load MiB | plan: parameters MiB |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for name, overrides in runs.items():
        ranks = load_memory._run(args.out / name.replace(" ", "_"), overrides)
        plan = plan_memory(overrides)
        load_row = plan.load.bytes_per_rank  # one rank's load (with nf4 the ranks take turns: its turn's peak)
        for r in ranks:
            load, run = r["peak_at_load"] - r["rss_before"], r["peak"] - r["rss_before"]
            lines.append(f"| {name} | {r['rank']} | {load / mib:,.0f} | {run / mib:,.0f} | {load_row / mib:,.0f} | "
                         f"{plan.total('parameters') / mib:,.0f} |")
            summary.setdefault(name, []).append({"load": load, "run": run})
    lines += ["", NOTE, ""]
    print("\n".join(lines))
    print(json.dumps(summary, indent=2))
    if args.report is not None:
        from vlm_finetune.bench.data import replace_section

        replace_section(args.report, "\n".join(lines), SECTION)


if __name__ == "__main__":
    main()
