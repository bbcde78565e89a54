"""Apply `train: {vision, projector, llm}` to a model: freeze, wrap with LoRA, or train fully; and the other
things done to a freshly built model before training: activation checkpointing, float32 trainables."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.models._partitioned import initialised_whole, is_partitioned, partitioning_active, unpartitioned
from vlm_finetune.models.base import Family, Mode, Part
from vlm_finetune.models.lora_targets import check_lora_matches
from vlm_finetune.models.moe_lora import apply_per_expert_lora, nf4_targets_for_peft
from vlm_finetune.precision import WeightsPolicy
from vlm_finetune.settings import LoraSettings, ModelSettings, is_auto


@dataclass
class TrainablePlan:
    modes: dict[Part, Mode]
    part_modules: dict[Part, list[str]]
    lora_pattern: str | None
    lora_parameters: list[str] = field(default_factory=list)  # parameters taking LoRA directly (MoE experts)
    full_modules: list[str] = field(default_factory=list)  # trained fully next to LoRA (PEFT modules_to_save)
    frozen_modules: list[str] = field(default_factory=list)  # kept in eval mode, no grad

    @property
    def uses_lora(self) -> bool:
        return self.lora_pattern is not None or bool(self.lora_parameters)


def plan_trainability(family: Family, model: nn.Module, modes: dict[Part, Mode], spec: ModelSettings,
                      lora: LoraSettings) -> TrainablePlan:
    part_modules = family.part_module_names(model)
    lora_parts = [p for p, m in modes.items() if m is Mode.LORA]
    by_part = {p: pattern for p in lora_parts if (pattern := family.lora_target_pattern(p, spec, lora))}
    check_lora_matches(model, part_modules, by_part, lora)  # compiled, and each part's matches listed
    patterns = list(by_part.values())
    lora_pattern = "|".join(f"(?:{p})" for p in patterns) if patterns else None
    parameters = [name for p in lora_parts for name in family.lora_target_parameters(p, spec, lora)]
    modules = dict(model.named_modules())
    full = [leaf for p, m in modes.items() if m is Mode.FULL for name in part_modules[p]
            for leaf in _saveable_modules(modules[name], name)]
    frozen = [name for p, m in modes.items() if m is not Mode.FULL for name in part_modules[p]]
    return TrainablePlan(modes, part_modules, lora_pattern, parameters, full, frozen)


def _saveable_modules(module: nn.Module, name: str) -> list[str]:
    """PEFT's modules_to_save takes modules, not containers: expand ModuleList/ModuleDict into their
    children, and leave out modules without parameters."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [leaf for child_name, child in module.named_children()
                for leaf in _saveable_modules(child, f"{name}.{child_name}")]
    return [name] if any(True for _ in module.parameters()) else []


def apply_trainability(model: nn.Module, plan: TrainablePlan, lora: LoraSettings) -> nn.Module:
    """Freeze everything, add LoRA where asked, unfreeze full parts. Returns the (possibly PEFT) model.

    With LoRA, fully trained parts become PEFT `modules_to_save`, so the adapter folder alone restores
    them through `PeftModel.from_pretrained`.
    """
    model.requires_grad_(False)
    if plan.uses_lora:
        from peft import LoraConfig, get_peft_model

        if plan.lora_parameters and lora.dropout:
            raise ConfigError(f"lora.dropout={lora.dropout}: LoRA on MoE expert tensors "
                              f"({', '.join(plan.lora_parameters)}) cannot apply dropout; set lora.dropout=0 "
                              "or lora.llm_modules=attention")
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=plan.lora_pattern if plan.lora_pattern is not None else [],
            target_parameters=list(plan.lora_parameters) or None,
            modules_to_save=list(plan.full_modules) or None, bias="none", init_lora_weights=True,
        )
        with nf4_targets_for_peft(model):  # 4-bit experts: PEFT finds them by their 16-bit names
            model = get_peft_model(model, config)
        if plan.lora_parameters and lora.expert_forward == "per_expert":
            apply_per_expert_lora(model)  # each expert's LoRA on its own tokens, no whole W + delta per layer
    else:
        modules = dict(model.named_modules())
        for name in plan.full_modules:
            modules[name].requires_grad_(True)
    set_frozen_eval(model, plan)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_frozen_eval(model: nn.Module, plan: TrainablePlan) -> None:
    """Frozen parts run in eval mode (dropout and drop-path off) whatever the trainer asks."""
    base = unwrap(model)
    modules = dict(base.named_modules())
    for part, mode in plan.modes.items():
        if mode is Mode.FROZEN:
            for name in plan.part_modules[part]:
                modules[name].eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); PEFT's frozen originals of modules_to_save count once. A parameter that ZeRO-3 has
    partitioned (an empty placeholder on each rank) counts its whole size (`ds_numel`)."""
    trainable = sum(_logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for n, p in model.named_parameters() if "original_module" not in n)
    return trainable, total


def partition_counts(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole) over the ZeRO-3-partitioned parameters."""
    params = [p for p in model.parameters() if is_partitioned(p)]
    return sum(p.ds_tensor.numel() for p in params), sum(int(p.ds_numel) for p in params)


def _logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a 4-bit (bitsandbytes) weight packs two per byte; a
    ZeRO-3-partitioned one holds none of them on this rank."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:  # before ZeRO-3's count: a partitioned 4-bit weight's ds_numel counts its storage
        return int(torch.Size(shape).numel())
    if hasattr(param, "ds_numel"):
        return int(param.ds_numel)
    return param.numel()


def keep_trainables_fp32(model: nn.Module) -> None:
    """Mixed precision with a half-precision frozen base: trainable parameters (LoRA, full parts) are
    kept in float32 as master weights, and PEFT's casting of activations up to the adapter's float32
    is turned off, so under autocast the adapters compute in bf16/fp16 instead of holding float32
    copies of every layer input (on GLM-4.1V-9B at 8k tokens that is about 0.5 GiB less peak memory).
    A ZeRO-3-partitioned parameter (a fully trained part built under zero.Init) is left to DeepSpeed, whose
    optimizer holds its float32 master partition."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and not is_partitioned(param):
            param.data = param.data.float()
    for module in model.modules():
        if hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False


def trainables_in_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """A model built inside zero.Init under DeepSpeed's bf16/fp16: its engine casts no parameter (it takes the
    partitioned base as built), so the parameters made outside zero.Init (LoRA, PEFT's trainable copies of a
    fully trained part) are cast here to the compute dtype, as the engine casts every parameter of a model built
    whole; the optimizer holds their float32 masters either way. PEFT's input casting stays off, as under
    `keep_trainables_fp32`."""
    for param in model.parameters():
        if not is_partitioned(param) and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for module in model.modules():
        if hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False


# -- activation checkpointing ------------------------------------------------------------------------------
def checkpointed_layer_count(value: Any, num_layers: int) -> int | str:
    """`model.activation_checkpointing` as a number of decoder layers: true -> all, false/null -> 0, a number
    N (0..num_layers) -> the first N, "auto" -> "auto" (the run resolves it from the memory plan)."""
    if is_auto(value):
        return "auto"
    if isinstance(value, bool) or value is None:
        return num_layers if value else 0
    if isinstance(value, int) and 0 <= value <= num_layers:
        return value
    raise ConfigError(f"model.activation_checkpointing={value!r}: use true, false, auto or a number of decoder "
                      f"layers (0-{num_layers}); the model has {num_layers} decoder layers")


def decoder_layers(model: nn.Module, family: Family) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, tuple(family.decoder_layer_classes))]


CHECKPOINT_SCOPES = ("layer", "mlp")


def apply_activation_checkpointing(model: nn.Module, family: Family, value: Any, scope: str = "layer") -> int:
    """Checkpoint the first N decoder layers (`value` as `checkpointed_layer_count` reads it; "auto" must be
    resolved first) for every family and every strategy: transformers' per-layer flag, with non-reentrant
    checkpoints (which work inside FSDP units and under ZeRO-3). With any layer checkpointed the vision
    blocks are checkpointed too, as the planner assumes. `scope="mlp"` (selective checkpointing) recomputes
    only each chosen layer's MLP and keeps its attention outputs: more memory than whole layers, less
    recompute. Returns N."""
    layers = decoder_layers(model, family)
    count = checkpointed_layer_count(value, len(layers))
    if count == "auto":
        raise ConfigError("model.activation_checkpointing=auto must be resolved from the memory plan before the "
                          "model is set up (train() does it; vlm_finetune.autotune)")
    if scope not in CHECKPOINT_SCOPES:
        raise ConfigError(f"model.checkpoint_scope={scope!r}: use layer (whole decoder layers) or mlp (only their MLP)")
    if scope == "mlp":
        for layer in layers[:count]:
            checkpoint_forward(_mlp_of(layer, family))
        return count
    if count:
        if not hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
            raise ConfigError(f"model.activation_checkpointing={value!r}: the {family.name} model "
                              f"({type(model).__name__}) has no activation_checkpointing_enable(); set it to false")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        # transformers' GradientCheckpointingLayer reads its own flag at every call
        layer.gradient_checkpointing = index < count
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module`'s forward in backward instead of keeping what it saves (non-reentrant checkpoint).
    The module's own forward is wrapped in place: its parameter names, and the children PEFT later swaps in
    for LoRA, are untouched."""
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def _mlp_of(layer: nn.Module, family: Family) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ConfigError(f"model.checkpoint_scope=mlp: the {family.name} decoder layer {type(layer).__name__} has "
                          "no `mlp` module; use model.checkpoint_scope=layer")
    return mlp


def compile_regions(model: nn.Module, family: Family) -> int:
    """Regional compilation (speed.compile=true): each decoder layer and vision block is compiled on its own
    (`nn.Module.compile`, in place: parameter names and LoRA layers inside stay as they are). Layers of one
    class share their compiled code, so compile time grows with the kinds of layers, not their number.
    Returns how many modules were compiled."""
    classes = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
    blocks = [m for m in unwrap(model).modules() if isinstance(m, classes)]
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)


def builds_partitioned(family: Family, spec: ModelSettings, zero3: bool, modes: dict[Part, Mode], policy: WeightsPolicy,
                       auto_micro_batch: bool) -> bool:
    """Whether the run builds the model inside DeepSpeed's zero.Init (VLMModule.configure_model): under ZeRO-3,
    for a family and model that can (`Family.can_build_partitioned`), unless the micro-batch is searched with
    real steps on a whole model, or for precision=nf4. `modes` do not change it (`trainables_in_compute_dtype`)."""
    # 4-bit weights are quantised whole on each rank (bitsandbytes quantises whole tensors), then partitioned by
    # the engine at its start
    return zero3 and family.can_build_partitioned(spec) and not auto_micro_batch and not policy.quantization


def build_trainable_model(family: Family, spec: ModelSettings, modes: dict[Part, Mode], lora: LoraSettings,
                          policy: WeightsPolicy, checkpointed_layers: Any, checkpoint_scope: str,
                          device: str | None = None) -> tuple[nn.Module, TrainablePlan]:
    """Build (or load) the model, checkpoint its first `checkpointed_layers` decoder layers, apply the
    trainability plan and keep trainables in float32 when the precision policy asks: the one recipe the
    run, the planner (`device="meta"`) and the benchmark share.

    Inside DeepSpeed's `zero.Init` (ZeRO-3: `VLMModule.configure_model`) the base is built partitioned, each
    module's weights initialised whole and split at once, and the LoRA layers are added as ordinary modules
    (the engine partitions them when it starts): the weights equal those of an unpartitioned build."""
    quantization = policy.quantization if device != "meta" else None
    partitioned = device != "meta" and partitioning_active()
    with initialised_whole() if partitioned else contextlib.nullcontext():
        model = family.build_model(spec, dtype=policy.load_dtype, device=device, quantization=quantization)
    if device == "meta" and any(p.device.type != "meta" for p in model.parameters()):
        raise ConfigError(f"model family {family.name!r} did not build on the meta device; "
                          "the planner loads no weights")
    apply_activation_checkpointing(model, family, checkpointed_layers, checkpoint_scope)
    plan = plan_trainability(family, model, modes, spec, lora)
    if policy.quantization and plan.lora_parameters and lora.expert_forward != "per_expert":
        raise ConfigError(f"lora.expert_forward={lora.expert_forward} with precision={policy.quantization}: PEFT's own "
                          "forward adds LoRA to the whole expert tensor, which is held in 4-bit here; set "
                          "lora.expert_forward=per_expert (each expert dequantised alone, its LoRA on its tokens)")
    with torch.device("meta") if device == "meta" else unpartitioned():
        model = apply_trainability(model, plan, lora)
        if partitioned and policy.mixed and policy.load_dtype != torch.float32:
            trainables_in_compute_dtype(model, policy.load_dtype)
        elif policy.keep_trainables_fp32:
            keep_trainables_fp32(model)
    return model, plan
