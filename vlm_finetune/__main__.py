"""`python -m vlm_finetune [overrides]`: train as configured by conf/train.yaml and its groups."""
from __future__ import annotations

import sys
from pathlib import Path

from vlm_finetune.signals import StopRequested, ignore_after_finish, install_early, stop_on_interrupt

install_early()  # before the slow imports: an early SLURM warning must not kill the process
stop_on_interrupt()  # Ctrl-C while starting: a message and exit 130, not a traceback

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vlm_finetune.config import CONF_DIR  # noqa: E402  (registers the resolvers conf/train.yaml uses)
from vlm_finetune.errors import ConfigError, DataError, WriteFailed  # noqa: E402

CONFIG_DIR = str(CONF_DIR)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vlm_finetune.memory.oom import TrainingOutOfMemory
    from vlm_finetune.rundir import remove_created
    from vlm_finetune.train import train
    from vlm_finetune.watchdog import RunHung

    try:
        metrics, _ = train(cfg)
        # finished, or saved and requeued: a late time-limit warning must not turn the exit into a failure
        ignore_after_finish()
    except (ConfigError, DataError) as err:
        print(f"vlm_finetune: error: {err}", file=sys.stderr, flush=True)
        remove_created(Path(cfg.output_dir))  # a refused start leaves behind nothing it made
        sys.exit(2)
    except TrainingOutOfMemory as err:  # the report is in the run folder
        print(f"vlm_finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(TrainingOutOfMemory.exit_code)
    except StopRequested as err:  # Ctrl-C outside the training steps (those save and stop: see below)
        run_dir = Path(cfg.output_dir)
        print(f"vlm_finetune: {err}: stopped without saving; any earlier checkpoint in {run_dir / 'checkpoints'} "
              "is kept. Rerun the same command (same run folder, resume=auto) to continue", file=sys.stderr,
              flush=True)
        sys.exit(128 + err.signum)
    except WriteFailed as err:  # a full disk: path and free space named, the previous file kept
        print(f"vlm_finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(WriteFailed.exit_code)
    except RunHung as err:  # a collective timed out: the message names the rank and the step
        print(f"vlm_finetune: error: {err}", file=sys.stderr, flush=True)
        sys.exit(RunHung.exit_code)
    if metrics.get("stop_signal"):  # stopped on request (SIGTERM): saved, but not finished
        sys.exit(128 + int(metrics["stop_signal"]))
    return metrics.get("val_accuracy")  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
