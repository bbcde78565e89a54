"""Measure the host memory a run's model takes on each rank: a model of about 1.6 GB in float32 in many small
layers (tiny_mgm_moe widened and deepened through overrides), written once in MGM's released layout by the
family's writer (the cached tiny folder), then trained for a few steps from that folder under trainer=single
and under trainer=zero3 on two CPU ranks. Each rank records its resident size before the run (VmRSS, after
the imports) and its peak at the end (VmHWM); the growth is compared with the model's bytes and with the
planner's load row, and the two adapters with each other. Two peaks: when training starts (the load: model
built or read, the ZeRO engine set up) and over the whole run (training steps included).

    python scripts/load_memory.py [--layers 30] [--out /tmp/load_memory]

It needs about 6 GB of memory and some minutes on two cores; it prints one JSON summary and exits non-zero when
a check fails (zero3 growth <= 0.7 x the model per rank at the load and over the run, planner within 20 % of
the load, adapters equal)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vlm_finetune.config import model_settings

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")


def model_overrides(layers: int) -> list[str]:
    return ["model=tiny_mgm_moe", f"model.llm.num_hidden_layers={layers}", "model.llm.hidden_size=512",
            "model.llm.intermediate_size=1024", "model.llm.num_local_experts=8", "model.llm.num_attention_heads=8",
            "model.llm.num_key_value_heads=4", "model.llm.head_dim=64",
            # the usual initialisation: tiny_mgm_moe's 0.1 over 30 layers of 512 makes a chaotic network, in which
            # the float rounding of two ranks' sums grows into different updates
            "model.llm.initializer_range=0.02"]


def run_overrides(layers: int, steps: int) -> list[str]:
    return [*model_overrides(layers), "precision=32-true", f"trainer.max_steps={steps}", "data.num_train=32",
            "data.num_val=2", "data.micro_batch_size=1", "data.val_batch_size=1",
            "eval.generate=false", "lora.dropout=0.0", "optimizer=sgd", "optimizer.lr=0.2", "scheduler=constant",
            "trainer.enable_progress_bar=false", "memory.monitor=false",
            # without it the MoE forward keeps its (gathered) expert weights for backward, layer after layer
            "model.activation_checkpointing=true",
            # LoRA on attention, as for a large MoE under memory pressure: PEFT's LoRA on the fused expert tensors
            # (target_parameters) materialises each layer's whole expert delta and its gradient in every step
            "lora.llm_modules=attention",
            # ranks on CPUs gather the parameters in host memory every step: the 1 MiB mmap threshold all run and
            # a heap trim after each step (the default holds it only while the model loads)
            "memory.release_host=true"]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(out: Path, overrides: list[str]) -> None:
    """One rank (Lightning starts the others by running this same command line again)."""
    # what the run imports lazily (the strategy, the engine, the model's code): code, not the model
    import deepspeed  # noqa: F401
    import lightning.pytorch.strategies.deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401
    from hydra import compose, initialize_config_dir

    import vlm_finetune.train as recipe  # noqa: F401  (every import made before the baseline)
    from vlm_finetune.module import VLMModule

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    import lightning as L

    trace: list[tuple[str, int, int]] = []  # (where, resident, peak so far) in bytes

    def mark(where: str) -> None:
        trace.append((where, _status("VmRSS"), _status("VmHWM")))

    class AtLoad(L.Callback):
        """The peak when training starts: the model built or loaded (and, under ZeRO-3, the engine set up)."""
        peak = 0

        def setup(self, trainer, pl_module, stage) -> None:
            mark("setup (before configure_model)")

        def on_fit_start(self, trainer, pl_module) -> None:
            AtLoad.peak = _status("VmHWM")
            mark("fit start")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            mark(f"batch {batch_idx} start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            mark("before backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            mark("after backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            mark(f"batch {batch_idx} end")

        def on_train_end(self, trainer, pl_module) -> None:
            mark("train end (adapter saved)")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            mark(f"validation batch {batch_idx} end")

    built = VLMModule.configure_model

    def configure_model(module) -> None:
        built(module)
        mark("model built (configure_model)")

    VLMModule.configure_model = configure_model
    before = _status("VmRSS")
    recipe.train(cfg, callbacks=[AtLoad()])
    mark("run returned")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "rss_before": before, "peak_at_load": AtLoad.peak,
                                                      "peak": _status("VmHWM"), "trace": trace}))


def _run(out: Path, overrides: list[str]) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)  # this script's own folder: an earlier run there would not run again
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--rank", str(out), "--", *overrides, f"output_dir={out / 'run'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


SECTION = "## Load memory on the CPU (scripts/load_memory.py)"


def render(summary: dict, arguments: str, layers: int, steps: int) -> str:
    """The figures as a docs/benchmarks.md section: command, machine, date, one row per run and rank."""
    import time

    mib = 2**20
    lines = [SECTION, "", f"- command: `python scripts/load_memory.py {arguments}`",
             f"- hardware: CPU ({os.cpu_count()} cores); date {time.strftime('%Y-%m-%d %H:%M')}",
             f"- model: tiny_mgm_moe widened to {layers} layers of 8 experts (hidden 512), float32, "
             f"{summary['model_bytes'] / 1e9:.2f} GB, read from its released-layout folder; LoRA on attention; "
             f"{steps} steps", "- growth: each rank's resident size (VmHWM) minus its size before the model exists", "",
             "| run | rank | load growth MiB | x model | run growth MiB | x model | planner load row / measured load |",
             "|---|---|---|---|---|---|---|"]
    for name in ("single", "zero3"):
        run = summary[name]
        for rank, (load, run_growth) in enumerate(zip(run["load_growth_per_rank"], run["run_growth_per_rank"])):
            lines.append(f"| {name} | {rank} | {load / mib:,.0f} | {run['load_growth_over_model'][rank]:.3f} | "
                         f"{run_growth / mib:,.0f} | {run['run_growth_over_model'][rank]:.3f} | "
                         f"{run['plan_over_measured_load']:.3f} |")
    lines += ["", f"Adapters (single vs zero3): largest difference {summary['adapter_max_rel_diff']:.1e} of each "
              "tensor's largest value.", "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}"
                                                           for k, v in summary["checks"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/load_memory"))
    parser.add_argument("--trace", action="store_true", help="print each rank's resident size at each phase")
    parser.add_argument("--only-zero3", action="store_true", help="measure the zero3 run alone (no checks)")
    parser.add_argument("--report", type=Path, default=None,
                        help="also write the figures as a section of this file (docs/benchmarks.md)")
    parser.add_argument("extra", nargs="*", help="overrides added to the zero3 run (to try DeepSpeed settings)")
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    from vlm_finetune.config import compose
    from vlm_finetune.models.registry import get_family
    from vlm_finetune.plan import plan_memory

    base = run_overrides(args.layers, args.steps)
    cfg = compose(base)
    # written once by the family's writer
    folder = get_family(cfg.model.family).checkpoint_folder(model_settings(cfg.model))
    model_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    zero3 = [*base, "trainer=zero3", "hardware=cpu", "hardware.devices=2",
             # DeepSpeed's working buffers sized for a model of this size, not for the defaults' billions
             # (no prefetch, nothing kept gathered for reuse, a gradient bucket of 4 MB), and each module gathered
             # by an all-reduce straight into its parameters (one whole copy at a time, not two)
             "trainer.stage3_param_persistence_threshold=0", "trainer.stage3_prefetch_bucket_size=0",
             "trainer.stage3_max_live_parameters=2e7", "trainer.stage3_max_reuse_distance=0",
             "trainer.reduce_bucket_size=1e6", "trainer.stage3_use_all_reduce_for_fetch_params=true", *args.extra]
    single = [*base, "trainer=single", "hardware=cpu", "trainer.accumulate_grad_batches=2"]  # the same 2 samples
    summary: dict = {"model_bytes": model_bytes, "folder": str(folder)}
    runs = (("zero3", zero3),) if args.only_zero3 else (("single", single), ("zero3", zero3))
    for name, overrides in runs:
        ranks = _run(args.out / name, overrides)
        at_load = [r["peak_at_load"] - r["rss_before"] for r in ranks]
        growth = [r["peak"] - r["rss_before"] for r in ranks]
        planned = plan_memory(overrides).load
        if args.trace:
            for r in ranks:
                for where, rss, hwm in r["trace"]:
                    print(f"{name} rank {r['rank']} {where:32s} resident +{(rss - r['rss_before']) / 2**20:7.0f} MiB"
                          f"  peak +{(hwm - r['rss_before']) / 2**20:7.0f} MiB", file=sys.stderr)
        summary[name] = {"load_growth_per_rank": at_load,
                         "load_growth_over_model": [round(g / model_bytes, 3) for g in at_load],
                         "run_growth_per_rank": growth,
                         "run_growth_over_model": [round(g / model_bytes, 3) for g in growth],
                         "plan_host_bytes_per_node": planned.host_bytes,
                         "plan_over_measured_load": round(planned.host_bytes / sum(at_load), 3)}
    if args.only_zero3:
        print(json.dumps(summary, indent=2, default=str))
        return
    adapters = [load_file(str(args.out / n / "run" / "adapter" / "adapter_model.safetensors"))
                for n in ("single", "zero3")]
    summary["adapter_max_rel_diff"] = max(float((adapters[0][k] - adapters[1][k]).abs().max())
                                          / max(float(adapters[0][k].abs().max()), 1e-8) for k in adapters[0])
    summary["adapter_same_keys"] = set(adapters[0]) == set(adapters[1])
    checks = {
        "zero3 load growth <= 0.7 x model on each rank": max(summary["zero3"]["load_growth_over_model"]) <= 0.7,
        "zero3 run growth <= 0.7 x model on each rank": max(summary["zero3"]["run_growth_over_model"]) <= 0.7,
        "planner host row within 20 % of the load (zero3)": abs(summary["zero3"]["plan_over_measured_load"] - 1) <= 0.2,
        "planner host row within 20 % of the load (single)":
            abs(summary["single"]["plan_over_measured_load"] - 1) <= 0.2,
        # the order of the sums differs (2 ranks, or 2 accumulated micro-batches) and 30 layers carry it on
        "adapters equal (1e-3 of each tensor's largest value)": summary["adapter_same_keys"]
        and summary["adapter_max_rel_diff"] <= 1e-3,
    }
    summary["checks"] = checks
    print(json.dumps(summary, indent=2, default=str))
    if args.report is not None:
        from vlm_finetune.bench.data import replace_section

        replace_section(args.report, render(summary, " ".join(sys.argv[1:]), args.layers, args.steps), SECTION)
    del torch
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]), sys.argv[4:])
    else:
        main()
