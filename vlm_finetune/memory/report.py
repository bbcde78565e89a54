"""What the planner reports: the rows of the predicted peak per GPU, the verdict against the hardware budget,
the suggestions, and their text (`python -m vlm_finetune.plan` prints `MemoryPlan.render()`)."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
USABLE_FRACTION = 0.97  # of the profile's nominal GPU memory (driver reservations, ECC); an estimate


@dataclass
class Row:
    """One line of the breakdown: bytes per GPU (or in CPU memory when `where == "cpu"`)."""

    category: str  # parameters | gradients | optimizer | activations | loss | strategy | overhead
    item: str
    bytes: int
    where: str = "gpu"
    four_bit: bool = False  # nf4 weights: what the host holds of them while a CPU rank loads (memory/load_plan.py)
    # held only while the model runs, not between steps: "gather" (modules gathered for a forward or backward, in
    # validation too), "trace" (prefetched or kept gathered along the training step's recorded trace, which
    # validation's forward does not follow); "" for what stays
    in_flight: str = ""


@dataclass
class Suggestion:
    label: str
    overrides: list[str]
    plan: MemoryPlan

    @property
    def command(self) -> str:
        return "python -m vlm_finetune " + " ".join(shlex.quote(override) for override in self.overrides)


@dataclass
class MemoryPlan:
    overrides: list[str]
    rows: list[Row]
    hardware: str
    world_size: int
    gpu_memory_gib: float
    peak_phase: str
    checkpointed_layers: int
    num_layers: int
    micro_batch_size: int
    tokens: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    parameters: int = 0  # of the model as configured (LoRA included), counted on the meta device
    trainable_parameters: int = 0
    load: Any = None  # memory.load_plan.LoadPlan: host memory per node while the model loads
    checkpoint_scope: str = "layer"  # what the checkpointed layers recompute: the whole layer, or its MLP
    validation: Any = None  # memory.validation.ValidationPlan: the validation phase and its batch
    save_bytes: int = 0  # a checkpoint or adapter write: what the step holds between steps + the trainables whole
    choices: dict = field(default_factory=dict)  # `auto` options the plan resolved (option -> value), for the run
    communication: list = field(default_factory=list)  # memory.comm.CommRow: bytes each rank sends per step
    interconnect_gbps: float = 0.0  # the hardware profile's link bandwidth (0: unknown)

    @property
    def communication_bytes(self) -> int:
        """Bytes each rank sends per optimizer step (it receives as many)."""
        return sum(row.bytes for row in self.communication)

    @property
    def communication_seconds(self) -> float | None:
        """Seconds those bytes take at the profile's link bandwidth (None: unknown bandwidth)."""
        return self.communication_bytes * 8 / (self.interconnect_gbps * 1e9) if self.interconnect_gbps else None
    precision: str = ""  # the precision planned (precision=auto resolved)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step (micro-batch auto may raise it)

    def total(self, category: str | None = None, where: str = "gpu") -> int:
        return sum(row.bytes for row in self.rows
                   if row.where == where and (category is None or row.category == category))

    @property
    def allocated_bytes(self) -> int:
        """Predicted peak of torch.cuda.max_memory_allocated() per GPU (what the benchmark measures)."""
        return self.total() - self.total("overhead")

    @property
    def validation_excess(self) -> int:
        """What validation at the asked batch holds beyond the step's peak (0 at the auto batch)."""
        return 0 if self.validation is None else max(0, self.validation.allocated_bytes - self.allocated_bytes)

    @property
    def peak_bytes(self) -> int:
        """Predicted peak per GPU including runtime overhead (what must fit in the GPU): the step's, or the
        validation's where an asked data.val_batch_size makes that larger."""
        return self.total() + self.validation_excess

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_memory_gib * USABLE_FRACTION * GiB)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gib <= 0:
            return None
        return self.peak_bytes <= self.budget_bytes

    @property
    def verdict(self) -> str:
        if self.fits is None:
            return "NO GPU BUDGET (hardware profile has no GPU)"
        return "FITS" if self.fits else "DOES NOT FIT"

    @property
    def overall(self) -> str:
        """The verdict on the step and the load together (the load row's verdict, the step's)."""
        step, load = self.fits, None if self.load is None else self.load.fits
        if load is None:
            return self.verdict
        if step and load:
            return "FITS: the step and the load both fit"
        if step is False and load is False:
            return "DOES NOT FIT: neither the step nor the load fits"
        return "DOES NOT FIT: " + ("the load does not fit" if step else "the step does not fit")

    def _communication_lines(self) -> list[str]:
        if not self.communication:
            return []
        link = f"s at {self.interconnect_gbps:g} Gb/s" if self.interconnect_gbps else "s (no interconnect_gbps)"
        lines = ["", f"{'communication per optimizer step (sent per rank; it receives as much)':<75} "
                     f"{'GiB per rank':>12} {link:>17}"]
        for item, size in [(r.item, r.bytes) for r in self.communication] + [("total", self.communication_bytes)]:
            time = size * 8 / (self.interconnect_gbps * 1e9) if self.interconnect_gbps else None
            lines.append(f"  {item:<73} {size / GiB:>12.3f} {'' if time is None else f'{time:.3f}':>17}")
        return lines

    def render(self) -> str:
        lines = [f"vlm_finetune.plan: {' '.join(self.overrides) or '(defaults)'}",
                 f"hardware {self.hardware}: {self.world_size} " +
                 (f"GPU(s), {self.gpu_memory_gib:g} GiB each " if self.gpu_memory_gib > 0 else "CPU process(es) ") +
                 f"(budget {self.budget_bytes / GiB:.2f} GiB usable); precision {self.precision}; micro-batch "
                 f"{self.micro_batch_size} x {self.tokens // max(self.micro_batch_size, 1)} tokens, accumulation "
                 f"{self.accumulate_grad_batches}; {self.checkpointed_layers} of "
                 f"{self.num_layers} decoder layers checkpointed"
                 + (" (MLP only: speed.checkpoint_scope=mlp)" if self.checkpoint_scope == "mlp" else ""),
                 f"model: {self.parameters / 1e9:.2f} B parameters ({self.parameters:,}), "
                 f"{self.trainable_parameters:,} trainable; built on the meta device, no weight loaded", "",
                 f"{'category':<12} {'item':<62} {'GiB per GPU':>11}", "-" * 87]
        for row in self.rows:
            if row.where == "gpu" and row.bytes >= 0.005 * GiB:
                lines.append(f"{row.category:<12} {row.item:<62} {row.bytes / GiB:>11.2f}")
        lines.append("-" * 87)
        lines.append(f"{'peak allocated (torch max_memory_allocated), phase: ' + self.peak_phase:<75} "
                     f"{self.allocated_bytes / GiB:>11.2f}")
        lines.append(f"{'peak with runtime overhead':<75} {self.peak_bytes / GiB:>11.2f}")
        cpu = [row for row in self.rows if row.where == "cpu" and row.bytes >= 0.005 * GiB]
        for row in cpu:
            lines.append(f"{'cpu memory':<12} {row.item:<62} {row.bytes / GiB:>11.2f}")
        if self.validation is not None:
            lines += self.validation.render(self.allocated_bytes)
            if self.validation_excess:
                lines.append(f"note: validation at batch {self.validation.batch_size} is the run's peak, "
                             f"{self.validation_excess / GiB:.2f} GiB above the step's; data.val_batch_size=auto "
                             "sizes it within the step")
        lines += self._communication_lines()
        lines += ["", f"verdict: {self.verdict} ({self.peak_bytes / GiB:.2f} GiB of {self.budget_bytes / GiB:.2f} GiB)"]
        if self.load is not None:
            lines += self.load.render()
            if self.fits is not None and self.load.fits is not None:
                lines.append(f"overall (the step on each GPU, the load in host memory and on each GPU): {self.overall}")
        lines += [f"note: {note}" for note in self.notes]
        if self.fits is False:
            if self.suggestions:
                lines += ["", "changes that make it fit, cheapest first:"]
                for number, suggestion in enumerate(self.suggestions, 1):
                    peak = suggestion.plan.peak_bytes / GiB
                    lines.append(f"  {number}. {suggestion.label}: predicted peak {peak:.2f} GiB "
                                 f"({suggestion.plan.verdict})\n     {suggestion.command}")
            else:
                lines += ["", "no change tried here makes it fit (sharding, smaller micro-batch, checkpointing, "
                          "offload, 4-bit base, more GPUs)"]
        return "\n".join(lines)
