"""precision=nf4 (QLoRA): the LLM's frozen linear layers become bitsandbytes 4-bit layers and its fused MoE experts are
quantised per expert (moe_nf4), on the device they will run on.

A checkpoint folder is quantised as it is read (`stream_quantised`): the model is built on the meta device, the
parts outside the decoder layers (towers, projector, embeddings, head) are filled in the load dtype, then each
decoder layer in turn is given memory, filled from the folder one tensor at a time and quantised at once, its
16-bit weights freed before the next layer is read. The host never holds more of the LLM in 16 bits than one
decoder layer (MGM-8x7B: 2.8 GB instead of 94 GB), and a GPU never more than one of its tensors.

A model built from its config (random weights: benchmarks, real-size rehearsals) is quantised the same way
(`build_quantised`): everything but the decoder layers is built and initialised as usual, the decoder layers
are created on the meta device, then each in turn is given memory, initialised by the LLM's own
`_init_weights` and quantised."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from vlm_finetune.models._sharded import ShardReader, stream_into
from vlm_finetune.models.moe_nf4 import quantize_experts_nf4

_ON_HOST = [False]
# what a 4-bit layer computes in: the dtype its model was loaded in (bf16 for precision=nf4, float32 for nf4-fp32)
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)


@contextmanager
def quantised_on_host() -> Iterator[None]:
    """Inside, weights are quantised into host memory even where a GPU is present: FSDP (trainer=fsdp) then moves
    only each rank's shard of the 4-bit bytes to its GPU, instead of every rank holding the whole 4-bit model there."""
    _ON_HOST[0] = True
    try:
        yield
    finally:
        _ON_HOST[0] = False


def quantization_device() -> torch.device:
    """Where quantised weights live: this process's GPU, or the CPU (no GPU, or inside `quantised_on_host`)."""
    if torch.cuda.is_available() and not _ON_HOST[0]:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def quantize_linear_nf4(root: nn.Module) -> int:
    """Every nn.Linear under `root` (decoder layers) becomes a bitsandbytes 4-bit layer (nf4, double-quantised
    statistics), quantised on `quantization_device()` from its weight as loaded and computing in that weight's
    dtype (bf16 under precision=nf4, float32 under nf4-fp32). Returns how many layers were quantised."""
    import bitsandbytes as bnb

    device = quantization_device()
    count = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            dtype = child.weight.dtype if child.weight.dtype in COMPUTE_DTYPES else torch.bfloat16
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", dtype), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first eval forward without
            # gradients (on CPUs with AVX512-BF16) and keeps it repacked: its later training forwards then compute
            # in another kernel and pass no gradient to the layer's input (gemv_4bit has no autograd). Training here
            # validates between steps, so the layers keep the training kernel.
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))  # the move quantises
            count += 1
    return count


def quantize_layers_nf4(root: nn.Module) -> None:
    """nf4 for everything under `root` that QLoRA quantises: its linear layers and its fused MoE experts."""
    quantize_linear_nf4(root)
    quantize_experts_nf4(root, device=quantization_device())


def materialise_outside(model: nn.Module, inside: nn.Module, device: str | torch.device) -> None:
    """`model.to_empty(device)` for every parameter and buffer not under `inside`, which stays on the meta device.
    A tensor shared by two modules (a tied head) stays one tensor."""
    skipped = {id(m) for m in inside.modules()}
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if id(module) in skipped:
            continue
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or tensor.device.type != "meta":
                    continue
                if id(tensor) not in made:
                    empty = torch.empty_like(tensor, device=device)
                    made[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                        if isinstance(tensor, nn.Parameter) else empty)
                store[name] = made[id(tensor)]


def stream_quantised(model: nn.Module, layers_name: str, sources: dict[str, list[str]],
                     assemble: Callable, reader: ShardReader, skip: set[str] = frozenset(),
                     device: str | torch.device = "cpu") -> None:
    """Fill `model` (built on the meta device) from `reader` and quantise its decoder layers (`layers_name`, an
    nn.ModuleList) to nf4 one layer at a time: the rest first, on `device` in its dtype, then each layer given
    memory, filled and quantised before the next. `sources`, `assemble`, `skip` as for `stream_into`."""
    layers = model.get_submodule(layers_name)
    materialise_outside(model, layers, device)
    prefix = layers_name + "."
    stream_into(model, {n: s for n, s in sources.items() if not n.startswith(prefix)}, assemble, reader, skip)
    for index, layer in enumerate(layers):
        layer.to_empty(device=device)
        own = f"{prefix}{index}."
        stream_into(layer, {n[len(own):]: s for n, s in sources.items() if n.startswith(own)}, assemble, reader)
        quantize_layers_nf4(layer)


@contextmanager
def created_on_meta(classes: tuple[type[nn.Module], ...]) -> Iterator[None]:
    """Inside, every instance of `classes` (and of their subclasses) is created on the meta device: its
    constructor runs under `torch.device("meta")`, so it holds no memory and draws no random numbers."""
    saved = {cls: cls.__dict__.get("__init__") for cls in classes}

    def on_meta(init):
        def __init__(self, *args, **kwargs):
            with torch.device("meta"):
                init(self, *args, **kwargs)
        return __init__

    for cls in classes:
        cls.__init__ = on_meta(cls.__init__)
    try:
        yield
    finally:
        for cls, init in saved.items():
            if init is None:
                del cls.__init__  # it was inherited
            else:
                cls.__init__ = init


def build_quantised(make: Callable[[], nn.Module], layer_classes: tuple[type[nn.Module], ...], layers_name: str,
                    owner_name: str, device: str | torch.device = "cpu") -> nn.Module:
    """`make()` (a model built from its config) with its decoder layers (`layers_name`, instances of
    `layer_classes`) quantised to nf4 one at a time: created on the meta device, then each given memory on
    `device`, initialised by the transformers model that owns them (`owner_name`; its `_init_weights`, module by
    module, children first, as its `post_init` does) and quantised before the next one exists."""
    with created_on_meta(layer_classes):
        model = make()
    owner = model.get_submodule(owner_name)
    layers = model.get_submodule(layers_name)
    if not any(p.device.type == "meta" for p in layers.parameters()):
        raise RuntimeError(f"{layers_name} was not created on the meta device: its layers are not of "
                           f"{[c.__name__ for c in layer_classes]}")
    for layer in layers:
        layer.to_empty(device=device)
        with torch.no_grad():
            for module in _children_first(layer):
                owner._init_weights(module)
        quantize_layers_nf4(layer)
    return model


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _children_first(child)
    yield module
