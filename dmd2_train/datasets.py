"""Real images for the GAN, read one sample at a time: image folders, WebDataset shards, latent shards.

A source is an indexed list of units (shards) of known size; ``read(unit, k)`` decodes one
sample or raises. Nothing here holds the pixels of more than the sample being read: the order
and the DataLoader workers live in ``stream.py``, the latent writer in ``latents.py``.

``open_real_source`` tells the sources apart by content:
    image folder: images found recursively; captions from ``metadata.jsonl`` / ``metadata.csv``
        (the Hugging Face imagefolder convention: ``file_name`` relative to the metadata file,
        ``text``) at any level, else a same-named ``.txt``; an image without one gets "";
    WebDataset shards: ``.tar`` files (a folder of them, one file, or a glob such as
        ``shards/*.tar``); a sample is the run of members sharing a key (``a/0001.jpg``,
        ``a/0001.txt``): an image (jpg, jpeg, png, webp, bmp) and a ``txt`` caption or a
        ``json`` with ``text`` (or ``caption``/``prompt``);
    latent shards: a folder written by ``python -m dmd2_train encode-latents`` (``latents.json``
        and ``latents-XXXXXX.safetensors``), checked against the teacher before use.
Images are centre-cropped to a square and resized to the teacher's side, in [-1, 1].
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from dmd2_serve.model.errors import first_line

from .data import IMAGE_SUFFIXES, DataError, centre_square

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")  # WebDataset extensions read as the image
CAPTION_FIELDS = ("text", "caption", "prompt")
LATENT_MANIFEST = "latents.json"
LATENT_FORMAT = "dmd2-latents/1"
WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's split: key = up to the basename's first dot


@dataclass
class Sample:
    """One decoded real sample: pixels (image sources) or a latent distribution (latent shards)."""

    caption: str  # "" when the sample has none
    pixels: Tensor | None = None  # (C, H, W) float32 in [-1, 1]
    mean: Tensor | None = None  # (C, h, w) float16, UNet space
    std: Tensor | None = None


class Source(Protocol):
    """An indexed source: ``unit_sizes[u]`` samples in unit u, ``read(u, k)`` decodes one."""

    where: str  # how messages name it
    unit_sizes: list[int]

    def read(self, unit: int, k: int) -> Sample: ...

    def name_of(self, unit: int, k: int) -> str: ...


def load_image(data: bytes | Path, size: int, channels: int) -> Tensor:
    """An encoded image -> (C, size, size) float32 in [-1, 1]: centre square, resized (bicubic).

    Decoding happens here (``convert`` loads every pixel), so a truncated file raises here.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from dmd2_serve.model.pixels import converted

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = converted(ImageOps.exif_transpose(im), "RGB" if channels == 3 else "L")
    except UnidentifiedImageError:
        raise OSError("not an image format PIL can decode") from None
    arr = np.asarray(centre_square(im, size), dtype=np.float32).reshape(size, size, channels) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def caption_of(data: bytes, ext: str) -> str:
    """A caption from a ``.txt`` (the text) or a ``.json`` (its ``text``/``caption``/``prompt``).

    Raises ``ValueError`` for one that is not UTF-8 or not JSON: its sample is skipped and named,
    never trained on with mangled text. A leading byte-order mark is dropped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"its .{ext} caption is not UTF-8 text (byte {e.start}); save the captions as UTF-8") from None
    if ext != "json":
        return text.strip()
    row = json.loads(text)
    found = next((row[k] for k in CAPTION_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), "")
    return found.strip()


def print_warning(message: str) -> None:
    """``warning: message`` on stderr, on its own line above a progress bar (tqdm's write)."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------- image folder

def read_metadata(root: Path) -> dict[str, str]:
    """Captions of every ``metadata.jsonl`` / ``metadata.csv`` under ``root``, keyed by the image
    path relative to ``root``. A malformed row is skipped with a warning (its image then counts
    as uncaptioned), never fatal."""
    captions: dict[str, str] = {}
    for meta in sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")]):
        base, bad, rows = meta.parent.relative_to(root), [], []
        try:
            if meta.suffix == ".csv":
                with open(meta, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
                    rows = list(enumerate(csv.DictReader(f), 2))
            else:
                for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
                    try:
                        rows += [(n, json.loads(line))] if line.strip() else []
                    except json.JSONDecodeError:
                        bad.append(n)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            print_warning(f"{meta} cannot be read ({e}); its images count as uncaptioned unless they have a .txt")
            continue
        for n, row in rows:
            name = row.get("file_name") if isinstance(row, dict) else None
            text = next((row[k] for k in CAPTION_FIELDS if isinstance(row.get(k), str)), None) if name else None
            if isinstance(name, str) and text is not None:
                captions[(base / name.replace("\\", "/")).as_posix()] = text.strip()  # "\\": written on Windows
            else:
                bad.append(n)
        if bad:
            print_warning(f"{meta}: {len(bad)} rows (line {', '.join(map(str, sorted(bad)[:5]))}"
                          f"{', ...' if len(bad) > 5 else ''}) are not JSON / have no 'file_name' with a 'text';"
                          " their images count as uncaptioned")
    return captions


class ImageFolderSource:
    """Every image under a folder (recursively, hidden folders left out), one unit.

    Only the listing is held (relative paths, and the metadata captions); ``.txt`` captions are
    read with their image, in the worker.
    """

    def __init__(self, root: Path, files: list[Path], size: int, channels: int) -> None:
        self.where, self.root, self.size, self.channels = f"image folder '{root}'", root, size, channels
        self.files = [p.relative_to(root).as_posix() for p in files]
        self.captions = read_metadata(root)
        self.unit_sizes = [len(self.files)]
        listed = set(self.files)
        if missing := [name for name in self.captions if name not in listed]:  # they would train uncaptioned
            print_warning(f"{root}: {len(missing)} metadata rows name files that are not there (first: {missing[0]!r});"
                          " file_name is a path relative to its metadata file's folder")

    def name_of(self, unit: int, k: int) -> str:
        return self.files[k]

    def read(self, unit: int, k: int) -> Sample:
        rel = self.files[k]
        caption = self.captions.get(rel)
        if caption is None:
            txt = (self.root / rel).with_suffix(".txt")
            caption = caption_of(txt.read_bytes(), "txt") if txt.is_file() else ""
        return Sample(caption, pixels=load_image(self.root / rel, self.size, self.channels))


# ------------------------------------------------------------------------------ WebDataset shards

def tar_samples(path: Path, warn: bool = False) -> list[dict[str, tuple[int, int]]]:
    """The samples of a WebDataset shard as ``{extension: (data offset, size)}``, from its headers
    alone (``tarfile`` seeks past the data). A truncated or damaged tail ends the list there; a
    file that is no tar gives an empty one (``warn``: say so on stderr)."""
    samples: list[dict[str, tuple[int, int]]] = []
    last_key = None
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: random access by offset
            for member in tar:
                match = WDS_KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != last_key:
                    samples.append({})
                    last_key = key
                samples[-1][ext] = (member.offset_data, member.size)
            end = tar.offset  # where tarfile stopped: the end-of-archive block, or a header it could not read
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):  # tarfile ends quietly at a damaged or cut header
                raise tarfile.ReadError(f"a damaged or cut header at byte {end}")
    except (tarfile.TarError, OSError, EOFError) as e:
        if warn:
            print_warning(f"{path}: {e} after {len(samples)} samples; the rest of the shard is skipped")
    return samples


def recent(cache: OrderedDict, key: Any, make: Callable[[], Any], keep: int = 2) -> Any:
    """``cache[key]``, made on first use; only the ``keep`` most recently used entries stay."""
    if key not in cache:
        cache[key] = make()
        if len(cache) > keep:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


class TarShardSource:
    """WebDataset ``.tar`` shards, one unit each, read by offset (random access, no extraction)."""

    def __init__(self, where: str, shards: list[Path], size: int, channels: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.where, self.shards, self.size, self.channels = where, shards, size, channels
        with ThreadPoolExecutor(8) as pool:  # header scans: I/O bound
            indexes = list(pool.map(lambda shard: tar_samples(shard, warn=True), shards))
        self.unit_sizes = [len(index) for index in indexes]
        self._indexes: OrderedDict[int, list[dict[str, tuple[int, int]]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_indexes": OrderedDict()}  # a worker indexes its own shards

    def _index(self, unit: int) -> list[dict[str, tuple[int, int]]]:
        return recent(self._indexes, unit, lambda: tar_samples(self.shards[unit]))

    def name_of(self, unit: int, k: int) -> str:
        return f"{self.shards[unit].name} sample {k}"

    def read(self, unit: int, k: int) -> Sample:
        members = self._index(unit)[k]
        image = next((ext for ext in IMAGE_KEYS if ext in members), None)
        if image is None:
            raise ValueError(f"no image member ({', '.join(IMAGE_KEYS)}) among {sorted(members)}")
        with open(self.shards[unit], "rb") as f:
            def member(ext: str) -> bytes:
                offset, size = members[ext]
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise EOFError(f"the shard ends inside its .{ext} member (truncated)")
                return data

            pixels = load_image(member(image), self.size, self.channels)
            caption = ""
            for ext in ("txt", "json"):
                if ext in members:  # a caption that does not read makes its sample unreadable, as in a folder
                    caption = caption_of(member(ext), ext)
                    break
        return Sample(caption, pixels=pixels)


# --------------------------------------------------------------------------------- latent shards

def probe_image(size: int, channels: int) -> Tensor:
    """A fixed smooth test image (1, C, size, size) in [-1, 1]: its latents identify a VAE."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    planes = [torch.sin(3 * x + 1), torch.cos(2 * y - x), x * y][:channels]
    return torch.stack(planes).unsqueeze(0)


def latent_probe(backbone: Any) -> list[float]:
    """The backbone's latent mean of ``probe_image``, pooled to at most 8x8: a fingerprint of its
    VAE and scaling factor (different VAEs differ by O(1); bf16 vs fp32 by about 1%)."""
    mean, _ = backbone.encode_distribution(probe_image(backbone.image_size, backbone.image_channels))
    pooled = torch.nn.functional.adaptive_avg_pool2d(mean.float().cpu(), min(8, mean.shape[-1]))
    return [round(v, 5) for v in pooled.flatten().tolist()]


def latent_facts(backbone: Any) -> dict[str, Any]:
    """What latent shards record about the teacher that made them, and training checks."""
    return {"family": backbone.family, "sample_shape": list(backbone.sample_shape),
            "image_size": backbone.image_size, "probe": latent_probe(backbone)}


def check_latent_facts(folder: Path, facts: dict[str, Any], backbone: Any) -> None:
    """Refuse latents made for another teacher (other latent shape or another VAE)."""
    fix = "re-encode them for this teacher: python -m dmd2_train encode-latents --teacher TEACHER --images SRC --out NEW"
    shape, mine = tuple(facts.get("sample_shape", ())), tuple(backbone.sample_shape)
    if facts.get("image_size") not in (None, backbone.image_size):  # the same VAE's latents of other images
        raise DataError(f"the latent shards in '{folder}' were encoded from {facts['image_size']} px images; this run"
                        f" trains at {backbone.image_size} px: {fix} --image-size {backbone.image_size}")
    if shape != mine:
        raise DataError(f"the latent shards in '{folder}' hold latents of shape {shape} ({facts.get('image_size')} px);"
                        f" this teacher's are {mine} ({backbone.image_size} px): {fix}")
    theirs, ours = torch.tensor(facts.get("probe", [])), torch.tensor(latent_probe(backbone))
    differ = float((theirs - ours).norm() / (ours.norm() + 1e-6)) if theirs.shape == ours.shape else 1.0
    if differ > 0.05:
        raise DataError(f"the latent shards in '{folder}' were encoded with another VAE (a test image's latents"
                        f" differ by {differ:.0%}): {fix}")


def latent_shard_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole latent shard (a header cut off or damaged, a part missing), or None."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            if not {"mean", "std"} <= set(f.keys()) or "captions" not in (f.metadata() or {}):
                return "it lacks the mean, std or captions of a latent shard"
    except Exception as e:  # noqa: BLE001 - safetensors' own errors, OSError: all mean the file is not whole
        return first_line(e)
    return None


class LatentShardSource:
    """An ``encode-latents`` folder: fp16 mean and std of each image's latent distribution, with captions."""

    def __init__(self, folder: Path, backbone: Any) -> None:
        from safetensors import safe_open

        try:
            manifest = json.loads((folder / LATENT_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"'{folder / LATENT_MANIFEST}' cannot be read ({e}); re-run encode-latents") from None
        if manifest.get("format") != LATENT_FORMAT:
            raise DataError(f"'{folder}' holds latents in format {manifest.get('format')!r}, this version reads"
                            f" {LATENT_FORMAT!r}: re-run encode-latents into a new --out")
        self.where, self.folder = f"latent shards '{folder}'", folder
        self.shards = sorted(folder.glob("latents-*.safetensors"))
        if not isinstance(manifest.get("shards"), int):
            raise DataError(f"'{folder / LATENT_MANIFEST}' is damaged (it has no shard count); re-run encode-latents")
        if len(self.shards) != manifest["shards"]:
            raise DataError(f"'{folder}' is incomplete ({len(self.shards)} of {manifest['shards']} latent shards):"
                            " finish it by running the same encode-latents command again")
        check_latent_facts(folder, manifest, backbone)
        self.unit_sizes = []
        for shard in self.shards:
            if problem := latent_shard_problem(shard):
                raise DataError(f"the latent shard '{shard}' cannot be read ({problem}): it is damaged or was cut off;"
                                " run the same encode-latents command again: it encodes that shard anew")
            with safe_open(shard, framework="pt") as f:
                self.unit_sizes.append(f.get_slice("mean").get_shape()[0])
        self._open: OrderedDict[int, tuple[Any, list[str]]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_open": OrderedDict()}  # file handles stay in their process

    def _shard(self, unit: int) -> tuple[Any, list[str]]:
        from safetensors import safe_open

        def open_shard() -> tuple[Any, list[str]]:
            handle = safe_open(self.shards[unit], framework="pt")
            return handle, json.loads(handle.metadata()["captions"])

        return recent(self._open, unit, open_shard)

    def name_of(self, unit: int, k: int) -> str:
        return f"{self.shards[unit].name} sample {k}"

    def read(self, unit: int, k: int) -> Sample:
        handle, captions = self._shard(unit)
        return Sample(captions[k], mean=handle.get_slice("mean")[k], std=handle.get_slice("std")[k])


# ------------------------------------------------------------------------------------- detection

def try_read(source: Source, unit: int, k: int) -> tuple[Sample | None, str]:
    """``source.read(unit, k)``, or (None, "name: why"): any failure to decode (PIL, a damaged
    tar, safetensors, a vanished file) makes the sample unreadable, to skip and count, never fatal."""
    try:
        return source.read(unit, k), ""
    except Exception as e:  # noqa: BLE001
        return None, f"{source.name_of(unit, k)}: {first_line(e)}"


def first_readable(source: Source) -> tuple[int, int]:
    """(unit, k) of the first sample that decodes; a one-line ``DataError`` when none does."""
    tried, first = 0, ""
    for unit, n in enumerate(source.unit_sizes):
        for k in range(n):
            sample, why = try_read(source, unit, k)
            if sample is not None:
                return unit, k
            tried, first = tried + 1, first or why
    if not tried:
        raise DataError(f"no samples in the {source.where}; point real_images at a folder of captioned images,"
                        " WebDataset .tar shards or an encode-latents folder")
    raise DataError(f"none of the {tried} samples of the {source.where} can be read (first: {first}); replace the"
                    " damaged files or point real_images at another source")


def is_shard_pattern(path: Path | str) -> bool:
    """Whether ``real_images`` is a glob or WebDataset's brace notation (shards/{000000..000099}.tar)."""
    return any(c in str(path) for c in "*?[{")


def real_images_problem(path: Path) -> str | None:
    """Why ``real_images`` cannot be read, where that is known without reading it: a path (not a shard
    pattern) that does not exist. None otherwise (the source's own checks come when it is opened)."""
    if is_shard_pattern(path) or Path(path).exists():
        return None
    return (f"real images '{path}' do not exist; pass an image folder, WebDataset .tar shards or an encode-latents"
            " folder")


def image_source(path: Path, size: int, channels: int) -> ImageFolderSource | TarShardSource:
    """The raw-image source at ``path``: an image folder, or WebDataset shards (file, folder, glob or
    WebDataset's brace notation)."""
    text = str(path)
    if is_shard_pattern(text):
        from braceexpand import braceexpand  # WebDataset's shard notation: shards/{000000..000099}.tar

        shards = sorted({Path(p) for pattern in braceexpand(text) for p in glob.glob(pattern, recursive=True)
                         if p.lower().endswith(".tar")})
        if not shards:
            raise DataError(f"no .tar shards match '{path}'; check the pattern (e.g. 'shards/*.tar' or"
                            " 'shards/{000000..000099}.tar')")
        return TarShardSource(f"WebDataset shards '{path}'", shards, size, channels)
    if (problem := real_images_problem(path)) is not None:
        raise DataError(problem)
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise DataError(f"'{path}' is a file but not a WebDataset .tar shard; pass a folder of images or shards")
        return TarShardSource(f"WebDataset shard '{path}'", [path], size, channels)
    found = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    shards = [p for p in found if p.suffix.lower() == ".tar"]
    if images and shards:
        raise DataError(f"'{path}' holds both images and .tar shards; point real_images at one kind")
    if shards:
        return TarShardSource(f"WebDataset shards in '{path}'", shards, size, channels)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}), .tar shards or latent shards found in"
                        f" '{path}' (searched recursively); point real_images at your training images")
    return ImageFolderSource(path, images, size, channels)


@dataclass
class StreamedImages:
    """Real data read as a stream: the source and its first readable sample (unit, k)."""

    source: Source
    fallback: tuple[int, int]


def open_real_source(path: Path, backbone: Any) -> StreamedImages:
    """The source at ``path`` for this teacher, checked to hold at least one readable sample.

    Raises ``DataError`` (one line: what, and how to fix it) when nothing can be read.
    """
    path = Path(path)
    if (path / LATENT_MANIFEST).is_file():
        source: Source = LatentShardSource(path, backbone)
    else:
        source = image_source(path, backbone.image_size, backbone.image_channels)
    return StreamedImages(source, first_readable(source))
