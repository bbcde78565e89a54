"""`python -m vlm_finetune [overrides]`: train as configured by conf/train.yaml and its groups."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vlm_finetune.errors import ConfigError, DataError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vlm_finetune.train import train

    try:
        metrics, _ = train(cfg)
    except (ConfigError, DataError) as err:
        print(f"vlm_finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return metrics.get("val_accuracy")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
