"""The model's load, before the first step: host (CPU) memory per node while the ranks build or read the model.

Under most strategies every rank builds (or reads) the whole model in its own host memory before the strategy
moves or shards it: a node holds ranks-per-node copies at the load dtype (what stopped MGM-8x7B on six 24 GB
cards before training started: six copies of 94 GB). Under ZeRO-3, a family that builds inside DeepSpeed's
zero.Init (`Family.builds_partitioned`) is built partitioned and its folder streamed one tensor at a time: each
rank holds its partition (the model / world size) and, while a tensor is read, that tensor whole twice (as read
and gathered). The rows say so before launch, with their own verdict against the profile's host memory per
node (`hardware.host_memory_gib`).
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.memory.count import ModelCount
from vlm_finetune.memory.report import GiB

HOST_USABLE_FRACTION = 0.90  # of a node's memory: the OS, page cache and the data loaders need the rest


@dataclass
class LoadPlan:
    ranks_per_node: int
    bytes_per_rank: int  # one rank's host memory at the load: the whole model, or its partition and a tensor
    host_memory_gib: float  # per node, from the hardware profile (0: unknown)
    partitioned: bool = False  # ZeRO-3 construction inside zero.Init: no rank holds the whole model

    @property
    def host_bytes(self) -> int:
        return self.ranks_per_node * self.bytes_per_rank

    @property
    def budget_bytes(self) -> int:
        return int(self.host_memory_gib * HOST_USABLE_FRACTION * GiB)

    @property
    def fits(self) -> bool | None:
        return None if self.host_memory_gib <= 0 else self.host_bytes <= self.budget_bytes

    @property
    def verdict(self) -> str:
        if self.fits is None:
            return "NO HOST BUDGET (set hardware.host_memory_gib)"
        return "FITS" if self.fits else "DOES NOT FIT"

    def render(self) -> list[str]:
        what = ("its partition, one tensor whole at a time" if self.partitioned
                else "each builds or reads the whole model")
        lines = [f"load (host memory per node): {self.ranks_per_node} rank(s) x "
                 f"{self.bytes_per_rank / GiB:.2f} GiB ({what}) = "
                 f"{self.host_bytes / GiB:.2f} GiB of {self.budget_bytes / GiB:.2f} GiB usable: {self.verdict}"]
        if self.fits is False:
            lines.append("  the load is what does not fit: run fewer ranks per node (hardware.devices), use nodes "
                         "with more host memory (hardware.host_memory_gib), or a smaller load dtype "
                         "(precision=bf16-mixed)" + ("" if self.partitioned else
                                                     ", or trainer=zero3 (built partitioned, where the family can)"))
        return lines


def plan_load(count: ModelCount, ranks_per_node: int, host_memory_gib: float, world_size: int = 1,
              partitioned: bool = False, partitions_on_host: bool = True) -> LoadPlan:
    """Host memory of the load: every rank on a node holds the whole model (as counted on the meta device, at
    the dtypes it is built in), or, `partitioned` (ZeRO-3 construction), the largest tensor twice (read, and
    gathered whole while rank 0 copies it in) and, `partitions_on_host` (CPU ranks, parameter offload), its
    1/world_size share of the model (on GPUs without offload the partitions are made on the GPU)."""
    import torch

    whole = sum(group.numel * torch.empty((), dtype=group.dtype).element_size() for group in count.groups)
    share = -(-whole // max(1, int(world_size))) if partitions_on_host else 0
    per_rank = share + 2 * count.largest_tensor_bytes if partitioned else whole
    return LoadPlan(int(ranks_per_node), int(per_rank), float(host_memory_gib), partitioned)
