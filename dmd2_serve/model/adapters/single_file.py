"""Single-file checkpoints: one ``.safetensors`` in the original (CompVis / SGM) key layout.

Which family a file is comes from diffusers' own detector (``infer_diffusers_model_type``, the
one its single-file loader uses) matched against each adapter's ``single_file_types``; the
adapter's ``single_file_pipeline`` then converts it with diffusers' ``from_single_file``. The
architecture, tokenizers and scheduler come from a local diffusers config folder (the model's
hub folder without weights), never from the network. The trainer writes the converted pipeline
once into its run folder and reads it from there like any teacher folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import first_line
from .base import Backbone, ModelFolderError

LDM_UNET_PREFIX = "model.diffusion_model."  # every SD 1.x / 2.x / XL single file's UNet weights
LDM_UNET_CONV_IN = LDM_UNET_PREFIX + "input_blocks.0.0.weight"  # ... and the UNet's first convolution

__all__ = ["checkpoint_adapter", "is_single_file", "load_single_file"]


class LazyCheckpoint(Mapping[str, Tensor]):
    """A ``.safetensors`` file as a read-on-access mapping: detection reads two or three tensors."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = dict.fromkeys(self._file.keys())  # ordered, O(1) membership

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._keys

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def is_single_file(path: Path) -> bool:
    """Whether a teacher path names one file (a single-file checkpoint) rather than a folder."""
    return Path(path).is_file()


def _supported(adapters: list[type[Backbone]]) -> str:
    return "; ".join(f"{a.title} ({', '.join(a.single_file_types)})" for a in adapters if a.single_file_types)


def _open(path: Path) -> LazyCheckpoint:
    if path.suffix != ".safetensors":
        raise ModelFolderError(f"'{path}' is a file but not a .safetensors checkpoint; pass a diffusers pipeline"
                               " folder or a single-file .safetensors checkpoint of SD 1.x / 2.x / SDXL")
    try:
        return LazyCheckpoint(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError, for a damaged header
        raise ModelFolderError(f"'{path}' is not a readable .safetensors file ({first_line(e)}); check the"
                               " download or pass a diffusers pipeline folder") from None


def model_type(checkpoint: Mapping[str, Tensor]) -> str:
    """diffusers' name for what a single-file checkpoint holds (``v1``, ``v2``, ``xl_base``, ``sd3`` ...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type(checkpoint)


def checkpoint_adapter(path: Path, adapters: list[type[Backbone]]) -> tuple[type[Backbone], str]:
    """The adapter of a single-file checkpoint and diffusers' model type for it; anything else is
    refused with one line naming what is supported."""
    path = Path(path)
    checkpoint = _open(path)
    kind = model_type(checkpoint)
    for cls in adapters:
        if kind in cls.single_file_types:
            # diffusers falls back to "v1" for any file it does not recognise
            if LDM_UNET_CONV_IN not in checkpoint:
                raise ModelFolderError(
                    f"'{path}' is not a Stable Diffusion checkpoint (no {LDM_UNET_CONV_IN}: a LoRA, a VAE or"
                    f" another model's file?); supported single files: {_supported(adapters)}")
            return cls, kind
    flow = " (flow matching)" if any(n in kind for n in ("sd3", "flux")) else ""
    raise ModelFolderError(f"'{path}' is a {kind}{flow} checkpoint, which is not supported; supported single"
                           f" files: {_supported(adapters)}")


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype of the UNet's weights in the file (converted folders keep the file's precision)."""
    dtype = LazyCheckpoint(path)[LDM_UNET_CONV_IN].dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def load_single_file(path: Path, config: Path | None, adapters: list[type[Backbone]]) -> Any:
    """The diffusers pipeline of a single-file checkpoint, its architecture from ``config``.

    ``config`` is a local diffusers folder of the model (model_index.json, the component
    configs and the tokenizers; weights are not needed). Nothing is downloaded.
    """
    import diffusers
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    path = Path(path)
    cls, kind = checkpoint_adapter(path, adapters)
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind, {}).get("pretrained_model_name_or_path", "the model's hub repo")
    how = (f"pass teacher_config=DIR (--teacher-config DIR): a folder with model_index.json, the component configs"
           f" and the tokenizers, e.g. `hf download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.msgpack'"
           f" '*.onnx*' --local-dir DIR` (its scheduler config sets the prediction type)")
    if config is None:
        raise ModelFolderError(f"'{path}' is a single-file {cls.title} checkpoint ({kind}), whose architecture and"
                               f" tokenizers are not in the file; {how}")
    config = Path(config)
    index = config / "model_index.json"
    if not index.is_file():
        raise ModelFolderError(f"teacher_config '{config}' has no model_index.json; {how}")
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"'{index}' is not valid JSON ({e}); {how}") from None
    if not cls.matches({"_class_name": name}):
        raise ModelFolderError(f"teacher_config '{config}' is a {name or 'pipeline of unknown class'} folder; this"
                               f" checkpoint is {cls.title} ({kind}): {how}")
    try:
        pipe = getattr(diffusers, cls.single_file_pipeline).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=_checkpoint_dtype(path))
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, OSError, KeyError, its own ...
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = first if len(first) < 240 else first.split(". ")[0]  # diffusers appends long advice
        raise ModelFolderError(f"could not convert '{path}' with the configs in '{config}' ({first}); check that"
                               f" teacher_config is the folder of this very model ({cls.title}, {kind})") from None
    return pipe
