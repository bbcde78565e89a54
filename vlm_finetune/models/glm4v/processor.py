"""GLM-4V prompt format and batching: Samples in, `Glm4vForConditionalGeneration` inputs out."""
from __future__ import annotations

import torch

from vlm_finetune.data.sample import IGNORE_INDEX, IMAGE_PLACEHOLDER, EncodedSample, Sample, SampleTooLong, pad_encoded
from vlm_finetune.errors import DataError

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class Glm4vProcessor:
    """Formats a conversation exactly as the chat template released with GLM-4.1V-9B(-Thinking/-Base) does
    (`chat_template.jinja` of zai-org/GLM-4.1V-9B-Thinking; a copy is tests/data/glm41v_chat_template.jinja):

        [gMASK]<sop><|system|>\\nsystem<|user|>\\n<|begin_of_image|><|image|><|end_of_image|>question
        <|assistant|>\\nanswer<|user|>\\nnext question<|assistant|>\\nnext answer<|endoftext|>

    (one line; the template writes no newline of its own between turns). As in the HF `Glm4vProcessor`,
    each `<|image|>` stands for as many `<|image|>` tokens as the image has merged patches.

    The ids are those of that rendered text tokenised once: every run of text between two special tokens
    is tokenised as one string (the tokenizer splits on special tokens first, so the runs never interact),
    and the special ids are inserted directly, so image positions and supervised spans are exact.

    The template ends a reply with nothing but the next turn's role token, and a conversation with
    nothing at all; GLM stops generating at `<|endoftext|>`, `<|user|>` or `<|observation|>` (its
    generation_config). So, as GLM-4's own fine-tuning script does (its loss mask is shifted by one token),
    each reply is supervised together with the token that ends it: the next role token, or the
    `<|endoftext|>` appended after the last message. A training sequence is therefore the template's ids
    plus that one `<|endoftext|>`; a generation prompt is exactly the template's ids with
    `add_generation_prompt=True`.
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
        # where GLM-4.1V stops generating (its generation_config.eos_token_id): a reply ends at any of them
        observation = tokenizer.convert_tokens_to_ids("<|observation|>")
        self.stop_token_ids = {self.eos_token_id, ids["<|user|>"]} | (
            {observation} if observation not in (None, tokenizer.unk_token_id) else set())

    # -- encoding -------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _head_and_body(self, head: str, body: str) -> tuple[list[int], list[int]]:
        """`head + body` tokenised as one string (as the rendered template is), split into the tokens
        that hold only `head` and the rest; a token that straddles the two goes to the rest."""
        ids = self._text(head + body)
        head_ids = self._text(head)
        if ids[:len(head_ids)] == head_ids:
            return head_ids, ids[len(head_ids):]
        offsets = self.tokenizer(head + body, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n = sum(1 for _, end in offsets if end <= len(head))
        return ids[:n], ids[n:]

    def encode(self, sample: Sample, max_length: int | None = None, for_generation: bool = False) -> EncodedSample:
        messages = list(sample.messages)
        if for_generation:
            if not messages or messages[-1].role != "assistant":
                raise DataError("a sample for generation must end with the assistant reply to predict")
            messages = messages[:-1]
        images_needed = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages if m.role != "assistant")
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
        reply_open = False  # the last token written ends a reply: the next token is supervised too

        def special(token_id: int) -> None:
            nonlocal reply_open
            ids.append(token_id)
            labels.append(token_id if reply_open else IGNORE_INDEX)
            reply_open = False

        def prompt_text(token_ids: list[int]) -> None:
            ids.extend(token_ids)
            labels.extend([IGNORE_INDEX] * len(token_ids))

        for message in messages:
            special(self.special_ids[ROLE_TOKENS[message.role]])
            if message.role == "assistant":
                # the template: `<|assistant|>\n{{ msg.content }}`
                head, body = self._head_and_body("\n", message.content)
                prompt_text(head)
                ids.extend(body)
                labels.extend(body)
                reply_open = True
                continue
            # `<|system|>\n{{ content }}`, `<|user|>\n` + items; an image item is
            # `<|begin_of_image|><|image|><|end_of_image|>`, a text item its text
            chunks = message.content.split(IMAGE_PLACEHOLDER)
            for k, chunk in enumerate(chunks):
                if k > 0:
                    special(self.special_ids["<|begin_of_image|>"])
                    prompt_text([self.image_token_id] * tokens_per_image[image_index])
                    special(self.special_ids["<|end_of_image|>"])
                    image_index += 1
                prompt_text(self._text("\n" + chunk if k == 0 else chunk))
        if for_generation:  # the template's generation prompt; a prompt takes no loss
            special(self.special_ids["<|assistant|>"])
            prompt_text(self._text("\n"))
            labels = [IGNORE_INDEX] * len(ids)
        elif reply_open:
            special(self.eos_token_id)  # the conversation ends after the last reply

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
        ends = [i for i, t in enumerate(ids) if t in self.stop_token_ids]
        if ends:
            ids = ids[: ends[0]]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def save_pretrained(self, folder: str) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
