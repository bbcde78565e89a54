"""GLM-4.1V and GLM-4.5V built inside DeepSpeed's zero.Init (ZeRO-3): no rank ever holds the whole model.

From a config, transformers' own classes are built under zero.Init (each module's initialisation written whole
and split at once: `initialised_whole`). From a released folder the model is built with no initialisation and
the folder's tensors are streamed into each rank's partition one at a time (positioned reads, `ShardReader`),
after the key names have been checked against the model from the shard headers alone. The names go through
transformers' own checkpoint conversions (`get_model_conversion_mapping`: the renamings of older layouts, and
for GLM-4.5V the per-expert `mlp.experts.<e>.{gate,up,down}_proj.weight` tensors fused into the 3-D
`gate_up_proj` / `down_proj`); the tensors of a fused parameter are joined here, as transformers' MergeModulelist
and Concatenate do, one parameter at a time."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.models._partitioned import built_uninitialised, initialised_whole
from vlm_finetune.models._sharded import folder_reader, show_keys, stack_experts, stream_into
from vlm_finetune.models.nf4_load import stream_quantised

_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class MissingKeys(ConfigError):
    def __init__(self, missing: list[str], unexpected: list[str], folder: Path):
        self.missing, self.unexpected = missing, unexpected
        parts = ([f"{len(missing)} missing key(s): {show_keys(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected key(s): {show_keys(unexpected)}"] if unexpected else [])
        super().__init__(f"GLM-4V checkpoint in {folder} does not match the model its config.json describes: "
                         f"{'; '.join(parts)}. Check that config.json belongs to these weights (model_type, "
                         "num_hidden_layers, n_routed_experts, vision depth).")


def build_from_config(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` with transformers' initialisation, inside zero.Init: partitioned as it is built."""
    from transformers import AutoModelForImageTextToText

    with initialised_whole():
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def _ignored_patterns(model: nn.Module) -> list[re.Pattern]:
    """transformers' `_keys_to_ignore_on_load_unexpected` of the model and its sub-models (GLM-4.5V's
    multi-token-prediction layer, which the released folder holds and the model does not use)."""
    patterns = []
    for module in model.modules():
        patterns += [re.compile(p) for p in (getattr(type(module), "_keys_to_ignore_on_load_unexpected", None) or [])]
    return patterns


def released_sources(model: nn.Module, names: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """The model's state-dict names -> the checkpoint tensors each is made of (in the order `assemble` joins
    them); the per-expert tensors a fused parameter lacks; the checkpoint names that map to no model tensor
    (those transformers ignores left out)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    from vlm_finetune.models._partitioned import logical_shape

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    targets = dict(model.state_dict(keep_vars=True))
    ignored = _ignored_patterns(model)
    grouped: dict[str, list[str]] = defaultdict(list)
    unexpected = []
    for name in names:
        target, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, targets)
        if target in targets:
            grouped[target].append(name)
        elif not any(p.search(name) or p.search(target) for p in ignored):
            unexpected.append(name)

    def order(name: str) -> tuple:  # experts by number, gate before up (transformers' Concatenate order)
        match = _EXPERT.search(name)
        return (int(match.group(1)), match.group(2) != "gate_proj") if match else (-1, name)

    lacking = []
    for target, sources in grouped.items():
        kinds = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(target.rsplit(".", 1)[-1])
        match = _EXPERT.search(sources[0])
        if not target.endswith(("experts.gate_up_proj", "experts.down_proj")) or kinds is None or match is None:
            continue
        stem = sources[0][:match.start()]
        wanted = [f"{stem}.experts.{e}.{kind}.weight" for e in range(logical_shape(targets[target])[0])
                  for kind in kinds]
        lacking += sorted(set(wanted) - set(sources))
    return {target: sorted(sources, key=order) for target, sources in grouped.items()}, lacking, sorted(unexpected)


def assemble(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """One model tensor from its checkpoint tensors: a fused expert parameter stacks its experts (gate_up_proj:
    each expert's gate and up rows concatenated); anything else is its one tensor."""
    if len(tensors) == 1 and not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return tensors[0]
    if name.endswith("experts.gate_up_proj"):
        if len(tensors) % 2:
            raise ValueError(f"{name}: {len(tensors)} tensors, not a gate and an up projection per expert")
        return stack_experts(tensors, 2)
    if name.endswith("experts.down_proj"):
        return stack_experts(tensors, 1)
    raise ValueError(f"{name} is made of {len(tensors)} checkpoint tensors; only fused experts are")


def _checked_sources(model: nn.Module, reader, folder: Path) -> tuple[dict[str, list[str]], set[str]]:
    """The checkpoint tensors each state-dict tensor of `model` is made of, and the names not read (a tied
    head is the embedding's own parameter: one name holds it); MissingKeys, with the lists, before any read."""
    sources, lacking, unexpected = released_sources(model, reader.names)
    first_of: dict[int, str] = {}
    skip = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first_of:
            skip.add(name)
        else:
            first_of[id(tensor)] = name
    for name in skip:
        sources.pop(name, None)
    missing = sorted(set(model.state_dict()) - skip - set(sources)) + lacking
    if missing or unexpected:
        raise MissingKeys(missing, unexpected, Path(folder))
    return sources, skip


def _streamed(folder: Path, stream) -> None:
    try:
        stream()
    except ValueError as err:
        raise ConfigError(f"GLM-4V checkpoint {folder}: {err}; check that config.json belongs to these "
                          "weights") from err


def load_folder_partitioned(folder: Path, config, dtype: torch.dtype) -> nn.Module:
    """Inside zero.Init: the model of `config` (the folder's), built with no initialisation and no random number
    drawn (LoRA's come next, as in an ordinary load), its partitions filled from the folder one tensor at a time.
    The keys are checked first (MissingKeys, with the lists), fused expert tensors joined per parameter."""
    from transformers import AutoModelForImageTextToText

    reader = folder_reader(folder)
    with built_uninitialised():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    sources, skip = _checked_sources(model, reader, folder)
    _streamed(folder, lambda: stream_into(model, sources, assemble, reader, skip))
    return model


def load_folder_nf4(folder: Path, config, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """precision=nf4: the model of `config` built on the meta device, the keys checked as above, the towers,
    projector, embeddings and head filled in `dtype` and each decoder layer filled and quantised in turn
    (nf4_load.stream_quantised), so no more than one layer of the LLM is ever held in 16 bits. The rotary
    frequencies (non-persistent buffers, in no checkpoint) are computed again as transformers does after its
    own meta-device load (`_init_weights` of the modules that hold them)."""
    from transformers import AutoModelForImageTextToText

    reader = folder_reader(folder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    sources, skip = _checked_sources(model, reader, folder)
    _streamed(folder, lambda: stream_quantised(model, "model.language_model.layers", sources, assemble, reader,
                                               skip, device))
    for name, module in model.named_modules():
        buffers = [b for b in module._non_persistent_buffers_set if b in module._buffers]
        if not buffers:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise RuntimeError(f"{name} holds parameters beside its non-persistent buffers {buffers}; "
                               "re-initialising them would overwrite its loaded weights")
        with torch.no_grad():
            model._init_weights(module)
    return model
