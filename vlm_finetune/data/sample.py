"""The record type every data source produces, and the encoded form every model family turns it into."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IGNORE_INDEX = -100  # label of a position that takes no loss (PyTorch's cross-entropy default)
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str  # may hold IMAGE_PLACEHOLDER, once per image, in order


@dataclass
class Video:
    """A video as its frames (RGB, decoded) and the rate they were taken at (frames per second)."""

    frames: list[Image.Image]
    fps: float


@dataclass(frozen=True)
class VideoFile:
    """A video file a record names (a path, or bytes embedded in a table), with what its header says: the frame
    count and average rate of its video stream. The family's processor chooses the frames by its own sampling
    rule and decodes only those (data/videos.read_frames)."""

    source: Path | bytes
    num_frames: int
    fps: float

    @property
    def duration(self) -> float:
        """Seconds, as transformers' PyAV reader states it (frames / average rate)."""
        return self.num_frames / self.fps

    def __repr__(self) -> str:  # not the bytes
        where = self.source if isinstance(self.source, Path) else f"<{len(self.source)} embedded bytes>"
        return f"VideoFile({where}, {self.num_frames} frames at {self.fps:g} fps)"


@dataclass
class Sample:
    """One conversation with its images (RGB, loaded). Loss is taken on assistant messages only."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. {"question_type": "color"}; never fed to the model
    # in the order of the VIDEO_PLACEHOLDERs; only GLM-4.1V/4.5V take them
    videos: list[Video | VideoFile] = field(default_factory=list)

    @property
    def num_image_placeholders(self) -> int:
        return sum(m.content.count(IMAGE_PLACEHOLDER) for m in self.messages)


class SampleTooLong(Exception):
    """Raised by a processor's `encode` when a sample exceeds max_length and cannot be truncated
    (policy `drop`, or the cut would go through an image span). The data module drops and counts it."""


@dataclass
class EncodedSample:
    """One tokenised sample: 1-D tensors plus the image tensors the family's forward needs."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where no loss is taken
    image_inputs: dict[str, torch.Tensor]  # e.g. pixel_values, image_grid_thw; empty without images
    num_supervised_tokens: int
    truncated: bool = False


def pad_encoded(encoded: list[EncodedSample], pad_token_id: int, padding_side: str = "right",
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of a batch, padded on `padding_side` (left for generation)."""
    length = max(e.input_ids.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = e.input_ids.numel()
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span], labels[row, span], attention_mask[row, span] = e.input_ids, e.labels, 1
    return input_ids, attention_mask, labels
