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

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_finetune.errors import ConfigError

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

# --- calibrated / estimated constants (see the module docstring) -----------------------------------------
CUDA_CONTEXT_BYTES = int(0.6 * GiB)   # CUDA context + cuBLAS/cuDNN workspaces: outside the allocator's count
NCCL_BYTES = int(0.5 * GiB)           # NCCL communicators and their buffers, multi-GPU only
FRAGMENTATION = 0.06                  # reserved / allocated - 1 seen on the H100 runs: 1.03-1.09
USABLE_FRACTION = 0.97                # of the profile's nominal GPU memory (driver reservations, ECC)
NF4_BYTES_PER_PARAM = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit codes + fp8 absmax per 64 + fp32 per 256 blocks
ADAM_STATES = 2


@dataclass
class Row:
    """One line of the breakdown: bytes per GPU (or in CPU memory when `where == "cpu"`)."""

    category: str  # parameters | gradients | optimizer | activations | loss | strategy | overhead
    item: str
    bytes: int
    where: str = "gpu"


@dataclass
class Suggestion:
    label: str
    overrides: list[str]
    plan: MemoryPlan

    @property
    def command(self) -> str:
        return "python -m vlm_finetune " + " ".join(shlex.quote(o) for o in self.overrides)


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

    def total(self, category: str | None = None, where: str = "gpu") -> int:
        return sum(r.bytes for r in self.rows if r.where == where and (category is None or r.category == category))

    @property
    def allocated_bytes(self) -> int:
        """Predicted peak of torch.cuda.max_memory_allocated() per GPU (what the benchmark measures)."""
        return self.total() - self.total("overhead")

    @property
    def peak_bytes(self) -> int:
        """Predicted peak per GPU including runtime overhead (what must fit in the GPU)."""
        return self.total()

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

    def render(self) -> str:
        lines = [f"vlm_finetune.plan: {' '.join(self.overrides) or '(defaults)'}",
                 f"hardware {self.hardware}: {self.world_size} " +
                 (f"GPU(s), {self.gpu_memory_gib:g} GiB each " if self.gpu_memory_gib > 0 else "CPU process(es) ") +
                 f"(budget {self.budget_bytes / GiB:.2f} GiB usable); micro-batch {self.micro_batch_size} x "
                 f"{self.tokens // max(self.micro_batch_size, 1)} tokens; {self.checkpointed_layers} of "
                 f"{self.num_layers} decoder layers checkpointed",
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
        cpu = [r for r in self.rows if r.where == "cpu" and r.bytes >= 0.005 * GiB]
        for row in cpu:
            lines.append(f"{'cpu memory':<12} {row.item:<62} {row.bytes / GiB:>11.2f}")
        lines += ["", f"verdict: {self.verdict} ({self.peak_bytes / GiB:.2f} GiB of {self.budget_bytes / GiB:.2f} GiB)"]
        lines += [f"note: {n}" for n in self.notes]
        if self.fits is False:
            if self.suggestions:
                lines += ["", "changes that make it fit, cheapest first:"]
                for i, s in enumerate(self.suggestions, 1):
                    lines.append(f"  {i}. {s.label}: predicted peak {s.plan.peak_bytes / GiB:.2f} GiB "
                                 f"({s.plan.verdict})\n     {s.command}")
            else:
                lines += ["", "no change tried here makes it fit (sharding, smaller micro-batch, checkpointing, "
                          "offload, 4-bit base, more GPUs)"]
        return "\n".join(lines)


# --- configuration --------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    """The training config for these overrides (the same composition `python -m vlm_finetune` uses)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()  # inside a running Hydra app (the OOM report plans from within training)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=[*overrides, "output_dir=/tmp/vlm_finetune_plan"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"the overrides {overrides} do not compose: {err}") from err
    finally:
        restore_gh_from_backup(backup)


def _checkpointed_layers(model_cfg: Any, num_layers: int) -> int | str:
    value = model_cfg.get("activation_checkpointing")
    if isinstance(value, str):
        if value.lower() == "auto":
            return "auto"
        raise ConfigError(f"model.activation_checkpointing={value!r}: use true, false, auto or a number of "
                          f"decoder layers (0-{num_layers})")
    if isinstance(value, bool) or value is None:
        return num_layers if value else 0
    if isinstance(value, int) and 0 <= value <= num_layers:
        return value
    raise ConfigError(f"model.activation_checkpointing={value!r}: use true, false, auto or a number of decoder "
                      f"layers (0-{num_layers})")


# --- exact parameter accounting on the meta device -------------------------------------------------------
@dataclass
class ParamGroup:
    part: str  # vision | projector | llm | other
    kind: str  # frozen | lora | full
    dtype: torch.dtype
    numel: int
    persistent_numel: int = 0  # parameters small enough for ZeRO-3 to keep whole on every rank


@dataclass
class ModelCount:
    groups: list[ParamGroup]
    unit_numels: list[int]       # wrapped units (decoder layers, vision blocks): FSDP / ZeRO-3 gather units
    trainable_unit_numels: list[int]  # numel of units holding at least one trainable parameter
    largest_fetch_numel: int     # largest module ZeRO-3 gathers at once (a leaf MoE block, or one weight)
    quantizable_numel: int       # frozen linear weights nf4 would quantise (LLM, not lm_head)
    lora_linears_per_layer: int = 0  # LoRA-adapted linears in one decoder layer


def _clean_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for part in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(part, "")
    return name


_COUNTS: dict[str, ModelCount] = {}


def count_model(cfg: Any, family: Any, dtype: torch.dtype, keep_fp32: bool, persistence_threshold: int = 0
                ) -> ModelCount:
    """Build the model on the meta device, apply the real trainability plan, and count its parameters by
    part, kind and dtype. Nothing is allocated and no weight file is read. Memoised per model, trainability,
    LoRA, dtype and threshold (suggestions re-plan the same model many times)."""
    from omegaconf import OmegaConf

    key = repr((OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.train, resolve=True),
                OmegaConf.to_container(cfg.lora, resolve=True), str(dtype), keep_fp32, persistence_threshold))
    if key not in _COUNTS:
        _COUNTS[key] = _count_model(cfg, family, dtype, keep_fp32, persistence_threshold)
    return _COUNTS[key]


def _count_model(cfg: Any, family: Any, dtype: torch.dtype, keep_fp32: bool, persistence_threshold: int) -> ModelCount:
    from omegaconf import OmegaConf

    from vlm_finetune.models.base import parse_trainability
    from vlm_finetune.trainability import apply_trainability, keep_trainables_fp32, plan_trainability

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # kernels and checkpointing change no parameter; Liger's patching needs a GPU
    model_cfg.update(liger_kernels=False, activation_checkpointing=False)
    model_cfg = OmegaConf.create(model_cfg)
    if not hasattr(family, "build_model"):
        raise ConfigError(f"model family {family.name!r} cannot build a model")
    model = family.build_model(model_cfg, dtype=dtype, device="meta")
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ConfigError(f"model family {family.name!r} did not build on the meta device; the planner loads no weights")
    plan = plan_trainability(family, model, parse_trainability(cfg.train), model_cfg, cfg.lora)
    with torch.device("meta"):
        model = apply_trainability(model, plan, cfg.lora)
    if keep_fp32:
        keep_trainables_fp32(model)

    part_of = [(name, part.value) for part, names in plan.part_modules.items() for name in names]
    part_of.sort(key=lambda item: -len(item[0]))

    def part_for(clean: str) -> str:
        for prefix, part in part_of:
            if clean == prefix or clean.startswith(prefix + "."):
                return part
        return "other"

    groups: dict[tuple, ParamGroup] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        clean = _clean_name(name)
        kind = "lora" if "lora_" in name else ("full" if param.requires_grad else "frozen")
        key = (part_for(clean), kind, param.dtype)
        group = groups.setdefault(key, ParamGroup(*key, 0))
        group.numel += param.numel()
        if persistence_threshold and param.numel() < persistence_threshold:
            group.persistent_numel += param.numel()

    unit_classes = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
    leaf_classes = tuple(getattr(family, "zero3_leaf_classes", ()) or ())
    units, trainable_units, fetch = [], [], 0
    quantizable = 0
    for name, module in model.named_modules():
        if isinstance(module, unit_classes):
            params = list(module.parameters())
            units.append(sum(p.numel() for p in params))
            if any(p.requires_grad for p in params):
                trainable_units.append(units[-1])
        if leaf_classes and isinstance(module, leaf_classes):
            fetch = max(fetch, sum(p.numel() for p in module.parameters()))
        else:
            own = sum(p.numel() for p in module.parameters(recurse=False))
            fetch = max(fetch, own)
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            clean = _clean_name(name)
            if part_for(clean) == "llm" and "lm_head" not in clean and not module.weight.requires_grad:
                quantizable += module.weight.numel()
    lora_linears = 0
    for module in model.modules():
        if isinstance(module, tuple(family.decoder_layer_classes)):
            lora_linears = sum(1 for n, _ in module.named_modules() if n.endswith("lora_A"))
            break
    return ModelCount(list(groups.values()), units, trainable_units, fetch, quantizable, lora_linears)


# --- activation model ------------------------------------------------------------------------------------
def decoder_layer_bytes_per_token(dims: dict, act_bytes: int, liger: bool, llm_trains: bool, moe_layer: bool,
                                  lora_rank: int = 0, lora_linears: int = 0, llm_full: bool = False) -> float:
    """Bytes autograd keeps for backward per token in one decoder layer (pre-norm GLM-style layer: four
    RMSNorms, attention with q/k/v/o, gated MLP), at `act_bytes` per activation element.

    Attention (SDPA flash / memory-efficient kernels): q and k after rotary, v, the output, the output's
    contiguous copy into o_proj, and a float32 logsumexp per head. Linear inputs that LoRA or full training
    need (the normed input of q/k/v, of gate_up). The MLP keeps gate_up's output (SiLU's input), the
    activation and the product (down_proj's input); Liger's SwiGLU keeps only gate_up's output and
    recomputes the rest. HF's RMSNorm keeps a float32 copy of its input; Liger's keeps the input as is
    plus a float32 reciprocal RMS. A MoE layer replaces the MLP by the router (float32 logits), the
    top-k routed experts (each a copy of the token's input and its gated MLP) and the shared experts.
    Each LoRA-adapted linear keeps lora_A's output (rank values); rotary keeps its cos/sin per layer. A fully
    trained LLM (float32 norm weights under mixed precision) also keeps each norm's normalised input and
    casts the float32 norm output once per reading linear (q, k, v): six more hidden-sized tensors."""
    h, q, kv = dims["hidden"], dims["q_dim"], dims["kv_dim"]
    heads = dims["heads"]
    a = act_bytes
    norms = 4 * (h * a + 4) if liger else 4 * (h * 4 + 4)
    attention = (2 * q + 2 * kv) * a + 4 * heads + q * a  # q_rot, out, k_rot, v; lse; o_proj's input copy
    attention += 2 * dims.get("rotary_dim", dims["q_dim"] // heads) * a
    lora = lora_linears * lora_rank * a
    linear_inputs = 2 * h * a if llm_trains else 0     # normed inputs of q/k/v and of the MLP
    if llm_full:
        linear_inputs += 6 * h * a

    def gated_mlp(width: int) -> float:
        # gate_up's output (2 x width) is SiLU's input; HF's MLP also keeps the activation, and the product
        # when down_proj trains; Liger's SwiGLU recomputes the activation
        kept = 2 * width + (0 if liger else width) + (width if llm_trains else 0)
        return kept * a

    if moe_layer:
        k, e = dims["experts_per_token"], dims["experts"]
        im, shared = dims["moe_intermediate"], dims.get("shared_experts", 0)
        mlp = 4 * e + k * (h * a + gated_mlp(im)) + shared * gated_mlp(im)
    else:
        mlp = gated_mlp(dims["intermediate"])
    return norms + attention + linear_inputs + mlp + lora


def vision_block_bytes_per_patch(dims: dict, act_bytes: int, full: bool = True) -> float:
    """Bytes a trained ViT block keeps per patch: two float32 RMSNorm inputs, qkv's output (v is a view of
    it), q and k after rotary, the attention output and its copy into proj, the gated MLP (gate output,
    up output, the activation, the product). With the block trained fully under mixed precision the norm
    weights are float32 masters, so each norm also keeps its normalised input for the weight gradient and
    its float32 output is cast to bf16 separately by every linear that reads it (qkv; gate and up); with
    LoRA (half-precision norms) one bf16 norm output feeds them all."""
    h, i = dims["vision_hidden"], dims["vision_intermediate"]
    norm_side = (2 + 3) * h if full else 2 * h
    return 2 * (h * 4 + 4) + (norm_side + 3 * h + 2 * h + 2 * h) * act_bytes + 4 * dims["vision_heads"] + 4 * i * act_bytes


def image_geometry(dims: dict, image_px: int) -> tuple[int, int]:
    """(ViT patches, LLM image tokens) of one square image of `image_px` pixels."""
    return int(dims["vision_patches_per_image"]), int(dims["image_tokens_per_image"])


# --- the plan ---------------------------------------------------------------------------------------------
SUGGESTION_ORDER = ("shard", "micro_batch", "checkpointing", "offload", "nf4", "more_gpus")


def plan_memory(overrides: list[str], seq: int | None = None, image_px: int | None = None, images: int = 1,
                suggest: bool = True, cfg: Any = None) -> MemoryPlan:
    """The memory plan of a training run configured by `overrides` (the training command's overrides)."""
    from vlm_finetune.hardware import resolve
    from vlm_finetune.models import get_family
    from vlm_finetune.models.base import Mode, parse_trainability
    from vlm_finetune.strategies import check_combination
    from vlm_finetune.train import MIXED, PRECISIONS

    cfg = cfg if cfg is not None else compose(list(overrides))
    precision = str(cfg.precision.name)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; use one of {sorted(PRECISIONS)}")
    hardware = resolve(cfg.hardware)
    check_combination(cfg.trainer, hardware, precision)
    modes = parse_trainability(cfg.train)
    family = get_family(cfg.model.family)
    if not hasattr(family, "memory_dims"):
        raise ConfigError(f"model family {family.name!r} does not declare memory_dims(model_cfg, image_size), which "
                          "the planner needs for activations; implement it in the family (see models/base.py)")
    seq = int(seq or cfg.data.max_length)
    image_px = int(image_px or cfg.model.get("max_image_size") or cfg.model.get("image_size") or 336)
    dims = family.memory_dims(cfg.model, image_px)

    t = cfg.trainer
    strategy = str(t.strategy)
    stage = int(t.get("zero_stage", 0)) if strategy == "deepspeed" else 0
    world = hardware.world_size
    mixed = precision in MIXED
    half = precision != "32-true"
    load_dtype = PRECISIONS[precision][1]
    if strategy == "fsdp" and mixed:
        load_dtype = torch.float32  # train.py: FSDP keeps one dtype per unit, float32, and computes in bf16
    keep_fp32 = mixed and not (strategy == "fsdp")
    threshold = int(float(t.get("stage3_param_persistence_threshold", 0))) if stage == 3 else 0
    count = count_model(cfg, family, load_dtype, keep_fp32, threshold)
    notes: list[str] = []

    mbs_raw = cfg.data.micro_batch_size
    if isinstance(mbs_raw, str) and mbs_raw.lower() == "auto":
        mbs = None
    elif isinstance(mbs_raw, int) and mbs_raw >= 1:
        mbs = mbs_raw
    else:
        raise ConfigError(f"data.micro_batch_size={mbs_raw!r} must be a positive integer or auto")
    num_layers = int(dims["layers"])
    ckpt = _checkpointed_layers(cfg.model, num_layers)

    def build(mbs_value: int, ckpt_layers: int) -> MemoryPlan:
        rows = _rows(cfg, dims, count, hardware, strategy, stage, precision, mixed, half, modes, Mode,
                     seq * mbs_value, mbs_value, images, ckpt_layers, num_layers)
        phase = rows.pop()  # the last row carries the name of the peak phase
        return MemoryPlan(list(overrides), rows, hardware.name, world, hardware.gpu_memory_gib, phase.item,
                          ckpt_layers, num_layers, mbs_value, seq * mbs_value, list(notes),
                          parameters=sum(g.numel for g in count.groups),
                          trainable_parameters=sum(g.numel for g in count.groups if g.kind != "frozen"))

    if mbs is None:
        mbs = largest_micro_batch(lambda m: build(m, num_layers if ckpt == "auto" else ckpt))
        notes.append(f"data.micro_batch_size=auto: a GPU search with real steps picks it at run time; the plan "
                     f"assumes {mbs}, the largest the model predicts fits")
    if ckpt == "auto":
        ckpt = fewest_checkpointed_layers(lambda n: build(mbs, n), num_layers)
        notes.append(f"model.activation_checkpointing=auto: {ckpt} of {num_layers} decoder layers checkpointed, "
                     "the fewest that fit the budget")
    if precision == "nf4" and not cfg.model.get("path"):
        notes.append("precision=nf4 quantises a checkpoint folder: set model.path (a model built from its config "
                     "has no weights to quantise)")
    if precision == "32-true" and hardware.accelerator == "gpu":
        notes.append("precision=32-true keeps the frozen base in float32; precision=bf16-mixed halves it")
    if count.trainable_unit_numels and strategy == "fsdp":
        notes.append("FSDP (use_orig_params) keeps a float32 gradient for whole units that hold a trainable "
                     "parameter, frozen weights included")
    result = build(mbs, ckpt)
    result.notes = notes
    if suggest and result.fits is False:
        result.suggestions = suggestions(list(overrides), result, seq, image_px, images, cfg)
    return result


def _rows(cfg, dims, count: ModelCount, hardware, strategy: str, stage: int, precision: str, mixed: bool,
          half: bool, modes, Mode, tokens: int, mbs: int, images: int, ckpt_layers: int, num_layers: int) -> list[Row]:
    t = cfg.trainer
    world = hardware.world_size
    rows: list[Row] = []
    offload_opt = bool(t.get("offload_optimizer"))
    offload_params = bool(t.get("offload_parameters"))
    deepspeed_half = strategy == "deepspeed" and half
    optimizer_name = str(cfg.optimizer.get("name", "adamw"))
    states = ADAM_STATES if optimizer_name == "adamw" else (1 if float(cfg.optimizer.get("momentum", 0) or 0) else 0)

    # -- parameters -------------------------------------------------------------------------------------
    trainable_numel = sum(g.numel for g in count.groups if g.kind != "frozen")
    trainable_bytes = 0
    for g in sorted(count.groups, key=lambda g: ("vision", "projector", "llm", "other").index(g.part)):
        dtype = g.dtype
        if deepspeed_half:  # DeepSpeed casts the module to bf16/fp16 and keeps float32 masters in the optimizer
            dtype = torch.bfloat16 if precision != "fp16-mixed" else torch.float16
        size = torch.empty((), dtype=dtype).element_size()
        numel = g.numel
        label = f"{g.part} {g.kind} {str(dtype).removeprefix('torch.')}"
        if precision == "nf4" and g.part == "llm" and g.kind == "frozen":
            quant = min(count.quantizable_numel, numel)
            rows.append(Row("parameters", "llm frozen nf4 (4-bit, double-quantised)", int(quant * NF4_BYTES_PER_PARAM)))
            numel -= quant
        if g.kind != "frozen":
            trainable_bytes += numel * size
        if strategy == "fsdp" or stage == 3:
            # ZeRO-3 partitions every parameter; those below the persistence threshold are also kept whole
            sharded = numel
            where = "cpu" if offload_params else "gpu"
            if g.persistent_numel:
                rows.append(Row("parameters", label + " (small, kept whole)", g.persistent_numel * size))
            rows.append(Row("parameters", label + f" (sharded 1/{world})", math.ceil(sharded / world) * size, where))
            if offload_params:
                rows[-1].item = label + f" (sharded 1/{world}, offloaded)"
        else:
            rows.append(Row("parameters", label, numel * size))

    # -- gradients and optimizer states -----------------------------------------------------------------
    grad_bytes = trainable_bytes
    if strategy == "deepspeed":
        half_size = 2 if half else 4
        # ZeRO-2/3: half-precision gradients reduced into this rank's partition; a float32 copy of the
        # partition exists during the step
        partition = math.ceil(trainable_numel / world)
        rows.append(Row("gradients", f"trainable {'bf16' if half else 'fp32'} (partition 1/{world})",
                        partition * half_size))
        where_opt = "cpu" if offload_opt else "gpu"
        if half:
            rows.append(Row("gradients", f"fp32 copy of the partition for the optimizer step (1/{world})",
                            partition * 4, where_opt))
        # DeepSpeed's optimizer holds a float32 copy of the partition, under 32-true too (ZeRO-3 would reuse
        # float32 weights, but compares a device string with a torch.device and so always copies;
        # tests/test_zero_cpu.py measures it)
        master = 4
        rows.append(Row("optimizer", f"fp32 master + {states} AdamW states (partition 1/{world})",
                        partition * (master + 4 * states), where_opt))
    elif strategy == "fsdp":
        unit_total = sum(count.trainable_unit_numels)
        root_trainable = max(0, trainable_numel - unit_total)
        grad_numel = unit_total + root_trainable
        rows.append(Row("gradients", f"fp32, whole units with a trainable weight (sharded 1/{world})",
                        math.ceil(grad_numel / world) * 4))
        rows.append(Row("optimizer", f"{states} AdamW states fp32 (sharded 1/{world})",
                        math.ceil(trainable_numel / world) * 4 * states))
    else:
        rows.append(Row("gradients", "trainable (dtype of each parameter)", grad_bytes))
        rows.append(Row("optimizer", f"{states} {optimizer_name} state(s) per trainable parameter", grad_bytes * states))

    # -- strategy buffers -------------------------------------------------------------------------------
    gathered_size = 2 if half else 4
    if strategy == "deepspeed":
        bucket = min(int(float(t.reduce_bucket_size)), trainable_numel) * (2 if half else 4)
        rows.append(Row("strategy", "ZeRO reduce bucket (contiguous gradients)", bucket))
        if stage == 3:
            prefetch = int(float(t.stage3_prefetch_bucket_size))
            fetch = count.largest_fetch_numel
            live = min(fetch + min(prefetch, fetch), max(int(float(t.stage3_max_live_parameters)), fetch))
            rows.append(Row("strategy", "ZeRO-3 gathered module + prefetch bucket", live * gathered_size))
        else:
            rows.append(Row("strategy", "ZeRO-2 all-gather bucket (updated parameters)",
                            min(int(float(t.allgather_bucket_size)), trainable_numel) * (2 if half else 4)))
    elif strategy == "fsdp":
        unit = max(count.unit_numels or [0])
        total = sum(g.numel for g in count.groups)
        root = total - sum(count.unit_numels)
        rows.append(Row("strategy", "FSDP all-gathers: two units (current + prefetch) in compute dtype",
                        2 * unit * gathered_size))
        rows.append(Row("strategy", "FSDP root unit held whole (embeddings, head, projector)", root * gathered_size))

    # -- activations ------------------------------------------------------------------------------------
    a = 2 if half else 4
    liger = bool(cfg.model.get("liger_kernels"))
    llm_trains = modes[_part("LLM")] is not Mode.FROZEN
    vision_trains = modes[_part("VISION")] is not Mode.FROZEN
    h = dims["hidden"]
    moe_layers = int(dims.get("moe_layers", 0))
    dense_layers = num_layers - moe_layers
    lora = (int(cfg.lora.r), count.lora_linears_per_layer, modes[_part("LLM")] is Mode.FULL)
    per_dense = decoder_layer_bytes_per_token(dims, a, liger, llm_trains, False, *lora) * tokens
    per_moe = decoder_layer_bytes_per_token(dims, a, liger, llm_trains, True, *lora) * tokens if moe_layers else 0.0
    # checkpointed layers are taken from the first; MoE layers follow the dense ones in GLM-4.5V
    kept = num_layers - ckpt_layers
    kept_moe = min(kept, moe_layers)
    kept_dense = kept - kept_moe
    saved = kept_dense * per_dense + kept_moe * per_moe
    boundaries = ckpt_layers * tokens * h * a
    recompute = max(per_dense if dense_layers else 0, per_moe) if ckpt_layers else 0
    width = max(dims.get("intermediate", 0), dims.get("experts_per_token", 0) * dims.get("moe_intermediate", 0))
    backward_working = tokens * 2 * width * a  # the gradient of the largest MLP output of the layer in backward
    rows.append(Row("activations", f"LLM saved, {kept} layers not checkpointed", int(saved)))
    rows.append(Row("activations", f"LLM checkpoint boundaries, {ckpt_layers} layers", int(boundaries)))
    rows.append(Row("activations", "LLM recompute of one checkpointed layer", int(recompute)))
    rows.append(Row("activations", "LLM backward working set (gradients in flight)", int(backward_working)))

    patches, image_tokens = image_geometry(dims, 0)
    total_patches = patches * images * mbs
    rows.append(Row("activations", f"image tokens ({image_tokens * images * mbs} into the LLM)",
                    int(image_tokens * images * mbs * h * a)))
    mining = int(dims.get("mining_saved_elements_per_image", 0))
    if mining and (vision_trains or modes[_part("PROJECTOR")] is not Mode.FROZEN):
        # MGM's patch info mining: trainable projectors over the high-res sub-grids save their inputs
        rows.append(Row("activations", f"patch info mining saved for backward, {images * mbs} image(s)",
                        int(mining * images * mbs * a)))
    vision_phase = 0
    if vision_trains:
        vblock = vision_block_bytes_per_patch(dims, a, modes[_part("VISION")] is Mode.FULL) * total_patches
        vdepth = int(dims["vision_layers"])
        if ckpt_layers:
            vision = vdepth * total_patches * dims["vision_hidden"] * a + vblock
            label = f"ViT trained: {vdepth} block boundaries + one block recompute, {total_patches} patches"
        else:
            vision = vdepth * vblock
            label = f"ViT trained: {vdepth} blocks saved, {total_patches} patches"
        rows.append(Row("activations", label, int(vision)))
    else:
        # a frozen tower saves nothing; its peak is one block's forward working set, before the LLM runs
        vision_phase = int(total_patches * (3 * dims["vision_hidden"] + 3 * dims["vision_intermediate"]) * a)

    # -- loss -------------------------------------------------------------------------------------------
    impl = str(cfg.loss.get("impl", "chunked"))
    vocab = int(dims["vocab"])
    if impl == "plain":
        loss = tokens * vocab * (a + 4 + 4 + 4)  # logits, float32 copy, log-softmax, its gradient
        rows.append(Row("loss", f"full logits {tokens} x {vocab} (bf16 + float32 copies)", int(loss)))
    else:
        chunk = int(cfg.loss.get("chunk_size") or 1024)
        rows.append(Row("loss", f"supervised hidden rows + one chunk of logits ({min(chunk, tokens)} x {vocab})",
                        int(tokens * h * a + min(chunk, tokens) * vocab * a)))

    static = sum(r.bytes for r in rows if r.where == "gpu" and r.category in ("parameters", "gradients",
                                                                                "optimizer", "strategy"))
    dynamic = sum(r.bytes for r in rows if r.category in ("activations", "loss"))
    phase = "LLM backward"
    if vision_phase > dynamic:
        rows = [r for r in rows if r.category not in ("activations", "loss")]
        rows.append(Row("activations", f"frozen ViT forward working set, {total_patches} patches", vision_phase))
        phase = "vision forward"
    allocated = static + max(dynamic, vision_phase)
    overhead = int(allocated * FRAGMENTATION) + CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0)
    rows.append(Row("overhead", "CUDA context, allocator fragmentation" + (", NCCL" if world > 1 else ""), overhead))
    rows.append(Row("phase", phase, 0, "none"))
    return rows


def _part(name: str):
    from vlm_finetune.models.base import Part

    return Part[name]


def largest_micro_batch(plan_for, limit: int = 256) -> int:
    """The largest micro-batch whose plan fits (1 when none does)."""
    best, size = 1, 1
    while size <= limit:
        if plan_for(size).fits is False:
            break
        best, size = size, size * 2
    low, high = best, min(size, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        if plan_for(mid).fits is False:
            high = mid
        else:
            low = mid
    return low


def fewest_checkpointed_layers(plan_for, num_layers: int) -> int:
    """The fewest checkpointed decoder layers whose plan fits the budget (all of them when none fits)."""
    low, high = 0, num_layers
    if plan_for(num_layers).fits is False:
        return num_layers
    while low < high:
        mid = (low + high) // 2
        if plan_for(mid).fits is False:
            low = mid + 1
        else:
            high = mid
    return low


# --- suggestions -----------------------------------------------------------------------------------------
def _replace(overrides: list[str], key: str, value: str) -> list[str]:
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != key]
    return [*kept, f"{key}={value}"]


def _hardware_profiles() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml") if p.stem not in ("auto", "cpu"))


def _candidates(overrides: list[str], plan: MemoryPlan, cfg: Any) -> list[tuple[str, str, list[list[str]]]]:
    """(kind, label, override lists to try in order) for each kind of change, cheapest first."""
    strategy = str(cfg.trainer.strategy)
    stage = int(cfg.trainer.get("zero_stage", 0)) if strategy == "deepspeed" else 0
    out = []
    if not (strategy == "fsdp" or stage == 3) and plan.world_size > 1:
        out.append(("shard", "shard parameters, gradients and optimizer states",
                    [_replace(overrides, "trainer", "zero3"), _replace(overrides, "trainer", "fsdp")]))
    mbs = plan.micro_batch_size
    if mbs > 1:
        acc = int(cfg.trainer.accumulate_grad_batches)
        tries = []
        for smaller in sorted((d for d in range(1, mbs) if mbs % d == 0), reverse=True):
            o = _replace(overrides, "data.micro_batch_size", str(smaller))
            tries.append(_replace(o, "trainer.accumulate_grad_batches", str(acc * mbs // smaller)))
        out.append(("micro_batch", "smaller micro-batch, more accumulation (same global batch)", tries))
    if plan.checkpointed_layers < plan.num_layers:
        out.append(("checkpointing", "activation checkpointing",
                    [_replace(overrides, "model.activation_checkpointing", "auto"),
                     _replace(overrides, "model.activation_checkpointing", "true")]))
    if not cfg.trainer.get("offload_optimizer"):
        target = "zero3_offload" if (stage == 3 or strategy == "fsdp") else "zero2_offload"
        out.append(("offload", "offload to CPU memory (DeepSpeed)",
                    [_replace(overrides, "trainer", target), _replace(overrides, "trainer", "zero3_offload")]))
    if str(cfg.precision.name) != "nf4" and cfg.model.get("path"):
        tries = [_replace(overrides, "precision", "nf4")]
        if strategy == "fsdp" or stage == 3:
            tries = [_replace(_replace(overrides, "precision", "nf4"), "trainer", "zero2" if plan.world_size > 1 else "single")]
        out.append(("nf4", "4-bit base (QLoRA)", tries))
    bigger = []
    for name in _hardware_profiles():
        hw = compose([f"hardware={name}"]).hardware
        if int(hw.devices) * int(hw.num_nodes) * float(hw.gpu_memory_gib) > plan.world_size * plan.gpu_memory_gib:
            o = _replace(overrides, "hardware", name)
            if int(hw.devices) * int(hw.num_nodes) > 1 and strategy == "single":
                o = _replace(o, "trainer", "ddp")
            bigger.append(o)
    if bigger:
        out.append(("more_gpus", "more or larger GPUs", bigger))
    return out


def _try(overrides: list[str], seq, image_px, images) -> MemoryPlan | None:
    try:
        return plan_memory(overrides, seq, image_px, images, suggest=False)
    except ConfigError:
        return None  # a combination the trainer refuses (e.g. nf4 with ZeRO-3) is no suggestion


def suggestions(overrides: list[str], plan: MemoryPlan, seq, image_px, images, cfg: Any) -> list[Suggestion]:
    """For each kind of change, cheapest kind first, the first override set whose own plan fits. When no
    single change fits, changes are combined in the same order until the plan fits."""
    found: list[Suggestion] = []
    for kind, label, tries in _candidates(overrides, plan, cfg):
        for o in tries:
            p = _try(o, seq, image_px, images)
            if p is not None and p.fits:
                found.append(Suggestion(label, o, p))
                break
    if found:
        return found
    combined, current, labels = list(overrides), plan, []
    for _ in range(len(SUGGESTION_ORDER)):
        step = None
        for kind, label, tries in _candidates(combined, current, compose(combined)):
            best = None
            for o in tries:
                p = _try(o, seq, image_px, images)
                if p is not None and p.peak_bytes < current.peak_bytes and (best is None or p.peak_bytes < best[1].peak_bytes):
                    best = (o, p)
            if best is not None:
                step = (label, *best)
                break
        if step is None:
            return []
        labels.append(step[0])
        combined, current = step[1], step[2]
        if current.fits:
            return [Suggestion(" + ".join(labels), combined, current)]
    return []


# --- command line ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m vlm_finetune.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default: data.max_length)")
    parser.add_argument("--image", type=int, default=None, help="image side in pixels (default: model.max_image_size)")
    parser.add_argument("--images", type=int, default=1, help="images per sample (default 1)")
    args, overrides = parser.parse_known_args(argv)
    try:
        plan = plan_memory(overrides, args.seq, args.image, args.images)
    except ConfigError as err:
        print(f"vlm_finetune.plan: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(plan.render(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
