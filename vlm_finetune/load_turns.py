"""precision=nf4 under sharding (trainer=fsdp, trainer=zero3) with several ranks per node: bitsandbytes quantises whole
tensors, so each rank builds and quantises the whole 4-bit model in host memory before it keeps its shard. Done by
every rank at once, a node holds one whole 4-bit model per rank (MGM-8x7B on four 4090s: 4 x 30 GiB); done in turns,
one rank of the node after another, it holds one whole model and the other ranks' shards.

Each rank keeps its own shard of its own build (no rank sends its weights to another), so the builds must be equal:
`check_same_builds` compares the fingerprints of the ranks' whole models, gathered after the turns, and stops the
run, naming the first tensor that differs, where they are not (a build that draws different random numbers per
rank, or nodes reading different model folders)."""
from __future__ import annotations

from datetime import timedelta
from typing import Callable

import torch
from torch import nn

# how long a rank of the node waits for another rank's turn (the whole model built and quantised on the host:
# minutes for MGM-8x7B, longer than trainer.collective_timeout_s may be)
LOAD_TURN_TIMEOUT = timedelta(minutes=30)


def loads_in_turns(strategy: str, zero_stage: int, precision: str, ranks_per_node: int,
                   auto_micro_batch: bool = False) -> bool:
    """Whether the ranks of a node build the model one after another: FSDP2 or ZeRO-3 with precision=nf4 and
    several ranks per node, unless the micro-batch is searched with real steps on a whole model."""
    from vlm_finetune.precision import is_nf4

    sharded = strategy == "fsdp" or (strategy == "deepspeed" and zero_stage == 3)
    return sharded and is_nf4(precision) and ranks_per_node > 1 and not auto_micro_batch


def one_rank_at_a_time(local_rank: int, ranks_per_node: int, barrier: Callable[[], None],
                       work: Callable[[], None]) -> None:
    """`work()` on each rank of a node in turn, local rank 0 first: rank r runs it after the barriers that follow
    the turns of ranks 0..r-1 (collective: every rank of every node calls it; node n's rank r shares its turn
    with the other nodes' rank r)."""
    for turn in range(ranks_per_node):
        if turn == local_rank:
            work()
        barrier()


def load_in_turns(local_rank: int, ranks_per_node: int, work: Callable[[], list[tuple[str, int]]]) -> None:
    """`work()` (build the whole model, keep this rank's shard of it, return the build's `fingerprint`) on one rank
    of the node at a time, then the ranks' builds compared (`check_same_builds`). A rank whose build fails still
    takes part in the other turns' barriers, so every rank stops at once with its error instead of waiting out
    the turn's timeout. Collective."""
    import torch.distributed as dist

    # the barriers wait for another rank's whole build: a CPU group of their own with a timeout for it
    group = dist.new_group(backend="gloo", timeout=LOAD_TURN_TIMEOUT)
    built: list[tuple[str, int]] = []
    failed: list[BaseException] = []

    def turn() -> None:
        try:
            built.extend(work())
        except Exception as error:  # raised below, once every rank knows
            failed.append(error)

    try:
        one_rank_at_a_time(local_rank, ranks_per_node, lambda: dist.barrier(group=group), turn)
        # one gather: each rank's error (or None) and its build's fingerprint
        every: list = [None] * dist.get_world_size(group=group)
        dist.all_gather_object(every, (f"{type(failed[0]).__name__}: {failed[0]}" if failed else None, built),
                               group=group)
        if failed:
            raise failed[0]
        for rank, (error, _) in enumerate(every):
            if error is not None:
                raise RuntimeError(f"precision=nf4 load in turns: rank {rank}'s build failed ({error}); see its "
                                   "log")
        check_same_builds([fingerprints for _, fingerprints in every])
    finally:
        dist.destroy_process_group(group)


def fingerprint(model: nn.Module) -> list[tuple[str, int]]:
    """(name, sum of its bytes) of every parameter and buffer of a whole model, and of the 4-bit weights'
    quantisation statistics: equal on two ranks that built the same weights (one read of the model)."""
    def byte_sum(tensor: torch.Tensor) -> int:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return 0
        return int(tensor.detach().contiguous().reshape(-1).view(torch.uint8).sum(dtype=torch.int64))

    found = [(name, byte_sum(t)) for name, t in [*model.named_parameters(), *model.named_buffers()]]
    for name, param in model.named_parameters():
        state = getattr(param, "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            found.append((f"{name} (absmax)", byte_sum(state.absmax)))
    return found


def check_same_builds(every: list[list[tuple[str, int]]]) -> None:
    """Stop the run where the ranks' builds differ (`every`: each rank's fingerprint, by rank): each rank would train
    its shard of another model."""
    for rank, theirs in enumerate(every):
        if theirs == every[0]:
            continue
        first = next((a[0] for a, b in zip(every[0], theirs) if a != b), "the list of tensors")
        raise RuntimeError(
            f"precision=nf4 load in turns: rank {rank} built other weights than rank 0 ({first} differs). Each rank "
            "keeps its shard of its own build, so the builds must be equal: the same seed on every rank, the same "
            "model folder on every node, no rank-dependent initialisation")
