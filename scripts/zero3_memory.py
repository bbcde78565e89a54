"""What a ZeRO-3 rank holds over a whole run, against one process (issue 35): tiny_mgm_moe widened to 1.6 GB in
float32 (16 layers of 16 experts, hidden 1024), LoRA on the experts (the model's default, lora.llm_modules=all),
trained 2 steps on two CPU ranks under trainer=zero3 with the profile's defaults, with and without activation
checkpointing, and in one process with the same global batch. Each rank's resident growth over the whole run
(VmHWM at the end minus VmRSS before the run, scripts/load_memory.py's rank probe) is compared with the model's
bytes, and the adapters with each other.

    python scripts/zero3_memory.py [--out /tmp/zero3_memory] [--val-batch 2] [--layers 16] [extra overrides ...]

About 10 minutes and 12 GB on two cores. Prints one JSON summary; exits non-zero when a check fails (growth
<= 0.8 x the model without checkpointing, <= 0.7 x with it, adapters equal to 1e-4)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory import _run, rank_main  # noqa: E402  (the per-rank probe this script shares)

WIDE = ["model=tiny_mgm_moe", "model.llm.hidden_size=1024", "model.llm.intermediate_size=512",
        "model.llm.num_local_experts=16", "model.llm.num_hidden_layers=16", "model.llm.initializer_range=0.02"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/zero3_memory"))
    parser.add_argument("--val-batch", type=int, default=2, help="data.val_batch_size (validation at batch 100, the "
                        "shapes default, is not sized like training yet: issue 35)")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers of the widened model (16: 1.65 GB; "
                        "more to see how the growth over the model changes with its size)")
    parser.add_argument("extra", nargs="*", help="overrides added to the zero3 runs (to try DeepSpeed settings)")
    args = parser.parse_args()
    import load_memory
    from safetensors.torch import load_file

    from vlm_finetune.config import compose, model_settings
    from vlm_finetune.models.registry import get_family

    load_memory.__file__ = __file__  # the ranks run this script's own `--rank` entry
    wide = [o for o in WIDE if not o.startswith("model.llm.num_hidden_layers=")]
    common = [*wide, f"model.llm.num_hidden_layers={args.layers}", "precision=32-true", "trainer.max_steps=2",
              "data.num_train=32", "data.num_val=4",
              f"data.val_batch_size={args.val_batch}", "eval.generate=false", "lora.dropout=0.0", "optimizer=sgd",
              "optimizer.lr=0.2", "scheduler=constant", "trainer.enable_progress_bar=false", "memory.monitor=false"]
    cfg = compose(common)
    folder = get_family(cfg.model.family).checkpoint_folder(model_settings(cfg.model))
    model_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    zero3 = [*common, "trainer=zero3", "hardware=cpu", "hardware.devices=2", "data.micro_batch_size=2", *args.extra]
    runs = {"single": [*common, "trainer=single", "hardware=cpu", "data.micro_batch_size=2",
                       "trainer.accumulate_grad_batches=2"],
            "zero3": zero3, "zero3_checkpointing": [*zero3, "model.activation_checkpointing=true"]}
    summary: dict = {"model_bytes": model_bytes}
    for name, overrides in runs.items():
        ranks = _run(args.out / name, overrides)
        growth = [r["peak"] - r["rss_before"] for r in ranks]
        summary[name] = {"run_growth_per_rank_mib": [g // 2**20 for g in growth],
                         "run_growth_over_model": [round(g / model_bytes, 3) for g in growth]}
    adapters = {n: load_file(str(args.out / n / "run" / "adapter" / "adapter_model.safetensors")) for n in runs}
    for name in ("zero3", "zero3_checkpointing"):
        # relative to each tensor's largest value, with a floor of 1e-6 for a tensor that stays near zero (the
        # projector's unused bias: 4e-12, whose float32 noise would read as 4e-4)
        summary[name]["adapter_max_rel_diff"] = max(
            float((adapters[name][k] - v).abs().max()) / max(float(v.abs().max()), 1e-6)
            for k, v in adapters["single"].items())
    checks = {"zero3 growth <= 0.8 x model": max(summary["zero3"]["run_growth_over_model"]) <= 0.8,
              "zero3 + checkpointing growth <= 0.7 x model":
                  max(summary["zero3_checkpointing"]["run_growth_over_model"]) <= 0.7,
              "adapters equal (1e-4)": all(summary[n]["adapter_max_rel_diff"] <= 1e-4
                                           for n in ("zero3", "zero3_checkpointing"))}
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
