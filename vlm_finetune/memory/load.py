"""The model's load, before the first step: host (CPU) memory per node while the ranks build or read the model.

Today every rank builds (or reads) the whole model in its own host memory before the strategy moves,
shards or partitions it: a node holds ranks-per-node copies at the load dtype. That is what stops
MGM-8x7B on six 24 GB cards before training starts (six copies of 94 GB). The rows here say so before
launch, with their own verdict against the profile's host memory per node (`hardware.host_memory_gib`).
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.memory.count import ModelCount
from vlm_finetune.memory.report import GiB

HOST_USABLE_FRACTION = 0.90  # of a node's memory: the OS, page cache and the data loaders need the rest


@dataclass
class LoadPlan:
    ranks_per_node: int
    bytes_per_rank: int  # the whole model at its load dtype, in one rank's host memory
    host_memory_gib: float  # per node, from the hardware profile (0: unknown)

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
        lines = [f"load (host memory per node): {self.ranks_per_node} rank(s) x "
                 f"{self.bytes_per_rank / GiB:.2f} GiB (each builds or reads the whole model) = "
                 f"{self.host_bytes / GiB:.2f} GiB of {self.budget_bytes / GiB:.2f} GiB usable: {self.verdict}"]
        if self.fits is False:
            lines.append("  the load is what does not fit: run fewer ranks per node (hardware.devices), use nodes "
                         "with more host memory (hardware.host_memory_gib), or a smaller load dtype "
                         "(precision=bf16-mixed); partitioned construction under ZeRO-3 is not built yet")
        return lines


def plan_load(count: ModelCount, ranks_per_node: int, host_memory_gib: float) -> LoadPlan:
    """Host memory of the load: every rank on a node holds the whole model (as counted on the meta device, at
    the dtypes it is built in)."""
    import torch

    per_rank = sum(group.numel * torch.empty((), dtype=group.dtype).element_size() for group in count.groups)
    return LoadPlan(int(ranks_per_node), int(per_rank), float(host_memory_gib))
