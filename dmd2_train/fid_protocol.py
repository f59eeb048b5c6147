"""The official DMD2 FID protocol: how an image becomes Inception features, and the FID of two sets.

What the official evaluation does, read in tianweiy/DMD2 (commit 8d8fa55) ``main/test_folder_sd.py``,
``main/sdxl/test_folder_sdxl.py``, ``main/coco_eval/coco_evaluator.py`` (``compute_fid``) and its
vendored clean-fid ``main/coco_eval/cleanfid/{fid,utils,resize,features,inception_torchscript}.py``
(the same as GaParmar/clean-fid e88c4d6 ``cleanfid/``, bar import paths and the array dataset):

1. generated images are cast to uint8 by truncation: ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``;
   reference images are read with PIL and ``.convert("RGB")``;
2. both sets go through the same transform (``custom_image_tranform``): the centre square of the
   short side (torchvision's ``center_crop``, offsets ``int(round((size - side) / 2))``), then a PIL
   resize of that uint8 RGB image to the evaluation resolution with Lanczos -- ``--eval_res 256``
   for SD1.5 (``experiments/sdv1.5/README.md``), ``512`` for SDXL (``experiments/sdxl/README.md``);
3. patch-FID (SDXL only, computed beside the FID in ``test_folder_sdxl.py``): instead of step 2,
   the centre 299x299 crop of the full-resolution image, no resize (images under 299 px are passed
   through uncropped there; we refuse them);
4. clean-fid's "clean" mode resizes the result to 299x299 (``resize.py``: ``build_resizer("clean")``
   is PIL **bicubic**, not Lanczos, applied to each channel as a float32 ``mode "F"`` image, clipped
   to [0, 255] and *not* re-quantised); at 299 px already (patch-FID) PIL returns a copy;
5. the features are the 2048-d pool features of the TorchScript ``inception-2015-12-05.pt``, called
   as ``net.layers((x - 128) / 128)`` on those float pixels (``inception_torchscript.py``,
   ``resize_inside=False``): the network's own resize in ``forward`` is bypassed;
6. FID = ``|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))`` with ``np.mean``, ``np.cov`` (N - 1)
   and ``scipy.linalg.sqrtm`` over all the features of each set (``fid.py``: ``frechet_distance``).

The code below is ours; it follows those steps, with the resize filter of step 2 a setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from dmd2_serve.model.adapters import PaperEval, adapter
from dmd2_serve.model.errors import first_line

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

INCEPTION_SIZE = 299  # the FID network's input side, and the patch-FID crop
RESIZE_FILTERS = ("lanczos", "bicubic", "bilinear", "hamming", "box", "nearest")  # PIL's Resampling names
# A family without the paper's settings (``PaperEval`` on its adapter) gets SD1.5's resolution.
FALLBACK = PaperEval(256, 0)


class EvalError(ValueError):
    """A missing or unusable evaluation input; the message says which and how to fix it."""


@dataclass(frozen=True)
class FidProtocol:
    """Every setting that changes an FID; ``settings()`` is what the output JSON records."""

    eval_resolution: int = 256  # side of the centre square after the resize of step 2
    resize_filter: str = "lanczos"  # PIL filter of that resize
    patch_fid: bool = False  # also the FID of the centre 299x299 of the full-resolution images
    num_images: int | None = None  # first N captions (None: all)

    crop: ClassVar[str] = "centre square of the short side (torchvision center_crop rounding)"
    inception_input: ClassVar[str] = (f"{INCEPTION_SIZE}x{INCEPTION_SIZE}, PIL bicubic on each float32 channel,"
                                      " not re-quantised (clean-fid 'clean' mode); net.layers((x - 128) / 128)")
    quantisation: ClassVar[str] = "generated images truncated to uint8: ((x + 1) * 127.5).clamp(0, 255)"

    def __post_init__(self) -> None:
        if self.resize_filter not in RESIZE_FILTERS:
            raise EvalError(f"unknown resize filter {self.resize_filter!r}: use one of {', '.join(RESIZE_FILTERS)}"
                            " (the official evaluation uses lanczos)")
        if self.eval_resolution < 1:
            raise EvalError(f"eval resolution {self.eval_resolution} is not a size: give a side in pixels"
                            " (256 for SD1.5, 512 for SDXL)")
        if self.num_images is not None and self.num_images < 2:
            raise EvalError(f"{self.num_images} images cannot give an FID: give --num 2 or more"
                            " (the paper: 30000 for SD1.5, 10000 for SDXL)")

    @classmethod
    def for_family(cls, family: str, eval_resolution: int | None = None, resize_filter: str | None = None,
                   patch_fid: bool | None = None, num_images: int | None = None) -> FidProtocol:
        """The official protocol of a model family; each argument given (not None) overrides its default."""
        def given(value: object, default: object) -> object:
            return default if value is None else value

        paper = adapter(family).paper_eval
        facts = paper or FALLBACK
        return cls(eval_resolution=given(eval_resolution, facts.resolution),
                   resize_filter=given(resize_filter, "lanczos"),
                   patch_fid=given(patch_fid, facts.patch_fid),
                   num_images=given(num_images, paper.images if paper else None))

    def settings(self) -> dict[str, object]:
        """The settings as the output JSON records them, the fixed steps included."""
        return {"eval_resolution": self.eval_resolution, "resize_filter": self.resize_filter, "crop": self.crop,
                "patch_fid": self.patch_fid, "patch_size": INCEPTION_SIZE if self.patch_fid else None,
                "num_images": self.num_images, "inception_input": self.inception_input,
                "quantisation": self.quantisation}


def centre_crop(image: PILImage, side: int) -> PILImage:
    """The centred ``side`` x ``side`` square of ``image``, offsets rounded as torchvision's ``center_crop``.

    Not ``data.centre_square``: that one floors the offsets (training data), and the protocol's
    crop must land on the same pixels as the official one.
    """
    left, top = round((image.width - side) / 2), round((image.height - side) / 2)  # half to even, as Python
    return image.crop((left, top, left + side, top + side))


def square(image: PILImage, size: int, resize_filter: str) -> PILImage:
    """The centre square of the short side, resized to ``size`` x ``size`` with a PIL filter (step 2)."""
    from PIL import Image

    return centre_crop(image, min(image.size)).resize((size, size), Image.Resampling[resize_filter.upper()])


def clean_resize(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (299, 299, 3) float32 in [0, 255]: clean-fid's "clean" resize (step 4)."""
    from PIL import Image

    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    channels = [np.asarray(Image.fromarray(pixels[..., c].astype(np.float32)).resize(size, Image.Resampling.BICUBIC))
                for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255).astype(np.float32)


def fid_view(image: PILImage, protocol: FidProtocol, patch: bool = False) -> np.ndarray:
    """The Inception input of one RGB image: (299, 299, 3) float32 in [0, 255] (steps 2-4)."""
    if patch:
        if min(image.size) < INCEPTION_SIZE:
            raise EvalError(f"patch-FID scores the centre {INCEPTION_SIZE}x{INCEPTION_SIZE} of the full-resolution"
                            f" image, and this one is {image.width}x{image.height}: turn it off with"
                            " --no-patch-fid (it is meant for SDXL's 1024 px images)")
        view = centre_crop(image, INCEPTION_SIZE)
    else:
        view = square(image, protocol.eval_resolution, protocol.resize_filter)
    return clean_resize(np.asarray(view.convert("RGB")))


class InceptionFeatures(nn.Module):
    """The TorchScript FID Inception called as clean-fid does: ``layers((x - 128) / 128)`` (step 5)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise EvalError(f"Inception weights '{path}' do not exist: pass the TorchScript file"
                            " inception-2015-12-05.pt (the FID network of StyleGAN2-ADA / clean-fid)")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise EvalError(f"'{path}' is not a TorchScript file: {first_line(e)}") from e
        if not hasattr(self.net, "layers"):
            raise EvalError(f"'{path}' has no 'layers' module, so it is not the FID Inception network:"
                            " pass inception-2015-12-05.pt (StyleGAN2-ADA / clean-fid)")

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """(N, 3, 299, 299) float in [0, 255] -> (N, D) float32 pool features (D = 2048 for Inception)."""
        return self.net.layers((pixels - 128) / 128).reshape(len(pixels), -1).float()


class FidFeatures:
    """The features of the generated and the reference images, for FID and (when asked) patch-FID."""

    def __init__(self, network: InceptionFeatures, protocol: FidProtocol, device: str | torch.device = "cpu",
                 pool: Executor | None = None) -> None:
        self.network, self.protocol, self.device = network.to(device), protocol, device
        self.map = pool.map if pool is not None else map  # PIL frees the GIL while it resizes: threads help
        self.views = (False, True) if protocol.patch_fid else (False,)  # patch: no, yes
        self.features: dict[tuple[bool, bool], list[np.ndarray]] = {(real, patch): [] for real in (False, True)
                                                                     for patch in self.views}

    def add(self, images: Sequence[PILImage], real: bool) -> None:
        """Preprocess a batch of RGB images and keep their features."""
        for patch in self.views:
            pixels = np.stack(list(self.map(partial(fid_view, protocol=self.protocol, patch=patch), images)))
            batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)  # (B, 3, 299, 299)
            self.features[real, patch].append(self.network(batch).cpu().numpy())

    def count(self, real: bool) -> int:
        """How many reference (``real``) or generated images have been added."""
        return sum(len(f) for f in self.features[real, False])

    def fid(self, patch: bool = False) -> float:
        """FID between the generated and the reference features (step 6)."""
        from .evaluate import frechet_distance

        generated, reference = (np.concatenate(self.features[real, patch]) for real in (False, True))
        return frechet_distance(generated, reference)
