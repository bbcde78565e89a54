"""GLM-4V prompt format and batching: Samples in, `Glm4vForConditionalGeneration` inputs out."""
from __future__ import annotations

import re

import torch

# IGNORE_INDEX and SampleTooLong are re-exported: callers take them from here
from vlm_finetune.data.sample import (  # noqa: F401
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    EncodedSample,
    Sample,
    SampleTooLong,
)
from vlm_finetune.errors import DataError
from vlm_finetune.models.glm4v.video import VideoSettings, tokens_per_frame_pair, video_inputs
from vlm_finetune.models.processor_base import LabelledIds, VLMProcessorBase

PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class Glm4vProcessor(VLMProcessorBase):
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

    image_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    takes_video = True

    def __init__(self, tokenizer, image_processor, merge_size: int = 2, truncation: str = "truncate",
                 video: VideoSettings | None = None):
        super().__init__(tokenizer, truncation)
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.video = video or VideoSettings()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>",
                "<|end_of_video|>", *ROLE_TOKENS.values())}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise DataError(f"the tokenizer lacks GLM-4V special tokens {missing}; is model.path a GLM-4V checkpoint?")
        self.special_ids = ids
        self.image_token_id = ids["<|image|>"]
        self.image_end_id = ids["<|end_of_image|>"]
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        # where GLM-4.1V stops generating (its generation_config.eos_token_id): a reply ends at any of them
        observation = tokenizer.convert_tokens_to_ids("<|observation|>")
        self.stop_token_ids = {self.eos_token_id, ids["<|user|>"]} | (
            {observation} if observation not in (None, tokenizer.unk_token_id) else set())

    # -- encoding -------------------------------------------------------------------------------
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
        messages = self._conversation(sample, for_generation)
        images_needed = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages if m.role != "assistant")
        videos_needed = sum(m.content.count(VIDEO_PLACEHOLDER) for m in messages if m.role != "assistant")
        if videos_needed > len(sample.videos):
            raise DataError(f"the conversation has {videos_needed} {VIDEO_PLACEHOLDER} placeholder(s) but "
                            f"{len(sample.videos)} video(s)")
        images = sample.images[:images_needed]
        image_inputs: dict[str, torch.Tensor] = {}
        tokens_per_image: list[int] = []
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt"))
            grid = image_inputs["image_grid_thw"]
            tokens_per_image = [int(g.prod()) // self.merge_size**2 for g in grid]
        # each video: (image tokens per temporal patch, one timestamp per temporal patch)
        video_spans: list[tuple[int, list[int]]] = []
        if videos_needed:
            made = [video_inputs(video, self.video) for video in sample.videos[:videos_needed]]
            image_inputs["pixel_values_videos"] = torch.cat([m[0] for m in made])
            image_inputs["video_grid_thw"] = torch.cat([m[1] for m in made])
            video_spans = [(tokens_per_frame_pair(m[1], self.merge_size), m[2]) for m in made]

        seq = LabelledIds([self.special_ids["[gMASK]"], self.special_ids["<sop>"]])
        image_index = video_index = 0
        reply_open = False  # the last token written ends a reply: the next token is supervised too

        def special(token_id: int) -> None:
            nonlocal reply_open
            seq.add([token_id], reply_open)
            reply_open = False

        for message in messages:
            special(self.special_ids[ROLE_TOKENS[message.role]])
            if message.role == "assistant":
                # the template: `<|assistant|>\n{{ msg.content }}`
                head, body = self._head_and_body("\n", message.content)
                seq.prompt(head)
                seq.supervised(body)
                reply_open = True
                continue
            # `<|system|>\n{{ content }}`, `<|user|>\n` + items; an image item is
            # `<|begin_of_image|><|image|><|end_of_image|>`, a video item `<|begin_of_video|><|video|><|end_of_video|>`
            # with `<|video|>` expanded as the released Glm4vProcessor does: per temporal patch
            # `<|begin_of_image|>` + its image tokens + `<|end_of_image|>` + its timestamp in whole seconds
            chunks = PLACEHOLDERS.split(message.content)  # text, placeholder, text, ...
            for k, chunk in enumerate(chunks):
                if chunk == IMAGE_PLACEHOLDER and k % 2:
                    special(self.special_ids["<|begin_of_image|>"])
                    seq.prompt([self.image_token_id] * tokens_per_image[image_index])
                    special(self.image_end_id)
                    image_index += 1
                elif chunk == VIDEO_PLACEHOLDER and k % 2:
                    special(self.special_ids["<|begin_of_video|>"])
                    tokens, timestamps = video_spans[video_index]
                    for timestamp in timestamps:
                        seq.prompt([self.special_ids["<|begin_of_image|>"]] + [self.image_token_id] * tokens
                                   + [self.image_end_id] + self._text(str(timestamp)))
                    special(self.special_ids["<|end_of_video|>"])
                    video_index += 1
                else:
                    seq.prompt(self._text("\n" + chunk if k == 0 else chunk))
        if for_generation:  # the template's generation prompt; a prompt takes no loss
            special(self.special_ids["<|assistant|>"])
            seq.prompt(self._text("\n"))
            seq.labels = [IGNORE_INDEX] * len(seq)
        elif reply_open:
            special(self.eos_token_id)  # the conversation ends after the last reply
        return self._finish(seq.ids, seq.labels, image_inputs, max_length, for_generation)

    # -- batching -------------------------------------------------------------------------------
    def _token_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        # 1 marks image positions, 2 those inside a video (as the released processor's create_mm_token_type_ids):
        # GLM-4V's M-RoPE needs them whenever images or videos are present
        in_video = (torch.cumsum(input_ids == self.special_ids["<|begin_of_video|>"], dim=1)
                    > torch.cumsum(input_ids == self.special_ids["<|end_of_video|>"], dim=1))
        image = (input_ids == self.image_token_id) & attention_mask.bool()
        return {"mm_token_type_ids": (image.to(torch.int32) * (1 + in_video.to(torch.int32)))}

    def save_pretrained(self, folder: str) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
