"""The precision policy, decided once: for a `precision=` profile and a strategy, Lightning's precision, the
dtype the weights load in, whether trainable weights are kept in float32, and the 4-bit quantisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_finetune.errors import ConfigError

PRECISIONS = {
    # name -> (Lightning precision, dtype the weights are loaded in). In the mixed profiles the frozen
    # base is loaded in half precision and trainable parameters are kept in float32 (master weights);
    # compute runs under autocast.
    "32-true": ("32-true", torch.float32),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16),
    "bf16-true": ("bf16-true", torch.bfloat16),
    "fp16-mixed": ("16-mixed", torch.float16),
    "nf4": ("bf16-mixed", torch.bfloat16),  # 4-bit frozen base (bitsandbytes), bf16 compute
    # 4-bit frozen base, the rest and the compute in float32 (bitsandbytes' compute dtype float32: each 4-bit weight
    # dequantised to float32): what a CPU has no fast bf16 for, and what an exact comparison of runs needs
    "nf4-fp32": ("32-true", torch.float32),
}
MIXED = ("bf16-mixed", "fp16-mixed", "nf4")
NF4 = ("nf4", "nf4-fp32")  # the profiles whose frozen LLM base is 4-bit (QLoRA)


def is_nf4(precision: str) -> bool:
    """Whether `precision` holds the LLM's frozen linear layers (and MoE experts) in 4 bits."""
    return precision in NF4


@dataclass(frozen=True)
class WeightsPolicy:
    lightning: str  # Lightning's `precision=` value
    load_dtype: torch.dtype  # the dtype the model is built or loaded in
    keep_trainables_fp32: bool  # trainable weights cast back to float32 master weights after the build
    quantization: str | None  # "nf4": the LLM's frozen linear layers in 4-bit, computing in load_dtype
    mixed: bool  # compute under autocast
    half: bool  # activations in 16 bits


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; use one of {sorted(PRECISIONS)} or auto")


def resolve_precision(asked: str, accelerator: str, supports_bf16: bool, hardware_name: str) -> tuple[str, str | None]:
    """(precision, why) for `precision=auto` (the default): bf16-mixed on GPUs with bf16, fp16-mixed (loss
    scaling) on GPUs without, 32-true on the CPU. Any other value is returned as given, with no reason."""
    if asked != "auto":
        check_precision(asked)
        return asked, None
    if accelerator != "gpu":
        return "32-true", (f"precision=auto: 32-true (hardware={hardware_name} is the CPU: float32 weights and "
                           "compute)")
    if supports_bf16:
        return "bf16-mixed", (f"precision=auto: bf16-mixed (hardware={hardware_name} supports bf16: the frozen base "
                              "in bf16, trainable weights in float32, bf16 autocast)")
    return "fp16-mixed", (f"precision=auto: fp16-mixed (hardware={hardware_name} has no bf16: float16 autocast with "
                          "loss scaling, float32 weights of what trains)")


def weights_policy(precision: str, strategy: str = "single") -> WeightsPolicy:
    """How the weights of a run under `precision` and `trainer.strategy` are held."""
    check_precision(precision)
    lightning, dtype = PRECISIONS[precision]
    mixed = precision in MIXED
    keep_fp32 = mixed
    return WeightsPolicy(lightning, dtype, keep_fp32, "nf4" if is_nf4(precision) else None, mixed,
                         dtype != torch.float32)
