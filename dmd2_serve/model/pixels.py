"""Pillow images to the modes the models take, shared by the server's uploads and training's data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # Pillow's modes for 16-bit grey PNGs


def converted(im: Image.Image, mode: str) -> Image.Image:
    """``im.convert(mode)``, with 16-bit grey scaled to 8 bits first (Pillow's ``convert`` clips its
    0..65535 at 255, which turns all but the darkest pixels white)."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:  # the high byte, in place: one copy at the source's width, then 8 bits
        grey = np.array(im)
        np.clip(grey, 0, 65535, out=grey)
        grey >>= 8
        im = Image.fromarray(grey.astype(np.uint8), "L")
    return im.convert(mode)
