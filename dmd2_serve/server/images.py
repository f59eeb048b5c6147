"""Request images in: base64 text or file bytes -> pixels at the size the model renders.

Every uploaded image is untrusted. It is opened only as PNG, JPEG or WebP (no other Pillow
plugin ever sees the bytes), its header's dimensions are checked against a pixel limit before
any pixel is decoded (a 100 KB PNG can claim 100000 x 100000), and any failure of the decoder
on malformed or truncated data becomes :class:`BadImage`, which the API turns into a 422 (or
OpenAI's 400) naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from ..model.pixels import converted

FORMATS = ("PNG", "JPEG", "WEBP")
# The largest image decoded: 16.8 megapixels (4096 x 4096; a 12 MP phone photo fits), about 67 MB
# as RGBA while it is converted. The body limit bounds the file; this bounds what it expands to.
MAX_INPUT_PIXELS = 4096 * 4096


class BadImage(ValueError):
    """An uploaded image that cannot be used; the message says why and what to send instead."""


def from_base64(text: str) -> bytes:
    """The file bytes of base64 text, or of a ``data:image/...;base64,`` URL (what browsers make).

    Whitespace (line-wrapped base64) is ignored; anything else outside the alphabet is refused.
    """
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise BadImage("is a data: URL without base64; send data:image/png;base64,iVBOR... (or bare base64)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("is not valid base64: send the PNG, JPEG or WebP file's bytes base64-encoded"
                       " (e.g. base64 -w0 photo.png) or as a data: URL") from None


def _signature(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce, if any."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def load_image(data: bytes, size: tuple[int, int], channels: int, max_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    """Decode an uploaded file to (H, W, C) uint8 at ``size`` = (width, height), under ``max_pixels``.

    The image is turned upright (EXIF orientation), converted to ``channels`` (1: grey, 3: RGB;
    alpha is dropped), centre-cropped to the aspect ratio of ``size`` and resized (Lanczos).
    Raises :class:`BadImage` for anything else than a whole PNG, JPEG or WebP within the limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadImage("is empty: send a PNG, JPEG or WebP file")
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # reads the header only
            width, height = im.size
            if width * height > max_pixels or min(width, height) < 1:
                raise BadImage(f"is {width} x {height} pixels; at most {max_pixels:,} pixels (e.g. 4096 x 4096)"
                               " are decoded: scale it down first")
            if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale when that still covers size, either way up
                im.draft(mode, (max(size), max(size)))
            im.load()  # a truncated or corrupt file fails here
            upright = converted(ImageOps.exif_transpose(im), mode)
    except BadImage:
        raise
    except UnidentifiedImageError:
        if kind := _signature(data):
            raise BadImage(f"starts as a {kind} file but could not be read (damaged or cut off?); send it again,"
                           " or re-save it") from None
        raise BadImage("is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise BadImage(f"claims more pixels than the {max_pixels:,} allowed: scale it down first") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the sender's problem
        raise BadImage(f"could not be decoded ({type(e).__name__}: {e}); is the file whole, not truncated?") from None
    fitted = ImageOps.fit(upright, size, Image.Resampling.LANCZOS)
    return np.array(fitted, dtype=np.uint8).reshape(size[1], size[0], channels)  # a writable copy
