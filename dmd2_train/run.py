"""What a run needs that is not DMD2: the run folder, the accelerator, prompt encoding, real data.

Kept apart from ``loop.py`` so the loop reads top to bottom, and shared with the digits teacher's
trainer and the training benchmark.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmd2_serve.model.adapters import META_FILE, Backbone, Conditioning

from .config import DistillConfig
from .data import CaptionedImages, TrainingData, digits_data, prompt_file_problem, read_prompts
from .datasets import StreamedImages, open_real_source, real_images_problem
from .step import RealBatch
from .stream import StreamBatch, StreamPlan, StreamReader


class RunError(RuntimeError):
    """A run that cannot start or go on (bad output folder, missing data, out of memory); the
    message says why and what to do."""


# The storage refused a write: full, over quota, a file over the size limit, mounted read-only.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def storage_failure(e: BaseException) -> str | None:
    """What a write the storage refused says ("No space left on device (writing X)"); None for any other
    error. Seen as an ``OSError``; as safetensors' error, which names only the OS error's number; as
    ``torch.save``'s short write, which names none; and as DCP's ``CheckpointException`` (a
    ``BaseException``) around each process's error."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        return os.strerror(e.errno) + (f" (writing {e.filename})" if e.filename else "")
    if type(e).__name__ == "SafetensorError" and (found := re.search(r"\(os error (\d+)\)", str(e))):
        return os.strerror(int(found[1])) if int(found[1]) in STORAGE_ERRNOS else None
    if isinstance(e, RuntimeError) and "inline_container" in str(e) and "unexpected pos" in str(e):
        return "a write stopped short (the disk full, a quota or a file size limit)"
    return None


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Fail early, with a clear message naming ``flag``, when the folder cannot be made or written."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} '{out}' is a file, not a folder; pass {flag} DIR with a new or writable folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder '{out}' ({e.strerror}); pass {flag} DIR with a writable"
                       " folder") from None


def remove_if_empty(out: Path) -> None:
    """Remove ``out`` and the folders in it when they hold no file: what a refused start made (a run
    stopped before writing anything leaves no empty folder behind). Never removes a file."""
    inner = sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for folder in [*inner, out]:  # deepest first: a folder is empty once its empty folders are gone
        try:
            folder.rmdir()
        except OSError:
            pass


def check_new_run(out: Path) -> None:
    """Refuse to start a fresh run in a folder that holds one: its checkpoints would be mixed with the
    new run's and its exported generator replaced."""
    from . import checkpoint as ckpt

    found = ckpt.list_checkpoints(out)
    if found or (out / "generator").exists():
        held = f"a checkpoint at step {found[-1][0]}" if found else "an exported generator/"
        raise RunError(f"--out '{out}' already holds a run ({held}): continue it with --resume, or give a new --out"
                       " (delete the folder to start over)")


def check_resumable(out: Path) -> None:
    """Refuse ``--resume`` on a finished run whose checkpoints are gone (deleted to save space, or the only
    one moved aside): it would train from the teacher and replace the exported generator."""
    from . import checkpoint as ckpt

    if (out / "generator").exists() and not ckpt.list_checkpoints(out):
        raise RunError(f"--out '{out}' holds an exported generator/ but no checkpoint to resume from, so --resume"
                       f" would train from the teacher and replace it; give a new --out (with"
                       f" init_from={out / 'generator'} to start from that generator), or move generator/ aside to"
                       " start this run over")


def set_aside_earlier_start(out: Path) -> Path | None:
    """Move the logs and previews of an earlier start that wrote no checkpoint (stopped, diverged or
    crashed before its first) into ``out/earlier-start-<time>/``, so that a run starting again from
    step 0 does not mix its curves and preview grids with them. Returns that folder, None if none."""
    stale = [out / name for name in ("logs", "previews") if (out / name).is_dir() and any((out / name).rglob("*"))]
    if not stale:
        return None
    stamp = time.strftime("earlier-start-%Y%m%d-%H%M%S")
    aside, n = out / stamp, 1
    while aside.exists():
        n += 1
        aside = out / f"{stamp}-{n}"
    aside.mkdir()
    for folder in stale:
        folder.rename(aside / folder.name)
    return aside


def check_replaceable_model_folder(out: Path) -> None:
    """Refuse an ``--out`` that writing a model folder would destroy: a file, or a folder of other files."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out '{out}' is a file; give the path of a folder (new, empty, or a model folder to replace)")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise RunError(f"--out '{out}' holds files that are not a model folder (no {META_FILE}), and the folder is"
                       " replaced whole: give a new or empty folder")
    if (out / META_FILE).is_file():
        try:
            card = json.loads((out / META_FILE).read_text())
        except (OSError, ValueError):
            card = {}
        if not isinstance(card, dict) or card.get("timesteps") or card.get("base"):
            raise RunError(f"--out '{out}' holds a distilled generator (its {META_FILE} records a few-step schedule),"
                           " the result of a distillation run: give a new folder or a teacher's to replace")


def make_accelerator(cfg: DistillConfig) -> Any:
    """accelerate's ``Accelerator`` for the run: precision, trackers, the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not cuda and os.environ.get("RANK", "0") == "0":  # accelerate drops it silently
        print("warning: mixed_precision=fp16 does nothing on the CPU (accelerate trains in fp32 there); bf16 runs on"
              " the CPU, fp16 on a GPU", file=sys.stderr)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "wandb" in cfg.log_with:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RunError("log_with includes wandb, which is not installed: pip install 'dmd2-fast[wandb]',"
                           " or log_with=[tensorboard]") from None
    accelerator = Accelerator(
        mixed_precision=precision, cpu=not cuda, log_with=list(cfg.log_with) or None,
        # DDP's gradients live in its all-reduce buckets instead of beside them (one copy, not two)
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "logs")),
    )
    if cfg.sharding == "fsdp2" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RunError("sharding=fsdp2 shards over the processes of a distributed launch, and this is a plain one:"
                       " start it with torchrun --nproc_per_node N -m dmd2_train ... (N GPUs; 1 works too), or"
                       " leave sharding out")
    return accelerator


class PromptEncoder:
    """Encodes prompts with the backbone; a known set is encoded once, up front, kept on the host.

    Encoding the known set in one fixed order (not lazily, batch by batch) keeps a resumed run
    bit-identical: the same text always gets the same bits. The cache lives in (pinned) host
    memory, not on the GPU: 8,192 SDXL prompts are 5 GB at float32.
    """

    def __init__(self, backbone: Backbone, known: list[str] | None = None, chunk: int = 256,
                 limit: int | None = None) -> None:
        """``known``: the texts to encode up front (repeats count once); more than ``limit``
        distinct ones (None: no limit) and nothing is cached: every batch is encoded as it comes."""
        self.backbone = backbone
        self.cache: dict[str, Conditioning] = {}
        pin = backbone.device.type == "cuda"
        texts = sorted(set(known or []))
        if limit is not None and len(texts) > limit:
            texts = []
        for i in range(0, len(texts), chunk):
            part = texts[i:i + chunk]
            enc = backbone.encode_prompts(part).to("cpu")
            for j, p in enumerate(part):
                row = enc.index(slice(j, j + 1))
                self.cache[p] = row.pin_memory() if pin else Conditioning(row.hidden.clone(), {
                    k: v.clone() for k, v in row.added.items()})

    def __call__(self, prompts: list[str]) -> Conditioning:
        """Encoded prompts on the backbone's device."""
        if all(p in self.cache for p in prompts):
            return Conditioning.cat([self.cache[p] for p in prompts]).to(self.backbone.device, non_blocking=True)
        return self.backbone.encode_prompts(prompts)


class RealLatents:
    """Real images encoded ONCE into their latent distribution (mean, std), kept on the host.

    Each use draws a fresh sample ``mean + std * z`` (what ``latent_dist.sample()`` would give)
    on the training device, so the VAE encoder never runs inside the loop. Encoded in fixed
    chunks, so the numbers do not depend on when a run started or resumed.
    """

    def __init__(self, backbone: Backbone, images: Tensor, chunk: int = 16) -> None:
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), chunk):
                mean, std = backbone.encode_distribution(images[i:i + chunk].to(backbone.device))
                means.append(mean.cpu())
                stds.append(std.cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        if backbone.device.type == "cuda":
            self.mean, self.std = self.mean.pin_memory(), self.std.pin_memory()

    def sample(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Samples of images ``idx`` on ``g``'s device, (B, C, H, W) float32."""
        return draw_latents(self.mean[idx], self.std[idx], g)


def draw_latents(mean: Tensor, std: Tensor, g: torch.Generator) -> Tensor:
    """A fresh sample ``mean + std * z`` of latent distributions, on ``g``'s device, float32."""
    mean = mean.to(g.device, non_blocking=True).float()
    std = std.to(g.device, non_blocking=True).float()
    return mean + std * torch.randn(mean.shape, generator=g, device=g.device)


def stream_plan(cfg: DistillConfig, accelerator: Any) -> StreamPlan:
    """How this process reads a streamed real-data source."""
    return StreamPlan(batch=cfg.batch_size * cfg.gradient_accumulation_steps, seed=cfg.seed,
                      rank=accelerator.process_index, world=accelerator.num_processes, workers=cfg.data_workers,
                      prefetch=cfg.data_prefetch, pin_memory=accelerator.device.type == "cuda")


class RunBatches:
    """A run's conditioning and real data: prompts drawn from the prompt set, encoded; real
    images with their captions for the GAN.

    Real data in memory (the bundled digits) is drawn by index from the step's host generator;
    streamed real data (``datasets.py``) comes in the stream's fixed order (``stream.py``), its
    position saved in each checkpoint (``data_state``) so a resumed run continues it exactly.
    """

    def __init__(self, data: TrainingData, encode: PromptEncoder, backbone: Backbone,
                 plan: StreamPlan | None = None) -> None:
        self.data, self.encode, self.backbone = data, encode, backbone
        self.latents = RealLatents(backbone, data.real.images) if isinstance(data.real, CaptionedImages) else None
        self.stream: StreamReader | None = None
        if isinstance(data.real, StreamedImages):
            self.stream = StreamReader(data.real.source, data.real.fallback, plan or StreamPlan(1, 0),
                                       self._stream_latents)

    def prompts(self, n: int, g: torch.Generator) -> Conditioning:
        return self.encode(self.data.prompts(n, g))

    def real(self, n: int, g: torch.Generator, device_g: torch.Generator) -> RealBatch:
        if self.stream is not None:
            mean, std, captions = self.stream.take(n)
            return RealBatch(draw_latents(mean, std, device_g), self.encode(captions))
        if not isinstance(self.data.real, CaptionedImages) or self.latents is None:
            raise RunError("the GAN needs real images: pass real_images=FOLDER, or gan=false")
        idx, captions = self.data.real.draw(n, g)
        return RealBatch(self.latents.sample(idx, device_g), self.encode(captions))

    @torch.no_grad()
    def _stream_latents(self, batch: StreamBatch, chunk: int = 16) -> tuple[Tensor, Tensor]:
        """A streamed batch as (mean, std) on the device: latent shards as they are, images
        VAE-encoded here, in fixed chunks (the same numbers however the run was resumed)."""
        device = self.backbone.device
        if batch.pixels is None:
            return batch.mean.to(device, non_blocking=True), batch.std.to(device, non_blocking=True)
        parts = [self.backbone.encode_distribution(batch.pixels[i:i + chunk].to(device, non_blocking=True))
                 for i in range(0, len(batch.pixels), chunk)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])

    # -- the stream's place in checkpoints and logs (collective: every process calls these) --
    def _totals(self, accelerator: Any) -> dict[str, int]:
        assert self.stream is not None
        state = self.stream.state()
        counts = torch.tensor([state["skipped"], state["uncaptioned"]], device=accelerator.device)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        return state | {"skipped": int(counts[0]), "uncaptioned": int(counts[1])}

    def data_state(self, accelerator: Any) -> dict[str, int] | None:
        """What a checkpoint keeps of the stream: its position and the counts of all processes."""
        return self._totals(accelerator) if self.stream is not None else None

    def restore_data(self, state: dict[str, int] | None) -> None:
        if self.stream is not None and state:
            self.stream.restore(state)

    def data_logs(self, accelerator: Any) -> dict[str, float]:
        """Running totals of the stream, all processes together: unreadable samples skipped,
        samples without a caption, passes over the source."""
        if self.stream is None:
            return {}
        totals = self._totals(accelerator)
        return {"data/skipped": totals["skipped"], "data/uncaptioned": totals["uncaptioned"],
                "data/epochs": self.stream.epochs}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def needs_real_images(cfg: DistillConfig) -> bool:
    """The GAN's real images, or (without backward simulation) the generator's noised inputs."""
    return cfg.gan or not cfg.backward_simulation


def check_data_given(cfg: DistillConfig, bundled_data: bool) -> None:
    """Before a model loads: every missing input named in one message (the prompt set, real images), and
    a given prompt file or real-image path that does not exist."""
    if bundled_data and cfg.prompts is None and cfg.real_images is None:
        return  # the family's bundled data
    if cfg.real_images is not None and not needs_real_images(cfg) and real_images_problem(Path(cfg.real_images)) is None:
        print(f"warning: real_images '{cfg.real_images}' is not used by this run: gan=false with"
              " backward_simulation=true trains from prompts and noise alone (the GAN's stage, e.g. --preset"
              " sd15-stage2, reads it)", file=sys.stderr)
    def instead_of_bundled(given: str, needed: str) -> str:
        """Why the family's bundled data does not fill the gap: the one input given replaces it whole."""
        return (f"; {given} replaces the bundled images and their captions, so it needs {needed} too (or leave"
                f" {given} out to train on the bundled data)" if bundled_data else "")

    missing = []
    if cfg.prompts is None:
        missing.append("a prompt set: pass prompts=FILE (a .txt or .jsonl of captions)"
                       + instead_of_bundled("real_images", "one"))
    if needs_real_images(cfg) and cfg.real_images is None:
        missing.append(("real images for the GAN: pass real_images=FOLDER, or gan=false" if cfg.gan else
                        "real images (backward_simulation=false noises them as the generator's inputs):"
                        " pass real_images=FOLDER, or backward_simulation=true")
                       + instead_of_bundled("prompts", "real images"))
    problems = (["this teacher needs " + "; and ".join(missing)] if missing else []) + data_path_problems(cfg)
    if problems:
        raise RunError("; and ".join(problems))


def data_path_problems(cfg: DistillConfig) -> list[str]:
    """A given prompt file that is missing (or a folder), a given real-image path that does not exist:
    a mistyped path, found before minutes of loading, or converting, the teacher."""
    problems = []
    if cfg.prompts is not None and (problem := prompt_file_problem(Path(cfg.prompts))) is not None:
        problems.append(problem)
    if cfg.real_images is not None and (problem := real_images_problem(Path(cfg.real_images))) is not None:
        problems.append(problem if needs_real_images(cfg) else
                        f"real_images '{cfg.real_images}' does not exist (and this run would not use it: gan=false"
                        " with backward_simulation=true); fix the path or leave real_images out")
    return problems


def make_data(cfg: DistillConfig, backbone: Backbone) -> TrainingData:
    """The family's bundled data (digits) when no data is given, otherwise the prompt file and images
    (:func:`check_data_given` has passed: it runs before the backbone loads)."""
    if backbone.bundled_data and cfg.prompts is None and cfg.real_images is None:
        return digits_data()
    real = open_real_source(cfg.real_images, backbone) if needs_real_images(cfg) else None
    return TrainingData(read_prompts(cfg.prompts), real)
