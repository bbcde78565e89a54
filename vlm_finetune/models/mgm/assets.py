"""Locally made MGM tokenizers and tiny checkpoint folders (nothing can come from a hub here).

The tiny checkpoint is written in MGM's released layout by `checkpoint.save_folder` and loaded back by
`checkpoint.load_folder`, the same path `model.path=/a/MGM-2B` takes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_finetune.models._tiny import cached_folder, corpus, fingerprint

# (bos, eos, pad) of the LLM each template belongs to
TOKEN_ROLES = {
    "gemma": ("<bos>", "<eos>", "<pad>"),
    "vicuna_v1": ("<s>", "</s>", "<unk>"),
    "mistral_instruct": ("<s>", "</s>", "<unk>"),
    "plain": ("<s>", "</s>", "<unk>"),
    "llama_3": ("<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"),
    "chatml_direct": ("<|startoftext|>", "<|endoftext|>", "<unk>"),
}
# LLMs whose tokenizer adds no BOS (Nous-Hermes-2-Yi-34B: add_bos_token false)
NO_BOS = ("chatml_direct",)
# every template's special tokens and roles, in one vocabulary (the byte-level BPE keeps [INST] / [/INST] as
# single tokens, as Mistral's newer tokenizers do; the SentencePiece kind splits them, as Mixtral-v0.1's does)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                  "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]",
                  "<|im_start|>", "<|im_end|>", "<|reserved_special_token_0|>", "<|startoftext|>", "<|endoftext|>"]
# words of the templates, so that the SentencePiece model learns them (never "[INST]": it must stay pieces)
TEMPLATE_WORDS = "USER: ASSISTANT: user model system assistant Answer the questions. A chat between a curious user"
KINDS = ("bpe", "sentencepiece")
# not user-defined pieces of the SentencePiece model: its own unk/bos/eos pieces, and [INST] / [/INST] (text)
SENTENCEPIECE_TEXT = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]")


def transformers4_compatible(folder: Path) -> None:
    """Rewrite a tokenizer folder saved by transformers 5 so that transformers 4 (MGM's code) reads it too:
    a tokenizer class it knows, and BPE merges as "a b" strings (the older format, which both read)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    tok_path = folder / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    model = tok["model"]
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("ignore_merges") is False:
        del model["ignore_merges"]  # a newer field; false is what older readers assume
    tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False))


def _write_bpe(folder: Path, vocab_size: int, template: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer)
    bos, eos, pad = TOKEN_ROLES[template]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
                                        unk_token="<unk>", add_bos_token=template not in NO_BOS)
    tokenizer.save_pretrained(folder)
    transformers4_compatible(folder)


def _write_sentencepiece(folder: Path, template: str, legacy: bool) -> None:
    """A SentencePiece-only folder as Llama-family checkpoints ship it: tokenizer.model (BPE, byte fallback,
    dummy prefix), tokenizer_config.json (LlamaTokenizer, `legacy`, add_bos_token), no tokenizer.json."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() + [TEMPLATE_WORDS] * 4), model_writer=buffer, vocab_size=600,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, user_defined_symbols=[t for t in SPECIAL_TOKENS if t not in SENTENCEPIECE_TEXT],
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    bos, eos, pad = TOKEN_ROLES[template]
    roles = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "pad_token": pad}
    config = dict(roles, tokenizer_class="LlamaTokenizer", legacy=bool(legacy), add_bos_token=template not in NO_BOS,
                  add_eos_token=False, clean_up_tokenization_spaces=False, model_max_length=4096,
                  sp_model_kwargs={})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "special_tokens_map.json").write_text(json.dumps(roles, indent=2, sort_keys=True))


def ensure_tokenizer_folder(cache_dir: str | os.PathLike, vocab_size: int, template: str, kind: str = "bpe",
                            legacy: bool = False) -> Path:
    """A tokenizer with the special tokens of MGM's templates, bos/eos/pad (and whether BOS is added) as
    `template`'s LLM: `kind=bpe` a byte-level BPE of `vocab_size` (tokenizer.json), `kind=sentencepiece` a
    SentencePiece model (tokenizer.model only; `legacy` is transformers' flag for text after special tokens).
    Both are written so that transformers 4 reads them as well."""
    from vlm_finetune.errors import ConfigError

    if template not in TOKEN_ROLES:
        raise ConfigError(f"model.template={template!r} is unknown; use one of {sorted(TOKEN_ROLES)}")
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind {kind!r} is unknown; use one of {KINDS}")
    spec = {"kind": "mgm-tokenizer", "vocab_size": vocab_size, "template": template, "version": 2}
    if kind != "bpe":
        spec.update(tokenizer=kind, legacy=bool(legacy), vocab_size=None)
    target = Path(cache_dir) / f"mgm-tokenizer-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        if kind == "bpe":
            _write_bpe(folder, vocab_size, template)
        else:
            _write_sentencepiece(folder, template, legacy)
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def tokenizer_options(model: dict) -> dict:
    """The locally made tokenizer's kind: `+model.tokenizer_kind=sentencepiece` (and `+model.tokenizer_legacy=true`)
    for a SentencePiece tokenizer like the Llama family's; the byte-level BPE by default."""
    options = {"kind": str(model.get("tokenizer_kind") or "bpe")}  # optional keys (no model config declares them)
    if options["kind"] != "bpe":
        options["legacy"] = bool(model.get("tokenizer_legacy"))
    return options


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, settings, build_config) -> Path:
    """A complete tiny MGM folder in the released layout: config.json, model.safetensors, tokenizer,
    preprocessor_config.json. `settings` are the model's (ModelSettings); `build_config(settings, tokenizer)`
    gives the MgmConfig."""
    plain = settings.as_dict()
    spec = {"kind": "tiny-mgm", "version": 4, **{k: plain.get(k) for k in (
        "llm", "vision", "vision_aux", "image_size_aux", "image_grid", "image_global", "template", "vocab_size",
        "init_seed", "projector_type", "tokenizer_kind", "tokenizer_legacy")}}
    target = Path(cache_dir) / f"{plain.get('name', 'tiny_mgm')}-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        import torch
        from transformers import AutoTokenizer

        from vlm_finetune.models.mgm.checkpoint import save_folder
        from vlm_finetune.models.mgm.modeling import ClipTower, ConvNeXtAuxTower, MgmForCausalLM
        from vlm_finetune.models.mgm.processor import MgmImages, MgmProcessor

        tokenizer_folder = ensure_tokenizer_folder(cache_dir, int(plain["vocab_size"]), str(plain["template"]),
                                                   **tokenizer_options(plain))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        config = build_config(settings, tokenizer)
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
        MgmProcessor(tokenizer, images, config.image_tokens, config.template,
                     tokenizer_folder=tokenizer_folder).save_pretrained(str(folder))
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)
