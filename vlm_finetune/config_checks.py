"""Every check of a run's settings that needs no weights (`check_settings`, on the settings config.read_settings
read): the settings read and checked, the
trainability modes, the hardware profile resolved and checked against the strategy and precision, the packages an
option needs, and `+key=value` overrides that nothing would read. It fails in seconds, before any weight loads,
naming the option and the fix."""
from __future__ import annotations

import importlib.util

from vlm_finetune.autotune import check_auto_options
from vlm_finetune.config import hydra_overrides
from vlm_finetune.data.packing import pack_length
from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import Hardware, preflight, resolve
from vlm_finetune.models.base import Mode, Part
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.precision import check_precision, is_nf4
from vlm_finetune.settings import RunSettings
from vlm_finetune.strategies import check_combination, check_expert_parallel


def check_settings(settings: RunSettings) -> tuple[dict, Hardware]:
    """Every check that needs no weights: fails in seconds with the option and the fix. Returns the trainability
    modes and the resolved hardware profile."""
    modes = parse_trainability(settings.trainability)
    check_precision(settings.precision)
    hardware = resolve(settings.hardware)
    check_combination(settings.strategy, hardware, settings.precision)
    if settings.strategy.expert_parallel > 1:  # the model's experts from its config, no weights
        spec = settings.model
        experts = get_family(spec.family).memory_dims(spec, spec.image_size).get("experts")
        check_expert_parallel(settings.strategy, spec.name, experts, modes[Part.LLM] == Mode.FULL,
                              modes[Part.LLM] == Mode.LORA and settings.lora.llm_modules in ("mlp", "experts", "all"),
                              settings.lora.expert_forward)
    preflight(hardware, settings.precision)
    if is_nf4(settings.precision) and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("precision=nf4 (QLoRA) loads the base in 4-bit with bitsandbytes, which is not installed: "
                          "pip install 'vlm_finetune[qlora]' (CUDA GPUs, and CPUs for rehearsal with tiny models)")
    check_auto_options(settings, hardware)
    acc = settings.accumulate_grad_batches
    if isinstance(acc, bool) or not isinstance(acc, int) or acc < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={acc!r} must be a positive integer")
    _check_values(settings)
    attn = settings.model.attn_implementation
    if attn.startswith("flash_attention"):  # transformers would refuse it only as the model loads
        package = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface"
        if hardware.accelerator != "gpu" or importlib.util.find_spec(package) is None:
            raise ConfigError(f"model.attn_implementation={attn} needs a CUDA GPU and the {package} package "
                              f"({'none present' if hardware.accelerator != 'gpu' else 'not installed'}); use sdpa")
    if settings.loss.impl == "liger":
        if hardware.accelerator != "gpu":
            raise ConfigError("loss.impl=liger needs a CUDA GPU (Triton kernels); use loss.impl=chunked")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("loss.impl=liger needs liger-kernel: pip install 'vlm_finetune[gpu]'")
    return modes, hardware


# `+key=value` overrides that add keys something reads (everything else a `+` adds would be ignored)
ADDABLE_KEYS = ("callbacks.", "data.global_batch_size", "model.llm.", "model.vision.", "model.text.",
                "model.config_overrides", "model.tokenizer_kind", "model.tokenizer_legacy", "hydra.")


def _check_values(settings: RunSettings) -> None:
    """Values that would otherwise fail only once the model is built (or never)."""
    steps = settings.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"trainer.max_steps={steps!r} must be 0 or a positive number of optimizer steps")
    pack_length(settings.data)  # data.packing's row length fits every sample
    added = [o for o in (hydra_overrides() or []) if o.startswith("+") and not o.startswith("++")]
    unread = [o for o in added if not o.lstrip("+").split("=", 1)[0].startswith(ADDABLE_KEYS)]
    if unread:
        raise ConfigError(f"{unread[0]} adds a key that nothing reads (a misspelling?); drop the '+' to override an "
                          f"existing key (an unknown one is then named), or use one of: {', '.join(ADDABLE_KEYS)}")
