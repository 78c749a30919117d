"""Image grids: many generations in one PNG, written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image

from diffimmune.errors import DiffImmuneError
from diffimmune.eval.classifier import to_uint8
from diffimmune.files import atomic_file


def make_grid(
    images: torch.Tensor, columns: int | None = None, scale: int = 1, padding: int = 2
) -> Image.Image:
    count = images.shape[0]
    if count == 0:
        raise DiffImmuneError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = to_uint8(images)
    height, width = pixels.shape[1] * scale, pixels.shape[2] * scale
    canvas = Image.new(
        "RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white"
    )
    for index, image in enumerate(pixels):
        tile = Image.fromarray(image).resize((width, height), Image.NEAREST)
        row, column = divmod(index, columns)
        canvas.paste(tile, (padding + column * (width + padding), padding + row * (height + padding)))
    return canvas


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG")
    return Path(path)
