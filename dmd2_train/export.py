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

A LoRA run (``lora_rank > 0``) writes the same folder, its ``unet/`` the teacher's UNet with the
adapter merged in, plus the adapter on its own (``dmd2_serve.model.lora``):
    lora/pytorch_lora_weights.safetensors   diffusers' LoRA format
    lora/dmd2.json                          family, timesteps, ``base`` (the teacher folder), rank, alpha
and records ``lora: {rank, alpha, targets, path}`` in the folder's dmd2.json. Stock diffusers::

    pipe = StableDiffusionPipeline.from_pretrained(teacher)      # or StableDiffusionXLPipeline
    pipe.load_lora_weights("run/generator/lora")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe(prompt, timesteps=[999, 749, 499, 249], guidance_scale=0)
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

from dmd2_serve.model.adapters import Backbone
from dmd2_serve.model.card import LoraFacts, ModelCard
from dmd2_serve.model.lora import fused_lora_unet

from .lora import LoraSpec

LORA_FOLDER = "lora"  # the adapter's sub-folder of a generator folder


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it to read it leaves
    a moment in which another thread's files would get it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def permissions_by_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and all it holds) the modes a plain ``open`` would: safetensors
    writes its files 0600, which a server running as another user (a read-only model mount) cannot read."""
    mask = _umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def folder_written_atomically(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by renames.

    A crash while writing leaves the previous ``out`` (if any) untouched; an error (a full disk) or an
    interrupt also removes what was written of the new one (gigabytes, under a name no later run reuses).
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        permissions_by_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_generator(
    weights: dict[str, Tensor], unet_config: Mapping[str, Any], backbone: Backbone, teacher: Path, out: Path,
    timesteps: list[int], extra: dict[str, Any] | None = None, lora: LoraSpec | None = None,
) -> Path:
    """Write the generator folder to ``out`` atomically (build beside it, then rename).

    ``weights`` is the generator's full state dict (gathered from every process when sharded) and
    ``unet_config`` its diffusers config: the folder is written without building another UNet.
    With ``lora``, ``weights`` is the adapter's state dict: the folder gets ``lora/`` and, in
    ``unet/``, the teacher's UNet with the adapter fused in exactly as diffusers fuses it.
    """
    import diffusers
    from diffusers import LCMScheduler
    from safetensors.torch import save_file

    out = Path(out)
    card = ModelCard(**{"family": backbone.family, "timesteps": [int(t) for t in timesteps],
                        "teacher": str(Path(teacher).absolute()), **backbone.meta(), **(extra or {})})
    with folder_written_atomically(out) as tmp:
        if lora is not None:
            lora.save(weights, tmp / LORA_FOLDER, next(iter(backbone.pipeline_classes), "StableDiffusionPipeline"))
            card.model_copy(update={"base": str(Path(teacher).resolve()),
                                    "lora": LoraFacts(**lora.meta())}).write(tmp / LORA_FOLDER)
            weights = fused_lora_unet(teacher, tmp / LORA_FOLDER).state_dict()
            card = card.model_copy(update={"lora": LoraFacts(**lora.meta(), path=LORA_FOLDER)})
        (tmp / "unet").mkdir()
        # The config as diffusers writes it; the class named by hand (a sharded module's class is
        # FSDP's subclass of it).
        config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers.__version__,
                  **{k: v for k, v in dict(unet_config).items() if not k.startswith("_")}}
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file({k: v.detach().contiguous() for k, v in weights.items()},
                  tmp / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        scheduler_config = json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text())
        # The teacher's betas and prediction type; no clipping or thresholding of x0, which the
        # generator's own sampler never does (DDPMScheduler's default clip_sample is true).
        LCMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False).save_pretrained(
            tmp / "scheduler")
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

        card.write(tmp)
    return out
