"""Images decoded the way image libraries for ML do, so that the pixels reaching the model are what the file
means: the EXIF orientation applied (phone photos are stored sideways), 16- and 32-bit images scaled to 8
bits (not clipped to white), transparency composited onto a white background (not dropped)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlm_finetune.data.rules import image_size_problem
from vlm_finetune.errors import DataError

BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image` as it is meant to be seen."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey levels: PIL's convert("RGB") clips them at 255, so almost
        # everything becomes white; scale the file's range down to 8 bits instead
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else float(values.max())
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if values.max() <= 1.0 else float(values.max())
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_checked(path: str | Path) -> Image.Image:
    """Open an image file lazily (only its header read), refused with a DataError naming the file when its size
    breaks data/rules.py (Pillow's own decompression-bomb warning and error are replaced by that message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the size rule below decides
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    problem = image_size_problem(*image.size)
    if problem is not None:
        image.close()
        raise DataError(f"image {path} {problem}")
    return image


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file and return it decoded as `to_rgb` does (the file is read fully and closed); sizes
    the processors refuse raise a DataError naming the file (data/rules.py)."""
    with open_checked(path) as image:
        image.load()
        return to_rgb(image)
