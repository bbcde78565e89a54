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

import json
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import PeftModel

from vlm_finetune.adapters import load_adapter
from vlm_finetune.config import model_settings, parse_overrides, remote_code_as_asked
from vlm_finetune.errors import ConfigError, WriteFailed
from vlm_finetune.io import atomic_folder
from vlm_finetune.models.registry import get_family
from vlm_finetune.precision import PRECISIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


EXPORT_MARKER = "vlm_finetune_export.json"  # in every folder export writes: only such a folder is replaced


def _run_config(run_dir: Path, trust_remote_code: bool = False):
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"run_dir={run_dir} has no config.yaml; point run_dir at a training run's folder "
                          "(outputs/<model>/<date_time>)")
    adapter = run_dir / "adapter"
    if not adapter.is_dir() or not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"run_dir={run_dir} holds no finished run (adapter/ and metrics.json are written when "
                          "training completes; a stopped or preempted run has only its checkpoint: resume it first)")
    cfg = OmegaConf.load(config)
    remote_code_as_asked(cfg.model, trust_remote_code, f"run_dir={run_dir}")
    return cfg, adapter


def check_output_folder(out: Path, run_dir: Path) -> None:
    """`out` may be new, empty, or an earlier export (it holds EXPORT_MARKER); never the run folder, a folder
    holding it, or a folder with files this project did not write there."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise ConfigError(f"out={out} is the run folder or holds it; exporting there would replace the run. "
                          f"Choose another folder (default: {run_dir}/export/...)")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / EXPORT_MARKER).is_file())):
        raise ConfigError(f"out={out} already exists and holds files vlm_finetune did not export there; nothing "
                          "was changed. Choose a new or empty folder")


def load_trained_model(run_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(base model with the run's trained weights as a PeftModel, or the plain model when the run used no
    LoRA; the family processor; the run's config)."""
    cfg, adapter = _run_config(run_dir, trust_remote_code)
    spec = model_settings(cfg.model)
    family = get_family(spec.family)
    model = load_adapter(family.build_model(spec, dtype=dtype), adapter, dtype)
    processor = family.load_processor(spec, truncation=str(cfg.data.truncation))
    model.eval()
    return model, processor, cfg


def export(run_dir: str | Path, merge: bool = False, out: str | Path | None = None, dtype: str = "auto",
           trust_remote_code: bool = False) -> Path:
    """Write the adapter folder (or, with `merge`, the merged model folder) and return its path."""
    run_dir = Path(run_dir)
    cfg, adapter = _run_config(run_dir, trust_remote_code)
    out = Path(out) if out else run_dir / "export" / ("merged" if merge else "adapter")
    check_output_folder(out, run_dir)
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
            # fold in float32, then cast
            model, processor, _ = load_trained_model(run_dir, torch.float32, trust_remote_code)
            if isinstance(model, PeftModel):  # runs without LoRA load as plain models
                model = model.merge_and_unload()
            get_family(cfg.model.family).save_merged(model.to(torch_dtype), tmp, processor)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"run_dir": str(run_dir.resolve()), "merged": bool(merge)}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_overrides(list(sys.argv[1:] if argv is None else argv),
                                  {"run_dir": None, "merge": False, "out": None, "dtype": "auto",
                                   "trust_remote_code": False})
        if not options["run_dir"]:
            raise ConfigError("run_dir=... is required: the folder of a training run")
        folder = export(options["run_dir"], bool(options["merge"]), options["out"], str(options["dtype"]),
                        bool(options["trust_remote_code"]))
    except ConfigError as err:
        print(f"vlm_finetune.export: error: {err}", file=sys.stderr, flush=True)
        return 2
    except WriteFailed as err:  # a full disk: the message names the path and the free space
        print(f"vlm_finetune.export: error: {err}", file=sys.stderr, flush=True)
        return WriteFailed.exit_code
    kind = "merged model" if options["merge"] else "adapter"
    print(f"vlm_finetune.export: {kind} written to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
