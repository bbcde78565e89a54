"""The validation phase of the plan: what a rank holds while it evaluates, and the validation batch that
`data.val_batch_size=auto` picks from it.

Validation runs the forward without autograd: nothing is saved for a backward, so its working set is one decoder
layer's at a time (the residual stream in and out, the widest MLP's intermediates), the image tokens, the frozen
vision tower's forward, the loss's logits and, when it generates, the key/value cache. Everything the step holds
between steps (parameters, optimizer states, the strategy's buffers) stays. A validation batch is sized so that
this stays within the training step's own peak: validation is never what decides whether a run fits."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlm_finetune.memory.inputs import PlanInputs
from vlm_finetune.memory.report import GiB, Row

AUTO_CAP = 8  # auto never batches more than this many training micro-batches: beyond it padding grows, speed not


@dataclass
class ValidationPlan:
    """The validation phase at `batch_size` samples per rank."""

    batch_size: int
    rows: list[Row]
    static_bytes: int  # what the step also holds: parameters, optimizer, strategy buffers
    why: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def allocated_bytes(self) -> int:
        return self.static_bytes + sum(row.bytes for row in self.rows)

    def render(self, step_allocated: int) -> list[str]:
        lines = [f"validation (batch {self.batch_size} per rank{': ' + self.why if self.why else ''}): "
                 f"{self.allocated_bytes / GiB:.2f} GiB allocated, the step's peak is {step_allocated / GiB:.2f}"]
        lines += [f"  {row.item:<72} {row.bytes / GiB:>11.2f}" for row in self.rows if row.bytes >= 0.005 * GiB]
        return lines


def validation_rows(inputs: PlanInputs, seq: int, batch: int, images: int, generate_tokens: int) -> list[Row]:
    """What the forward of one validation batch adds to the step's static memory (no autograd)."""
    dims, act_bytes = inputs.dims, inputs.act_bytes
    tokens = seq * batch
    hidden = int(dims["hidden"])
    width = max(int(dims.get("intermediate", 0)),
                int(dims.get("experts_per_token", 0)) * int(dims.get("moe_intermediate", 0)))
    rows = [Row("activations", f"validation: one decoder layer's forward, {tokens} tokens",
                int(tokens * (2 * hidden + 3 * width) * act_bytes))]
    image_tokens = int(dims["image_tokens_per_image"]) * images * batch
    rows.append(Row("activations", f"validation: image tokens ({image_tokens} into the LLM)",
                    int(image_tokens * hidden * act_bytes)))
    patches = int(dims["vision_patches_per_image"]) * images * batch
    vision_width = 3 * int(dims["vision_hidden"]) + 3 * int(dims["vision_intermediate"])
    rows.append(Row("activations", f"validation: vision tower forward working set, {patches} patches",
                    int(patches * vision_width * act_bytes)))
    vocab = int(dims["vocab"])
    if inputs.loss_impl == "plain":
        rows.append(Row("loss", f"validation: logits {tokens} x {vocab} and their float32 log-softmax",
                        int(tokens * vocab * (act_bytes + 4 + 4))))
    else:
        at_once = min(inputs.loss_chunk, tokens)
        rows.append(Row("loss", f"validation: hidden rows + one chunk of logits ({at_once} x {vocab})",
                        int(tokens * hidden * act_bytes + at_once * vocab * act_bytes)))
    if generate_tokens > 0:
        cache = 2 * int(dims["layers"]) * int(dims["kv_dim"]) * batch * (seq + generate_tokens) * act_bytes
        rows.append(Row("activations", f"validation: generation's key/value cache, {batch} x "
                                       f"{seq + generate_tokens} positions", int(cache)))
    return rows


def plan_validation(inputs: PlanInputs, static_bytes: int, step_allocated: int, seq: int, images: int,
                    micro_batch: int, asked: int | None, generate_tokens: int, val_samples: int | None
                    ) -> ValidationPlan:
    """The validation phase at the asked batch (`data.val_batch_size`), else (auto) the largest batch of at most
    AUTO_CAP training micro-batches (and at most the rank's share of the validation set, where known) whose peak
    stays within the training step's peak; at least 1."""
    def at(batch: int, why: str = "") -> ValidationPlan:
        return ValidationPlan(batch, validation_rows(inputs, seq, batch, images, generate_tokens), static_bytes, why)

    if asked is not None:
        return at(asked)
    cap = AUTO_CAP * micro_batch
    if val_samples:
        cap = max(1, min(cap, -(-val_samples // max(inputs.world, 1))))
    chosen = 1
    for batch in range(cap, 0, -1):
        if at(batch).allocated_bytes <= step_allocated:
            chosen = batch
            break
    why = (f"auto: the largest of at most {cap} whose peak stays within the step's" if chosen > 1 or
           at(1).allocated_bytes <= step_allocated else "auto: batch 1 already exceeds the step's peak")
    return at(chosen, why)
