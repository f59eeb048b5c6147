"""Export the generator as a self-contained folder that ``dmd2_serve`` (and diffusers) load.

Layout (diffusers):
    unet/          the distilled generator, safetensors
    scheduler/     LCMScheduler config (same betas as the teacher); LCM's step is exactly
                   DMD2's denoise / re-noise with fresh noise
    vae/, text_encoder/, tokenizer/ (+ _2 for SDXL)   copied from the teacher (SD families)
    model_index.json   the teacher's pipeline class, so DiffusionPipeline.from_pretrained works
    dmd2.json      family, the recorded timesteps, image size and provenance

Stock diffusers use: ``pipe = DiffusionPipeline.from_pretrained(folder)`` then
``pipe(prompt, timesteps=[999, 749, 499, 249], guidance_scale=0)`` (the schedule is in dmd2.json).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from dmd2_serve.model.adapters import META_FILE, Backbone


@contextmanager
def folder_written_atomically(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by renames.

    A crash while writing leaves the previous ``out`` (if any) untouched.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_generator(
    weights: dict[str, Tensor], unet_config: Mapping[str, Any], backbone: Backbone, teacher: Path, out: Path,
    timesteps: list[int], extra: dict[str, Any] | None = None,
) -> Path:
    """Write the generator folder to ``out`` atomically (build beside it, then rename).

    ``weights`` is the generator's full state dict (gathered from every process when sharded) and
    ``unet_config`` its diffusers config: the folder is written without building another UNet.
    """
    import diffusers
    from diffusers import LCMScheduler
    from safetensors.torch import save_file

    out = Path(out)
    with folder_written_atomically(out) as tmp:
        (tmp / "unet").mkdir()
        # The config as diffusers writes it; the class named by hand (a sharded module's class is
        # FSDP's subclass of it).
        config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers.__version__,
                  **{k: v for k, v in dict(unet_config).items() if not k.startswith("_")}}
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file({k: v.detach().contiguous() for k, v in weights.items()},
                  tmp / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        scheduler_config = json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text())
        LCMScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
        backbone.save(tmp)

        index_path = Path(teacher) / "model_index.json"
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            index["scheduler"] = ["diffusers", "LCMScheduler"]
            for optional in ("safety_checker", "feature_extractor", "image_encoder"):
                if optional in index:
                    index[optional] = [None, None]
            if "requires_safety_checker" in index:
                index["requires_safety_checker"] = False
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

        meta = {"family": backbone.family, "timesteps": [int(t) for t in timesteps],
                "teacher": str(teacher), **backbone.meta(), **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out
