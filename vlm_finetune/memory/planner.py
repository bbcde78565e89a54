"""`python -m vlm_finetune.plan [--seq N] [--image PX] [--images N] <training overrides>`: predicted peak GPU
memory per device, before any weight loads, with FITS / DOES NOT FIT against the hardware profile and, when
it does not fit, the cheapest changes that make it fit (each with its command line and its own prediction).

What is exact and what is modelled:

- Parameters, gradients and optimizer states are counted from the real model built on the meta device
  (no memory, no weights read), after the real trainability plan (LoRA via peft, full parts) and the
  precision profile (mixed: frozen base in half precision, trainables float32), then sharded the way the
  strategy shards them. On one process these equal the bytes a real run allocates (tests/test_plan.py).
- Activations are a model: bytes per token that autograd saves in one decoder layer (checked against
  `saved_tensors_hooks` on the CPU in tests/test_plan.py), checkpoint boundaries, one layer's recompute and
  its gradients in flight, the vision tower by patch count, and the loss. Its constants were calibrated on
  one H100 measurement (docs/benchmarks.md: GLM-4.1V-9B, LoRA r=16, 8192 tokens, every layer
  checkpointed, 24.31 GiB peak allocated; the model gives 24.35 GiB there, 24.21 with chunk 512
  (measured 24.16) and 24.81 without Liger (measured 24.74)). Other settings are predictions until
  measured; `tests/test_plan_gpu.py` compares them with the benchmark on a GPU.
- Strategy buffers and runtime overhead (CUDA context, allocator fragmentation, NCCL) are estimates.
"""
from __future__ import annotations

import logging
from typing import Any

from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import available_host_memory_gib, resolve
from vlm_finetune.load_turns import loads_in_turns
from vlm_finetune.memory.activations import (
    decoder_layer_bytes_per_token,
    eager_attention_matrix_bytes,
    mlp_bytes_per_token,
    recompute_flops_per_token,
    trained_vision_rows,
)
from vlm_finetune.memory.auto_batch import plan_micro_batch, searched_with_real_steps
from vlm_finetune.memory.comm import all_to_all_buffer_rows, communication_rows, experts_per_rank
from vlm_finetune.memory.count import count_model
from vlm_finetune.memory.inputs import NF4_BYTES_PER_PARAM, PlanInputs, plan_inputs
from vlm_finetune.memory.load_plan import check_host_load, gpu_at_load, plan_load
from vlm_finetune.memory.report import GiB, MemoryPlan, Row
from vlm_finetune.memory.search import fastest_checkpointing
from vlm_finetune.memory.state_rows import optimizer_rows, parameter_rows, strategy_rows
from vlm_finetune.memory.validation import plan_validation
from vlm_finetune.models.base import Mode, Part, parse_trainability
from vlm_finetune.models.registry import get_family
from vlm_finetune.precision import check_precision, is_nf4, weights_policy
from vlm_finetune.settings import RunSettings, is_auto
from vlm_finetune.strategies import check_combination
from vlm_finetune.trainability import CHECKPOINT_SCOPES, builds_partitioned, checkpointed_layer_count

log = logging.getLogger(__name__)

# --- calibrated / estimated constants (see the module docstring; the usable fraction of a GPU is in report) --
CUDA_CONTEXT_BYTES = int(0.6 * GiB)   # CUDA context + cuBLAS/cuDNN workspaces: outside the allocator's count
NCCL_BYTES = int(0.5 * GiB)           # NCCL communicators and their buffers, multi-GPU only
FRAGMENTATION = 0.06                  # reserved / allocated - 1 seen on the H100 runs: 1.03-1.09
STATIC_CATEGORIES = ("parameters", "gradients", "optimizer", "strategy")  # held between steps, and in validation


def sample_geometry(settings: RunSettings, seq: int | None, image_px: int | None) -> tuple[int, int]:
    """(tokens per sample, image side in pixels): the given values, else the configured ones (the largest
    image a GLM-4.1V processor makes, max_image_size, where the model config has one)."""
    return int(seq or settings.data.max_length), int(image_px or settings.model.largest_image_side)


def _micro_batch(value: Any) -> int | None:
    """data.micro_batch_size: a positive number, or None for auto."""
    if is_auto(value):
        return None
    if isinstance(value, int) and value >= 1:
        return value
    raise ConfigError(f"data.micro_batch_size={value!r} must be a positive integer or auto")


# --- the plan ---------------------------------------------------------------------------------------------
def plan_run(settings: RunSettings, overrides: list[str], seq: int | None = None, image_px: int | None = None,
             images: int = 1) -> MemoryPlan:
    """The memory plan of a training run with these settings (`overrides`: the training command's overrides
    they were composed from, for the plan's command line). No suggestions (memory.suggest adds them);
    `vlm_finetune.plan.plan_memory(overrides)` composes and plans."""
    precision = settings.precision
    check_precision(precision)
    hardware = resolve(settings.hardware)
    check_combination(settings.strategy, hardware, precision)
    modes = parse_trainability(settings.trainability)
    family = get_family(settings.model.family)
    seq, image_px = sample_geometry(settings, seq, image_px)
    dims = family.memory_dims(settings.model, image_px)  # Family's default raises a ConfigError naming the method
    strategy, stage = settings.strategy.strategy, settings.strategy.zero_stage
    policy = weights_policy(precision, strategy)
    threshold = int(float(settings.strategy.deepspeed["stage3_param_persistence_threshold"])) if stage == 3 else 0
    count = count_model(settings.model, modes, settings.lora, family, policy, threshold)
    micro_batch = _micro_batch(settings.data.micro_batch_size)
    expert_lora = modes[Part.LLM] is Mode.LORA and bool(family.lora_target_parameters(Part.LLM, settings.model,
                                                                                        settings.lora))
    inputs = plan_inputs(settings, dims, count, modes, hardware.world_size, policy, expert_lora)
    num_layers = inputs.num_layers
    checkpointed = checkpointed_layer_count(settings.model.activation_checkpointing, num_layers)
    scope = settings.speed.checkpoint_scope
    accumulate = settings.accumulate_grad_batches if isinstance(settings.accumulate_grad_batches, int) else 1
    notes: list[str] = [experts_per_rank(inputs)] if experts_per_rank(inputs) else []

    def build(batch_size: int, checkpointed_layers: int, scope: str = scope) -> MemoryPlan:
        tokens = seq * batch_size
        rows, phase = plan_rows(inputs, tokens, batch_size, images, checkpointed_layers, scope)
        return MemoryPlan(list(overrides), rows, hardware.name, hardware.world_size, hardware.gpu_memory_gib, phase,
                          checkpointed_layers, num_layers, batch_size, tokens, list(notes),
                          parameters=sum(group.numel for group in count.groups),
                          trainable_parameters=inputs.trainable_numel, checkpoint_scope=scope,
                          communication=communication_rows(inputs, tokens, accumulation, checkpointed_layers),
                          interconnect_gbps=hardware.interconnect_gbps)

    notes += list(settings.auto_choices)  # precision=auto
    accumulation = accumulate  # micro-batch auto may raise it (the global batch kept); build() reads it when called
    if micro_batch is None:
        micro_batch, accumulation, note = plan_micro_batch(
            lambda size: build(size, num_layers if checkpointed == "auto" else checkpointed,
                               "layer" if checkpointed == "auto" else scope), settings, hardware.world_size,
            hardware.accelerator)
        notes.append(note)
    if checkpointed == "auto":
        # both scopes unless the command line fixes one: the fastest plan that fits (least recompute)
        asked = any(o.split("=", 1)[0].lstrip("+~") == "speed.checkpoint_scope" for o in overrides)
        checkpointed, scope = fastest_checkpointing(lambda layers, s: build(micro_batch, layers, s), num_layers,
                                                    (scope,) if asked else CHECKPOINT_SCOPES,
                                                    lambda s: _recompute_cost(inputs, s, seq))
        what = "decoder layers checkpointed" if scope == "layer" else "decoder layers' MLPs recomputed (selective)"
        notes.append(f"model.activation_checkpointing=auto: {checkpointed} of {num_layers} {what}, the plan with "
                     "the least recompute that fits the budget")
    if precision == "32-true" and hardware.accelerator == "gpu":
        notes.append("precision=32-true keeps the frozen base in float32; precision=bf16-mixed halves it")
    result = build(micro_batch, checkpointed, scope)
    result.notes = notes
    result.precision, result.accumulate_grad_batches = precision, accumulation
    val_batch = settings.data.val_batch_size
    # between steps: parameters, gradients, optimizer states and the strategy's standing buffers
    static = sum(row.bytes for row in result.rows
                 if row.where == "gpu" and row.category in STATIC_CATEGORIES and not row.in_flight)
    # the validation's forward gathers module by module as the step's does, but neither prefetches nor keeps
    # anything gathered for reuse: both follow the training step's trace (measured: scripts/phase_peaks.py)
    gathering = sum(row.bytes for row in result.rows if row.in_flight == "gather")
    result.validation = plan_validation(
        inputs, static + gathering, result.allocated_bytes, seq, images, micro_batch,
        None if is_auto(val_batch) else int(val_batch or micro_batch),
        settings.eval.max_new_tokens if settings.eval.generate else 0, settings.data.num_val)
    result.save_bytes = static + inputs.trainable_numel * 4  # the trainables gathered whole, in float32, to write
    if stage == 3 and is_auto(settings.strategy.deepspeed.get("stage3_allgather_sequential")):
        result.choices["trainer.stage3_allgather_sequential"] = False
        if result.fits is False:  # auto: gather in place only where that is what makes the step fit
            in_place = settings.replace(strategy=settings.strategy.with_deepspeed(stage3_allgather_sequential=True))
            alternative = plan_run(in_place, overrides, seq, image_px, images)
            if alternative.fits:
                alternative.choices["trainer.stage3_allgather_sequential"] = True
                alternative.notes.append("trainer.stage3_allgather_sequential=auto: true: with each parameter "
                                         "gathered into its own buffer (no flat-buffer copy, a parameter "
                                         "prefetched per module fetch) the step fits; it does not otherwise "
                                         f"({result.peak_bytes / GiB:.2f} GiB)")
                return alternative
    partitioned = builds_partitioned(family, settings.model, stage == 3, modes, policy,
                                     searched_with_real_steps(settings, hardware.accelerator))
    on_host = hardware.accelerator != "gpu" or settings.strategy.offload_parameters
    streamed = is_nf4(precision) and family.quantises_while_loading(settings.model)
    four_bit = sum(r.bytes for r in result.rows if r.four_bit)
    if inputs.shards_parameters and is_nf4(precision):
        # FSDP, ZeRO-3: each rank quantises the whole model in host memory (bitsandbytes quantises whole tensors),
        # then the engine shards the codes onto the GPUs (ZeRO-3: zero3_nf4.partition_first, a tensor at a time)
        on_host = True
        four_bit = int(count.quantizable_numel * NF4_BYTES_PER_PARAM) + count.expert_nf4_bytes
    # FSDP2 / ZeRO-3 + nf4: the ranks of a node build one at a time, each keeping its parameter shards once its
    # turn is over
    kept = (sum(r.bytes for r in result.rows if r.category == "parameters")
            if loads_in_turns(settings.strategy.strategy, stage, precision, hardware.devices,
                              searched_with_real_steps(settings, hardware.accelerator)) else None)
    result.load = plan_load(count, hardware.devices, hardware.host_memory_gib, hardware.world_size, partitioned,
                            on_host, streamed, four_bit if on_host else 0, kept)
    if result.fits is not None:  # GPUs: one GPU at the load, against the step's budget
        sliced = partitioned and family.checkpoint_folder(settings.model) is not None
        result.load.gpu_bytes_per_rank, result.load.gpu_what = gpu_at_load(
            result.total("parameters"), count, inputs.shards_parameters, is_nf4(precision), inputs.offload_parameters,
            sliced)
        result.load.gpu_budget_bytes = result.budget_bytes
    return result


def _recompute_cost(inputs: PlanInputs, scope: str, seq: int) -> float:
    """Forward FLOPs per token one checkpointed layer of this scope runs again (the larger of dense and MoE)."""
    moe = int(inputs.dims.get("moe_layers", 0))
    kinds = ([False] if inputs.num_layers > moe else []) + ([True] if moe else [])
    return max(recompute_flops_per_token(inputs.dims, scope, seq, kind) for kind in kinds)


def plan_rows(inputs: PlanInputs, tokens: int, micro_batch: int, images: int, checkpointed_layers: int,
              scope: str = "layer") -> tuple[list[Row], str]:
    """Every row of one build and the name of the phase that peaks (LLM backward, or the forward of a
    frozen vision tower when that is larger than everything the LLM's backward holds)."""
    rows = (parameter_rows(inputs) + optimizer_rows(inputs) + strategy_rows(inputs)
            + all_to_all_buffer_rows(inputs, tokens))
    static = sum(row.bytes for row in rows if row.where == "gpu")
    dynamic_rows = (activation_rows(inputs, tokens, micro_batch, images, checkpointed_layers, scope)
                    + loss_rows(inputs, tokens))
    dynamic = sum(row.bytes for row in dynamic_rows)
    patches = _patches(inputs, micro_batch, images)
    vision_forward = 0
    if inputs.modes[Part.VISION] is Mode.FROZEN:
        # a frozen tower saves nothing; its peak is one block's forward working set, before the LLM runs
        width = 3 * inputs.dims["vision_hidden"] + 3 * inputs.dims["vision_intermediate"]
        forward_rows = [Row("activations", f"frozen ViT forward working set, {patches} patches",
                            int(patches * width * inputs.act_bytes))]
        if inputs.dims.get("vision_eager_attention"):
            # scores, their float32 softmax and its copy in the compute dtype, for every image at once
            matrix = eager_attention_matrix_bytes(inputs.dims, int(inputs.dims["vision_patches_per_image"]), 1)
            count = images * micro_batch
            forward_rows.append(Row("activations", f"frozen ViT eager vision attention, one block: {count} x "
                                    f"{_gib(matrix * 2)} GiB (bf16) matrices, 3 copies",
                                    int(count * matrix * (4 + 2 * inputs.act_bytes))))
        vision_forward = sum(row.bytes for row in forward_rows)
    phase = "LLM backward"
    if vision_forward > dynamic:
        dynamic_rows = forward_rows
        phase = "vision forward"
    allocated = static + max(dynamic, vision_forward)
    multi_gpu = inputs.world > 1
    overhead = int(allocated * FRAGMENTATION) + CUDA_CONTEXT_BYTES + (NCCL_BYTES if multi_gpu else 0)
    overhead_row = Row("overhead", "CUDA context, allocator fragmentation" + (", NCCL" if multi_gpu else ""), overhead)
    return rows + dynamic_rows + [overhead_row], phase


def _patches(inputs: PlanInputs, micro_batch: int, images: int) -> int:
    """ViT patches of a micro-batch."""
    return int(inputs.dims["vision_patches_per_image"]) * images * micro_batch


def activation_rows(inputs: PlanInputs, tokens: int, micro_batch: int, images: int, checkpointed_layers: int,
                    scope: str = "layer") -> list[Row]:
    """What the LLM and a trained vision tower hold at the LLM's backward. Scope `layer` checkpoints the first
    `checkpointed_layers` whole decoder layers (and the vision blocks); scope `mlp` recomputes only those
    layers' MLPs and keeps the rest of each layer (the vision blocks are not checkpointed)."""
    dims, act_bytes, modes = inputs.dims, inputs.act_bytes, inputs.modes
    llm_trains = modes[Part.LLM] is not Mode.FROZEN
    vision_trains = modes[Part.VISION] is not Mode.FROZEN
    hidden = dims["hidden"]
    num_layers = inputs.num_layers
    moe_layers = int(dims.get("moe_layers", 0))
    dense_layers = num_layers - moe_layers
    lora = (inputs.lora_rank, inputs.count.lora_linears_per_layer, modes[Part.LLM] is Mode.FULL)
    per_dense = decoder_layer_bytes_per_token(dims, act_bytes, inputs.liger, llm_trains, False, *lora) * tokens
    per_moe = 0.0
    if moe_layers:
        per_moe = decoder_layer_bytes_per_token(dims, act_bytes, inputs.liger, llm_trains, True, *lora) * tokens
    # checkpointed layers are taken from the first; MoE layers are taken to follow the dense ones
    kept = num_layers - checkpointed_layers
    kept_moe = min(kept, moe_layers)
    kept_dense = kept - kept_moe
    saved = kept_dense * per_dense + kept_moe * per_moe
    width = max(dims.get("intermediate", 0), dims.get("experts_per_token", 0) * dims.get("moe_intermediate", 0))
    backward_working = tokens * 2 * width * act_bytes  # the gradient of the layer's largest MLP output in backward
    rows = [Row("activations", f"LLM saved, {kept} layers not checkpointed", int(saved))]
    if scope == "mlp":
        # the selective layers keep all but their MLP's insides; the recompute is one MLP's working set
        ckpt_moe = moe_layers - kept_moe
        selective = [decoder_layer_bytes_per_token(dims, act_bytes, inputs.liger, llm_trains, moe, *lora,
                                                   mlp_recomputed=True,
                                                   mlp_lora_linears=inputs.count.mlp_lora_linears_per_layer) * tokens
                     for moe in (False, bool(moe_layers))]
        held = (checkpointed_layers - ckpt_moe) * selective[0] + ckpt_moe * selective[1]
        recompute = max(mlp_bytes_per_token(dims, act_bytes, inputs.liger, llm_trains, moe) * tokens
                        for moe in ([False] if dense_layers else []) + ([True] if moe_layers else []))
        rows += [Row("activations", f"LLM kept by {checkpointed_layers} layers with the MLP recomputed", int(held)),
                 Row("activations", "LLM recompute of one MLP", int(recompute) if checkpointed_layers else 0)]
    else:
        boundaries = checkpointed_layers * tokens * hidden * act_bytes
        recompute = max(per_dense if dense_layers else 0, per_moe) if checkpointed_layers else 0
        rows += [Row("activations", f"LLM checkpoint boundaries, {checkpointed_layers} layers", int(boundaries)),
                 Row("activations", "LLM recompute of one checkpointed layer", int(recompute))]
    rows.append(Row("activations", "LLM backward working set (gradients in flight)", int(backward_working)))
    if inputs.expert_lora_stacks and moe_layers:
        # lora.expert_forward=peft: each MoE layer that runs with saved activations (and the one recomputed) keeps
        # its whole W + delta stacks for backward, and the backward makes one stack's gradient
        stack = inputs.count.expert_numel // moe_layers * act_bytes
        held = kept_moe + (1 if checkpointed_layers > dense_layers else 0)
        rows.append(Row("activations", f"PEFT expert LoRA: W + delta of {held} MoE layer(s) saved, one gradient "
                                       "(lora.expert_forward=peft)", int((held + 1) * stack)))

    if inputs.stage == 3 and moe_layers and inputs.count.expert_numel and not inputs.expert_lora:
        # frozen fused experts (no LoRA on them): the grouped-GEMM forward saves its weights for the input's
        # gradient, so under ZeRO-3 each MoE layer that keeps its activations keeps its gathered expert stack until
        # its backward (scripts/phase_peaks.py, LoRA on attention); checkpointed layers keep only the one recomputed
        stack = inputs.count.expert_numel // moe_layers * act_bytes
        held = kept_moe + (1 if checkpointed_layers > dense_layers else 0)
        rows.append(Row("activations", f"ZeRO-3: frozen experts' gathered weights saved by {held} MoE layer(s)",
                        int(held * stack)))
    if is_nf4(inputs.precision) and moe_layers and inputs.count.expert_numel:
        # 4-bit experts: one expert's matrix at a time dequantised, for its tokens and again in backward for the
        # input's gradient (models/moe_lora.py, _Nf4ExpertLinear); none is kept for backward
        rows.append(Row("activations", "nf4 experts: one expert's gate_up matrix dequantised",
                        2 * int(dims["moe_intermediate"]) * int(hidden) * act_bytes))
    image_tokens = int(dims["image_tokens_per_image"])
    rows.append(Row("activations", f"image tokens ({image_tokens * images * micro_batch} into the LLM)",
                    int(image_tokens * images * micro_batch * hidden * act_bytes)))
    extra = int(dims.get("vision_extra_saved_elements_per_image", 0))
    if extra and (vision_trains or modes[Part.PROJECTOR] is not Mode.FROZEN):
        # trainable modules between the towers and the LLM that save more than the image tokens (the label
        # names the one family that declares it)
        rows.append(Row("activations", f"vision-to-LLM modules saved for backward, {images * micro_batch} image(s)",
                        int(extra * images * micro_batch * act_bytes)))
    if vision_trains:
        rows += [Row("activations", label, size) for label, size in trained_vision_rows(
            dims, act_bytes, modes[Part.VISION] is Mode.FULL, inputs.count.vision_lora_linears, inputs.lora_rank,
            images * micro_batch, bool(checkpointed_layers and scope == "layer"))]
    return rows


def _gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def loss_rows(inputs: PlanInputs, tokens: int) -> list[Row]:
    act_bytes, vocab = inputs.act_bytes, int(inputs.dims["vocab"])
    if inputs.loss_impl == "plain":
        logits = tokens * vocab * (act_bytes + 4 + 4 + 4)  # logits, float32 copy, log-softmax, its gradient
        return [Row("loss", f"full logits {tokens} x {vocab} (bf16 + float32 copies)", int(logits))]
    rows_at_once = min(inputs.loss_chunk, tokens)
    return [Row("loss", f"supervised hidden rows + one chunk of logits ({rows_at_once} x {vocab})",
                int(tokens * inputs.dims["hidden"] * act_bytes + rows_at_once * vocab * act_bytes))]


def check_host_memory(settings: RunSettings, overrides: list[str]) -> None:
    """A run's preflight: the load row of its plan (what `python -m vlm_finetune.plan` prints) against the host
    memory, before any weight loads, so that a model whose load cannot fit stops in seconds with the figures
    instead of loading for minutes until the machine runs out. A ConfigError found on the meta-device model (a
    LoRA target that matches nothing) passes through; any other planner failure only skips the check."""
    try:
        load = plan_run(settings, overrides).load
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  the run's own checks came first; a planner gap must not stop it
        log.warning("host-memory preflight skipped: the planner failed (%s: %s)", type(err).__name__, err)
        return
    check_host_load(load, available_host_memory_gib(), overrides)
