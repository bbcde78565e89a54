"""4-bit weights under sharding (precision=nf4 with trainer=fsdp or trainer=zero3). FSDP and DeepSpeed ZeRO-3 shard
and all-gather a parameter as a flat tensor of its dtype, and may cast it first (FSDP to its mixed-precision
param_dtype, DeepSpeed's engine to its bf16/fp16 dtype with `module.bfloat16()`). 4-bit codes packed in uint8 are
refused, or cast as numbers (corrupt: accelerate#3983, loss 0 and NaN gradients); so, as in FSDP-QLoRA and PEFT's
ZeRO-3 + QLoRA (bitsandbytes' `quant_storage`), the packed bytes are viewed as a floating dtype the engine leaves
alone: it moves them untouched and each rank stores 1/N of them. The quantisation statistics (absmax, code books)
are no parameters: they stay whole on every rank."""
from __future__ import annotations

import torch
from torch import nn

from vlm_finetune.errors import ConfigError

# the storage FSDP2 shards 4-bit codes in: bytes viewed in the dtype of the 16-bit base they replace
FOUR_BIT_STORAGE = torch.bfloat16


def _four_bit_tensors(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, name, parameter) of every packed 4-bit weight: bitsandbytes' Linear4bit weights and the nf4 MoE
    experts' codes (models/moe_nf4.py)."""
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if type(param).__name__ == "Params4bit" or (name.endswith("_nf4") and hasattr(param, "quant_state")):
                found.append((module, name, param))
    return found


def store_4bit_as(model: nn.Module, dtype: torch.dtype) -> int:
    """View every packed 4-bit weight of `model` as `dtype` (a floating dtype the sharding engine leaves alone),
    the bytes unchanged; returns how many. bitsandbytes reads any storage dtype back as its bytes."""
    count = 0
    for module, name, param in _four_bit_tensors(model):
        if getattr(param, "quant_state", None) is not None and hasattr(module, "quant_state"):
            # FSDP re-wraps the weight as a plain parameter: bitsandbytes restores the state from the module
            module.quant_state = param.quant_state
        if param.dtype == dtype:
            continue
        data = param.data
        experts = data.dim() == 2 and data.shape[1] != 1  # MoE codes: one row of bytes per expert, sharded by row
        row_bytes = data.shape[1] * data.element_size() if experts else data.numel() * data.element_size()
        if row_bytes % torch.empty((), dtype=dtype).element_size():
            raise ConfigError(f"{name} of a {type(module).__name__} holds {row_bytes} bytes of 4-bit codes per row, "
                              f"which cannot be viewed as {dtype}; use trainer=ddp or trainer=zero2 with precision=nf4")
        flat = data.contiguous().view(torch.uint8)
        param.data = flat.view(dtype) if experts else flat.reshape(-1).view(dtype).reshape(-1, 1)
        if hasattr(param, "quant_storage"):
            param.quant_storage = dtype
        if hasattr(module, "quant_storage"):
            module.quant_storage = dtype
        # bitsandbytes repacks weights for its CPU kernel in eval (AVX512-BF16): never on bytes an engine gathers
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        count += 1
    return count


def check_4bit_storage(model: nn.Module, gather_dtype: torch.dtype | None, trainer: str = "trainer=fsdp",
                       engine: str = "FSDP") -> None:
    """Refuse a model whose sharded parameters the engine would corrupt: integer storage (4-bit codes in uint8) or
    4-bit bytes stored in another dtype than the one the engine casts its parameters to (`gather_dtype`; None: no
    cast)."""
    cast = "" if gather_dtype is None else f" cast to {gather_dtype}"
    for module, name, param in _four_bit_tensors(model):
        if not param.dtype.is_floating_point or (gather_dtype is not None and param.dtype != gather_dtype):
            raise ConfigError(
                f"{trainer}: {name} of a {type(module).__name__} holds 4-bit codes in {param.dtype} storage, but "
                f"{engine} gathers floating-point parameters{cast}: "
                "it would refuse or cast the packed codes as numbers and train on garbage. Store them as "
                f"{gather_dtype or FOUR_BIT_STORAGE} (bitsandbytes' quant_storage; store_4bit_as does it for "
                "precision=nf4), or use trainer=ddp / trainer=zero2 with precision=nf4")
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise ConfigError(f"{trainer} cannot shard {name} ({param.dtype}): {engine} all-gathers floating-point "
                              "tensors only. Store it in a floating dtype (bitsandbytes' quant_storage), or use "
                              "trainer=ddp / trainer=zero2")
