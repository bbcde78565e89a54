"""GLM-4V prompt format and batching: Samples in, `Glm4vForConditionalGeneration` inputs out."""
from __future__ import annotations

import torch

from vlm_finetune.data.sample import IGNORE_INDEX, IMAGE_PLACEHOLDER, EncodedSample, Sample, SampleTooLong, pad_encoded
from vlm_finetune.errors import DataError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class Glm4vProcessor:
    """Formats a conversation as GLM-4.1V does:
    `[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|>*n<|end_of_image|>question<|assistant|>\\nanswer<eos>`.

    Every text segment is tokenised on its own and the special ids are inserted directly, so the
    positions of image tokens and the supervised span are exact (no re-tokenisation drift).
    """

    def __init__(self, tokenizer, image_processor, merge_size: int = 2, truncation: str = "truncate"):
        if truncation not in ("truncate", "drop"):
            raise ValueError(f"data.truncation={truncation!r}: use 'truncate' or 'drop'")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.truncation = truncation
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", *ROLE_TOKENS.values())}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise DataError(f"the tokenizer lacks GLM-4V special tokens {missing}; is model.path a GLM-4V checkpoint?")
        self.special_ids = ids
        self.image_token_id = ids["<|image|>"]
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    # -- encoding -------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, sample: Sample, max_length: int | None = None, for_generation: bool = False) -> EncodedSample:
        messages = list(sample.messages)
        if for_generation:
            if not messages or messages[-1].role != "assistant":
                raise DataError("a sample for generation must end with the assistant reply to predict")
            messages = messages[:-1]
        images_needed = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        images = sample.images[:images_needed]
        image_inputs: dict[str, torch.Tensor] = {}
        tokens_per_image: list[int] = []
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = image_inputs["image_grid_thw"]
            tokens_per_image = [int(g.prod()) // self.merge_size**2 for g in grid]

        ids = [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]
        labels = [IGNORE_INDEX, IGNORE_INDEX]
        image_index = 0
        for message in messages:
            ids.append(self.special_ids[ROLE_TOKENS[message.role]])
            labels.append(IGNORE_INDEX)
            head = self._text("\n")
            ids += head
            labels += [IGNORE_INDEX] * len(head)
            if message.role == "assistant":
                body = self._text(message.content) + [self.eos_token_id]
                ids += body
                labels += body
                continue
            for k, chunk in enumerate(message.content.split(IMAGE_PLACEHOLDER)):
                if k > 0:
                    span = ([self.special_ids["<|begin_of_image|>"]]
                            + [self.image_token_id] * tokens_per_image[image_index]
                            + [self.special_ids["<|end_of_image|>"]])
                    image_index += 1
                    ids += span
                    labels += [IGNORE_INDEX] * len(span)
                text_ids = self._text(chunk)
                ids += text_ids
                labels += [IGNORE_INDEX] * len(text_ids)
        if for_generation:
            ids += [self.special_ids["<|assistant|>"]] + self._text("\n")
            labels += [IGNORE_INDEX] * (len(ids) - len(labels))

        truncated = False
        if max_length is not None and len(ids) > max_length:
            last_image = max((i for i, t in enumerate(ids) if t == self.special_ids["<|end_of_image|>"]), default=-1)
            if self.truncation == "drop" or for_generation or last_image >= max_length:
                # cutting through an image span would leave image features without their tokens
                raise SampleTooLong(f"{len(ids)} tokens > data.max_length={max_length}")
            ids, labels, truncated = ids[:max_length], labels[:max_length], True
        input_ids = torch.tensor(ids, dtype=torch.long)
        label_tensor = torch.tensor(labels, dtype=torch.long)
        return EncodedSample(input_ids=input_ids, labels=label_tensor, image_inputs=image_inputs,
                             num_supervised_tokens=int((label_tensor[1:] != IGNORE_INDEX).sum()), truncated=truncated)

    # -- batching -------------------------------------------------------------------------------
    def collate(self, encoded: list[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        input_ids, attention_mask, labels = pad_encoded(encoded, self.pad_token_id, padding_side, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 # 1 marks image positions: GLM-4V's M-RoPE needs it whenever images are present
                 "mm_token_type_ids": ((input_ids == self.image_token_id).to(torch.int32)
                                       * attention_mask.to(torch.int32))}
        with_images = [e.image_inputs for e in encoded if e.image_inputs]
        if with_images:
            batch["pixel_values"] = torch.cat([x["pixel_values"] for x in with_images])
            batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_images])
        return batch

    def decode(self, token_ids: torch.Tensor) -> str:
        ids = [int(t) for t in token_ids]
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def save_pretrained(self, folder: str) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
