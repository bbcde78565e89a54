"""Locally made MGM tokenizers and tiny checkpoint folders (nothing can come from a hub here).

The tiny checkpoint is written in MGM's released layout by `checkpoint.save_folder` and loaded back by
`checkpoint.load_folder`, the same path `model.path=/a/MGM-2B` takes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_finetune.models._tiny import cached_folder, corpus, fingerprint
from vlm_finetune.models.mgm.templates import TEMPLATES

# (bos, eos, pad) of the LLM each template belongs to
TOKEN_ROLES = {
    "gemma": ("<bos>", "<eos>", "<pad>"),
    "vicuna_v1": ("<s>", "</s>", "<unk>"),
    "mistral_instruct": ("<s>", "</s>", "<unk>"),
    "plain": ("<s>", "</s>", "<unk>"),
    "llama_3": ("<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"),
    "chatml_direct": ("<|startoftext|>", "<|endoftext|>", "<unk>"),
}


def plain_dict(cfg) -> dict:
    """A config node (or mapping) as a plain resolved dict; None -> {}."""
    from omegaconf import OmegaConf

    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def ensure_tokenizer_folder(cache_dir: str | os.PathLike, vocab_size: int, template: str) -> Path:
    """A byte-level BPE tokenizer with the special tokens of MGM's templates, bos/eos/pad as `template`'s LLM."""
    if template not in TOKEN_ROLES:
        from vlm_finetune.errors import ConfigError

        raise ConfigError(f"model.template={template!r} is unknown; use one of {sorted(TOKEN_ROLES)}")
    spec = {"kind": "mgm-tokenizer", "vocab_size": vocab_size, "template": template, "version": 1}
    target = Path(cache_dir) / f"mgm-tokenizer-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        special = ["<unk>", "<pad>"]
        for t in TEMPLATES.values():
            special += [s for s in t.special_tokens if s not in special]
        special += [s for roles in TOKEN_ROLES.values() for s in roles if s not in special]
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(corpus(), trainer)
        bos, eos, pad = TOKEN_ROLES[template]
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
                                            unk_token="<unk>")
        tokenizer.save_pretrained(folder)
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, model_cfg, build_config) -> Path:
    """A complete tiny MGM folder in the released layout: config.json, model.safetensors, tokenizer,
    preprocessor_config.json. `build_config(model_cfg, tokenizer)` gives the MgmConfig."""
    plain = plain_dict(model_cfg)
    spec = {"kind": "tiny-mgm", "version": 3, **{k: plain.get(k) for k in (
        "llm", "vision", "vision_aux", "image_size_aux", "image_grid", "image_global", "template", "vocab_size",
        "init_seed", "projector_type")}}
    target = Path(cache_dir) / f"{plain.get('name', 'tiny_mgm')}-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        import torch
        from transformers import AutoTokenizer

        from vlm_finetune.models.mgm.checkpoint import save_folder
        from vlm_finetune.models.mgm.modeling import ClipTower, ConvNeXtAuxTower, MgmForCausalLM
        from vlm_finetune.models.mgm.processor import MgmImages, MgmProcessor

        tokenizer = AutoTokenizer.from_pretrained(ensure_tokenizer_folder(cache_dir, int(plain["vocab_size"]),
                                                                          str(plain["template"])))
        config = build_config(model_cfg, tokenizer)
        seed = int(plain["init_seed"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MgmForCausalLM(config)
            # each tower drawn from its own seed: the same random vision features whatever the LLM
            # (tiny_mgm and tiny_mgm_moe see images identically)
            torch.manual_seed(seed + 1)
            model.model.vision_tower = ClipTower(config.vision_config, config.mm_vision_select_layer,
                                                 config.mm_vision_select_feature)
            torch.manual_seed(seed + 2)
            model.model.vision_tower_aux = ConvNeXtAuxTower(config.aux["dims"], config.aux["depths"])
        save_folder(model, folder / "weights")
        for item in (folder / "weights").iterdir():
            item.rename(folder / item.name)
        (folder / "weights").rmdir()
        images = MgmImages(config.image_size_aux, config.vision_config.image_size, config.image_grid,
                           config.image_global)
        MgmProcessor(tokenizer, images, config.image_tokens, config.template).save_pretrained(str(folder))
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)
