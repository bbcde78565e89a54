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
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vlm_finetune.errors import ConfigError
from vlm_finetune.train import replace_folder

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
    from vlm_finetune.models import get_family

    cfg, adapter = _run_config(run_dir)
    family = get_family(cfg.model.family)
    model = family.build_model(cfg.model, dtype=dtype)
    processor = family.load_processor(cfg.model)
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    else:  # full / projector-only training: the trained tensors are in non_lora_trainables
        from safetensors.torch import load_file

        trained = load_file(str(adapter / "non_lora_trainables.safetensors"))
        names = set(dict(model.named_parameters()))
        unknown = sorted(set(trained) - names)
        if unknown:
            raise ConfigError(f"{adapter}/non_lora_trainables.safetensors holds {len(unknown)} tensor(s) this model "
                              f"does not have, e.g. {unknown[0]}: was the run made with another model?")
        model.load_state_dict({k: v.to(dtype) for k, v in trained.items()}, strict=False)
    model.eval()
    return model, processor, cfg


def export(run_dir: str | Path, merge: bool = False, out: str | Path | None = None, dtype: str = "auto") -> Path:
    """Write the adapter folder (or, with `merge`, the merged model folder) and return its path."""
    from vlm_finetune.models import get_family

    run_dir = Path(run_dir)
    cfg, adapter = _run_config(run_dir)
    out = Path(out) if out else run_dir / "export" / ("merged" if merge else "adapter")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        if not merge:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        else:
            if dtype == "auto":
                from vlm_finetune.train import PRECISIONS

                torch_dtype = PRECISIONS.get(cfg.precision.name, (None, torch.float32))[1]
            elif dtype in DTYPES:
                torch_dtype = DTYPES[dtype]
            else:
                raise ConfigError(f"dtype={dtype!r}: use auto (the run's weight dtype), {', '.join(DTYPES)}")
            model, processor, _ = load_trained_model(run_dir, torch.float32)  # fold in float32, then cast
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            model = model.to(torch_dtype)
            family = get_family(cfg.model.family)
            if hasattr(family, "save_merged"):  # a family with its own checkpoint layout (MGM)
                family.save_merged(model, tmp, processor)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
                processor.save_pretrained(str(tmp))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_overrides(argv: list[str], allowed: dict[str, object]) -> dict:
    """`key=value` arguments (the Hydra override look) into a dict; unknown keys are an error."""
    values = dict(allowed)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: write key=value, with key one of {sorted(allowed)}")
        key, value = arg.split("=", 1)
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r}; options: {sorted(allowed)}")
        default = allowed[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{key}={value!r}: use true or false")
            values[key] = value.lower() in ("true", "1", "yes")
        elif isinstance(default, int) and not isinstance(default, bool):
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: must be an integer") from None
        else:
            values[key] = value
    return values


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
