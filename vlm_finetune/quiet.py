"""Third-party noise at start, stopped before the libraries load (`vlm_finetune/__init__.py` calls `quiet_start`):
messages about things this project never does, which read like errors. What concerns the run stays."""
from __future__ import annotations

import logging
import sys

# loggers whose warnings at import concern nothing a run does, with why
QUIET_LOGGERS = {
    # bitsandbytes' CPU backend (imported by peft and transformers whenever bitsandbytes is installed) asks the
    # `kernels` package for an optional gemm kernel from the Hugging Face hub and warns when it cannot have it;
    # bitsandbytes' own CPU kernels run either way
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_start() -> None:
    """Silence the loggers above, and keep the `kernels` package (downloads compiled kernels from the Hugging Face
    hub and loads them) from being imported by the libraries here: nothing is fetched from the hub and no code of
    it runs, as for model folders (model.trust_remote_code). A program that imported `kernels` itself keeps it."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if "kernels" not in sys.modules:
        sys.modules["kernels"] = None  # `import kernels` raises ImportError: the libraries take it as absent
