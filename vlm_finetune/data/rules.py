"""What a processor accepts, in one place: the up-front check of every record (data/conversations.py), the
processors' own `encode` (models/processor_base.py), image loading (data/images.py) and `generate` all ask
these functions, so a record that passes the check before the weights load is one the processors take.

- `<image>` placeholders stand where the model is shown an image: in user (or system) turns. Every family
  here places image tokens only in the prompt it is given; a placeholder inside an assistant reply would be
  supervised as the literal text `<image>` and its image never shown.
- One image per placeholder, in order.
- Images: at most `MAX_IMAGE_PIXELS` pixels (Pillow's decompression-bomb limit: above it Pillow warns, above
  twice it refuses to open the file) and an aspect ratio of at most `MAX_ASPECT_RATIO` (transformers'
  `smart_resize` for GLM-4.1V/4.5V raises above 200; applied to every family so that a data set means the
  same for each of them: such a strip keeps no detail at the towers' 336-1120 px anyway).
- Generation (validation answers, `generate`) needs a conversation that ends with the assistant reply to
  predict, after a user turn.
"""
from __future__ import annotations

from vlm_finetune.data.sample import IMAGE_PLACEHOLDER, Message

IMAGE_ROLES = ("system", "user")
MAX_ASPECT_RATIO = 200.0
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS default (about 0.25 GB of 24-bit pixels)


def placeholder_problem(messages: list[Message], num_images: int) -> str | None:
    """Why these messages cannot go with `num_images` images, or None."""
    for index, message in enumerate(messages):
        if IMAGE_PLACEHOLDER in message.content and message.role not in IMAGE_ROLES:
            return (f"turn {index} ({message.role}) holds an '{IMAGE_PLACEHOLDER}' placeholder, where the model "
                    f"is shown no image (its text would be learned literally); put images in user turns")
    placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != num_images:
        return f"has {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} image(s)"
    return None


def generation_problem(messages: list[Message]) -> str | None:
    """Why an answer cannot be generated and scored for these messages (validation, generate), or None."""
    if not messages or messages[-1].role != "assistant":
        last = messages[-1].role if messages else "nothing"
        return (f"ends with a {last} turn; an evaluated conversation must end with the assistant reply to "
                "predict")
    if len(messages) < 2 or messages[-2].role != "user":
        return "has no user turn before its last assistant reply (nothing to answer)"
    return None


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None."""
    if width < 1 or height < 1:
        return f"is {width}x{height} pixels: empty"
    if width * height > MAX_IMAGE_PIXELS:
        return (f"is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
                "(a decompression bomb, or a scan that needs downscaling first)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (f"is {width}x{height} pixels, an aspect ratio of {ratio:.0f}:1 over the limit of "
                f"{MAX_ASPECT_RATIO:.0f}:1 (the image processors refuse it); crop or pad it")
    return None
