"""MGM's config.json: the released fields (MGM's mm_* beside the LLM's own, flat) read into an MgmConfig and
written back in the same layout, with the fields MGM's code of the transformers-4 era reads (rotary settings,
Gemma's activation) kept in their old form."""
from __future__ import annotations

from pathlib import Path

import torch

from vlm_finetune.errors import ConfigError
from vlm_finetune.models._sharded import read_config_json
from vlm_finetune.models.mgm.modeling import (
    ARCHITECTURES,
    BACKBONES,
    CLIP_L_336,
    CONVNEXT,
    MODEL_TYPES,
    MgmConfig,
)

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
    arch = MgmConfig(
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
    if raw.get("mm_hidden_size_aux") not in (None, arch.mm_hidden_size_aux):
        raise ConfigError(f"config.json: mm_hidden_size_aux={raw['mm_hidden_size_aux']} but the ConvNeXt stages "
                          f"{arch.aux['dims']} sum to {arch.mm_hidden_size_aux}")
    if arch.vision_config.hidden_size != arch.mm_hidden_size:
        raise ConfigError(f"config.json: mm_hidden_size={arch.mm_hidden_size} but the CLIP tower's hidden size is "
                          f"{arch.vision_config.hidden_size}")
    arch.check()
    return arch


def config_to_dict(arch: MgmConfig, dtype: torch.dtype | None = None) -> dict:
    """MgmConfig -> config.json in MGM's layout: every field of the config.json it was loaded from, then the LLM's
    fields (flat, in transformers 5's form and, for rotary settings and Gemma's activation, transformers 4's as
    well: MGM's code reads those), MGM's mm_* fields and our tower configs.

    Fields MGM's own loader needs to give the same model: `optimize_vision_tower_aux: true` (otherwise it keeps
    the ConvNeXt of `mm_vision_tower_aux` and ignores the one in the weights, which training may have changed),
    `mm_use_im_patch_token: false` (otherwise it adds a token and grows the vocabulary)."""
    text = arch.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    out = dict(arch.source)
    out.update({"architectures": [ARCHITECTURES[arch.backbone]], "model_type": MODEL_TYPES[arch.backbone], **text})
    rope = rope_fields(text)
    if rope.get("rope_scaling") is not None and arch.source.get("rope_scaling") is not None:
        rope.pop("rope_scaling")  # a released value in transformers 4's form stays as it was
    out.update(rope)
    if arch.backbone == "gemma":  # transformers >= 4.39 reads hidden_activation first, 4.38 only hidden_act
        out["hidden_activation"] = out["hidden_act"]
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.update(arch.extra)
    out.update({
        "mm_vision_tower": arch.mm_vision_tower, "mm_vision_tower_aux": arch.mm_vision_tower_aux,
        "mm_hidden_size": arch.mm_hidden_size, "mm_hidden_size_aux": arch.mm_hidden_size_aux, "use_mm_proj": True,
        "mm_projector_type": arch.mm_projector_type, "mm_vision_select_layer": arch.mm_vision_select_layer,
        "mm_vision_select_feature": arch.mm_vision_select_feature, "image_size_aux": arch.image_size_aux,
        "image_grid": arch.image_grid, "image_global": arch.image_global, "image_aspect_ratio": arch.image_aspect_ratio,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "optimize_vision_tower_aux": True,
    })
    out.setdefault("optimize_vision_tower", False)
    out["vision_config"] = {k: v for k, v in arch.vision_config.to_dict().items()
                            if k not in ("transformers_version", "architectures")}
    out["vision_aux_config"] = dict(arch.aux)
    out["template"] = arch.template
    return out


def read_config(folder: Path) -> MgmConfig:
    return config_from_dict(read_config_json(folder, "an MGM checkpoint folder (config.json, "
                                                     "*.safetensors[.index.json], tokenizer files)"))
