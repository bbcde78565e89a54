"""`python -m vlm_finetune.generate model=tiny_glm41v adapter=outputs/.../adapter image=cat.png prompt="What is this?"`

Answers one question about one image, greedily, with the base model (a `conf/model` name; `model_path=` for a
local checkpoint folder) and, if given, a trained adapter folder. `run_dir=<run>` takes the model and the
adapter from a training run instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlm_finetune.adapters import is_adapter_folder, load_adapter
from vlm_finetune.config import compose, group_options, model_settings, parse_overrides, remote_code_as_asked
from vlm_finetune.data.images import load_rgb
from vlm_finetune.data.rules import placeholder_problem
from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, Message, Sample
from vlm_finetune.errors import ConfigError, DataError
from vlm_finetune.models._sharded import check_model_folder
from vlm_finetune.models.registry import get_family
from vlm_finetune.trainability import unwrap


def _model_config(model: str | None, model_path: str | None, run_dir: str | None, trust_remote_code: bool = False):
    from omegaconf import OmegaConf

    if run_dir:
        config = Path(run_dir) / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"run_dir={run_dir} has no config.yaml; point it at a training run's folder")
        cfg = OmegaConf.load(config)
        remote_code_as_asked(cfg.model, trust_remote_code, f"run_dir={run_dir}")
        return cfg
    if not model:
        raise ConfigError("model=<name> (one of conf/model/*.yaml) or run_dir=<run folder> is required")
    available = group_options("model")
    if model not in available:
        raise ConfigError(f"model={model!r} is not a model config; use one of {available} "
                          "(and model_path=/a/checkpoint for a local checkpoint folder)")
    overrides = [f"model={model}"] + ([f"model.path={model_path}"] if model_path else [])
    return compose(overrides, output_dir="/tmp")


def answer(image: str | Path, prompt: str, model: str | None = None, adapter: str | Path | None = None,
           model_path: str | None = None, run_dir: str | Path | None = None, max_new_tokens: int = 64,
           trust_remote_code: bool = False) -> str:
    """The model's greedy answer to `prompt` about `image`."""
    from PIL import UnidentifiedImageError

    cfg = _model_config(model, model_path, str(run_dir) if run_dir else None, trust_remote_code)
    spec = model_settings(cfg.model)
    if run_dir and adapter is None:
        adapter = Path(run_dir) / "adapter"
    text = prompt if IMAGE_PLACEHOLDER in prompt else f"{IMAGE_PLACEHOLDER}{prompt}"
    sample_messages = [Message("user", text), Message("assistant", "")]
    problem = placeholder_problem(sample_messages, 1)  # the processors' rule (data/rules.py), before any weight
    if problem is not None:
        raise ConfigError(f"prompt={prompt!r} {problem}: generate takes one image (image=), so the prompt holds "
                          f"at most one '{IMAGE_PLACEHOLDER}' (none: the image goes first)")
    try:
        picture = load_rgb(image)
    except DataError as err:  # a size the processors refuse
        raise ConfigError(f"image={image}: {err}") from None
    except (OSError, UnidentifiedImageError) as err:
        raise ConfigError(f"image={image}: cannot be read as an image ({err})") from None
    if adapter is not None and not is_adapter_folder(Path(adapter)):
        raise ConfigError(f"adapter={adapter} is not an adapter folder (no adapter_config.json); use a run's "
                          "adapter/ folder or the output of python -m vlm_finetune.export")
    family = get_family(spec.family)
    if spec.path:  # weight files read before the load (a clear error for a corrupt or incomplete folder)
        check_model_folder(family.checkpoint_folder(spec))
    processor = family.load_processor(spec, truncation=str(cfg.data.truncation))
    network = family.build_model(spec, dtype=torch.float32)
    if adapter is not None:
        network = load_adapter(network, Path(adapter))
    network.eval()
    sample = Sample(sample_messages, [picture])
    encoded = processor.encode(sample, None, for_generation=True)
    batch = processor.collate([encoded], padding_side="left")
    inputs = {k: v for k, v in batch.items() if k in family.input_keys}
    with torch.no_grad():
        output = unwrap(network).generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False,
                                          eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:])


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_overrides(list(sys.argv[1:] if argv is None else argv),
                                  {"model": None, "model_path": None, "adapter": None, "run_dir": None,
                                   "image": None, "prompt": None, "max_new_tokens": 64,
                                   "trust_remote_code": False})
        if not options["image"] or not options["prompt"]:
            raise ConfigError("image=<file> and prompt=<question> are required")
        reply = answer(options["image"], options["prompt"], options["model"], options["adapter"],
                       options["model_path"], options["run_dir"], options["max_new_tokens"],
                       bool(options["trust_remote_code"]))
    except ConfigError as err:
        print(f"vlm_finetune.generate: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(reply, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
