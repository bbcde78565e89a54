"""A locally made GLM-4V tokenizer, image processor and tiny checkpoint, saved as an HF folder.

Nothing can come from a hub here, so the tiny model and every real-size model built from a config
get their tokenizer and processor from a folder made once on this machine, then loaded through the
same `from_pretrained` calls that a real GLM-4.1V checkpoint folder goes through.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_finetune.models._tiny import cached_folder, corpus, fingerprint

SPECIAL_TOKENS = [
    "<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>",
    "<pad>",
]

def ensure_processor_folder(cache_dir: str | os.PathLike, vocab_size: int, image_size: int,
                            max_image_size: int) -> Path:
    """A tokenizer (byte-level BPE, GLM-4V special tokens) + GLM-4V image processor folder."""
    spec = {"kind": "glm4v-processor", "vocab_size": vocab_size, "image_size": image_size,
            "max_image_size": max_image_size, "version": 2}
    target = Path(cache_dir) / f"glm4v-processor-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast
        from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(corpus(), trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<pad>")
        tokenizer.save_pretrained(folder)
        # pixel budget: images are resized so H*W lies in [image_size^2, max_image_size^2], multiples of 28.
        # The processor counts the still image twice (temporal_patch_size=2 frames), hence the factor 2.
        image_processor = Glm4vImageProcessorPil(
            size={"shortest_edge": 2 * image_size * image_size, "longest_edge": 2 * max_image_size * max_image_size})
        image_processor.save_pretrained(folder)
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike, text: dict, vision: dict, image_size: int,
                           max_image_size: int, vocab_size: int, init_seed: int, moe: bool = False) -> Path:
    """A complete tiny GLM-4V checkpoint folder (config, seeded random weights, tokenizer, processor):
    GLM-4.1V, or with `moe` GLM-4.5V (`Glm4vMoeForConditionalGeneration`: routed experts + a shared one)."""
    spec = {"kind": "tiny-glm4v-moe" if moe else "tiny-glm4v", "text": dict(text), "vision": dict(vision),
            "image_size": image_size, "max_image_size": max_image_size, "vocab_size": vocab_size,
            "init_seed": init_seed, "version": 2}
    target = Path(cache_dir) / f"{'tiny_glm45v' if moe else 'tiny_glm41v'}-{fingerprint(spec)}"

    def write(folder: Path) -> None:
        import torch
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            Glm4vForConditionalGeneration,
            Glm4vMoeForConditionalGeneration,
        )

        processor_folder = ensure_processor_folder(cache_dir, vocab_size, image_size, max_image_size)
        tokenizer = AutoTokenizer.from_pretrained(processor_folder)
        config = tiny_config(tokenizer, text, vision, image_size, moe=moe)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = (Glm4vMoeForConditionalGeneration if moe else Glm4vForConditionalGeneration)(config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        AutoImageProcessor.from_pretrained(processor_folder).save_pretrained(folder)
        (folder / "vlm_finetune.json").write_text(json.dumps(spec, indent=2))

    return cached_folder(target, write)


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image|>"], "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"], "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"], "video_end_token_id": ids["<|end_of_video|>"],
    }


def tiny_config(tokenizer, text: dict, vision: dict, image_size: int, moe: bool = False):
    from transformers import Glm4vConfig, Glm4vMoeConfig

    config = Glm4vMoeConfig() if moe else Glm4vConfig()
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rotary_half = head_dim // 4  # partial_rotary_factor 0.5, then halves: the M-RoPE sections must sum to this
    t = rotary_half // 4
    section = [t, (rotary_half - t) // 2, rotary_half - t - (rotary_half - t) // 2]
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": section, "partial_rotary_factor": 0.5}
    config.text_config.update(dict(text, vocab_size=len(tokenizer)))
    config.vision_config.update(dict(vision, out_hidden_size=text["hidden_size"], image_size=image_size))
    for key, value in special_token_ids(tokenizer).items():
        setattr(config, key, value)
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    return config
