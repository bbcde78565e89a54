"""MGM's released checkpoint layout: config.json with MGM's fields, (sharded) safetensors with MGM's key
names. Loading places every weight or fails listing what is missing or unexpected; saving writes the
same layout back, so a fine-tuned model is a drop-in replacement for a released one.

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
from vlm_finetune.models.mgm.modeling import (
    ARCHITECTURES,
    BACKBONES,
    CLIP_L_336,
    CONVNEXT,
    MODEL_TYPES,
    MgmConfig,
    MgmForCausalLM,
)
from vlm_finetune.models.nf4_load import stream_quantised

# config.json fields that are MGM's (everything else belongs to the LLM's config)
MM_FIELDS = ("mm_vision_tower", "mm_vision_tower_aux", "mm_hidden_size", "mm_hidden_size_aux", "use_mm_proj",
             "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature", "image_size_aux",
             "optimize_vision_tower", "optimize_vision_tower_aux", "image_grid", "image_global", "image_aspect_ratio",
             "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
             "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr", "freeze_mm_mlp_adapter",
             "mm_vision_tower_lr")
# fields this project adds to config.json (released folders lack them; the defaults are the released towers)
OWN_FIELDS = ("vision_config", "vision_aux_config", "template")


def default_template(backbone: str, vocab_size: int) -> str:
    """The conversation template MGM's scripts use for each released LLM."""
    if backbone == "gemma":
        return "gemma"
    if backbone in ("mixtral", "mistral"):
        return "mistral_instruct"
    if vocab_size >= 128000:  # LLaMA-3
        return "llama_3"
    if vocab_size == 64000:  # Nous-Hermes-2-Yi-34B
        return "chatml_direct"
    return "vicuna_v1"


def text_config_for(backbone: str, fields: dict):
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(backbone, **fields)
    except ValueError as err:
        raise ConfigError(f"MGM: LLM backbone {backbone!r} is not known to transformers ({err})") from err
    if backbone == "gemma" and fields.get("hidden_act"):
        # transformers 5 turns Gemma's `hidden_act: gelu` into the tanh approximation; MGM's code (transformers
        # 4.38) computed exactly what the field says, and that is what the released weights were trained with
        config.hidden_act = fields["hidden_act"]
    return config


def rope_fields(text: dict) -> dict:
    """The transformers-4 form of the rotary settings (`rope_theta`, `rope_scaling`) from transformers 5's
    `rope_parameters`: code of the transformers-4 era (MGM's) reads only these."""
    rope = dict(text.get("rope_parameters") or {})
    out = {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    params = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    if kind == "default":
        out["rope_scaling"] = None
    elif kind in ("linear", "dynamic"):
        out["rope_scaling"] = {"type": kind, "factor": params.get("factor")}  # exactly the two fields 4.x checks
    else:
        out["rope_scaling"] = {"rope_type": kind, "type": kind, **params}
    return out


def _aux_for(name: str, given: dict | None) -> dict:
    if given:
        return dict(given)
    for key, spec in CONVNEXT.items():
        if key in name.replace("-", "_"):
            return dict(spec)
    raise ConfigError(f"MGM: mm_vision_tower_aux={name!r} is not a ConvNeXt this project knows "
                      f"({', '.join(CONVNEXT)}); "
                      "add `vision_aux_config: {dims: [...], depths: [...]}` to config.json")


def _clip_for(name: str, given: dict | None):
    from transformers import CLIPVisionConfig

    if given:
        return CLIPVisionConfig(**given)
    folder = Path(name)
    if (folder / "config.json").is_file():  # a local CLIP folder, as MGM's own loader expects
        return CLIPVisionConfig.from_pretrained(folder)
    if "clip-vit-large-patch14-336" in name:
        return CLIPVisionConfig(**CLIP_L_336)
    raise ConfigError(f"MGM: mm_vision_tower={name!r} is neither a local CLIP folder nor CLIP ViT-L/14-336; "
                      "add `vision_config` (a CLIPVisionConfig dict) to config.json")


def config_from_dict(raw: dict) -> MgmConfig:
    """A released (or exported) config.json -> MgmConfig."""
    model_type = raw.get("model_type")
    if model_type not in BACKBONES:
        raise ConfigError(f"config.json has model_type={model_type!r}, not an MGM model ({', '.join(BACKBONES)})")
    backbone = BACKBONES[model_type]
    text_fields = {k: v for k, v in raw.items()
                   if k not in MM_FIELDS and k not in OWN_FIELDS and k not in ("model_type", "architectures")
                   and not (k == "rope_scaling" and v is None)}  # transformers 5 warns on the old field
    text = text_config_for(backbone, text_fields)
    mm = {k: raw[k] for k in MM_FIELDS if k in raw}
    cfg = MgmConfig(
        text_config=text,
        vision_config=_clip_for(str(raw.get("mm_vision_tower", MgmConfig.mm_vision_tower)), raw.get("vision_config")),
        aux=_aux_for(str(raw.get("mm_vision_tower_aux", MgmConfig.mm_vision_tower_aux)), raw.get("vision_aux_config")),
        mm_hidden_size=int(raw.get("mm_hidden_size", 1024)),
        mm_projector_type=str(raw.get("mm_projector_type", "mlp2x_gelu")),
        mm_vision_select_layer=int(raw.get("mm_vision_select_layer", -2)),
        mm_vision_select_feature=str(raw.get("mm_vision_select_feature", "patch")),
        image_size_aux=int(raw.get("image_size_aux", 320)),
        image_grid=int(raw.get("image_grid", 1) or 1),
        image_global=bool(raw.get("image_global", False)),
        template=str(raw.get("template") or default_template(backbone, int(text.vocab_size))),
        mm_vision_tower=str(raw.get("mm_vision_tower", MgmConfig.mm_vision_tower)),
        mm_vision_tower_aux=str(raw.get("mm_vision_tower_aux", MgmConfig.mm_vision_tower_aux)),
        image_aspect_ratio=str(raw.get("image_aspect_ratio", "pad")),
        extra={k: v for k, v in mm.items() if k not in (
            "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
            "image_size_aux", "image_grid", "image_global", "mm_vision_tower", "mm_vision_tower_aux",
            "mm_hidden_size_aux", "image_aspect_ratio")},
        source=dict(raw),
    )
    if raw.get("mm_hidden_size_aux") not in (None, cfg.mm_hidden_size_aux):
        raise ConfigError(f"config.json: mm_hidden_size_aux={raw['mm_hidden_size_aux']} but the ConvNeXt stages "
                          f"{cfg.aux['dims']} sum to {cfg.mm_hidden_size_aux}")
    if cfg.vision_config.hidden_size != cfg.mm_hidden_size:
        raise ConfigError(f"config.json: mm_hidden_size={cfg.mm_hidden_size} but the CLIP tower's hidden size is "
                          f"{cfg.vision_config.hidden_size}")
    cfg.check()
    return cfg


def config_to_dict(cfg: MgmConfig, dtype: torch.dtype | None = None) -> dict:
    """MgmConfig -> config.json in MGM's layout: every field of the config.json it was loaded from, then the LLM's
    fields (flat, in transformers 5's form and, for rotary settings and Gemma's activation, transformers 4's as
    well: MGM's code reads those), MGM's mm_* fields and our tower configs.

    Fields MGM's own loader needs to give the same model: `optimize_vision_tower_aux: true` (otherwise it keeps
    the ConvNeXt of `mm_vision_tower_aux` and ignores the one in the weights, which training may have changed),
    `mm_use_im_patch_token: false` (otherwise it adds a token and grows the vocabulary)."""
    text = cfg.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    out = dict(cfg.source)
    out.update({"architectures": [ARCHITECTURES[cfg.backbone]], "model_type": MODEL_TYPES[cfg.backbone], **text})
    rope = rope_fields(text)
    if rope.get("rope_scaling") is not None and cfg.source.get("rope_scaling") is not None:
        rope.pop("rope_scaling")  # a released value in transformers 4's form stays as it was
    out.update(rope)
    if cfg.backbone == "gemma":  # transformers >= 4.39 reads hidden_activation first, 4.38 only hidden_act
        out["hidden_activation"] = out["hidden_act"]
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.update(cfg.extra)
    out.update({
        "mm_vision_tower": cfg.mm_vision_tower, "mm_vision_tower_aux": cfg.mm_vision_tower_aux,
        "mm_hidden_size": cfg.mm_hidden_size, "mm_hidden_size_aux": cfg.mm_hidden_size_aux, "use_mm_proj": True,
        "mm_projector_type": cfg.mm_projector_type, "mm_vision_select_layer": cfg.mm_vision_select_layer,
        "mm_vision_select_feature": cfg.mm_vision_select_feature, "image_size_aux": cfg.image_size_aux,
        "image_grid": cfg.image_grid, "image_global": cfg.image_global, "image_aspect_ratio": cfg.image_aspect_ratio,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "optimize_vision_tower_aux": True,
    })
    out.setdefault("optimize_vision_tower", False)
    out["vision_config"] = {k: v for k, v in cfg.vision_config.to_dict().items()
                            if k not in ("transformers_version", "architectures")}
    out["vision_aux_config"] = dict(cfg.aux)
    out["template"] = cfg.template
    return out


def read_config(folder: Path) -> MgmConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path={folder} has no config.json; point it at an MGM checkpoint folder "
                          "(config.json, *.safetensors[.index.json], tokenizer files)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from err
    return config_from_dict(raw)


# -- key names --------------------------------------------------------------------------------------
_LLM_MLP = re.compile(r"^model\.layers\.\d+\.mlp\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def to_released(state: dict[str, torch.Tensor], cfg: MgmConfig) -> dict[str, torch.Tensor]:
    """Module state dict -> released key names and tensors (drops the tied head)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.backbone == "mixtral" and _LLM_MLP.match(name):
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


def from_released(state: dict[str, torch.Tensor], cfg: MgmConfig) -> dict[str, torch.Tensor]:
    """Released key names -> this model's state dict (fuses Mixtral's per-expert Linears)."""
    sources = released_sources(list(state), cfg)
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


def released_sources(names: list[str], cfg: MgmConfig) -> dict[str, list[str]]:
    """This model's state-dict names -> the released tensors each is made of (`assemble` joins them): the
    name-level `from_released`, so that the keys are checked before any tensor is read."""
    if cfg.backbone != "mixtral":
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
    n_experts = int(cfg.text_config.num_local_experts)
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
    cfg = read_config(folder)
    reader = folder_reader(folder)
    sources = released_sources(reader.names, cfg)
    model, partitioned = built_for_loading(lambda: MgmForCausalLM(cfg), dtype)
    expected = set(model.state_dict())
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
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
    if cfg.tie_word_embeddings:
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
