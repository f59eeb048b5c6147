"""A few-step generator: load an exported folder; prompts and seeds in, images out."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import META_FILE, Backbone, Conditioning, ModelFolderError, load_backbone, load_unet, read_card, unet_eps
from .backends import (
    INDUCTOR_BACKENDS,
    BackendError,
    Denoiser,
    FastPath,
    GraphedLoop,
    adapter_conflict,
    check_fast_path,
    compile_modules,
    fuse_qkv,
    set_attention,
    tensorrt_modules,
)
from .errors import first_line
from .lora import LoraAdapters, fused_lora_unet, lora_base
from .precision import quantize_fp8
from .sampling import philox_sample, sdedit_start
from .upsample import set_subpixel_upsample


class CaptureFailed(RuntimeError):
    """A loop with the prompt encoders in it could not be captured in a CUDA graph (the cause is chained)."""


def _moved(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``model.to(device, dtype)``. diffusers' ``ModelMixin.to`` warns on every cast that "modules
    should be kept in float32", even when the model keeps none (``[]``): every server start said it;
    a model that keeps some gets diffusers' own ``to`` and its warning."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(device=device, dtype=dtype)
    return nn.Module.to(model, device=device, dtype=dtype)


class FewStepPipeline:
    """The generator, its prompt encoder and its schedule, ready to sample.

    Noise comes from the fused Philox re-noise kernel (``dmd2_kernels.renoise``): sample b's
    draws depend on ``seeds[b]`` alone. Given images and a ``strength``, the loop starts from
    them instead of from noise (image to image, SDEdit on the generator's own schedule).
    :meth:`accelerate` switches the UNet and the VAE decoder to another backend; on CUDA each
    batch shape's whole loop is then replayed from a CUDA graph. :meth:`use_lora` adds an exported
    LoRA to the UNet for the batches that follow.

    Args:
        unet: the generator UNet (eps- or v-predicting, as its teacher; ``backbone.schedule`` says).
        backbone: the family adapter (prompt encoding, decode, the schedule and prediction type).
        timesteps: the schedule the generator was distilled for, e.g. (999, 749, 499, 249);
            default: the steps recorded in the backbone's schedule.
        name: a display name (the folder's name when loaded).
    """

    def __init__(
        self, unet: nn.Module, backbone: Backbone, timesteps: Sequence[int] | None = None, name: str = "generator",
    ) -> None:
        self.unet = unet
        self.backbone = backbone
        self.schedule = backbone.schedule.with_timesteps(
            backbone.schedule.timesteps if timesteps is None else timesteps).to("cpu")
        if not self.schedule.timesteps:
            raise ValueError("a few-step pipeline needs the generator's timesteps, e.g. (999, 749, 499, 249)")
        self.name = name
        self.dtype = next(unet.parameters()).dtype
        self._on_device: dict[torch.device, Any] = {}
        self.denoise: Denoiser = lambda x_t, t, cond: unet_eps(self.unet, x_t, t, cond, self._schedule(x_t.device))
        self.fast = FastPath()
        self._graphs: dict[tuple, GraphedLoop] = {}
        self._pool: Any = None
        self._text_graph_failed = False  # a capture with the prompt encoder in it failed: encode before the graph
        self.loras = LoraAdapters(unet)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, fuse_lora: bool = True) -> FewStepPipeline:
        """Load a generator folder written by ``dmd2_train`` export.

        ``folder`` is a full generator (``run/generator``) or a LoRA export (``run/generator/lora``),
        whose ``dmd2.json`` names the teacher it adapts: the encoders, VAE and UNet then come from
        the teacher, the adapter fused into the UNet (``lora.py``). ``dtype`` None picks float16 on
        CUDA (with a bfloat16 VAE: the SDXL VAE overflows in float16) and float32 elsewhere.
        ``fuse_lora=False`` keeps a LoRA export's adapter beside the teacher's weights, active
        (:meth:`use_lora`), so that other adapters can take its place.
        """
        folder = Path(folder)
        card = read_card(folder)
        if not card.is_generator:
            raise ModelFolderError(
                f"'{folder}' has no '{META_FILE}' with a recorded schedule: it is a teacher, not a"
                " distilled generator; distil it first with python -m dmd2_train --teacher ..."
            )
        on_cuda = torch.device(device).type == "cuda"
        dtype = dtype or (torch.float16 if on_cuda else torch.float32)
        base = lora_base(folder, card)
        backbone = load_backbone(base or folder, card).to(device)
        if on_cuda and getattr(backbone, "vae", None) is not None:
            backbone.vae.to(torch.bfloat16)
        fused = base is not None and fuse_lora
        unet = fused_lora_unet(base, folder) if fused else load_unet(base or folder)
        unet = _moved(unet, device, dtype).eval().requires_grad_(False)
        pipe = cls(unet, backbone, name=folder.name)
        if base is not None and not fuse_lora:
            pipe.use_lora(folder)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The generator's few-step schedule."""
        return self.schedule.timesteps

    def _schedule(self, device: torch.device) -> Any:
        """The schedule with ``alphas_cumprod`` on ``device`` (the v -> eps conversion indexes it there)."""
        if device not in self._on_device:
            self._on_device[device] = self.schedule.to(device)
        return self._on_device[device]

    def accelerate(self, fast: FastPath, buckets: Sequence[int] = (1,), example: Conditioning | None = None) -> None:
        """Prepare the UNet and VAE decoder for ``fast.backend`` (in place; raises ``BackendError``).

        ``buckets`` are the batch sizes that will run (TensorRT's shape profile); ``example`` is a
        conditioning of the right shapes (default: the encoded empty prompt).
        """
        check_fast_path(fast)
        if self.loras.loaded and (why := adapter_conflict(fast)):
            raise BackendError(f"this pipeline holds LoRA adapters: {why} (or load the folder with fuse_lora=True)")
        vae = getattr(self.backbone, "vae", None)
        slices = hasattr(vae, "use_slicing")  # diffusers' VAEs that can decode in slices (False: no VAE)
        if fast.vae_slicing and vae is not None and not slices:
            raise BackendError(f"--vae-slicing: this model's VAE ({type(vae).__name__}) cannot decode in slices")
        for module in (self.unet, vae):
            if module is not None:
                set_attention(module, fast.attention)
        if slices:  # what enable_slicing() / disable_slicing() set: decode (and encode) one image at a time or not
            vae.use_slicing = fast.vae_slicing
        fuse_qkv(self.unet, fast)
        if fast.precision == "fp8":
            quantize_fp8(self.unet)
            self.dtype = torch.bfloat16
        for module in (self.unet, vae):  # swapped in or back, as this backend asks (folded from the final dtype)
            if module is not None:
                set_subpixel_upsample(module, fast.subpixel_upsample)
        if fast.backend in INDUCTOR_BACKENDS:
            compile_modules(self.unet, vae, fast, self.backbone.text_encoders())
        elif fast.backend == "tensorrt":
            cond = (example or self.backbone.encode_prompts([""])).to(self.device, self.dtype)
            predict, decoder = tensorrt_modules(self.unet, vae, fast, self.backbone.sample_shape, cond, buckets)
            self.denoise = lambda x_t, t, c: self._schedule(x_t.device).eps(x_t, predict(x_t, t, c), t)
            if decoder is not None:
                vae.decoder = decoder
        self.fast = fast
        self._text_graph_failed = False  # a new backend: the encoders may capture now
        self.release_graphs()

    def use_lora(self, folder: str | Path | None, scale: float = 1.0) -> bool:
        """Sample the next batches with the exported LoRA in ``folder`` added to the UNet at ``scale``
        (None: the UNet alone); whether it had to be loaded (``self.loras`` keeps the recent ones).

        The adapter runs beside the weights (peft), not fused: its images equal those of the
        folder loaded alone (:meth:`from_folder`, fused) within float rounding. Batches with an
        adapter run eagerly, outside the CUDA graphs: the graphs hold the UNet as captured, and
        a scale is a constant in them. Compiled and TensorRT backends bake the modules in, so
        they refuse adapters.
        """
        if folder is not None and (why := adapter_conflict(self.fast)):
            raise BackendError(f"cannot add the LoRA adapter in '{folder}': {why}")
        return self.loras.activate(None if folder is None else Path(folder), scale)

    @property
    def graphed(self) -> bool:
        """Whether sampling replays CUDA graphs (CUDA, graphs on, not TensorRT's own runtime, no LoRA adapter)."""
        return (self.fast.cuda_graphs and self.device.type == "cuda" and self.fast.backend != "tensorrt"
                and self.loras.active is None)

    def sample_images(self, cond: Conditioning, seeds: Tensor, timesteps: Sequence[int],
                      shape: Sequence[int], latents: Tensor | None = None, init: Tensor | None = None,
                      start_step: int = 0) -> Tensor:
        """The whole loop for one batch: Philox noise (or ``latents`` to start from, or ``init``, encoded
        images re-noised to ``timesteps[start_step]``), UNet steps, fused re-noise, decode to [0, 1]."""
        x0 = philox_sample(lambda x_t, t: self.denoise(x_t, t, cond), seeds, shape,
                           self.schedule.with_timesteps(timesteps), self.dtype, start=latents, x0_start=init,
                           start_step=start_step)
        return self.backbone.decode(x0)

    @torch.no_grad()
    def encode_images(self, image: Tensor) -> Tensor:
        """Images in [0, 1], (B, C_img, H, W) -> their UNet-space x0 (B, C, h, w), float32 on the device.

        The mean of the encoded distribution (the VAE's, or the pixels themselves), so that a
        request gives the same start every time.
        """
        channels = self.backbone.image_channels
        if image.ndim != 4 or image.shape[1] != channels:
            raise ValueError(f"images must be (B, {channels}, H, W) in [0, 1]; got shape {tuple(image.shape)}")
        mean, _ = self.backbone.encode_distribution(image.to(self.device, torch.float32) * 2 - 1)
        return mean.to(self.device)

    def _seeds(self, seeds: Sequence[int]) -> Tensor:
        """Seeds as the (B,) int64 device tensor the kernel reads."""
        return torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int] | None = None, steps: int | None = None,
                 shape: tuple[int, int, int] | None = None, latents: Tensor | None = None,
                 image: Tensor | None = None, strength: float = 1.0) -> Tensor:
        """Images in [0, 1], (B, C, H, W), for ``prompts[b]`` drawn from ``seeds[b]``.

        ``latents`` (B, C, h, w), as in diffusers pipelines, is the starting noise (instead of
        the seeds' stream 0); the seeds (default 0..B-1) still give the re-noise draws.

        ``image`` (B, C_img, H, W) in [0, 1], at the size ``shape`` decodes to, with ``strength``
        in (0, 1]: image to image. The image is encoded, re-noised with the seed's own draw to the
        step that ``strength`` selects (:func:`~.sampling.sdedit_start`: with 4 steps, 0.5 runs the
        last two) and denoised from there. Strength 1 starts from pure noise: the image is unused.
        """
        seeds = list(range(len(prompts))) if seeds is None else seeds
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        tokens = self.backbone.tokenize(list(prompts)) if self._text_in_graph else None
        cond = self.backbone.encode_prompts(list(prompts)) if tokens is None else None
        timesteps = self.timesteps[: steps or len(self.timesteps)]
        start_step = sdedit_start(strength, len(timesteps))
        if image is None and strength != 1.0:
            raise ValueError("strength applies to an image to start from; pass image too")
        if image is not None:
            if latents is not None:
                raise ValueError("give either latents (starting noise) or image (to start from), not both")
            if image.shape[0] != len(prompts):
                raise ValueError(f"got {image.shape[0]} images for {len(prompts)} prompts")
            if start_step > 0:
                shape = tuple(shape or self.backbone.sample_shape)
                init = self.encode_images(image)
                if tuple(init.shape[1:]) != shape:
                    raise ValueError(f"the images encode to {tuple(init.shape[1:])}, not the sample shape {shape};"
                                     " resize them to the size that shape decodes to")
                if tokens is not None:
                    return self.images_from_tokens(tokens, self._seeds(seeds), timesteps, shape, init, start_step)
                return self.images(cond, self._seeds(seeds), timesteps, shape, init, start_step)
        if latents is not None:
            if latents.shape[0] != len(prompts):
                raise ValueError(f"got {latents.shape[0]} latents for {len(prompts)} prompts")
            cond = cond if tokens is None else self.backbone.encode_tokens(*tokens)  # no graph: eager anyway
            return self.sample_images(cond.to(self.device, self.dtype), self._seeds(seeds), timesteps,
                                      tuple(latents.shape[1:]), latents.to(self.device, self.dtype))
        if tokens is not None:
            return self.images_from_tokens(tokens, self._seeds(seeds), timesteps, shape)
        return self.images(cond, self._seeds(seeds), timesteps, shape)

    @property
    def _text_in_graph(self) -> bool:
        """Whether prompts are encoded inside the loop (``fast.text_in_graph``, an adapter that splits
        tokenizing from encoding, no failed capture so far)."""
        splits = type(self.backbone).tokenize is not Backbone.tokenize
        return self.fast.text_in_graph and splits and not self._text_graph_failed

    @torch.no_grad()
    def images(self, cond: Conditioning, seeds: Tensor, timesteps: Sequence[int],
               shape: Sequence[int] | None = None, init: Tensor | None = None, start_step: int = 0) -> Tensor:
        """Images in [0, 1] from encoded prompts (and ``init``, encoded images to start from at
        ``timesteps[start_step]``): through a CUDA graph per batch shape and start when graphed."""
        cond = cond.to(self.device, self.dtype)
        keys = sorted(cond.added)

        def conditioning(hidden: Tensor, *added: Tensor) -> Conditioning:
            return Conditioning(hidden, dict(zip(keys, added)))

        return self._loop("cond", [cond.hidden, *(cond.added[k] for k in keys)], conditioning, seeds, timesteps,
                          shape, init, start_step)

    @torch.no_grad()
    def images_from_tokens(self, tokens: Sequence[Tensor], seeds: Tensor, timesteps: Sequence[int],
                           shape: Sequence[int] | None = None, init: Tensor | None = None,
                           start_step: int = 0) -> Tensor:
        """:meth:`images` from the tokenizer's tensors (``backbone.tokenize``): the prompt encoders run
        inside the loop, and so inside its CUDA graph when graphed. If that capture fails, the
        pipeline warns once and encodes prompts before the graph from then on."""
        def conditioning(*t: Tensor) -> Conditioning:
            return self.backbone.encode_tokens(*t).to(self.device, self.dtype)

        try:
            return self._loop("tokens", list(tokens), conditioning, seeds, timesteps, shape, init, start_step)
        except CaptureFailed as e:
            self._text_graph_failed = True
            cause = e.__cause__
            warnings.warn(f"the prompt encoder could not be captured in the loop's CUDA graph ({type(cause).__name__}:"
                          f" {first_line(cause)[:200]}); encoding prompts before the graph instead",
                          stacklevel=2)
            self.release_graphs()  # a failed capture leaves its pool in an unknown state
            torch.cuda.synchronize()
            return self.images(conditioning(*tokens), seeds, timesteps, shape, init, start_step)

    def _loop(self, kind: str, prompt: list[Tensor], conditioning: Callable[..., Conditioning], seeds: Tensor,
              timesteps: Sequence[int], shape: Sequence[int] | None, init: Tensor | None, start_step: int) -> Tensor:
        """The loop of one batch from ``conditioning(*prompt)``; through a CUDA graph per ``kind`` of prompt
        input, batch shape and start when graphed (the graph's inputs: ``prompt``, the seeds, ``init``)."""
        timesteps = tuple(int(t) for t in timesteps)
        shape = tuple(shape or self.backbone.sample_shape)
        count = len(prompt)

        def loop(*inputs: Tensor) -> Tensor:
            x0 = inputs[count + 1] if init is not None else None
            return self.sample_images(conditioning(*inputs[:count]), inputs[count], timesteps, shape, init=x0,
                                      start_step=start_step)

        inputs = [*prompt, seeds, *(() if init is None else (init,))]
        if not self.graphed:
            return loop(*inputs)
        key = (kind, len(seeds), timesteps, shape, start_step if init is not None else None)
        if key not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[key] = GraphedLoop(loop, inputs, self._pool)
            except torch.OutOfMemoryError:
                raise  # the card is full, whatever the graph holds
            except RuntimeError as e:  # the warm-up or the capture (an op the capture does not allow)
                if kind != "tokens":
                    raise
                raise CaptureFailed(str(e)) from e
        return self._graphs[key](*inputs)

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory (they are recaptured on next use)."""
        self._graphs.clear()
        self._pool = None

    @torch.no_grad()
    def generate_padded(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                        bucket: int | Sequence[int] = 8, shape: tuple[int, int, int] | None = None,
                        image: Tensor | None = None, strength: float = 1.0) -> Tensor:
        """Like ``__call__``, but every forward pass holds exactly a bucket's number of samples.

        ``bucket`` is one size or several; each chunk (at most the largest bucket) is padded with
        blank prompts up to the smallest bucket that holds it. With one bucket size, a sample's
        pixels do not depend on how many or which other samples share its pass (kernels round
        differently for different batch sizes); several sizes trade that bit-exactness (the
        difference is float rounding) for latency. Fixed shapes are what CUDA graphs need.
        """
        sizes = sorted({bucket} if isinstance(bucket, int) else set(bucket))
        out = []
        for i in range(0, len(prompts), sizes[-1]):
            chunk_p, chunk_s = list(prompts[i:i + sizes[-1]]), list(seeds[i:i + sizes[-1]])
            pad = next(b for b in sizes if b >= len(chunk_p)) - len(chunk_p)
            chunk_i = None
            if image is not None:  # blank images pad the chunk, as blank prompts do
                chunk_i = image[i:i + sizes[-1]]
                chunk_i = torch.cat([chunk_i, chunk_i.new_zeros((pad, *chunk_i.shape[1:]))])
            images = self(chunk_p + [""] * pad, chunk_s + [0] * pad, steps, shape, image=chunk_i, strength=strength)
            out.append(images[: len(chunk_p)])
        return torch.cat(out)
