"""Response images out: each image's file made once, in the HTTP process, saying what made it.

The worker converts a batch to uint8 pixels on the device (:func:`to_pixels`: a quarter of the
bytes to copy to the host) and sends them back through LitServe's response queue, then goes on
to its next batch; the HTTP process makes each image's file (PNG, JPEG or WebP) on its threads,
side by side, and answers it as it is (``Accept: image/png``, ``image/jpeg``, ``image/webp``) or
base64s the same bytes into JSON. Nothing is decoded or encoded twice.

Unless the server runs with ``--no-metadata``, each file carries how to make it again, in the
form AUTOMATIC1111's web UI writes and the tools around it read: the prompt, then one line of
``Key: value`` pairs. PNG holds it in a ``parameters`` text chunk; JPEG and WebP, which have no
text chunks, in the EXIF UserComment (``UNICODE\\0`` then UTF-16BE, as A1111 writes it)::

    a handwritten 7
    Steps: 4, Sampler: DMD2, Seed: 42, Size: 8x8, Model: digits-generator
"""

from __future__ import annotations

import base64
import io
import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .schemas import GenerateResponse

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # output_format -> Pillow's format name
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# PNG's deflate with zlib's run-length strategy: on PNG's filtered rows it finds nearly every match the
# default search finds, at a fraction of the time. A 512x512 photo: 77 -> 21 ms, 489 KB either way; at
# 1024x1024, 350 -> 74 ms, 1443 -> 1446 KB (Pillow 13, one core of the development machine, 2026-12-07).
# WebP at effort 2 of 6 (Pillow's default 4): a 512x512 photo 35 -> 14 ms, 60 -> 61 KB; 1024x1024 97 -> 44 ms,
# 125 -> 131 KB (same machine and day).
SAVE_OPTIONS = {"png": {"compress_type": zlib.Z_RLE}, "jpeg": {}, "webp": {"method": 2}}
USER_COMMENT_UNICODE = b"UNICODE\0"  # EXIF UserComment's character code for UTF-16 text


class NotAcceptable(ValueError):
    """An ``Accept`` header that takes none of the answers /generate has for a request: a 406."""


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """An ``Accept`` header's media ranges with their weights (``q``, 1 when absent), in order. A range
    that is no ``type/subtype`` (a bare ``*`` reads as ``*/*``) or whose ``q`` is no number from 0 to 1
    is left out."""
    ranges = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        media = "*/*" if media == "*" else media.lower()
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0
        if media.count("/") == 1 and 0 <= q <= 1:
            ranges.append((media, q))
    return ranges


def _weight(media: str, ranges: list[tuple[str, float]]) -> tuple[float, int] | None:
    """A media type's weight from the most specific range that matches it (``image/png`` before
    ``image/*`` before ``*/*``; of equals, the first listed) and that range's place; None: no match."""
    kind = media.split("/")[0]
    matches = [(specific, -position, q) for position, (given, q) in enumerate(ranges)
               for specific, pattern in ((2, media), (1, f"{kind}/*"), (0, "*/*")) if given == pattern]
    if not matches:
        return None
    _, position, q = max(matches)
    return q, position


def raw_format(accept: str, preferred: str = "png", one_image: bool = True) -> str | None:
    """What an ``Accept`` header asks /generate for (RFC 9110's content negotiation): an image format
    whose file to answer with, or None for JSON.

    The heaviest answer wins (see :func:`_weight`), a tie going to the range listed first, then to
    JSON, then to ``preferred`` (the request's ``output_format``: what ``image/*`` gives). A file is
    an answer only for ``one_image``. No usable header: JSON. Raises :class:`NotAcceptable` when
    every answer weighs 0.
    """
    ranges = _media_ranges(accept)
    if not ranges:
        return None
    formats = [preferred] + [fmt for fmt in MEDIA_TYPES if fmt != preferred]
    answers = [(None, "application/json")] + [(fmt, MEDIA_TYPES[fmt]) for fmt in formats]
    weighed = [(weight, -rank, fmt) for rank, (fmt, media) in enumerate(answers)
               if (weight := _weight(media, ranges)) is not None and weight[0] > 0]
    if not one_image and any(fmt is not None for *_, fmt in weighed):
        if not any(fmt is None for *_, fmt in weighed):
            raise NotAcceptable(f"Accept: {accept} returns exactly one image's file; ask for num_images=1 or"
                                " accept application/json")
        return None
    if not weighed:
        raise NotAcceptable(f"Accept: {accept} takes none of application/json, image/png, image/jpeg, image/webp;"
                            " send Accept: application/json (or leave it out)")
    return max(weighed)[2]


def _quoted(value: str) -> str:
    """A value as A1111 writes it: JSON-quoted when a comma, colon or newline would split the line."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


@dataclass(frozen=True)
class Parameters:
    """What made one image: enough to make it again with the same model."""

    prompt: str
    seed: int
    steps: int  # the schedule's steps asked for (image to image runs the last round(strength * steps))
    size: tuple[int, int]  # (width, height) delivered
    model: str
    strength: float | None = None  # image to image only
    lora: str | None = None  # the request's LoRA adapter, by name, and its scale
    lora_scale: float = 1.0

    def infotext(self) -> str:
        """A1111's ``parameters`` text: the prompt, a newline, then ``Steps: 4, Sampler: DMD2, Seed: 42, ...``."""
        fields = {"Steps": self.steps, "Sampler": "DMD2", "Seed": self.seed, "Size": "{}x{}".format(*self.size),
                  "Model": self.model}
        if self.strength is not None:
            fields["Denoising strength"] = self.strength
        if self.lora is not None:
            fields.update({"Lora": self.lora, "Lora scale": f"{self.lora_scale:g}"})
        text = self.prompt + "\n" + ", ".join(f"{key}: {_quoted(str(value))}" for key, value in fields.items())
        # a lone surrogate (valid JSON, not UTF-8) or a NUL (ends a PNG text) must not break the file
        return text.encode("utf-8", "replace").decode("utf-8").replace("\0", " ")


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8, on the images' device: on a GPU this is done
    before the copy to the host, which then moves a quarter of the bytes."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def encode_image(image: np.ndarray | torch.Tensor, fmt: str, size: tuple[int, int],
                 parameters: Parameters | None = None, quality: int | None = None) -> bytes:
    """(H, W, C) uint8 pixels from :func:`to_pixels` (NumPy or torch), or a (C, H, W) tensor in [0, 1]
    -> the file's bytes, scaled (nearest) to ``size`` when it differs.

    ``parameters`` (None: no metadata) go into a PNG ``parameters`` text chunk or, for JPEG and
    WebP, the EXIF UserComment. ``quality`` (0-100; None: Pillow's default) sets JPEG's and WebP's; PNG,
    lossless, has none.
    """
    from PIL import ExifTags, Image
    from PIL.PngImagePlugin import PngInfo

    arr = image if isinstance(image, np.ndarray) else \
        (image if image.dtype == torch.uint8 else to_pixels(image[None])[0]).cpu().numpy()  # (H, W, C) uint8
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if pil.size != size:
        pil = pil.resize(size, Image.NEAREST)
    metadata = {}
    if parameters is not None:
        text = parameters.infotext()
        if fmt == "png":
            metadata["pnginfo"] = PngInfo()
            metadata["pnginfo"].add_text("parameters", text)  # tEXt, or iTXt (UTF-8) beyond Latin-1
        else:
            metadata["exif"] = Image.Exif()
            comment = USER_COMMENT_UNICODE + text.encode("utf-16-be")
            metadata["exif"].get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    if quality is not None and fmt != "png":
        metadata["quality"] = quality
    out = io.BytesIO()
    pil.save(out, format=FORMATS[fmt], **SAVE_OPTIONS[fmt], **metadata)
    return out.getvalue()


@dataclass
class EncodedImages:
    """A request's answer as the HTTP process sends it: the image files, ready to send as they are or base64."""

    files: list[bytes]
    seeds: list[int]
    media_type: str
    model: str
    timings_ms: dict[str, float]

    def base64_files(self) -> list[str]:
        return [base64.b64encode(data).decode("ascii") for data in self.files]

    def as_json(self) -> GenerateResponse:
        """The ``POST /generate`` JSON body: the same bytes, base64."""
        images = [{"data": data, "seed": seed} for data, seed in zip(self.base64_files(), self.seeds)]
        return GenerateResponse(images=images, model=self.model, timings_ms=self.timings_ms)


# ``POST /generate``'s answers beside its JSON, for the OpenAPI schema.
OPENAPI_RESPONSES = {
    200: {"description": "JSON; or with `Accept: image/png` (`image/jpeg`, `image/webp`) the one image's file",
          "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()},
          "headers": {"X-Seed": {"description": "the image's seed, on an answer that is the file itself",
                                 "schema": {"type": "integer"}}}},
    406: {"description": "`Accept` asks for one image's file but `num_images` is more than 1, or takes none of"
                         " JSON, PNG, JPEG and WebP (weights as RFC 9110 says: `image/*` gives `output_format`)",
          "content": {"application/json": {"schema": {"type": "object",
                                                      "properties": {"detail": {"type": "string"}}}}}},
}
