"""GLM-4V-9B's prompt format (the released tokenizer's `apply_chat_template`, reference section 5), images and
batches.

    [gMASK] <sop> <|user|> \\n <|begin_of_image|> <|endoftext|> x image rows <|end_of_image|> question
    <|assistant|> \\n answer <stop>

Each message is its role token, "\\n", then (in the message with the image) the image span, then the text;
the generation prompt ends with a bare <|assistant|> (the model writes the "\\n" itself). The released
tokenizer writes one <|endoftext|> placeholder and the released model expands it; here the ids carry every
image row already (the same sequence, and token budgets and truncation see its true length). Loss is on the
assistant reply: its "\\n", its text and the stop token (`stop_token`: <|user|> by default, see the YAML).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, EncodedSample, Sample
from vlm_finetune.errors import DataError
from vlm_finetune.models.glm4v_orig.modeling import CLIP_MEAN, CLIP_STD
from vlm_finetune.models.glm4v_orig.tokenizer import CONFIG_FILE, RANK_FILE
from vlm_finetune.models.processor_base import LabelledIds, VLMProcessorBase

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
STOP_TOKENS = ("<|user|>", "<|endoftext|>")


class Glm4vOrigImages:
    """PIL image -> [3, S, S]: squashed to S x S (bicubic, aspect ratio not kept), scaled to [0, 1], CLIP
    normalisation, as the released tokenizer prepares images."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self._mean = np.asarray(CLIP_MEAN, dtype=np.float32)
        self._std = np.asarray(CLIP_STD, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class Glm4vOrigProcessor(VLMProcessorBase):
    image_keys = ("pixel_values",)
    max_images, model_name = 1, "GLM-4V-9B"

    def __init__(self, tokenizer, image_size: int, image_rows: int, stop_token: str = "<|user|>",
                 truncation: str = "truncate", tokenizer_folder: str | Path | None = None):
        super().__init__(tokenizer, truncation, tokenizer_folder)
        if stop_token not in STOP_TOKENS:
            raise DataError(f"model.stop_token={stop_token!r}: use one of {STOP_TOKENS}")
        self.images = Glm4vOrigImages(image_size)
        self.image_rows = int(image_rows)  # patch rows per image (1600 at 1120 px)
        names = ("[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>", "<|observation|>",
                 *ROLE_TOKENS.values())
        vocab = tokenizer.get_vocab()
        missing = [t for t in names if t not in vocab]
        if missing:
            raise DataError(f"the tokenizer lacks GLM-4V-9B special tokens {missing}; is model.path a GLM-4V-9B "
                            "folder?")
        self.ids = {t: vocab[t] for t in names}
        self.eos_token_id = self.ids[stop_token]
        self.pad_token_id = self.ids["<|endoftext|>"]
        self.image_end_id = self.ids["<|end_of_image|>"]
        # the released generation stops: <|endoftext|>, <|user|>, <|observation|>
        self.stop_token_ids = [self.ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
        self.newline = self._text("\n")

    def image_span(self) -> list[int]:
        return [self.ids["<|begin_of_image|>"]] + [self.ids["<|endoftext|>"]] * self.image_rows + [self.image_end_id]

    def encode(self, sample: Sample, max_length: int | None = None, for_generation: bool = False) -> EncodedSample:
        messages = self._conversation(sample, for_generation)
        placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders > 1:
            raise DataError(f"GLM-4V-9B takes one image per conversation; this one has {placeholders} <image> "
                            "placeholders")
        if placeholders > len(sample.images):
            raise DataError("the conversation has an <image> placeholder but no image")
        seq = LabelledIds([self.ids["[gMASK]"], self.ids["<sop>"]])
        stop = self.eos_token_id
        stop_is_role = stop == self.ids["<|user|>"]
        supervise_role = False  # the previous reply's stop token is this turn's <|user|>
        for k, message in enumerate(messages):
            if message.role not in ROLE_TOKENS:
                raise DataError(f"role {message.role!r} is not one of {sorted(ROLE_TOKENS)}")
            role = self.ids[ROLE_TOKENS[message.role]]
            if message.role == "assistant":
                seq.prompt([role])
                seq.supervised(self.newline + self._text(message.content))
                supervise_role = stop_is_role and k + 1 < len(messages) and messages[k + 1].role == "user"
                if not supervise_role:  # the released history has no token between a reply and <|user|>
                    seq.supervised([stop])
                continue
            seq.add([role], supervise_role)
            seq.prompt(self.newline)
            text = message.content
            if IMAGE_PLACEHOLDER in text:  # the image goes right after the role line, before the text
                seq.prompt(self.image_span())
                text = text.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
            seq.prompt(self._text(text))
            supervise_role = False
        if for_generation:
            seq.prompt([self.ids["<|assistant|>"]])
        ids, labels, truncated = self._fit(seq.ids, seq.labels, max_length, for_generation)
        # the image is prepared only for a sample that is kept
        image_inputs = {"pixel_values": self.images(sample.images[0])[None]} if placeholders else {}
        return self._encoded(ids, labels, image_inputs, truncated)

    def save_pretrained(self, folder: str) -> None:
        """tokenizer.model and tokenizer_config.json of the folder the tokenizer came from, byte for byte."""
        if self.tokenizer_folder is None:
            raise DataError("this processor's tokenizer has no folder to copy tokenizer.model from")
        self._copy_tokenizer_files(folder, (RANK_FILE, CONFIG_FILE))
