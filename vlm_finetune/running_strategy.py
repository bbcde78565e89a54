"""What a running Lightning strategy implies for the rest of the code: which engine it is (DeepSpeed, ZeRO-3,
FSDP2, expert parallel), the loss rescale under DeepSpeed, synced generation and vision in every step where
forwards are collective, gradient clipping that sees every shard, whole gradients and trainable weights for
checks and saving, and the output head's weight for the chunked loss. Building the strategy from the config is
strategies.py's."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from vlm_finetune.fsdp import full_tensor, is_fsdp2


def is_deepspeed(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def is_fsdp(strategy: Any) -> bool:
    return is_fsdp2(strategy)


def is_zero3(strategy: Any) -> bool:
    return is_deepspeed(strategy) and bool(strategy.zero_stage_3)


def loss_rescale(strategy: Any, accumulate: int) -> float:
    """The extra factor the loss of a micro-batch needs under this strategy: DeepSpeed's engine.backward
    divides by gradient_accumulation_steps once more than Lightning's manual division accounts for."""
    return float(accumulate) if is_deepspeed(strategy) and accumulate > 1 else 1.0


def needs_synced_generation(strategy: Any) -> bool:
    """Under multi-rank ZeRO-3 and FSDP every forward gathers parameters collectively, and under expert parallelism
    every MoE layer exchanges tokens: generating ranks keep stepping until all are done (else their collectives go
    out of step and the run hangs)."""
    return strategy is not None and (is_zero3(strategy) or is_fsdp(strategy) or expert_parallel_size(strategy) > 1) \
        and strategy.world_size > 1


def expert_parallel_size(strategy: Any) -> int:
    """Ranks that split each MoE layer's experts (every forward of an MoE layer is then collective)."""
    return int(getattr(strategy, "expert_parallel", 1))


def runs_vision_every_step(strategy: Any) -> bool:
    """Under multi-rank ZeRO-3 and FSDP the vision tower's parameters are gathered collectively when it runs:
    a rank whose micro-batch is text-only must run it too (module.VisionInEveryStep), else the gathers of
    the ranks go out of step (gloo's "collective mismatch", or a hang)."""
    return strategy is not None and (is_zero3(strategy) or is_fsdp(strategy)) and strategy.world_size > 1


def clip_gradients(module: Any, optimizer: Any, value: float | None, algorithm: str | None) -> None:
    """Gradient clipping that sees every shard (under FSDP the gradients are DTensors: their norm is global)."""
    module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)


def is_accumulation_boundary(strategy: Any) -> bool:
    """Whether the gradients are those of a whole optimizer step now (Lightning calls before-step hooks after
    every micro-batch under DeepSpeed, whose engine accumulates)."""
    return not is_deepspeed(strategy) or strategy.model.is_gradient_accumulation_boundary()


def full_gradients(strategy: Any, module: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's whole gradient (float32, CPU). ZeRO keeps reduced gradients in its
    partitions: every rank must call this (each takes part in assembling each gradient)."""
    if is_deepspeed(strategy):
        from deepspeed.utils import safe_get_full_grad

        grads = {name: safe_get_full_grad(p) for name, p in module.named_parameters() if p.requires_grad}
    elif is_fsdp(strategy):
        grads = {name: None if p.grad is None else full_tensor(p.grad) for name, p in module.named_parameters()
                 if p.requires_grad}
    else:
        grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    return {name: g.detach().float().cpu().contiguous() for name, g in grads.items() if g is not None}


@contextlib.contextmanager
def full_trainable_parameters(trainer: Any, module: nn.Module) -> Iterator[None]:
    """Inside this context the trainable weights are whole on every rank: ZeRO-3 gathers them; DDP and one process
    hold them whole already (FSDP: `fsdp.full_trainable_state`). Every rank must enter it (the gathers are
    collective)."""
    strategy = trainer.strategy
    if is_zero3(strategy):
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def head_weight(head: nn.Module) -> torch.Tensor:
    """The output projection's weight, whole. The loss reads it outside the head's forward, where DeepSpeed
    ZeRO-3 has it partitioned (an empty placeholder on each rank): a frozen head is gathered into a full
    copy for this micro-batch (held until its backward, like one gathered layer); a trained head under
    ZeRO-3 is not supported by the chunked loss."""
    weight = head.weight
    if not hasattr(weight, "ds_id"):  # not a ZeRO-3 parameter
        return weight
    if weight.requires_grad:
        raise RuntimeError("a trained output head under DeepSpeed ZeRO-3 cannot feed the chunked loss; keep "
                           "lm_head frozen (train.llm=lora) or use trainer=zero2 / fsdp")
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if getattr(weight, "ds_persist", False):  # below the persistence threshold: never partitioned
        return weight.detach()
    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        # gathered by a module that is still active (a head tied to the input embedding): copy it, since
        # DeepSpeed frees it when that module is done; gathering again would free it under the module
        return weight.detach().clone()
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()
