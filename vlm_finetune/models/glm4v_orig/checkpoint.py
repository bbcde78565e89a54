"""GLM-4V-9B's released checkpoint layout: config.json (model_type `chatglm` with `vision_config`), sharded
safetensors with `model.safetensors.index.json`, every weight by its released name. Loading places every
tensor or stops with the list of missing / unexpected keys; saving writes the same layout back.

Name map (N: decoder layer, M: ViT layer; released -> module):
    transformer.embedding.word_embeddings.weight            model.embed_tokens.weight
    transformer.encoder.layers.N.self_attention.query_key_value.{weight,bias}
                                                            model.layers.N.self_attn.{q,k,v}_proj.* (split)
    transformer.encoder.layers.N.self_attention.dense        model.layers.N.self_attn.o_proj
    transformer.encoder.layers.N.mlp.dense_h_to_4h           model.layers.N.mlp.gate_up_proj (same fused order)
    transformer.encoder.layers.N.mlp.dense_4h_to_h           model.layers.N.mlp.down_proj
    transformer.encoder.layers.N.{input,post_attention}_layernorm  model.layers.N.* (same)
    transformer.encoder.final_layernorm                     model.norm
    transformer.output_layer                                lm_head
    transformer.vision.{patch_embedding,transformer}.*      vision.*
    transformer.vision.{conv,linear_proj,boi,eoi}*          projector.*
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from vlm_finetune.errors import ConfigError
from vlm_finetune.io import atomic_folder
from vlm_finetune.models._partitioned import built_for_loading, unpartitioned
from vlm_finetune.models._sharded import (
    INDEX_FILE,
    folder_reader,
    read_config_json,
    stream_into,
    weight_files,
    write_shards,
    written_dtype,
)
from vlm_finetune.models.glm4v_orig.modeling import Glm4vOrigConfig, Glm4vOrigForCausalLM, VisionSettings

IGNORED = ("transformer.rotary_pos_emb.inv_freq",)  # a buffer some exports hold; recomputed here
VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_heads", "intermediate_size", "patch_size", "image_size",
                 "in_channels", "layer_norm_eps", "scaling_factor")


# -- config.json -------------------------------------------------------------------------------------
def config_from_dict(raw: dict, initializer_range: float | None = None) -> Glm4vOrigConfig:
    from transformers import GlmConfig

    if raw.get("model_type") != "chatglm" or not isinstance(raw.get("vision_config"), dict):
        raise ConfigError(f"config.json has model_type={raw.get('model_type')!r}"
                          f"{'' if raw.get('vision_config') else ' and no vision_config'}: not a GLM-4V-9B folder "
                          "(model_type chatglm with a vision_config); GLM-4.1V folders load with model=glm41v_9b")
    unsupported = {"add_bias_linear": False, "rmsnorm": True, "original_rope": True, "post_layer_norm": True,
                   "apply_residual_connection_post_layernorm": False}
    wrong = [f"{k}={raw[k]!r}" for k, v in unsupported.items() if k in raw and bool(raw[k]) != v]
    if wrong or raw.get("pre_seq_len"):
        raise ConfigError(f"config.json: {', '.join(wrong) or 'pre_seq_len'} is not the GLM-4V-9B architecture this "
                          "family implements (linear layers without bias, RMSNorm, interleaved rotary, pre-norm)")
    heads = int(raw.get("num_attention_heads", 32))
    kv_heads = int(raw.get("multi_query_group_num", 2)) if raw.get("multi_query_attention", True) else heads
    eos = raw.get("eos_token_id", [151329, 151336, 151338])
    text = GlmConfig(
        vocab_size=int(raw.get("padded_vocab_size", 151552)), hidden_size=int(raw.get("hidden_size", 4096)),
        intermediate_size=int(raw.get("ffn_hidden_size", 13696)), num_hidden_layers=int(raw.get("num_layers", 40)),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=int(raw.get("kv_channels", 128)),
        max_position_embeddings=int(raw.get("seq_length", 8192)), rms_norm_eps=float(raw.get("layernorm_epsilon",
                                                                                            1.5625e-07)),
        attention_bias=bool(raw.get("add_qkv_bias", True)), tie_word_embeddings=bool(raw.get("tie_word_embeddings",
                                                                                              False)),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(raw.get("rope_ratio", 1) or 1),
                         "partial_rotary_factor": 0.5},  # rotary on kv_channels // 2 dims, interleaved pairs
        initializer_range=float(initializer_range if initializer_range is not None
                                else raw.get("initializer_range", 0.02)),
        pad_token_id=raw.get("pad_token_id", 151329), eos_token_id=eos, use_cache=False)
    vision_raw = raw["vision_config"]
    vision = VisionSettings(**{k: type(getattr(VisionSettings, k))(vision_raw[k]) for k in VISION_FIELDS
                               if k in vision_raw})
    if vision_raw.get("num_positions") not in (None, vision.num_positions):
        raise ConfigError(f"config.json: vision_config.num_positions={vision_raw['num_positions']} but image_size "
                          f"{vision.image_size} / patch_size {vision.patch_size} gives {vision.num_positions}")
    if vision.grid % 2:
        raise ConfigError(f"config.json: the ViT grid ({vision.grid} patches per side) must be even for the "
                          "2x2 stride-2 conv")
    return Glm4vOrigConfig(text_config=text, vision=vision, boi_token_id=int(raw.get("boi_token_id", 151339)),
                           eoi_token_id=int(raw.get("eoi_token_id", 151340)),
                           initializer_range=float(text.initializer_range), source=dict(raw))


def config_to_dict(arch: Glm4vOrigConfig, dtype: torch.dtype | None = None) -> dict:
    """Back to the released field names (every field of the config.json it came from is kept)."""
    t, v = arch.text_config, arch.vision
    out = dict(arch.source)
    out.update({
        "model_type": "chatglm", "architectures": out.get("architectures", ["ChatGLMModel"]),
        "num_layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
        "kv_channels": t.head_dim, "num_attention_heads": t.num_attention_heads,
        "multi_query_attention": t.num_key_value_heads != t.num_attention_heads,
        "multi_query_group_num": t.num_key_value_heads, "padded_vocab_size": t.vocab_size,
        "seq_length": t.max_position_embeddings, "layernorm_epsilon": t.rms_norm_eps,
        "rope_ratio": t.rope_parameters["rope_theta"] / 10000.0, "original_rope": True,
        "add_bias_linear": False, "add_qkv_bias": bool(t.attention_bias), "rmsnorm": True, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": bool(t.tie_word_embeddings),
        "pad_token_id": t.pad_token_id, "eos_token_id": t.eos_token_id,
        "boi_token_id": arch.boi_token_id, "eoi_token_id": arch.eoi_token_id,
    })
    vision = dict(out.get("vision_config") or {})
    vision.update({k: getattr(v, k) for k in VISION_FIELDS}, num_positions=v.num_positions)
    vision.setdefault("hidden_act", "gelu")
    vision.setdefault("dropout_prob", 0.0)
    out["vision_config"] = vision
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def read_config(folder: Path, initializer_range: float | None = None) -> Glm4vOrigConfig:
    raw = read_config_json(folder, "a GLM-4V-9B folder (config.json, *.safetensors + index, tokenizer.model, "
                                   "tokenizer_config.json)")
    return config_from_dict(raw, initializer_range)


# -- names -------------------------------------------------------------------------------------------
_LLM = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_RENAMES = {"self_attention.dense.weight": "self_attn.o_proj.weight",
            "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight", "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight"}
_TOP = {"transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight"}
_PROJECTOR = ("conv.", "linear_proj.", "boi", "eoi")


def _qkv_sizes(arch: Glm4vOrigConfig) -> list[int]:
    t = arch.text_config
    return [t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.num_key_value_heads * t.head_dim]


def module_names(name: str, arch: Glm4vOrigConfig) -> list[str]:
    """The module tensors one released tensor becomes (q / k / v for the fused QKV; none for an ignored buffer);
    a name it does not know is kept as it is (the load reports it as unexpected)."""
    if name in IGNORED:
        return []
    match = _LLM.match(name)
    if name in _TOP:
        return [_TOP[name]]
    if match and match.group(2).startswith("self_attention.query_key_value."):
        kind = match.group(2).rsplit(".", 1)[1]
        return [f"model.layers.{match.group(1)}.self_attn.{proj}_proj.{kind}" for proj in "qkv"]
    if match and match.group(2) in _RENAMES:
        return [f"model.layers.{match.group(1)}.{_RENAMES[match.group(2)]}"]
    if name.startswith("transformer.vision."):
        rest = name[len("transformer.vision."):]
        return [("projector." if rest.startswith(_PROJECTOR) else "vision.") + rest]
    return [name]


_QKV_PART = re.compile(r"\.self_attn\.([qkv])_proj\.(weight|bias)$")


def assemble(name: str, tensor: torch.Tensor, arch: Glm4vOrigConfig) -> torch.Tensor:
    """The module tensor `name` cut from the released tensor it comes from (`module_names`): its block of the
    fused QKV (contiguous blocks [Q | K | V]), or the tensor itself."""
    match = _QKV_PART.search(name)
    if match and name.startswith("model.layers."):
        return torch.split(tensor, _qkv_sizes(arch), dim=0)["qkv".index(match.group(1))]
    return tensor


def from_released(state: dict[str, torch.Tensor], arch: Glm4vOrigConfig) -> dict[str, torch.Tensor]:
    """Released names -> module names (the fused QKV split into q / k / v); names it does not know are kept as
    they are (the load reports them as unexpected)."""
    return {module: assemble(module, tensor, arch) for name, tensor in state.items()
            for module in module_names(name, arch)}


def to_released(state: dict[str, torch.Tensor], arch: Glm4vOrigConfig) -> dict[str, torch.Tensor]:
    """Module state dict -> released names and tensors (q / k / v fused back)."""
    inverse_top = {v: k for k, v in _TOP.items()}
    inverse = {v: k for k, v in _RENAMES.items()}
    out, qkv = {}, {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        if name in inverse_top:
            out[inverse_top[name]] = tensor
            continue
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            if rest.startswith("self_attn.") and rest[len("self_attn.")] in "qkv" and "_proj." in rest:
                proj, kind = rest[len("self_attn.")], rest.rsplit(".", 1)[1]
                qkv.setdefault((layer, kind), {})[proj] = tensor
                continue
            out[f"transformer.encoder.layers.{layer}.{inverse[rest]}"] = tensor
        elif name.startswith(("vision.", "projector.")):
            out["transformer.vision." + name.split(".", 1)[1]] = tensor
        else:
            raise ValueError(f"no released name for {name}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def released_name(name: str) -> str:
    """The released name of one module tensor (q / k / v name their fused query_key_value)."""
    match = re.match(r"^model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", name)
    if match:
        return f"transformer.encoder.layers.{match.group(1)}.self_attention.query_key_value.{match.group(2)}"
    inverse = {v: k for k, v in _RENAMES.items()}
    if name.startswith("model.layers."):
        layer, rest = name[len("model.layers."):].split(".", 1)
        return f"transformer.encoder.layers.{layer}.{inverse.get(rest, rest)}"
    if name.startswith(("vision.", "projector.")):
        return "transformer.vision." + name.split(".", 1)[1]
    return {v: k for k, v in _TOP.items()}.get(name, name)


class MissingKeys(ConfigError):
    def __init__(self, missing: list[str], unexpected: list[str], folder: Path | None = None):
        self.missing, self.unexpected = missing, unexpected

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = ([f"{len(missing)} missing key(s): {show(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected key(s): {show(unexpected)}"] if unexpected else [])
        super().__init__(f"GLM-4V-9B checkpoint{f' in {folder}' if folder else ''} does not match the model its "
                         f"config.json describes: {'; '.join(parts)}. Check that config.json belongs to these "
                         "weights (num_layers, vision_config.num_hidden_layers).")


# -- folders -----------------------------------------------------------------------------------------
def read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise ConfigError(f"{path} is named in {INDEX_FILE} but does not exist")
        state.update(load_file(str(path)))
    return state


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                initializer_range: float | None = None) -> Glm4vOrigForCausalLM:
    """Check the checkpoint's key names against the model (strict, from the shard headers alone), then read its
    tensors one at a time from the shards into the model: built on the meta device and placed on `device`, or,
    inside DeepSpeed's zero.Init (ZeRO-3), built partitioned (in the init's dtype, no initialisation) and filled
    partition by partition. One released tensor at a time is whole in memory besides the model or this rank's
    partition of it (the fused QKV is read once per q / k / v block)."""
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    folder = Path(folder)
    arch = read_config(folder, initializer_range)
    reader = folder_reader(folder)
    sources = {module: [name] for name in reader.names for module in module_names(name, arch)}
    model, partitioned = built_for_loading(lambda: Glm4vOrigForCausalLM(arch), dtype)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sources)), sorted(set(sources) - expected)
    if missing or unexpected:
        raise MissingKeys(sorted({released_name(k) for k in missing}), sorted({released_name(k) for k in unexpected}),
                          folder)
    if not partitioned:
        model.to_empty(device=device)
    try:
        stream_into(model, sources, lambda name, tensors: assemble(name, tensors[0], arch), reader)
    except ValueError as err:
        raise ConfigError(f"GLM-4V-9B checkpoint {folder}: {err}; check that config.json belongs to these "
                          "weights") from err
    # the rotary frequencies are a buffer, not in the checkpoint: recomputed (an ordinary module under ZeRO-3)
    with unpartitioned(), torch.device(device):
        model.model.rotary_emb = GlmRotaryEmbedding(arch.text_config)
    return model


def plan_shards(released: dict[str, torch.Tensor], max_shard_bytes: int, num_shards: int | None = None
                ) -> list[list[str]]:
    """Key names per shard, in name order: a new shard when the next tensor would pass `max_shard_bytes`, or,
    with `num_shards`, when the current one holds its share of the bytes."""
    def nbytes_of(name):
        return released[name].numel() * released[name].element_size()

    share = -(-sum(map(nbytes_of, released)) // num_shards) if num_shards else None
    shards, current, size = [], [], 0
    for name in sorted(released):
        nbytes = nbytes_of(name)
        if current and (size >= share if share else size + nbytes > max_shard_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + ([current] if current else [])


def write_weights(model: Glm4vOrigForCausalLM, folder: Path, state: dict[str, torch.Tensor] | None = None,
                  max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None,
                  num_shards: int | None = None) -> None:
    """config.json, `model-0000i-of-0000n.safetensors` and the index (always, as the released folder has)."""
    folder = Path(folder)
    state = model.state_dict() if state is None else state
    released = to_released({k: v.detach().to("cpu", dtype=dtype or v.dtype) for k, v in state.items()},
                           model.config)
    write_shards(released, folder, plan_shards(released, max_shard_bytes, num_shards))
    config = config_to_dict(model.config, written_dtype(released))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


# files of a released folder that an export carries as they are (beside the weights, config.json and the
# tokenizer files the processor copies): the released code's Python files and what transformers reads beside them
RELEASED_FILE_PATTERNS = ("*.py", "special_tokens_map.json", "generation_config.json")


def copy_released_files(source: Path, folder: Path) -> list[str]:
    """Copy RELEASED_FILE_PATTERNS from `source` (the folder the model was loaded from) into `folder`, byte for
    byte, never importing them; returns the names copied (none for a folder without them, such as a tiny one made
    here)."""
    copied = []
    for pattern in RELEASED_FILE_PATTERNS:
        for path in sorted(Path(source).glob(pattern)):
            if path.is_file() and not (Path(folder) / path.name).exists():
                shutil.copyfile(path, Path(folder) / path.name)
                copied.append(path.name)
    return copied


def save_folder(model: Glm4vOrigForCausalLM, folder: Path, state: dict[str, torch.Tensor] | None = None,
                max_shard_bytes: int = 4 * 1024**3, dtype: torch.dtype | None = None) -> None:
    with atomic_folder(Path(folder)) as tmp:
        write_weights(model, tmp, state, max_shard_bytes, dtype)
