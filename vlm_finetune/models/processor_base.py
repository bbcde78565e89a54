"""What every family's processor shares, so each family keeps only its prompt format and image tensors: the
truncation policy, the encode prologue, ids and labels built side by side, the EncodedSample, collate and
decode."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import torch

from vlm_finetune.data.rules import generation_problem, placeholder_problem
from vlm_finetune.data.sample import IGNORE_INDEX, EncodedSample, Message, Sample, SampleTooLong, pad_encoded
from vlm_finetune.errors import DataError

TRUNCATION_POLICIES = ("truncate", "drop")


class LabelledIds:
    """Token ids and their labels, appended together: a supervised token is its own label, any other
    IGNORE_INDEX, so the two lists never drift apart."""

    def __init__(self, ids: Iterable[int] = (), supervised: bool = False):
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.add(ids, supervised)

    def add(self, token_ids: Iterable[int], supervised: bool) -> None:
        token_ids = list(token_ids)
        self.ids += token_ids
        self.labels += token_ids if supervised else [IGNORE_INDEX] * len(token_ids)

    def prompt(self, token_ids: Iterable[int]) -> None:
        self.add(token_ids, False)

    def supervised(self, token_ids: Iterable[int]) -> None:
        self.add(token_ids, True)

    def __len__(self) -> int:
        return len(self.ids)


class VLMProcessorBase:
    """The parts of a family processor (models.base.FamilyProcessor) that do not depend on the prompt format.

    A subclass sets, in its __init__ after this one's: `eos_token_id`, `pad_token_id`, `stop_token_ids` (where
    a decoded reply ends) and `image_end_id` (the last token of an image span, which a cut may not reach); and
    `image_keys`, the image tensors collate concatenates, in batch order."""

    image_keys: tuple[str, ...] = ()
    image_end_id: int | None = None
    #: images one conversation may hold (None: any number); the data is checked against it before weights load
    max_images: int | None = None
    #: what to say when a conversation holds more (the model's name)
    model_name: str = "this model"
    #: whether conversations may hold videos (GLM-4.1V/4.5V); checked before weights load too
    takes_video: bool = False
    stop_token_ids: Iterable[int] = ()

    def __init__(self, tokenizer, truncation: str = "truncate", tokenizer_folder: str | Path | None = None):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"data.truncation={truncation!r}: use 'truncate' or 'drop'")
        self.tokenizer = tokenizer
        self.truncation = truncation
        #: where the tokenizer was read from (families that export its files byte for byte copy them from here)
        self.tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder is not None else None

    # -- encoding -------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        """Plain text as ids, no special tokens added (templates place those themselves)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @staticmethod
    def _conversation(sample: Sample, for_generation: bool) -> list[Message]:
        """The messages to encode: for generation the prompt stops where the last (assistant) reply begins."""
        messages = list(sample.messages)
        # the rules the up-front check applies to every record (data/rules.py)
        problem = placeholder_problem(messages, len(sample.images))
        if problem is None and for_generation:
            problem = generation_problem(messages)
        if problem is not None:
            raise DataError(f"the conversation {problem}")
        return messages[:-1] if for_generation else messages

    def _fit(self, ids: list[int], labels: list[int], max_length: int | None,
             for_generation: bool) -> tuple[list[int], list[int], bool]:
        """(ids, labels, truncated) within `max_length`: cut at the end under `truncate`, else SampleTooLong
        (policy `drop`; a generation prompt, whose end is what matters; or a cut through an image span, which
        would leave image features without their tokens)."""
        if max_length is None or len(ids) <= max_length:
            return ids, labels, False
        last_image = max((i for i, t in enumerate(ids) if t == self.image_end_id), default=-1)
        if self.truncation == "drop" or for_generation or last_image >= max_length:
            raise SampleTooLong(f"{len(ids)} tokens > data.max_length={max_length}")
        return ids[:max_length], labels[:max_length], True

    @staticmethod
    def _encoded(ids: list[int], labels: list[int], image_inputs: dict[str, torch.Tensor],
                 truncated: bool) -> EncodedSample:
        labels_t = torch.tensor(labels, dtype=torch.long)
        # the first label is never predicted (nothing comes before it), so it does not count
        return EncodedSample(input_ids=torch.tensor(ids, dtype=torch.long), labels=labels_t, image_inputs=image_inputs,
                             num_supervised_tokens=int((labels_t[1:] != IGNORE_INDEX).sum()), truncated=truncated)

    def _finish(self, ids: list[int], labels: list[int], image_inputs: dict[str, torch.Tensor],
                max_length: int | None, for_generation: bool) -> EncodedSample:
        ids, labels, truncated = self._fit(ids, labels, max_length, for_generation)
        return self._encoded(ids, labels, image_inputs, truncated)

    # -- batching -------------------------------------------------------------------------------------
    def _token_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token batch entries the family's forward needs (none by default)."""
        return {}

    def collate(self, encoded: list[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        input_ids, attention_mask, labels = pad_encoded(encoded, self.pad_token_id, padding_side, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 **self._token_inputs(input_ids, attention_mask)}
        for key in self.image_keys:  # a sample may have some (images, not video): each key over those that have it
            parts = [e.image_inputs[key] for e in encoded if key in e.image_inputs]
            if parts:
                batch[key] = torch.cat(parts)
        return batch

    def decode(self, token_ids) -> str:
        """The text of generated ids up to the first stop token, special tokens left out."""
        ids = [int(t) for t in token_ids]
        stops = set(self.stop_token_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()

    # -- export ---------------------------------------------------------------------------------------
    def _copy_tokenizer_files(self, folder: str, names: Iterable[str]) -> None:
        """Files of the tokenizer's own folder, byte for byte (what a released loader expects to read)."""
        for name in names:
            shutil.copyfile(self.tokenizer_folder / name, Path(folder) / name)
