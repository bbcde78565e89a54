"""`python -m vlm_finetune.export run_dir=outputs/... [merge=true] [out=...] [dtype=auto]`

Writes what a finished (or checkpointed) run trained as a folder other tools load:
- adapter only (default): the run's PEFT adapter folder (`PeftModel.from_pretrained(base, out)`), with the
  tokenizer and image processor;
- `merge=true`: a plain Hugging Face model folder with the LoRA weights folded into the base weights and
  fully trained parts (the projector) in place: config, safetensors weights, tokenizer, image processor.
  `AutoModelForImageTextToText.from_pretrained(out)` loads it without peft.

Either folder is written to a temporary folder beside `out` and renamed into place.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel

from vlm_finetune.adapters import load_adapter
from vlm_finetune.config import parse_overrides
from vlm_finetune.errors import ConfigError
from vlm_finetune.io import atomic_folder
from vlm_finetune.models import get_family
from vlm_finetune.precision import PRECISIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _run_config(run_dir: Path):
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"run_dir={run_dir} has no config.yaml; point run_dir at a training run's folder "
                          "(outputs/<model>/<date_time>)")
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise ConfigError(f"run_dir={run_dir} has no adapter/ folder: the run has not finished (a preempted run "
                          "writes it when it completes; resume it first)")
    return OmegaConf.load(config), adapter


def load_trained_model(run_dir: Path, dtype: torch.dtype = torch.float32):
    """(base model with the run's trained weights as a PeftModel, or the plain model when the run used no
    LoRA; the family processor; the run's config)."""
    cfg, adapter = _run_config(run_dir)
    family = get_family(cfg.model.family)
    model = load_adapter(family.build_model(cfg.model, dtype=dtype), adapter, dtype)
    processor = family.load_processor(cfg.model)
    model.eval()
    return model, processor, cfg


def export(run_dir: str | Path, merge: bool = False, out: str | Path | None = None, dtype: str = "auto") -> Path:
    """Write the adapter folder (or, with `merge`, the merged model folder) and return its path."""
    run_dir = Path(run_dir)
    cfg, adapter = _run_config(run_dir)
    out = Path(out) if out else run_dir / "export" / ("merged" if merge else "adapter")
    if merge:
        if dtype == "auto":
            torch_dtype = PRECISIONS.get(cfg.precision.name, (None, torch.float32))[1]
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise ConfigError(f"dtype={dtype!r}: use auto (the run's weight dtype), {', '.join(DTYPES)}")
    with atomic_folder(out) as tmp:
        if not merge:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        else:
            model, processor, _ = load_trained_model(run_dir, torch.float32)  # fold in float32, then cast
            if isinstance(model, PeftModel):  # runs without LoRA load as plain models
                model = model.merge_and_unload()
            get_family(cfg.model.family).save_merged(model.to(torch_dtype), tmp, processor)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_overrides(list(sys.argv[1:] if argv is None else argv),
                                  {"run_dir": None, "merge": False, "out": None, "dtype": "auto"})
        if not options["run_dir"]:
            raise ConfigError("run_dir=... is required: the folder of a training run")
        folder = export(options["run_dir"], bool(options["merge"]), options["out"], str(options["dtype"]))
    except ConfigError as err:
        print(f"vlm_finetune.export: error: {err}", file=sys.stderr, flush=True)
        return 2
    kind = "merged model" if options["merge"] else "adapter"
    print(f"vlm_finetune.export: {kind} written to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
