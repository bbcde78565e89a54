"""Building and loading a model whose parameters DeepSpeed ZeRO-3 partitions as they are created
(`deepspeed.zero.Init`, which Lightning enters around `LightningModule.configure_model`): no rank ever holds
the whole model, only one module's (or one tensor's) whole weights at a time.

Inside `zero.Init` every module's parameters are split over the ranks as soon as its `__init__` ends, so an
initialisation that runs later (transformers' `post_init`, an `nn.init` call in a parent's `__init__`) would
write into an empty placeholder. `whole(params)` gathers them for such a write; `initialised_whole()` does it
for transformers' per-module initialisation. Every rank draws the same random numbers in the same order as one
process building the whole model, so the weights equal the unpartitioned ones."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def partitioning_active() -> bool:
    """Inside `deepspeed.zero.Init` (its module-construction hooks are in place)."""
    try:
        from deepspeed.runtime.zero import partition_parameters as pp
    except ImportError:
        return False
    return bool(getattr(pp, "zero_init_context", 0)) and pp.top_level_context is not None


@contextlib.contextmanager
def whole(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """While inside, partitioned `params` are whole on every rank; what rank 0 writes into them is kept (every
    rank computes the same values). Unpartitioned parameters pass through untouched."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


_SKIP_INIT = []  # non-empty while a checkpoint's weights are about to replace the initial ones


@contextlib.contextmanager
def skipped_init() -> Iterator[None]:
    """While inside (with `initialised_whole`), a model built to be loaded skips transformers' initialisation
    and `whole_for_init` gathers nothing: writes into the empty placeholders do nothing, and no gather per
    module is spent on weights that the checkpoint replaces."""
    _SKIP_INIT.append(True)
    try:
        yield
    finally:
        _SKIP_INIT.pop()


def whole_for_init(params: Iterable[torch.Tensor]):
    """`whole(params)` for an initialisation, unless the weights are about to be loaded (`skipped_init`)."""
    return contextlib.nullcontext() if _SKIP_INIT else whole(params)


@contextlib.contextmanager
def built_uninitialised() -> Iterator[None]:
    """While inside (within zero.Init), a model is built partitioned for a checkpoint to fill: no initialisation
    (torch's nor transformers'), no random number drawn (LoRA's come next, as in an ordinary load)."""
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(devices=[]), no_init_weights(), initialised_whole(), skipped_init():
        yield


def built_for_loading(make, dtype: torch.dtype) -> tuple[nn.Module, bool]:
    """`make()`'s model, to be filled from a checkpoint, and whether it is partitioned: inside zero.Init built
    partitioned with no initialisation (in the init's dtype), otherwise on the meta device in `dtype`."""
    if partitioning_active():
        with built_uninitialised():
            return make(), True
    with torch.device("meta"):
        return make().to(dtype), False


@contextlib.contextmanager
def initialised_whole() -> Iterator[None]:
    """transformers' weight initialisation (`PreTrainedModel._initialize_weights`, module by module) writes
    into whole parameters while a model is built under `zero.Init`."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def gathered(self, module, is_custom_code: bool = False):
        if _SKIP_INIT:  # the checkpoint's weights replace these; an init can index an empty placeholder
            module._is_hf_initialized = True
            return None
        # its own tensors and those of its leaf children (a CLIP embedding initialises its Conv2d's weight):
        # never a container's, which would gather a whole decoder layer or model on every rank
        leaves = [module] + [child for child in module.children() if not any(True for _ in child.children())]
        own = [t for m in leaves for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t is not None]
        with whole_for_init(own):
            return original(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = gathered
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


@contextlib.contextmanager
def unpartitioned() -> Iterator[None]:
    """Modules created while inside are ordinary (LoRA layers, small and initialised by peft after creation);
    the ZeRO engine partitions them when it starts. `Module.apply` is zero.Init's no more either (there it gathers
    each module's parameters whole before the function runs). Outside `zero.Init` it does nothing."""
    if not partitioning_active():
        yield
        return
    from deepspeed.runtime.zero import partition_parameters as pp
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    if not getattr(pp.top_level_context, "patched", True):  # inside an outer `unpartitioned()`: it restores
        yield
        return

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def _own_partition(param: torch.Tensor) -> torch.Tensor | None:
    """The slice of the flattened tensor this rank holds (`param.ds_tensor`), where ZeRO-3 keeps it the plain way:
    partitioned, in memory (not swapped to NVMe), without a secondary (hpZ) copy. None otherwise."""
    part = getattr(param, "ds_tensor", None)
    if part is None or getattr(param, "ds_secondary_tensor", None) is not None:
        return None
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status is not ZeroParamStatus.NOT_AVAILABLE or \
            getattr(part, "final_location", None) == OffloadDeviceEnum.nvme:
        return None
    return part


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write one whole tensor into a parameter or buffer, partitioned or not. A partitioned parameter takes its
    own slice of `value` straight into this rank's partition (every rank reads the same checkpoint tensor):
    nothing is gathered, no collective runs. Otherwise rank 0's copy is kept."""
    with torch.no_grad():
        if tuple(logical_shape(param)) != tuple(value.shape):
            raise ValueError(f"shape {tuple(value.shape)} for a tensor of shape {logical_shape(param)}")
        part = _own_partition(param)
        if part is not None:
            import torch.distributed as dist

            size = int(part.ds_numel)
            start = size * dist.get_rank(group=param.ds_process_group)
            flat = value.reshape(-1)
            count = max(0, min(size, flat.numel() - start))
            if count:
                part.narrow(0, 0, count).copy_(flat.narrow(0, start, count))
            return
        with whole([param]):
            param.copy_(value)


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape (`ds_shape` for a partitioned one)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent parameter and buffer by state-dict name, tied ones once under each name."""
    return dict(model.state_dict(keep_vars=True))
