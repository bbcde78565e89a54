"""4-bit MoE experts (precision=nf4): transformers 5 stores the routed experts of Mixtral and GLM-4.5V as fused 3-D
parameters (experts x out x in), which bitsandbytes' Linear4bit replacement never sees. Here each expert's matrix is
quantised on its own with bitsandbytes' nf4 (`quantize_4bit`, blocks of 64, one float32 absmax per block) and held as
packed codes; `self.gate_up_proj[e]` dequantises expert e alone (`dequantize_4bit`). The module runs the eager
expert loop of transformers through moe_loop.expert_loop, whose 4-bit linear dequantises expert e for its tokens
and again in backward (nothing saved), so no step holds more than one expert's matrix in 16 bits: transformers' own
loop would keep every dequantised matrix it used for the input's gradient, a layer's whole stack in 16 bits."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from vlm_finetune.models.moe_loop import expert_loop

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64
CODE_BYTES = 16 * 4  # the nf4 code book: 16 float32 values, kept with each quantised tensor


def expert_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding fused 3-D expert weights (gate_up_proj and down_proj parameters; under ZeRO-3 a partitioned
    parameter's own shape is an empty placeholder, its whole shape `ds_shape`)."""
    return [(name, m) for name, m in root.named_modules()
            if all(isinstance(m._parameters.get(t), torch.Tensor)
                   and len(getattr(m._parameters[t], "ds_shape", m._parameters[t].shape)) == 3
                   for t in EXPERT_TENSORS)]


def nf4_bytes(experts: int, rows: int, cols: int) -> int:
    """Bytes one fused expert tensor holds in nf4 here: packed codes, absmax per block of each expert, the code book."""
    per_expert = rows * cols
    return experts * (math.ceil(per_expert / 2) + 4 * math.ceil(per_expert / BLOCKSIZE)) + CODE_BYTES


class _ExpertView:
    """What `experts.gate_up_proj` reads as once quantised: indexing by an expert dequantises that expert."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.shape = torch.Size(module._nf4_shapes[name])
        self.dtype = module._nf4_dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:  # PEFT's LoRA wrapper places its adapter by it (moe_lora.nf4_targets_for_peft)
        return getattr(self.module, f"{self.name}_nf4").device

    def __getitem__(self, expert) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        m, name = self.module, self.name
        # float32 again should a wrapper have cast the module's floating buffers (DeepSpeed's module.bfloat16())
        state = bnbf.QuantState(absmax=getattr(m, f"{name}_absmax")[expert].float(), shape=self.shape[1:],
                                code=getattr(m, f"{name}_code").float(), blocksize=BLOCKSIZE, quant_type="nf4",
                                dtype=self.dtype)
        return bnbf.dequantize_4bit(getattr(m, f"{name}_nf4")[expert], state)


def _view_property(name: str) -> property:
    return property(lambda self: _ExpertView(self, name))


_CLASSES: dict[type, type] = {}


def _nf4_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    return expert_loop(self, {}, hidden_states, top_k_index, top_k_weights)


def _quantized_class(cls: type) -> type:
    """A subclass of the experts class (ZeRO-3 leaf checks and isinstance still hold) whose weights are views and
    whose forward is the eager expert loop, one expert dequantised at a time (other kernels would read the fused
    tensors whole)."""
    if cls not in _CLASSES:
        body = {t: _view_property(t) for t in EXPERT_TENSORS}
        body["forward"] = _nf4_forward
        body["__doc__"] = f"{cls.__name__} with nf4 expert weights (vlm_finetune.models.moe_nf4)."
        _CLASSES[cls] = type(f"Nf4{cls.__name__}", (cls,), body)
    return _CLASSES[cls]


def quantize_experts_nf4(root: nn.Module, device: torch.device | str | None = None) -> int:
    """Quantise every fused expert tensor under `root` per expert to nf4, in place; returns the number of expert
    modules quantised. The packed codes stay a (frozen, uint8) parameter that records the full shape, so parameter
    counts are unchanged; absmax and the code book are buffers."""
    import bitsandbytes.functional as bnbf

    count = 0
    for _, module in expert_modules(root):
        shapes, dtype = {}, None
        for name in EXPERT_TENSORS:
            weight = module._parameters.pop(name).detach()
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.bfloat16
            target = torch.device(device) if device is not None else weight.device
            packed, absmax, code = [], [], None
            for expert in weight.to(target):
                q, state = bnbf.quantize_4bit(expert.contiguous(), blocksize=BLOCKSIZE, compress_statistics=False,
                                              quant_type="nf4")
                packed.append(q.view(-1))
                absmax.append(state.absmax)
                code = state.code
            codes = nn.Parameter(torch.stack(packed), requires_grad=False)
            codes.quant_state = SimpleNamespace(shape=tuple(weight.shape))  # logical size (two codes per byte)
            module.register_parameter(f"{name}_nf4", codes)
            module.register_buffer(f"{name}_absmax", torch.stack(absmax))
            module.register_buffer(f"{name}_code", code.clone())
            shapes[name] = tuple(weight.shape)
        module._nf4_shapes, module._nf4_dtype = shapes, dtype
        module.__class__ = _quantized_class(type(module))
        count += 1
    return count


def quantized_bytes(root: nn.Module) -> int:
    """Bytes the quantised experts under `root` really hold (codes, absmax, code books)."""
    total = 0
    for module in root.modules():
        for name in getattr(module, "_nf4_shapes", {}):
            total += sum(getattr(module, f"{name}_{part}").nbytes for part in ("nf4", "absmax", "code"))
    return total
