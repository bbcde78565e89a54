"""The model's load, before the first step: host (CPU) memory per node while the ranks build or read the model.

Under most strategies every rank builds (or reads) the whole model in its own host memory before the strategy
moves or shards it: a node holds ranks-per-node copies at the load dtype (what stopped MGM-8x7B on six 24 GB
cards before training started: six copies of 94 GB). Under ZeRO-3, a family that builds inside DeepSpeed's
zero.Init (`Family.builds_partitioned`) is built partitioned and its folder streamed one tensor at a time: each
rank holds its partition (the model / world size) and, while a tensor is read, that tensor whole once (each rank
reads it and copies its own slice into its partition: nothing is gathered). The rows say so before launch, with
their own verdict against the profile's host memory per node (`hardware.host_memory_gib`). Under FSDP2 or ZeRO-3
with nf4 and several ranks per node the ranks of a node load one at a time (load_turns.loads_in_turns): the node
holds one rank's whole load and what each other rank keeps once it has sharded (its parameter shards, the 4-bit
statistics whole).

On each GPU the load ends with the parameters the step keeps there (the whole model, or under ZeRO-3 and FSDP its
partition; nothing with parameter offload) and, while it runs, one tensor more: the tensor gathered whole while
rank 0 copies it into its partitions (ZeRO-3, or a unit FSDP places and shards), or the half-precision tensor on
the GPU while it is quantised to nf4. That row has its own verdict against the GPU budget of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.count import ModelCount
from vlm_finetune.memory.report import GiB

HOST_USABLE_FRACTION = 0.90  # of a node's memory: the OS, page cache and the data loaders need the rest


@dataclass
class LoadPlan:
    ranks_per_node: int
    bytes_per_rank: int  # one rank's host memory at the load: the whole model, or its partition and a tensor
    host_memory_gib: float  # per node, from the hardware profile (0: unknown)
    partitioned: bool = False  # ZeRO-3 construction inside zero.Init: no rank holds the whole model
    quantised_streamed: bool = False  # nf4 quantised decoder layer by decoder layer as the folder is read
    quantised_on_host: bool = False  # and the 4-bit layers kept in host memory (sharded runs, CPU ranks)
    gpu_bytes_per_rank: int = 0  # one GPU at the load: the parameters it keeps and the tensor in flight
    gpu_budget_bytes: int = 0  # the step's GPU budget (0: no GPU)
    gpu_what: str = ""
    # FSDP2 / ZeRO-3 + nf4 (load_turns.loads_in_turns): the ranks of a node build one at a time; what each keeps
    # once its turn is over
    in_turns_kept_bytes: int | None = None

    @property
    def in_turns(self) -> bool:
        return self.in_turns_kept_bytes is not None

    @property
    def host_bytes(self) -> int:
        if self.in_turns:  # the rank in its turn, and the shards of the ranks before it
            return self.bytes_per_rank + (self.ranks_per_node - 1) * self.in_turns_kept_bytes
        return self.ranks_per_node * self.bytes_per_rank

    @property
    def budget_bytes(self) -> int:
        return int(self.host_memory_gib * HOST_USABLE_FRACTION * GiB)

    @property
    def host_fits(self) -> bool | None:
        return None if self.host_memory_gib <= 0 else self.host_bytes <= self.budget_bytes

    @property
    def gpu_fits(self) -> bool | None:
        return None if self.gpu_budget_bytes <= 0 else self.gpu_bytes_per_rank <= self.gpu_budget_bytes

    @property
    def fits(self) -> bool | None:
        """Both rows: False when either does not fit, None when neither has a budget."""
        known = [f for f in (self.host_fits, self.gpu_fits) if f is not None]
        return None if not known else all(known)

    @property
    def verdict(self) -> str:
        if self.host_fits is None:
            return "NO HOST BUDGET (set hardware.host_memory_gib)"
        return "FITS" if self.host_fits else "DOES NOT FIT"

    def render(self) -> list[str]:
        what = ("its partition, one tensor whole at a time" if self.partitioned
                else "all but the decoder layers, and one decoder layer in 16 bits while it is quantised"
                + (", with the 4-bit layers" if self.quantised_on_host else "")
                if self.quantised_streamed else "each builds or reads the whole model")
        ranks = f"{self.ranks_per_node} rank(s) x {self.bytes_per_rank / GiB:.2f} GiB ({what})"
        if self.in_turns:
            ranks = (f"{self.ranks_per_node} ranks one rank at a time: {self.bytes_per_rank / GiB:.2f} GiB ({what}) + "
                     f"{self.ranks_per_node - 1} x {self.in_turns_kept_bytes / GiB:.2f} GiB (what each other rank "
                     "keeps once it has sharded: its parameter shards, the 4-bit statistics whole)")
        lines = [f"load (host memory per node): {ranks} = "
                 f"{self.host_bytes / GiB:.2f} GiB of {self.budget_bytes / GiB:.2f} GiB usable: {self.verdict}"]
        if self.gpu_budget_bytes > 0:
            lines.append(f"load (GPU memory per rank): {self.gpu_bytes_per_rank / GiB:.2f} GiB ({self.gpu_what}) of "
                         f"{self.gpu_budget_bytes / GiB:.2f} GiB: {'FITS' if self.gpu_fits else 'DOES NOT FIT'}")
        if self.host_fits is False:
            lines.append("  the load is what does not fit: run fewer ranks per node (hardware.devices), use nodes "
                         "with more host memory (hardware.host_memory_gib), or a smaller load dtype "
                         "(precision=bf16-mixed)" + ("" if self.partitioned else
                                                     ", or trainer=zero3 (built partitioned, where the family can)"))
        return lines


def plan_load(count: ModelCount, ranks_per_node: int, host_memory_gib: float, world_size: int = 1,
              partitioned: bool = False, partitions_on_host: bool = True, quantised_streamed: bool = False,
              quantised_on_host_bytes: int = 0, in_turns_kept_bytes: int | None = None) -> LoadPlan:
    """Host memory of the load: every rank on a node holds the whole model (as counted on the meta device, at
    the dtypes it is built in), or, `partitioned` (ZeRO-3 construction), the largest tensor once (read, and
    its own slice copied into the partition) and, `partitions_on_host` (CPU ranks, parameter offload), its
    1/world_size share of the model (on GPUs without offload the partitions are made on the GPU), or,
    `quantised_streamed` (nf4 from a folder), everything outside the decoder layers, the largest decoder layer
    in 16 bits while it is filled (and its largest tensor once more, as it is joined from the checkpoint's) and
    `quantised_on_host_bytes` (the 4-bit layers, when they stay on the host: CPU ranks). `in_turns_kept_bytes`
    (FSDP2 + nf4: the ranks of a node build one at a time): what each rank keeps once its turn is over, so the node
    holds one rank's load and the others' shards."""
    import torch

    whole = sum(group.numel * torch.empty((), dtype=group.dtype).element_size() for group in count.groups)
    share = -(-whole // max(1, int(world_size))) if partitions_on_host else 0
    if partitioned:
        per_rank = share + count.largest_tensor_bytes
    elif quantised_streamed and count.decoder_layer_bytes:
        layers = count.decoder_layer_bytes
        per_rank = whole - sum(layers) + max(layers) + count.largest_tensor_bytes + int(quantised_on_host_bytes)
    else:
        per_rank = whole
    return LoadPlan(int(ranks_per_node), int(per_rank), float(host_memory_gib), partitioned,
                    quantised_streamed and bool(count.decoder_layer_bytes) and not partitioned,
                    quantised_on_host=quantised_on_host_bytes > 0,
                    in_turns_kept_bytes=None if in_turns_kept_bytes is None else int(in_turns_kept_bytes))


def gpu_at_load(kept_bytes: int, count: ModelCount, sharded: bool, quantised: bool, offloaded: bool = False,
                sliced_from_folder: bool = False) -> tuple[int, str]:
    """One GPU's bytes at the load and what they are: `kept_bytes` (the step's parameter rows on the GPU) and,
    `sharded` (ZeRO-3, FSDP) or `quantised` (nf4), the largest tensor whole while it is placed; nothing more when
    a ZeRO-3 model built partitioned is filled from a folder (`sliced_from_folder`: each rank copies its own slice
    of each tensor from host memory into its partition, nothing is gathered)."""
    in_flight = count.largest_tensor_bytes if (sharded and not sliced_from_folder) or quantised else 0
    kept = ("what it keeps of the parameters (the partitions are on the host)" if offloaded
            else "its partition of the parameters" if sharded else "the parameters")
    if not in_flight:
        how = ", each rank's slice copied in from the folder" if sharded and sliced_from_folder else ""
        return kept_bytes, kept + how + ", as the step holds them"
    why = "gathered whole while it is split" if sharded else "in half precision while it is quantised"
    return kept_bytes + in_flight, f"{kept}, and the largest tensor {why}"


def check_host_load(load: LoadPlan, available_gib: float, command: list[str]) -> None:
    """Before any weight loads: a ConfigError with the planned and the available host memory when the load row
    does not fit the profile's host memory, or this machine's memory available now (`available_gib`, 0: not
    known), and the changes that shrink it. `command`: the run's overrides, for the planner's command line."""
    need = load.host_bytes
    limits = []
    if load.host_fits is False:
        limits.append(f"{load.budget_bytes / GiB:.2f} GiB usable of the profile's {load.host_memory_gib:.1f} GiB "
                      "(hardware.host_memory_gib)")
    if available_gib > 0 and need > available_gib * GiB:
        limits.append(f"{available_gib:.2f} GiB available on this machine now")
    if not limits:
        return
    what = ("its partition and one tensor whole" if load.partitioned else
            "all but the decoder layers and one decoder layer in 16 bits" if load.quantised_streamed
            else "the whole model")
    ranks = (f"one rank at a time: {load.bytes_per_rank / GiB:.2f} GiB ({what}) + {load.ranks_per_node - 1} x "
             f"{load.in_turns_kept_bytes / GiB:.2f} GiB (each other rank's shards)" if load.in_turns else
             f"{load.ranks_per_node} rank(s) x {load.bytes_per_rank / GiB:.2f} GiB ({what})")
    plan = " ".join(["python -m vlm_finetune.plan", *command])
    raise ConfigError(
        f"the model's load does not fit in host memory: planned {ranks} = {need / GiB:.2f} GiB, against "
        + " and ".join(limits) + ". Stopped before any weight loads. What shrinks the load: a smaller load dtype "
        "(precision=bf16-mixed), a 4-bit base (precision=nf4), a smaller model, fewer ranks per node "
        "(hardware.devices), or trainer=zero3 across more ranks (built partitioned, where the family can); "
        f"check each with the planner: {plan} <change>")
