"""The one record type every data source produces and every model family encodes."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str  # may hold IMAGE_PLACEHOLDER, once per image, in order


@dataclass
class Sample:
    """One conversation with its images (RGB, loaded). Loss is taken on assistant messages only."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. {"question_type": "color"}; never fed to the model

    @property
    def num_image_placeholders(self) -> int:
        return sum(m.content.count(IMAGE_PLACEHOLDER) for m in self.messages)
