"""Third-party noise at start, silenced before the libraries load (`vlm_finetune/__init__.py` calls `quiet_start`):
messages about things no run here does, which read like errors. What concerns the run stays."""
from __future__ import annotations

import logging
import warnings

# loggers whose messages at import concern nothing a run does, with the level that still passes
QUIET_LOGGERS = {
    # bitsandbytes' CPU backend (imported by peft and transformers wherever bitsandbytes is installed) asks the
    # `kernels` package for an optional gemm kernel from the Hugging Face hub and warns when it cannot have it
    # (offline, or the publisher unverified); bitsandbytes' own CPU kernels run either way
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}
# single messages of loggers whose other messages stay (the start of the message)
QUIET_MESSAGES = {
    # DeepSpeed on import, on every machine without CUDA: "Setting accelerator to CPU. If you have GPU ... we were
    # unable to detect it." The hardware profile says where a run goes, and a GPU profile on a machine without its
    # GPUs stops in the preflight (hardware.preflight), saying what it expected and found
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_start() -> None:
    """Silence the loggers and messages above (set before the libraries create their loggers: a logger is one
    object per name, and its level and filters hold when the library configures it)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, starts in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


def quiet_run() -> None:
    """Silence the warnings a run expects (train() calls it), so that what is printed is worth reading."""
    # frozen parts are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # validation metrics are torchmetrics objects, already reduced across ranks
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # Lightning sees SLURM's tools installed; runs outside a job are not meant for SLURM
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system.*")
    # a resumed run puts the earlier rows back into metrics.csv (resume.restore_csv_rows)
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
