"""The HTTP API: a LitServe ``LitAPI`` (setup / decode / batch / predict / unbatch / encode) plus
the OpenAI Images route, the playground, metrics and the limits around them.

Requests from all generation endpoints enter the same LitServe queue, so they batch together.
A batch is grouped by (image shape, step count, first step); each group runs in fixed-size
chunks (``FewStepPipeline.generate_padded``), so a seed's pixels never depend on its batch-mates.
Every image's noise comes from its own seed (seed + i for the i-th image of a request).

A request is checked against the model and its image decoded in the HTTP process
(:meth:`FewStepAPI.prepare`), before it is queued: LitServe answers a whole batch with the error
when ``decode_request`` raises, so a bad request there would fail the good ones beside it.
"""

# FastAPI reads the routes' annotations at runtime (the OpenAPI schema): no `from __future__ import annotations`.
import base64
import hmac
import io
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import anyio
import anyio.to_thread
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model.adapters import adapter, read_card
from ..model.backends import FastPath
from ..model.pipeline import FewStepPipeline
from ..model.sampling import sdedit_start
from . import metrics
from .images import BadImage, from_base64, load_image
from .lifecycle import ServingState, SupervisedServer, bind_to_parent
from .middleware import ServingMiddleware, openai_error
from .schemas import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    SIZE_PATTERN,
    GenerateRequest,
    GenerateResponse,
    OpenAIEditRequest,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
)

GENERATE_PATH = "/generate"
OPENAI_PATH = "/v1/images/generations"
OPENAI_EDITS_PATH = "/v1/images/edits"
STATIC = Path(__file__).parent / "static"


class RequestProblem(ValueError):
    """A request the model cannot serve as asked; names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class ModelFacts:
    """What the HTTP process knows of the model without loading it (from ``dmd2.json``)."""

    name: str
    family: str
    steps: int
    native: int  # image side in pixels

    @classmethod
    def read(cls, folder: Path) -> "ModelFacts":
        card = read_card(folder)
        return cls(Path(folder).name, card.family, len(card.timesteps or ()), card.image_size or 512)

    def resolve_size(self, size: str | None) -> tuple[int, int]:
        """(width, height) for a ``WxH`` string, or the native size (None, ``auto``); RequestProblem if unsupported."""
        if size is None or size == "auto":
            return self.native, self.native
        m = SIZE_PATTERN.match(size)
        if not m:
            raise RequestProblem("size", f"size must look like WIDTHxHEIGHT, e.g. {self.native}x{self.native}")
        w, h = int(m.group(1)), int(m.group(2))
        rule = adapter(self.family).size_rule(self.native, w, h)
        if rule is not None:
            raise RequestProblem("size", f"size {size} is not supported by this model; use {rule}")
        return w, h

    def check_steps(self, steps: int | None) -> None:
        if steps is not None and steps > self.steps:
            raise RequestProblem("steps", f"steps must be at most {self.steps}, the length of the trained schedule")

    def render_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the model draws for a delivered ``size`` (an input image is fitted to it)."""
        return adapter(self.family).render_size(self.native, *size)

    @property
    def image_channels(self) -> int:
        return adapter(self.family).image_channels


@dataclass
class Job:
    """One checked request: its images share a prompt; image i uses ``seeds[i]``.

    With an input image, ``init`` holds its pixels at the render size, (H, W, C) uint8, and the
    loop starts at ``start_step`` (which ``strength`` selects; 0: from noise, no image needed).
    """

    prompt: str
    seeds: list[int]
    steps: int | None
    size: tuple[int, int]
    output_format: str
    init: np.ndarray | None = None
    strength: float = 1.0
    start_step: int = 0
    received: float = field(default_factory=time.perf_counter)  # set in the HTTP process: a system-wide clock


@dataclass
class JobResult:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    seeds: list[int]
    output_format: str
    size: tuple[int, int]  # (width, height) to deliver
    timings_ms: dict[str, float]


def encode_image(image: torch.Tensor, fmt: str, size: tuple[int, int]) -> str:
    """(C, H, W) in [0, 1] -> base64 file bytes, scaled (nearest) to ``size`` when it differs."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if pil.size != size:
        pil = pil.resize(size, Image.NEAREST)
    out = io.BytesIO()
    pil.save(out, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return base64.b64encode(out.getvalue()).decode("ascii")


def pixels(init: np.ndarray, count: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (count, C, H, W) float32 in [0, 1], the pipeline's image layout."""
    return torch.from_numpy(init).permute(2, 0, 1).float().div(255).expand(count, -1, -1, -1)


def unprocessable(problem: RequestProblem) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, detail=[{"loc": ["body", problem.field], "msg": str(problem), "type": "value_error"}])


class FewStepAPI(ls.LitAPI):
    """The generator behind ``POST /generate`` (and the OpenAI route, which feeds the same queue)."""

    def __init__(self, model_dir: Path, *, max_batch_size: int = 8, batch_timeout: float = 0.01,
                 bucket: int | Sequence[int] = 8, api_key: str | None = None, threads: int | None = None,
                 fast: FastPath | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=GENERATE_PATH)
        self.model_dir = Path(model_dir)
        self.facts = ModelFacts.read(self.model_dir)
        self.bucket = (bucket,) if isinstance(bucket, int) else tuple(sorted(bucket))
        self.fast = fast or FastPath()
        self.api_key = api_key
        self.threads = threads
        self.server_pid = os.getpid()  # the main process: workers never outlive it
        self.pipe: FewStepPipeline | None = None

    # -- auth (runs in the HTTP process, as a FastAPI dependency) --------------------------------
    def authorize(self, request: Request) -> None:
        """``Authorization: Bearer <key>`` on generation endpoints, compared in constant time."""
        if not self.api_key or request.url.path in ("/health", "/", "/metrics"):
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise HTTPException(401, detail="missing or wrong API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    # -- the four phases (run in the inference worker) ------------------------------------------
    def setup(self, device: str) -> None:
        bind_to_parent(self.server_pid)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.pipe = FewStepPipeline.from_folder(self.model_dir, device=device)
        self.pipe.accelerate(self.fast, self.bucket)
        steps, side = len(self.pipe.timesteps), self.pipe.backbone.image_size
        for size in self.bucket:  # compilation, engine builds and graph captures happen here, not in a request
            self.pipe.generate_padded(["warm-up"] * size, list(range(size)), bucket=self.bucket)
            if self.pipe.graphed:  # image to image: one graph per first step
                blank = torch.zeros(size, self.facts.image_channels, side, side)
                for start in range(1, steps):
                    self.pipe.generate_padded(["warm-up"] * size, list(range(size)), bucket=self.bucket, image=blank,
                                              strength=(steps - start) / steps)

    def prepare(self, request: GenerateRequest, image: bytes | None = None) -> Job:
        """Check a request against the model and decode its image (HTTP process; RequestProblem).

        ``image`` is an uploaded file's bytes (the OpenAI edits route); else ``request.image``,
        base64, is used. The image is decoded under a pixel limit and fitted to the render size.
        """
        size = self.facts.resolve_size(request.size)
        self.facts.check_steps(request.steps)
        init, strength, start_step = None, 1.0, 0
        if image is not None or request.image is not None:
            try:
                data = image if image is not None else from_base64(request.image)
                init = load_image(data, self.facts.render_size(size), self.facts.image_channels)
            except BadImage as e:
                raise RequestProblem("image", f"image {e}") from None
            strength = DEFAULT_STRENGTH if request.strength is None else request.strength
            start_step = sdedit_start(strength, request.steps or self.facts.steps)
        elif request.strength is not None:
            raise RequestProblem("strength", "strength applies to an input image: send image too, or drop strength")
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return Job(request.prompt, [seed + i for i in range(request.num_images)], request.steps, size,
                   request.output_format, init if start_step > 0 else None, strength, start_step)

    def decode_request(self, request):  # a Job from prepare(); unannotated: LitServe's route (replaced) parses nothing
        return request

    def batch(self, inputs: list[Job]) -> list[Job]:
        return inputs

    def predict(self, jobs: list[Job] | Job) -> list[JobResult] | JobResult:
        """A batch of jobs (or one, when LitServe batching is off: max_batch_size=1)."""
        if isinstance(jobs, Job):
            return self._run([jobs])[0]
        return self._run(jobs)

    def _run(self, jobs: list[Job]) -> list[JobResult]:
        assert self.pipe is not None, "setup() has not run"
        metrics.BATCH_SIZE.observe(len(jobs))
        metrics.BATCH_IMAGES.observe(sum(len(j.seeds) for j in jobs))
        started = time.perf_counter()
        # Only jobs that run the same steps share a forward pass: (shape, steps, first step) -> job indices
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(self._shape(job.size), job.steps, job.start_step)].append(i)
        images: dict[int, torch.Tensor] = {}
        for (shape, steps, start_step), members in groups.items():
            prompts = [jobs[i].prompt for i in members for _ in jobs[i].seeds]
            seeds = [s for i in members for s in jobs[i].seeds]
            init, strength = None, 1.0
            if start_step > 0:  # every member's strength selects this first step; any one of them serves
                init = torch.cat([pixels(jobs[i].init, len(jobs[i].seeds)) for i in members])
                strength = jobs[members[0]].strength
            out = self.pipe.generate_padded(prompts, seeds, steps, self.bucket, shape, init, strength).cpu()
            start = 0
            for i in members:
                images[i] = out[start:start + len(jobs[i].seeds)]
                start += len(jobs[i].seeds)
        done = time.perf_counter()
        return [JobResult(images[i], job.seeds, job.output_format, job.size, {
            "queue": (started - job.received) * 1000, "inference": (done - started) * 1000,
            "batch_requests": float(len(jobs)),
        }) for i, job in enumerate(jobs)]

    def unbatch(self, output: list[JobResult]) -> list[JobResult]:
        return output

    def encode_response(self, output: JobResult) -> GenerateResponse:
        t0 = time.perf_counter()
        data = [{"data": encode_image(im, output.output_format, output.size), "seed": s}
                for im, s in zip(output.images, output.seeds)]
        timings = dict(output.timings_ms, encode=(time.perf_counter() - t0) * 1000)
        return GenerateResponse(images=data, model=self.facts.name, timings_ms=timings)

    # -- helpers --------------------------------------------------------------------------------
    def _shape(self, size: tuple[int, int]) -> tuple[int, int, int] | None:
        """UNet-space shape for an output size (None: the model's own)."""
        render = adapter(self.facts.family).render_size(self.facts.native, *size)
        if render == (self.facts.native, self.facts.native):
            return None
        return self.pipe.backbone.shape_for(*render)


def build_server(model_dir: Path, *, max_batch_size: int = 8, batch_timeout: float = 0.01,
                 bucket: int | Sequence[int] = 8, api_key: str | None = None, devices: int | str = "auto",
                 workers_per_device: int = 1, accelerator: str = "auto", max_queue: int = 64, timeout: float = 30.0,
                 max_body_bytes: int = 8 * 2**20, threads: int | None = None,
                 fast: FastPath | None = None) -> SupervisedServer:
    """The LitServer with every route, limit and metric wired in; run it with ``serve``."""
    from litserve.server import RegularRequestHandler

    api = FewStepAPI(model_dir, max_batch_size=max_batch_size, batch_timeout=batch_timeout, bucket=bucket,
                     api_key=api_key, threads=threads, fast=fast)
    state = ServingState()
    server = SupervisedServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device, timeout=timeout,
        max_payload_size=max_body_bytes, state=state,
        middlewares=[(ServingMiddleware, dict(generation_paths=(GENERATE_PATH, OPENAI_PATH, OPENAI_EDITS_PATH),
                                              known_paths=("/", "/health", "/metrics"), max_queue=max_queue,
                                              state=state))],
        model_metadata={"model": api.facts.name, "family": api.facts.family},
    )
    app = server.app
    # LitServe's index, and its /generate, which would hand the raw body to the worker: ours prepares it first.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", GENERATE_PATH)]
    handler = RegularRequestHandler(api, server)

    # Images decoded at once (each can take ~100 MB at the pixel limit), so that their memory stays bounded.
    decoding = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    async def prepare(request: GenerateRequest, image: bytes | None = None) -> Job:
        """``api.prepare`` off the event loop (decoding an image takes a while)."""
        with_image = image is not None or request.image is not None
        return await anyio.to_thread.run_sync(api.prepare, request, image, limiter=decoding if with_image else None)

    async def run(job: Job) -> GenerateResponse:
        result = await handler.handle_request(job, Job)
        return result if isinstance(result, GenerateResponse) else GenerateResponse(**result)

    @app.post(GENERATE_PATH, response_model=GenerateResponse, dependencies=[Depends(api.authorize)])
    async def generate(body: GenerateRequest) -> GenerateResponse:
        """Text to image; image to image with ``image`` (and ``strength``)."""
        try:
            job = await prepare(body)
        except RequestProblem as problem:
            raise unprocessable(problem) from None
        return await run(job)

    async def openai_answer(request: GenerateRequest, response_format: str, image: bytes | None = None) -> JSONResponse:
        """Run a request from an OpenAI route; problems are OpenAI's 400 naming the parameter."""
        if response_format == "url":
            return JSONResponse(openai_error("response_format 'url' is not supported: this server keeps no image"
                                             " store; use response_format='b64_json'", "response_format"), 400)
        try:
            job = await prepare(request, image)
        except RequestProblem as problem:
            return JSONResponse(openai_error(str(problem), problem.field), 400)
        images = (await run(job)).images
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": im.data} for im in images]})

    @app.post(OPENAI_PATH, response_model=OpenAIImagesResponse, dependencies=[Depends(api.authorize)])
    async def openai_images(body: OpenAIImagesRequest) -> JSONResponse:
        """The OpenAI Images API: ``client.images.generate(...)`` works unchanged."""
        return await openai_answer(GenerateRequest(prompt=body.prompt, num_images=body.n, size=body.size,
                                                   output_format=body.output_format or "png"), body.response_format)

    @app.post(OPENAI_EDITS_PATH, response_model=OpenAIImagesResponse, dependencies=[Depends(api.authorize)])
    async def openai_edits(
        body: Annotated[OpenAIEditRequest, Form()],
        image: Annotated[UploadFile, File(description="the PNG, JPEG or WebP to start from")],
        mask: Annotated[UploadFile | None, File(description="refused: inpainting is not supported yet")] = None,
    ) -> JSONResponse:
        """OpenAI's image edits: ``client.images.edit(image=..., prompt=...)`` works unchanged. The whole
        image is redrawn (image to image, ``strength``); a ``mask`` (inpainting) is refused."""
        if mask is not None:
            message = ("mask: inpainting is not supported yet; send the image without a mask to redraw all of it"
                       " (image to image; strength sets how far)")
            return JSONResponse(openai_error(message, "mask"), 400)
        request = GenerateRequest(prompt=body.prompt, num_images=body.n, size=body.size, strength=body.strength,
                                  output_format=body.output_format or "png")
        return await openai_answer(request, body.response_format, await image.read())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((STATIC / "playground.html").read_text(encoding="utf-8"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 413:
            return await http_exception_handler(request, exc)
        message = (f"the request body is over this server's limit of {max_body_bytes:,} bytes (--max-body-mb):"
                   " send a smaller image")
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_error(message, "image"), 413)
        return JSONResponse({"detail": [{"loc": ["body", "image"], "msg": message, "type": "too_large"}]}, 413)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if request.url.path.startswith("/v1/"):
            first = errors[0] if errors else {}
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return JSONResponse(openai_error(f"{param}: {first.get('msg', 'invalid request')}", param), 400)
        return JSONResponse({"detail": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors]}, 422)

    return server


def default_threads(workers: int) -> int:
    """CPU threads per worker so that workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
