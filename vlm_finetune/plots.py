"""Training curves as a PNG in the run folder, drawn from the run's own CSV log."""
from __future__ import annotations

import csv
from pathlib import Path

from vlm_finetune.io import atomic_path


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from Lightning's CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_training_curves(run_dir: Path, out_name: str = "training_curves.png") -> Path | None:
    """Train loss per optimizer step (and learning rate) beside the validation metrics; None without data."""
    csv_path = Path(run_dir) / "csv" / "metrics.csv"
    if not csv_path.is_file():
        return None
    series = read_metrics_csv(csv_path)
    if "train_loss" not in series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = zip(*series["train_loss"])
    ax_loss.plot(steps, losses, lw=1.2, label="train_loss (per token, per step)")
    if "val_loss" in series:
        vs, vl = zip(*series["val_loss"])
        ax_loss.plot(vs, vl, "o-", label="val_loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("cross-entropy (nats / token)")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    accuracy_keys = sorted(k for k in series if k.startswith("val_accuracy"))
    for key in accuracy_keys:
        xs, ys = zip(*series[key])
        ax_val.plot(xs, ys, "o-" if key == "val_accuracy" else "o--", label=key)
    ax_val.set_ylim(0, 1.02)
    ax_val.set_xlabel("optimizer step")
    ax_val.set_ylabel("exact-match accuracy")
    ax_val.grid(alpha=0.3)
    if accuracy_keys:
        ax_val.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    with atomic_path(out, ext=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
