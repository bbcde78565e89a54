"""`trainer=fsdp` and `trainer=fsdp_offload`: PyTorch's FSDP2 (`fully_shard` on a DeviceMesh) through Lightning's
`ModelParallelStrategy`, which hands the module a mesh; this file is the glue. Each decoder layer and vision block
of the family (its declared block classes) is one FSDP unit and the model itself the root unit (embeddings, head,
projector, norms); frozen base and LoRA weights sit side by side in a unit, each keeping its own dtype; the
mixed-precision policy gathers parameters in the compute dtype and reduces gradients in float32. It runs on CPU
processes over gloo as on GPUs over NCCL, so a sharded run can be rehearsed with a tiny model.

The loss is computed outside the model's `forward` (the family gives hidden states, the chunked loss reads the head's
weight), so it is registered as a forward method of the root unit: the root's gathers, and the backward's final
reduce-scatter, happen around it as they would around `forward`."""
from __future__ import annotations

import gc
import time
import weakref
from datetime import timedelta
from typing import Any, Callable

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.load_turns import fingerprint, load_in_turns
from vlm_finetune.memory.host import release_freed
from vlm_finetune.models.base import Family
from vlm_finetune.models.four_bit_storage import (  # noqa: F401  (FOUR_BIT_STORAGE, _four_bit_tensors: tests)
    FOUR_BIT_STORAGE,
    _four_bit_tensors,
    check_4bit_storage,
    store_4bit_as,
)
from vlm_finetune.settings import StrategySettings
from vlm_finetune.trainability import unwrap

# the root unit's method that computes a micro-batch's (loss sum, token count): a forward method for FSDP
ROOT_LOSS = "vlm_loss_sum"
# FSDP1's names, kept by the trainer profiles: what is resharded after each unit's forward
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}


def reshard_after_forward(settings: StrategySettings) -> bool:
    name = settings.sharding_strategy or "FULL_SHARD"
    if name not in RESHARD_AFTER_FORWARD:
        raise ConfigError(f"trainer.sharding_strategy={name!r} is not one FSDP2 takes here; use FULL_SHARD (gather "
                          "each layer again for the backward: least memory) or SHARD_GRAD_OP (keep it gathered from "
                          "the forward to the backward)")
    return RESHARD_AFTER_FORWARD[name]



def mixed_precision(param_dtype: torch.dtype | None = None):
    """Gradients reduced in float32. Parameters gathered as stored (param_dtype None): the precision policy already
    holds the frozen base in the compute dtype (bf16 under bf16-mixed and nf4) and the trained weights in float32
    with autocast computing in 16 bits, exactly as one process does; casting the trained weights to 16 bits for the
    gather would round what one process keeps in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def fsdp_units(model: nn.Module, family: Family) -> list[nn.Module]:
    """The modules sharded as units of their own, innermost first: every decoder layer and vision block."""
    blocks = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
    return [m for m in unwrap(model).modules() if isinstance(m, blocks)]


def shard_model(model: nn.Module, family: Family, mesh, reshard: bool, offload: bool,
                loss_fn: Callable[[nn.Module, dict], Any], param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place over `mesh` (one dimension: every rank holds 1/N of every parameter). `loss_fn(base,
    batch)` becomes the root's forward method `ROOT_LOSS`. Returns the root unit (the model under PEFT)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    check_4bit_storage(model, param_dtype, "trainer=fsdp", "FSDP")
    options = {"mesh": mesh, "mp_policy": mixed_precision(param_dtype)}
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    units = fsdp_units(model, family)
    if not units:
        raise ConfigError(f"trainer=fsdp found no {family.name} decoder layer or vision block to shard "
                          "(the family's block classes); use trainer=zero3 for this model")
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard, **options)
    base = unwrap(model)
    # the root stays gathered from its forward to its backward (FSDP2 never reshards the root after forward)
    fully_shard(base, **options)
    setattr(base, ROOT_LOSS, lambda batch: loss_fn(base, batch))
    register_fsdp_forward_method(base, ROOT_LOSS)
    if not _generates_through_forward(base):  # a model's own decoding loop reads the root's weights directly
        register_fsdp_forward_method(base, "generate")
    return base


def _generates_through_forward(model: nn.Module) -> bool:
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) or not hasattr(model, "generate")


def root_loss(model: nn.Module) -> Callable[[dict], Any] | None:
    """The root unit's loss method when `model` is sharded by `shard_model`, else None."""
    return getattr(unwrap(model), ROOT_LOSS, None)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (collective: every rank calls it, in the same order); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(module: nn.Module, rank_zero_only: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable parameter of `module` whole, on the CPU, by its name (collective). With `rank_zero_only`,
    the other ranks take part in the gathers but return an empty dict."""
    import torch.distributed as dist

    keep = not rank_zero_only or not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            whole = full_tensor(param.detach())
            if keep:
                state[name] = whole.to("cpu").clone()
    return state


def build_fsdp_strategy(settings: StrategySettings, family: Family, world_size: int, four_bit: bool, backend: str,
                        timeout: timedelta):
    """Lightning's ModelParallelStrategy (data parallel over every rank, no tensor parallelism) that shards the
    module's model with `shard_model` when it is set up (its loss: the module's `loss_sum_of(base, batch)`), and
    checkpoints only the trained weights (whole, on rank 0: the frozen base comes from the model folder).

    Its `build_in_turns` (precision=nf4 with several ranks per node; set by the run): the module's model is then its
    structure on the meta device, and each rank of a node builds and quantises the whole model in host memory
    (bitsandbytes quantises whole tensors) and shards it, dropping what is not its own, one rank after another
    (`one_rank_at_a_time`): a node holds one whole 4-bit model and the others' shards, not one whole model per
    rank. Sharding is local (`fully_shard` splits materialised parameters with no collective)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    reshard = reshard_after_forward(settings)
    offload = bool(settings.offload_parameters)

    class FSDP2Strategy(ModelParallelStrategy):
        build_in_turns: Callable[[], nn.Module] | None = None

        def setup(self, trainer) -> None:
            module = self.lightning_module
            build, self.build_in_turns = self.build_in_turns, None
            if build is not None:
                load_in_turns(self.local_rank, self.num_processes, lambda: self._build_and_shard(module, build))
            elif not is_sharded(module.model):
                self._shard(module)
            super().setup(trainer)

        def _shard(self, module, whole: list | None = None) -> None:
            if four_bit:  # precision=nf4: the 4-bit bytes travel as floating-point storage
                store_4bit_as(module.model, FOUR_BIT_STORAGE)
            if whole is not None:
                whole.extend(weakref.ref(p) for p in module.model.parameters())
            shard_model(module.model, family, self.device_mesh["data_parallel"], reshard, offload,
                        module.loss_sum_of)

        def _build_and_shard(self, module, build: Callable[[], nn.Module]) -> list[tuple[str, int]]:
            started, whole = time.time(), []
            module.model = build()
            built = fingerprint(module.model)
            self._shard(module, whole)  # the whole 4-bit copy goes: this rank keeps its shards
            gc.collect()
            release_freed()  # before the next rank of the node builds its copy
            alive = sum(ref() is not None for ref in whole)
            print(f"vlm_finetune: nf4 load, one rank of the node at a time: rank {self.global_rank} (local rank "
                  f"{self.local_rank} of {self.num_processes}) built, quantised and sharded its model, {alive} of "
                  f"its {len(whole)} whole parameters still held [{started:.6f} -> {time.time():.6f}]", flush=True)
            return built

        def lightning_module_state_dict(self) -> dict[str, Any]:
            # the trained weights only, whole on rank 0 (Lightning would gather the whole model)
            return full_trainable_state(self.lightning_module)

        def model_to_device(self) -> None:
            if not offload:
                super().model_to_device()
                return
            # CPU offload keeps the parameter shards in host memory (FSDP copies each unit in for its compute);
            # buffers (rotary frequencies, 4-bit statistics) are used where the compute runs
            for module in self.model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.to(self.root_device)

    return FSDP2Strategy(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=backend, timeout=timeout)


def is_fsdp2(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)
