"""MGM's released checkpoint layout: config.json with MGM's fields (read and written in config_file.py),
(sharded) safetensors with MGM's key names. Loading places every weight or fails listing what is missing or
unexpected; saving writes the same layout back, so a fine-tuned model is a drop-in replacement for a released one.

Mixtral is the one backbone whose layout transformers 5 changed: released checkpoints hold one
`block_sparse_moe.experts.E.{w1,w2,w3}` Linear per expert, transformers 5 one fused tensor per layer
(`mlp.experts.gate_up_proj` = [w1; w3] stacked over experts, `mlp.experts.down_proj` = w2 stacked).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.io import atomic_folder
from vlm_finetune.models._partitioned import built_for_loading, unpartitioned
from vlm_finetune.models._sharded import (
    folder_reader,
    show_keys,
    stack_experts,
    stream_into,
    write_shards,
    written_dtype,
)
from vlm_finetune.models.mgm.config_file import config_to_dict, read_config
from vlm_finetune.models.mgm.modeling import MgmConfig, MgmForCausalLM
from vlm_finetune.models.nf4_load import stream_quantised

# -- key names --------------------------------------------------------------------------------------
_LLM_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def to_released(state: dict[str, torch.Tensor], arch: MgmConfig) -> dict[str, torch.Tensor]:
    """Module state dict -> released key names and tensors (drops the tied head)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        if arch.backbone == "mixtral" and _LLM_MLP.match(name):
            layer = name.split(".mlp.")[0]
            if name.endswith("mlp.gate.weight"):
                out[f"{layer}.block_sparse_moe.gate.weight"] = tensor
            elif name.endswith("mlp.experts.gate_up_proj"):
                inter = tensor.shape[1] // 2
                for e in range(tensor.shape[0]):
                    out[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = tensor[e, :inter].contiguous()
                    out[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = tensor[e, inter:].contiguous()
            elif name.endswith("mlp.experts.down_proj"):
                for e in range(tensor.shape[0]):
                    out[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e].contiguous()
            else:
                raise ValueError(f"unexpected Mixtral MoE tensor {name}")
            continue
        out[name] = tensor.contiguous()
    return out


def from_released(state: dict[str, torch.Tensor], arch: MgmConfig) -> dict[str, torch.Tensor]:
    """Released key names -> this model's state dict (fuses Mixtral's per-expert Linears)."""
    sources = released_sources(list(state), arch)
    return {name: assemble(name, [state[s] for s in names]) for name, names in sources.items()}


class MissingKeys(ConfigError):
    def __init__(self, missing: list[str], unexpected: list[str], folder: Path | None = None):
        self.missing, self.unexpected = missing, unexpected

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show_keys(unexpected)}")
        where = f" in {folder}" if folder else ""
        super().__init__(f"MGM checkpoint{where} does not match the model its config.json describes: "
                         + "; ".join(parts)
                         + ". Check that config.json belongs to these weights (model_type, layer counts, tower names).")


# -- reading and writing folders ---------------------------------------------------------------------
def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder at once (tests and tools; `load_folder` reads them one at a time)."""
    reader = folder_reader(folder)
    return {name: reader.get(name) for name in reader.names}


def released_sources(names: list[str], arch: MgmConfig) -> dict[str, list[str]]:
    """This model's state-dict names -> the released tensors each is made of (`assemble` joins them): the
    name-level `from_released`, so that the keys are checked before any tensor is read."""
    if arch.backbone != "mixtral":
        return {name: [name] for name in names}
    out, experts = {}, {}
    for name in names:
        match = _EXPERT.match(name)
        if match:
            layer, e, w = match.groups()
            experts.setdefault(layer, {}).setdefault(int(e), {})[w] = name
        elif ".block_sparse_moe.gate.weight" in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = [name]
        else:
            out[name] = [name]
    n_experts = int(arch.text_config.num_local_experts)
    for layer, by_expert in experts.items():
        missing = [f"{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in range(n_experts)
                   for w in ("w1", "w2", "w3") if w not in by_expert.get(e, {})]
        if missing:
            raise MissingKeys(missing, [])
        out[f"{layer}.mlp.experts.gate_up_proj"] = [by_expert[e][w] for e in range(n_experts) for w in ("w1", "w3")]
        out[f"{layer}.mlp.experts.down_proj"] = [by_expert[e]["w2"] for e in range(n_experts)]
    return out


def assemble(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The released tensors `released_sources` lists for `name`, as this model holds them."""
    if name.endswith("mlp.experts.gate_up_proj"):  # [w1; w3] per expert, stacked over experts
        return stack_experts(tensors, 2)
    if name.endswith("mlp.experts.down_proj"):
        return stack_experts(tensors, 1)
    return tensors[0]


def _restore_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers are not in checkpoints; after `to_empty` they hold garbage (under ZeRO-3's
    zero.Init, the init's dtype): recompute them."""
    for module in model.modules():
        names = [n for n in getattr(module, "_non_persistent_buffers_set", ()) if n in module._buffers]
        if not names:
            continue
        if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embedding
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot restore buffers {names} of {type(module).__name__}")
        with torch.device("cpu"):
            fresh = type(module)(config)
        for name in names:
            module._buffers[name] = fresh._buffers[name].to(device)


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                quantization: str | None = None) -> MgmForCausalLM:
    """Check the checkpoint's key names against the model (strict), then read its tensors one at a time from
    the shards into the model: built on the meta device and placed on `device`, or, inside DeepSpeed's
    zero.Init (ZeRO-3), built partitioned (in the init's dtype) and filled partition by partition. Either way one
    tensor at a time is whole in memory besides the model (or this rank's partition of it). `quantization="nf4"`:
    the decoder layers are quantised one at a time as they are read (nf4_load.stream_quantised)."""
    folder = Path(folder)
    arch = read_config(folder)
    reader = folder_reader(folder)
    sources = released_sources(reader.names, arch)
    model, partitioned = built_for_loading(lambda: MgmForCausalLM(arch), dtype)
    expected = set(model.state_dict())
    skip = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    expected -= skip
    for name in skip:
        sources.pop(name, None)  # some exports keep the tied copy; it is the same tensor
    missing, unexpected = sorted(expected - set(sources)), sorted(set(sources) - expected)
    if missing or unexpected:
        raise MissingKeys(missing, unexpected, folder)
    if not partitioned and quantization is None:
        model.to_empty(device=device)
    try:
        if quantization == "nf4" and not partitioned:
            stream_quantised(model, "model.layers", sources, assemble, reader, skip, device)
        else:
            stream_into(model, sources, assemble, reader, skip)
    except ValueError as err:
        raise ConfigError(f"MGM checkpoint {folder}: {err}; check that config.json belongs to these weights") from err
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with unpartitioned():
        _restore_buffers(model, device)  # after the cast: rotary frequencies stay float32, as transformers keeps them
    return model


# the multimodal keys: MGM's loader reads CLIP, ConvNeXt and the mining projectors only from the shards that hold
# a `vlm_uni` / `vision_stages` key, and loads CLIP strictly; so they all go into one shard, never split
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.vision_tower_aux.", "model.vlm_uni_", "model.mm_projector.")


def plan_shards(released: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Key names per shard: the multimodal keys together in the first (whatever its size), then the LLM's in
    name order, a new shard whenever the next tensor would pass `max_shard_bytes`."""
    def nbytes(name):
        return released[name].numel() * released[name].element_size()

    multimodal = sorted(k for k in released if k.startswith(MULTIMODAL_PREFIXES))
    shards, current, size = [multimodal] if multimodal else [], [], 0
    for name in sorted(k for k in released if not k.startswith(MULTIMODAL_PREFIXES)):
        if current and size + nbytes(name) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes(name)
    if current:
        shards.append(current)
    if len(shards) > 1 and multimodal and sum(map(nbytes, multimodal)) + sum(map(nbytes, shards[1])) <= max_shard_bytes:
        shards[:2] = [multimodal + shards[1]]  # a small model: the LLM's first keys join the multimodal shard
    return shards


def write_weights(model: MgmForCausalLM, folder: Path, state: dict[str, torch.Tensor] | None = None,
                  max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None) -> None:
    """config.json, safetensors in the released layout and always model.safetensors.index.json (MGM's loader
    reads it), written into an existing folder. One shard is `model.safetensors`."""
    folder = Path(folder)
    state = model.state_dict() if state is None else state
    released = to_released({k: v.detach().to("cpu", dtype=dtype or v.dtype) for k, v in state.items()}, model.config)
    write_shards(released, folder, plan_shards(released, max_shard_bytes), single_name="model.safetensors")
    config = config_to_dict(model.config, written_dtype(released))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def save_folder(model: MgmForCausalLM, folder: Path, state: dict[str, torch.Tensor] | None = None,
                max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None) -> None:
    """`write_weights` into a temporary folder, then renamed: a crash never leaves half a checkpoint."""
    with atomic_folder(Path(folder)) as tmp:
        write_weights(model, tmp, state, max_shard_bytes, dtype)


def load_openclip_convnext(tower: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Place an OpenCLIP ConvNeXt checkpoint (`visual.trunk.stem.*`, `visual.trunk.stages.*`, or the bare timm
    trunk's `stem.*`, `stages.*`) into the aux tower; the head and the text tower are ignored."""
    mapped = {}
    for name, tensor in state.items():
        bare = name.removeprefix("visual.trunk.")
        if bare.startswith("stem."):
            mapped["vision_stem." + bare[len("stem."):]] = tensor
        elif bare.startswith("stages."):
            mapped["vision_stages." + bare[len("stages."):]] = tensor
    result = tower.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MissingKeys(list(result.missing_keys), list(result.unexpected_keys))
