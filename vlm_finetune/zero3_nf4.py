"""precision=nf4 under DeepSpeed ZeRO-3 (trainer=zero3, zero3_offload): the 4-bit codes are viewed in the engine's
floating dtype (bitsandbytes' quant_storage, as PEFT's ZeRO-3 + QLoRA recipe sets it to the model's dtype), so the
engine partitions them like any other parameter (each rank holds 1/N of the bytes) and gathers them untouched; a
storage it would cast or cannot gather is refused. bitsandbytes quantises whole tensors, so each rank quantises the
whole model in host memory; the model is then partitioned there, one parameter at a time (`partition_first`), before
the engine starts, since DeepSpeed's engine would otherwise move a model that is not partitioned yet onto the GPU
whole (engine._configure_distributed_model) and only then partition it.

With several ranks per node the ranks of a node build, quantise and partition one after another
(load_turns.one_rank_at_a_time), each keeping its partition of its own build: DeepSpeed's conversion of a built
module (`zero.Init(module=...)`) broadcasts each parameter from rank 0 first, which would need every rank's whole
model at once, so here it converts without the broadcast (`_local_conversion`); the builds are checked equal."""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch
from torch import nn

from vlm_finetune.load_turns import fingerprint, load_in_turns
from vlm_finetune.memory.host import release_freed
from vlm_finetune.models._partitioned import is_partitioned
from vlm_finetune.models.four_bit_storage import _four_bit_tensors, check_4bit_storage, store_4bit_as
from vlm_finetune.precision import is_nf4
from vlm_finetune.settings import StrategySettings

_ENGINE_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "nf4": torch.bfloat16,
                  "fp16-mixed": torch.float16}


def engine_dtype(precision: str) -> torch.dtype | None:
    """The dtype DeepSpeed's engine casts every floating parameter to at its start (None: no cast, float32)."""
    return _ENGINE_DTYPES.get(precision)


def four_bit_storage(precision: str) -> torch.dtype:
    """The storage of the 4-bit codes under ZeRO-3: the engine's dtype (bf16 under precision=nf4, float32 under
    nf4-fp32, whose engine casts nothing)."""
    return engine_dtype(precision) or torch.float32


def shard_4bit_under_zero3(model: nn.Module, settings: StrategySettings, precision: str) -> int:
    """precision=nf4 under ZeRO-3: view the 4-bit codes in the engine's dtype, then refuse any 4-bit storage the
    engine would cast or cannot gather. Returns how many 4-bit tensors there are (0 for other runs)."""
    if not (settings.is_zero3 and is_nf4(precision)):
        return 0
    count = store_4bit_as(model, four_bit_storage(precision))
    check_4bit_storage(model, four_bit_storage(precision), f"trainer={settings.name}", "DeepSpeed ZeRO-3")
    return count


def _local_conversion():
    """DeepSpeed's `zero.Init` whose conversion of a built module keeps this rank's partition of its own parameters
    without broadcasting rank 0's first (no collective: the ranks of a node convert in turns)."""
    import deepspeed

    class LocalConversion(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return LocalConversion


def partition_first(model: nn.Module, config: dict, precision: str, device: torch.device, local: bool = False) -> int:
    """Partition a model built whole (in host memory) as DeepSpeed's engine would at its start, before the engine
    sees it: each floating parameter cast to the engine's dtype (the 4-bit codes already are), then each parameter in
    turn moved to `device` and split (`deepspeed.zero.Init(module=...)`, the engine's own conversion), so a GPU
    never holds more than one whole tensor; buffers and 4-bit statistics then go to `device` (the engine places
    no buffer of a model it did not partition). Returns how many parameters were partitioned. Collective, unless
    `local` (every rank built the same weights: each keeps its partition of its own, no broadcast)."""
    import deepspeed

    dtype = engine_dtype(precision)
    four_bit = {id(p) for _, _, p in _four_bit_tensors(model)}
    with torch.no_grad():
        for param in model.parameters():
            if dtype is not None and id(param) not in four_bit and param.dtype in (torch.float32, torch.float16,
                                                                                 torch.bfloat16):
                param.data = param.data.to(dtype)
    zero = config.get("zero_optimization", {})
    offload = zero.get("offload_param", {}).get("device") == "cpu"
    params = [p for p in model.parameters() if not is_partitioned(p)]
    convert = _local_conversion() if local else deepspeed.zero.Init
    convert(module=model, config_dict_or_path=config, dtype=dtype or torch.float32,
            remote_device="cpu" if offload else None,
            pin_memory=bool(zero.get("offload_param", {}).get("pin_memory", False)))
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    states = {id(s): s for _, _, p in _four_bit_tensors(model) for s in [getattr(p, "quant_state", None)]
              if hasattr(s, "to")}
    for state in states.values():
        state.to(device)  # bitsandbytes' QuantState moves in place (absmax, code book, nested statistics)
    return len(params)


def _still_whole(model: nn.Module) -> tuple[int, int]:
    """(parameters still held whole, parameters) after a partition: a partitioned one holds an empty tensor, save
    those ZeRO-3 keeps whole by design (below stage3_param_persistence_threshold)."""
    params = list(model.parameters())
    whole = sum(1 for p in params if p.data.numel() and not getattr(p, "ds_persist", False))
    return whole, len(params)


def partitioning_first(strategy_class: type, config: dict, precision: str) -> type:
    """`strategy_class` (Lightning's DeepSpeedStrategy or the CPU one) whose set-up partitions the module's 4-bit
    model with `partition_first` before the engine starts. Its `build_in_turns` (several ranks per node; set by the
    run): the module's model is then its structure on the meta device, and each rank of the node in turn builds and
    quantises the whole model on the host and partitions it locally, before the next rank builds."""
    class PartitionFirst(strategy_class):
        build_in_turns: Callable[[], nn.Module] | None = None

        def setup(self, trainer) -> None:
            module = self.lightning_module
            build, self.build_in_turns = self.build_in_turns, None
            if build is not None:
                load_in_turns(self.local_rank, self.num_processes, lambda: self._build_and_partition(module, build))
            elif not any(is_partitioned(p) for p in module.model.parameters()):
                count = partition_first(module.model, config, precision, self.root_device)
                if self.global_rank == 0:
                    print(f"vlm_finetune: ZeRO-3: the 4-bit model partitioned before the engine starts ({count} "
                          "parameters, one at a time)", flush=True)
            super().setup(trainer)

        def _build_and_partition(self, module, build: Callable[[], nn.Module]) -> list[tuple[str, int]]:
            started = time.time()
            module.model = build()
            built = fingerprint(module.model)
            partition_first(module.model, config, precision, self.root_device, local=True)
            gc.collect()
            release_freed()  # before the next rank of the node builds its copy
            alive, total = _still_whole(module.model)
            print(f"vlm_finetune: nf4 load, one rank of the node at a time: rank {self.global_rank} (local rank "
                  f"{self.local_rank} of {self.num_processes}) built, quantised and partitioned its model, {alive} "
                  f"of its {total} whole parameters still held [{started:.6f} -> {time.time():.6f}]", flush=True)
            return built

    PartitionFirst.__name__ = PartitionFirst.__qualname__ = f"{strategy_class.__name__}PartitionFirst"
    return PartitionFirst
