"""Exact parameter accounting: the configured model built on the meta device (no memory, no weight file read)
with the real trainability plan (LoRA via peft, full parts) and precision policy, its parameters counted by
part, kind and dtype, plus the module sizes the sharding strategies gather at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_finetune.models import moe_nf4
from vlm_finetune.models.base import Family, Mode, Part
from vlm_finetune.precision import WeightsPolicy
from vlm_finetune.settings import LoraSettings, ModelSettings
from vlm_finetune.trainability import TrainablePlan, build_trainable_model


@dataclass
class ParamGroup:
    part: str  # vision | projector | llm | other
    kind: str  # frozen | lora | full
    dtype: torch.dtype
    numel: int
    persistent_numel: int = 0  # parameters small enough for ZeRO-3 to keep whole on every rank


# per bitsandbytes 4-bit layer: its nf4 code book (16 float32), the nested statistics' code book (256 float32, a copy
# per layer) and their offset (one float32)
NF4_CODE_BOOKS_PER_LAYER = 16 * 4 + 256 * 4 + 4


@dataclass
class ModelCount:
    groups: list[ParamGroup]
    unit_numels: list[int]       # wrapped units (decoder layers, vision blocks): FSDP / ZeRO-3 gather units
    trainable_unit_numels: list[int]  # trainable elements of each unit that holds one (FSDP's unsharded gradients)
    largest_fetch_numel: int     # largest module ZeRO-3 gathers at once (a leaf MoE block, or one weight)
    quantizable_numel: int       # frozen linear weights nf4 would quantise (LLM, not lm_head)
    lora_linears_per_layer: int = 0  # LoRA-adapted linears in one decoder layer
    mlp_lora_linears_per_layer: int = 0  # of those, inside its MLP (freed by selective checkpointing)
    quantizable_dtype: torch.dtype | None = None  # the dtype of those frozen linear weights
    expert_numel: int = 0  # frozen fused 3-D MoE expert weights of the LLM, which nf4 quantises per expert
    expert_nf4_bytes: int = 0  # what they hold once quantised (models/moe_nf4.py: codes, absmax, code books)
    expert_dtype: torch.dtype | None = None
    vision_lora_linears: tuple[str, ...] = ()  # LoRA-adapted linears in one vision block (their names in it)
    largest_tensor_bytes: int = 0  # the largest parameter: what a partitioned load holds whole at once
    decoder_layer_bytes: tuple[int, ...] = ()  # each decoder layer's parameters, at the dtypes they are built in
    vision_unit_numel: int = 0  # elements of the vision blocks among unit_numels (no backward when frozen)
    largest_param_numel: int = 0  # the largest single parameter (the sequential gather's prefetch overshoots by one)
    # ZeRO-3 under nf4: (elements, of them held in 4 bits) of the modules gathered at once that are largest in bytes
    # with 16- and with 32-bit compute (the largest fetch by elements may not be the largest in bytes)
    nf4_fetches: tuple[tuple[int, int], ...] = ()
    # what nf4's statistics of those linear weights hold (per layer: absmax per 64-block, nested absmax per 256 of
    # those, code books; bitsandbytes' rounding up of partial blocks included)
    quantizable_stats_bytes: int = 0


def count_model(spec: ModelSettings, modes: dict[Part, Mode], lora: LoraSettings, family: Family,
                policy: WeightsPolicy, persistence_threshold: int = 0) -> ModelCount:
    """Build the model on the meta device, apply the real trainability plan, and count its parameters by
    part, kind and dtype. Nothing is allocated and no weight file is read. Memoised per family, model,
    trainability, LoRA, weights policy and threshold (suggestions re-plan the same model many times)."""
    # kernels and checkpointing change no parameter; Liger's patching needs a GPU
    spec = spec.replace(liger_kernels=False, activation_checkpointing=False)
    # settings hold read-only mappings, which do not hash: their text is the cache key
    key = (family.name, repr(spec), repr(sorted(modes.items())), repr(lora), policy, persistence_threshold)
    if key not in _COUNTS:
        if len(_COUNTS) >= 64:
            _COUNTS.pop(next(iter(_COUNTS)))
        model, plan = build_trainable_model(family, spec, modes, lora, policy, checkpointed_layers=False,
                                            checkpoint_scope="layer", device="meta")
        _COUNTS[key] = _count(model, plan, family, persistence_threshold)
    return _COUNTS[key]


_COUNTS: dict[tuple, ModelCount] = {}


def _clean_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for part in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(part, "")
    return name


def _part_lookup(plan: TrainablePlan):
    """`part_for(clean_name) -> "vision" | "projector" | "llm" | "other"`: the part whose module prefix (the longest
    that matches) holds the name."""
    part_of = sorted(((name, part.value) for part, names in plan.part_modules.items() for name in names),
                     key=lambda item: -len(item[0]))

    def part_for(clean: str) -> str:
        return next((part for prefix, part in part_of if clean == prefix or clean.startswith(prefix + ".")), "other")

    return part_for


def _count(model: torch.nn.Module, plan: TrainablePlan, family: Family, persistence_threshold: int) -> ModelCount:
    part_for = _part_lookup(plan)
    groups: dict[tuple, ParamGroup] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        kind = "lora" if "lora_" in name else ("full" if param.requires_grad else "frozen")
        key = (part_for(_clean_name(name)), kind, param.dtype)
        group = groups.setdefault(key, ParamGroup(*key, 0))
        group.numel += param.numel()
        if persistence_threshold and param.numel() < persistence_threshold:
            group.persistent_numel += param.numel()

    unit_classes = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
    leaf_classes = tuple(family.zero3_leaf_classes)
    units, trainable_units, fetch, layer_bytes, vision_units = [], [], 0, [], 0
    fetches: list[tuple[int, int]] = []
    quantizable, quantizable_dtype, quantizable_stats = 0, None, 0
    for name, module in model.named_modules():
        if isinstance(module, unit_classes):
            params = list(module.parameters())
            units.append(sum(param.numel() for param in params))
            if any(param.requires_grad for param in params):
                trainable_units.append(sum(param.numel() for param in params if param.requires_grad))
            if isinstance(module, tuple(family.decoder_layer_classes)):
                layer_bytes.append(sum(param.numel() * param.element_size() for param in params))
            else:
                vision_units += units[-1]
        if leaf_classes and isinstance(module, leaf_classes):
            whole = sum(param.numel() for param in module.parameters())
            fetch = max(fetch, whole)
            fetches.append((whole, _four_bit_numel(module, name, True, part_for)))
        else:
            own = sum(param.numel() for param in module.parameters(recurse=False))
            fetch = max(fetch, own)
            fetches.append((own, _four_bit_numel(module, name, False, part_for)))
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            clean = _clean_name(name)
            if part_for(clean) == "llm" and "lm_head" not in clean and not module.weight.requires_grad:
                quantizable += module.weight.numel()
                quantizable_stats += nf4_linear_stats_bytes(module.weight.numel())
                quantizable_dtype = module.weight.dtype
    experts = [weight for name, module in moe_nf4.expert_modules(model) if part_for(_clean_name(name)) == "llm"
               for weight in (module._parameters[t] for t in moe_nf4.EXPERT_TENSORS) if not weight.requires_grad]
    lora_names: list[str] = []
    for module in model.modules():
        if isinstance(module, tuple(family.decoder_layer_classes)):
            lora_names = [child for child, _ in module.named_modules() if child.endswith("lora_A")]
            break
    vision_lora = next(([child.removesuffix(".lora_A") for child, _ in module.named_modules()
                         if child.endswith("lora_A")]
                        for module in model.modules() if isinstance(module, tuple(family.vision_block_classes))), [])
    return ModelCount(list(groups.values()), units, trainable_units, fetch, quantizable, len(lora_names),
                      sum(1 for name in lora_names if name.startswith("mlp.")), quantizable_dtype,
                      sum(w.numel() for w in experts), sum(moe_nf4.nf4_bytes(*w.shape) for w in experts),
                      experts[0].dtype if experts else None, tuple(vision_lora),
                      max((p.numel() * p.element_size() for p in model.parameters()), default=0),
                      tuple(layer_bytes), vision_units, max((p.numel() for p in model.parameters()), default=0),
                      tuple({max(fetches, key=lambda f: (f[0] - f[1]) * size + f[1] / 2, default=(0, 0))
                             for size in (2, 4)}), quantizable_stats)


def nf4_linear_stats_bytes(numel: int) -> int:
    """What bitsandbytes keeps beside one linear weight's nf4 codes (compress_statistics): one absmax byte per
    64-element block, one float32 per 256 of those blocks with its offset, and the two code books (16 and 256
    float32)."""
    blocks = -(-numel // 64)
    return blocks + 4 * -(-blocks // 256) + NF4_CODE_BOOKS_PER_LAYER


def stored_unit_numels(model: torch.nn.Module, plan: TrainablePlan, family: Family, code_element_bytes: int
                       ) -> list[int]:
    """Each decoder layer's and vision block's elements as ZeRO-3 stores them once nf4 has quantised it, read from
    its structure (on the meta device, not quantised yet): a 4-bit weight of n elements holds n / 2 bytes of codes,
    stored as elements of `code_element_bytes` (zero3_nf4.four_bit_storage); every other parameter as it is."""
    part_for = _part_lookup(plan)
    units = tuple(family.decoder_layer_classes) + tuple(family.vision_block_classes)
    stored = []
    for name, module in model.named_modules():
        if isinstance(module, units):
            whole = sum(p.numel() for p in module.parameters())
            four_bit = _four_bit_numel(module, name, True, part_for)
            stored.append(whole - four_bit + -(-four_bit // (2 * code_element_bytes)))
    return stored


def _four_bit_numel(module: torch.nn.Module, name: str, recurse: bool, part_for) -> int:
    """Elements of `module`'s parameters (its own, or all with `recurse`) that nf4 holds in 4 bits: the frozen
    weights of the LLM's linear layers (not lm_head, not LoRA) and its frozen fused experts."""
    total = 0
    for sub_name, sub in (module.named_modules(prefix=name) if recurse else [(name, module)]):
        clean = _clean_name(sub_name)
        if part_for(clean) != "llm" or "lora_" in sub_name:
            continue
        if isinstance(sub, torch.nn.Linear) and "lm_head" not in clean and not sub.weight.requires_grad:
            total += sub.weight.numel()
        for tensor in moe_nf4.EXPERT_TENSORS:
            weight = sub._parameters.get(tensor)
            if isinstance(weight, torch.Tensor) and weight.dim() == 3 and not weight.requires_grad:
                total += weight.numel()
    return total
