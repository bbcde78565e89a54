"""MGM's inputs made from Samples: template tokens, image positions, and MGM's two image tensors.

Token ids are MGM's own: the rendered prompt string is split at each `<image>` and every piece is tokenised
whole by the checkpoint's tokenizer with its own special tokens (its BOS, or none: Yi's tokenizer adds none),
the BOS of every piece after the first dropped (MGM's `tokenizer_image_token`); a prompt without images is
tokenised once. The supervised tokens (assistant replies with their end markers) are found by their
character offsets, so no template segment is ever tokenised on its own.

Images are prepared as MGM's training data loader does: with `image_aspect_ratio: pad` (every released
model) padded to a square with the mean colour, otherwise as CLIP's processor does (shortest edge resized,
centre crop); resized (bicubic) to `image_size_aux` and normalised with CLIP's mean/std (the high-res
`images_aux`); the low-res CLIP input is a bilinear downsample of that tensor to `clip_size * image_grid`, cut
into grid crops (row-major) plus a global view in HD mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, EncodedSample, Sample
from vlm_finetune.errors import DataError
from vlm_finetune.models.mgm.modeling import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX
from vlm_finetune.models.mgm.templates import get_template
from vlm_finetune.models.processor_base import LabelledIds, VLMProcessorBase

PROCESSOR_FILE = "preprocessor_config.json"
# the files of a tokenizer folder: copied byte for byte into exports (transformers 4, which MGM's code uses,
# cannot read what transformers 5 writes, and a SentencePiece tokenizer keeps its tokenizer.model and flags)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def resize_and_crop(image: Image.Image, side: int) -> Image.Image:
    """CLIP's processor (MGM's path for `image_aspect_ratio` other than pad): shortest edge to `side` (bicubic),
    then the centre `side` x `side` crop."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    size = (side, new_long) if width <= height else (new_long, side)
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    return image.crop((left, top, left + side, top + side))


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class MgmImages:
    """PIL image -> (`images` [views, 3, c, c], `images_aux` [3, A, A])."""

    def __init__(self, image_size_aux: int, clip_size: int, image_grid: int = 1, image_global: bool = False,
                 mean=CLIP_MEAN, std=CLIP_STD, aspect_ratio: str = "pad"):
        self.aspect_ratio = str(aspect_ratio or "square")
        self.image_size_aux, self.clip_size = int(image_size_aux), int(clip_size)
        self.image_grid, self.image_global = int(image_grid), bool(image_global)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = np.asarray(self.mean, dtype=np.float32)
        self._std = np.asarray(self.std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aspect_ratio == "pad":
            image = expand_to_square(image.convert("RGB"), tuple(int(m * 255) for m in self.mean))
            image = image.resize((self.image_size_aux, self.image_size_aux), Image.BICUBIC)
        else:
            image = resize_and_crop(image.convert("RGB"), self.image_size_aux)
        # numpy for the per-pixel arithmetic: small torch ops cost more in dispatch than in work
        array = (np.asarray(image, dtype=np.float32) / 255.0 - self._mean) / self._std
        aux = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        g, c = self.image_grid, self.clip_size
        low = F.interpolate(aux[None], size=(c * g, c * g), mode="bilinear", align_corners=False)[0]
        if g == 1:
            return low[None], aux
        crops = low.reshape(3, g, c, g, c).permute(1, 3, 0, 2, 4).reshape(g * g, 3, c, c)
        if self.image_global:
            whole = F.interpolate(low[None], size=(c, c), mode="bilinear", align_corners=False)
            crops = torch.cat([crops, whole], dim=0)
        return crops, aux

    def to_dict(self) -> dict:
        # CLIPImageProcessor's fields (what tools expect of a preprocessor_config.json) plus MGM's
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": True,
                "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
                "crop_size": {"height": self.image_size_aux, "width": self.image_size_aux},
                "size": {"shortest_edge": self.image_size_aux}, "image_mean": list(self.mean),
                "image_std": list(self.std), "image_aspect_ratio": self.aspect_ratio, "mgm_clip_size": self.clip_size,
                "image_grid": self.image_grid, "image_global": self.image_global}


class MgmProcessor(VLMProcessorBase):
    image_keys = ("images", "images_aux")
    image_end_id = IMAGE_TOKEN_INDEX  # MGM's image positions are placeholder ids, so the last one ends a span
    # several images per conversation: MGM's forward splices each image at its placeholder (MGM's own loader keeps
    # one per record; taking several is this project's extension, tests/test_mgm_templates.py)
    max_images, model_name = None, "MGM"

    def __init__(self, tokenizer, images: MgmImages, tokens_per_image: int, template: str,
                 truncation: str = "truncate", tokenizer_folder: str | Path | None = None):
        super().__init__(tokenizer, truncation, tokenizer_folder)
        self.images = images
        self.tokens_per_image = int(tokens_per_image)
        self.template = get_template(template)
        vocab = tokenizer.get_vocab()
        missing = [t for t in self.template.special_tokens if t not in vocab]
        if missing:
            raise DataError(f"the tokenizer lacks {missing}, which MGM's {self.template.name!r} template needs; "
                            "set model.template to the template of this checkpoint's LLM")
        stop = self.template.stop
        self.eos_token_id = vocab[stop] if stop in vocab else self._text(stop)[-1]
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.unk_token_id or 0)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)  # read at decode time: follows eos_token_id if it is changed

    def tokenize(self, prompt: str, spans: list[tuple[int, int]] = ()) -> tuple[list[int], list[int]]:
        """(ids, labels) of a rendered prompt as MGM tokenises it: each piece between `<image>` placeholders
        tokenised whole with the tokenizer's special tokens, the first token of every later piece dropped when
        the first piece starts with BOS, `tokens_per_image` image positions per placeholder. A token of the text
        (not one the tokenizer adds, such as BOS) is supervised when its first character lies in one of `spans`."""
        bos = self.tokenizer.bos_token_id
        seq = LabelledIds()
        start, drop = 0, 0
        for k, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            try:
                enc = self.tokenizer(piece, return_offsets_mapping=True)
            except NotImplementedError as err:
                raise DataError("MGM needs a fast tokenizer (character offsets); this checkpoint's tokenizer "
                                f"gives none ({err})") from err
            tokens, offsets, of_text = list(enc["input_ids"]), list(enc["offset_mapping"]), enc.sequence_ids()
            if k == 0:
                drop = 1 if tokens and bos is not None and tokens[0] == bos else 0
            else:
                seq.prompt([IMAGE_TOKEN_INDEX] * self.tokens_per_image)
                tokens, offsets, of_text = tokens[drop:], offsets[drop:], of_text[drop:]
            for token, (first, _), text in zip(tokens, offsets, of_text):
                first += start
                seq.add([token], text is not None and any(a <= first < b for a, b in spans))
            start += len(piece) + len(IMAGE_PLACEHOLDER)
        return seq.ids, seq.labels

    def encode(self, sample: Sample, max_length: int | None = None, for_generation: bool = False) -> EncodedSample:
        messages = self._conversation(sample, for_generation)
        prompt, spans = self.template.prompt(messages, for_generation)
        ids, labels = self.tokenize(prompt, spans)
        n_images = ids.count(IMAGE_TOKEN_INDEX) // max(self.tokens_per_image, 1)
        if n_images > len(sample.images):
            raise DataError(f"the conversation has {n_images} <image> placeholder(s) but {len(sample.images)} image(s)")
        image_inputs: dict[str, torch.Tensor] = {}
        if n_images:
            pairs = [self.images(image) for image in sample.images[:n_images]]
            image_inputs = {"images": torch.stack([p[0] for p in pairs]),
                            "images_aux": torch.stack([p[1] for p in pairs])}
        return self._finish(ids, labels, image_inputs, max_length, for_generation)

    def decode(self, token_ids: torch.Tensor) -> str:
        # image positions (negative placeholder ids) are no text
        return super().decode([t for t in token_ids if int(t) >= 0])

    def save_pretrained(self, folder: str) -> None:
        """The tokenizer files of the folder the tokenizer came from, byte for byte (a tokenizer given without
        its folder is saved by transformers), and preprocessor_config.json."""
        source = self.tokenizer_folder
        copied = [name for name in TOKENIZER_FILES if source is not None and (source / name).is_file()]
        if copied:
            self._copy_tokenizer_files(folder, copied)
        else:
            self.tokenizer.save_pretrained(folder)
        config = dict(self.images.to_dict(), template=self.template.name, image_tokens=self.tokens_per_image)
        (Path(folder) / PROCESSOR_FILE).write_text(json.dumps(config, indent=2))
