"""The released GLM-4V-9B config.json, and locally made stand-ins (nothing can come from a hub here): a tiny
tiktoken rank file with the released special tokens, and the tiny checkpoint folder, written in the released
layout (config.json, two safetensors shards + index, tokenizer.model, tokenizer_config.json) and loaded back
through `checkpoint.load_folder`, the path `model.path=/a/glm-4v-9b` takes."""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_finetune.models._tiny import cached_folder, corpus, fingerprint

# config.json of THUDM/glm-4v-9b (shared/reference/glm4v_9b_original.md section 1); seq_length 8192 (the
# copy found says 2048, every other source 8K)
RELEASED_CONFIG = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 40, "hidden_size": 4096,
    "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
    "multi_query_group_num": 2, "padded_vocab_size": 151552, "seq_length": 8192, "rope_ratio": 1,
    "original_rope": True, "add_bias_linear": False, "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False, "apply_query_key_layer_scaling": True,
    "attention_softmax_in_fp32": True, "rmsnorm": True, "post_layer_norm": True, "layernorm_epsilon": 1.5625e-07,
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "fp32_residual_connection": False, "bias_dropout_fusion": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329, "boi_token_id": 151339, "eoi_token_id": 151340, "use_cache": True,
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
                      "hidden_size": 1792, "patch_size": 14, "num_heads": 16, "intermediate_size": 15360,
                      "layer_norm_eps": 1e-06, "num_positions": 6401, "image_size": 1120, "scaling_factor": 8},
}


def released_config(overrides: dict | None = None, special_ids: dict | None = None) -> dict:
    """RELEASED_CONFIG with `overrides` (released field names; `vision_config` merged field by field) and the
    special ids of a locally made tokenizer."""
    raw = json.loads(json.dumps(RELEASED_CONFIG))
    overrides = dict(overrides or {})
    raw["vision_config"].update(overrides.pop("vision_config", None) or {})
    raw.update(overrides)
    vision = raw["vision_config"]
    vision["num_positions"] = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
    if special_ids:
        raw.update(special_ids)
    return raw


def tokenizer_ids(tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|user|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>")}
    return {"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
            "pad_token_id": ids["<|endoftext|>"], "boi_token_id": ids["<|begin_of_image|>"],
            "eoi_token_id": ids["<|end_of_image|>"]}


def write_tiny_tokenizer(folder: Path, vocab_size: int, image_size: int) -> None:
    """tokenizer.model + tokenizer_config.json in the released format: a byte-level BPE learnt here on the
    project's text, its first 256 ranks the single bytes in GPT-2 byte order (so "\\n" is 198, as in the
    released file), then the merges in the order they were learnt; the 14 special tokens follow."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from vlm_finetune.models.glm4v_orig.tokenizer import PATTERN, RANK_FILE, tokenizer_config, write_ranks

    byte_encoder = bytes_to_unicode()
    byte_decoder = {v: k for k, v in byte_encoder.items()}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    ranks = {bytes([b]): i for i, b in enumerate(byte_encoder)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(byte_decoder[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    write_ranks(ranks, folder / RANK_FILE)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(len(ranks), image_size), indent=2))


def ensure_tokenizer_folder(cache_dir: str | os.PathLike, vocab_size: int, image_size: int) -> Path:
    spec = {"kind": "glm4v-orig-tokenizer", "vocab_size": vocab_size, "image_size": image_size, "version": 1}
    target = Path(cache_dir) / f"glm4v-orig-tokenizer-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        write_tiny_tokenizer(folder, vocab_size, image_size)
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, model: dict) -> Path:
    """The tiny folder of the model settings `model` (ModelSettings.as_dict: `config`, released field names over
    the released values, `vocab_size`, `init_seed`), made once; its weights in two shards, as a multi-shard
    released folder."""
    plain = model
    spec = {"kind": "tiny-glm4v-orig", "version": 1,
            **{k: plain.get(k) for k in ("config", "vocab_size", "init_seed", "initializer_range")}}
    target = Path(cache_dir) / f"{plain.get('name', 'tiny_glm4v')}-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        write_tiny_folder(folder, plain.get("config"), int(plain["vocab_size"]), int(plain["init_seed"]),
                          float(plain.get("initializer_range") or 0.02))
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def write_tiny_folder(folder: Path, overrides: dict | None, vocab_size: int, seed: int,
                      initializer_range: float = 0.02, shards: int = 2):
    """A complete released-layout folder with seeded random weights; returns the model it was written from."""
    import torch

    from vlm_finetune.models.glm4v_orig.checkpoint import config_from_dict, write_weights
    from vlm_finetune.models.glm4v_orig.modeling import Glm4vOrigForCausalLM
    from vlm_finetune.models.glm4v_orig.tokenizer import load_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_size = int((overrides or {}).get("vision_config", {}).get("image_size", 1120))
    write_tiny_tokenizer(folder, vocab_size, image_size)
    tokenizer = load_tokenizer(folder)
    raw = released_config(overrides, tokenizer_ids(tokenizer))
    raw["padded_vocab_size"] = max(int(raw.get("padded_vocab_size", 0)) if overrides and "padded_vocab_size"
                                   in overrides else 0, -(-len(tokenizer) // 64) * 64)
    cfg = config_from_dict(raw, initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Glm4vOrigForCausalLM(cfg).eval()
    write_weights(model, folder, num_shards=shards)
    return model
