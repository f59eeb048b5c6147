"""The HTTP API: a LitServe ``LitAPI`` (setup / decode / batch / predict / unbatch / encode) plus
the OpenAI Images route, the playground, metrics and the limits around them.

Requests from both generation endpoints enter the same LitServe queue, so they batch together.
A batch is grouped by (image shape, step count); each group runs in fixed-size chunks
(``FewStepPipeline.generate_padded``), so a seed's pixels never depend on its batch-mates.
Every image's noise comes from its own seed (seed + i for the i-th image of a request).
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation
# at runtime to build the endpoint's request model (and so the OpenAPI schema).
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

import litserve as ls
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..model.adapters import adapter, read_meta
from ..model.backends import FastPath
from ..model.pipeline import FewStepPipeline
from . import metrics
from .middleware import ServingMiddleware, openai_error
from .schemas import (
    MAX_SEED,
    SIZE_PATTERN,
    GenerateRequest,
    GenerateResponse,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
)

GENERATE_PATH = "/generate"
OPENAI_PATH = "/v1/images/generations"
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
        meta = read_meta(folder)
        size = int(meta.get("image_size") or 512)
        return cls(Path(folder).name, meta["family"], len(meta["timesteps"]), size)

    def resolve_size(self, size: str | None) -> tuple[int, int]:
        """(width, height) for a ``WxH`` string, or the native size; RequestProblem if unsupported."""
        if size is None:
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


@dataclass
class Job:
    """One decoded request: its images share a prompt; image i uses ``seeds[i]``."""

    prompt: str
    seeds: list[int]
    steps: int | None
    size: tuple[int, int]
    output_format: str
    received: float = field(default_factory=time.perf_counter)


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
        if self.threads:
            torch.set_num_threads(self.threads)
        self.pipe = FewStepPipeline.from_folder(self.model_dir, device=device)
        self.pipe.accelerate(self.fast, self.bucket)
        for size in self.bucket:  # compilation, engine builds and graph captures happen here, not in a request
            self.pipe.generate_padded(["warm-up"] * size, list(range(size)), bucket=self.bucket)

    def decode_request(self, request: GenerateRequest) -> Job:
        try:
            size = self.facts.resolve_size(request.size)
            self.facts.check_steps(request.steps)
        except RequestProblem as problem:
            raise unprocessable(problem) from None
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return Job(request.prompt, [seed + i for i in range(request.num_images)], request.steps, size,
                   request.output_format)

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
        groups: dict[tuple, list[int]] = defaultdict(list)  # (shape, steps) -> job indices
        for i, job in enumerate(jobs):
            groups[(self._shape(job.size), job.steps)].append(i)
        images: dict[int, torch.Tensor] = {}
        for (shape, steps), members in groups.items():
            prompts = [jobs[i].prompt for i in members for _ in jobs[i].seeds]
            seeds = [s for i in members for s in jobs[i].seeds]
            out = self.pipe.generate_padded(prompts, seeds, steps, self.bucket, shape).cpu()
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
                 max_body_bytes: int = 64 * 1024, threads: int | None = None,
                 fast: FastPath | None = None) -> ls.LitServer:
    """The LitServer with every route, limit and metric wired in."""
    from litserve.server import RegularRequestHandler

    api = FewStepAPI(model_dir, max_batch_size=max_batch_size, batch_timeout=batch_timeout, bucket=bucket,
                     api_key=api_key, threads=threads, fast=fast)
    server = ls.LitServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device, timeout=timeout,
        max_payload_size=max_body_bytes,
        middlewares=[(ServingMiddleware, dict(generation_paths=(GENERATE_PATH, OPENAI_PATH),
                                              known_paths=("/", "/health", "/metrics"), max_queue=max_queue))],
        model_metadata={"model": api.facts.name, "family": api.facts.family},
    )
    app = server.app
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's index
    handler = RegularRequestHandler(api, server)

    @app.post(OPENAI_PATH, response_model=OpenAIImagesResponse, dependencies=[Depends(api.authorize)])
    async def openai_images(body: OpenAIImagesRequest) -> JSONResponse:
        """The OpenAI Images API: ``client.images.generate(...)`` works unchanged."""
        if body.response_format == "url":
            return JSONResponse(openai_error("response_format 'url' is not supported: this server keeps no image"
                                             " store; use response_format='b64_json'", "response_format"), 400)
        try:
            width, height = api.facts.resolve_size(body.size)
        except RequestProblem as problem:
            return JSONResponse(openai_error(str(problem), problem.field), 400)
        request = GenerateRequest(prompt=body.prompt, num_images=body.n, output_format=body.output_format or "png",
                                  size=f"{width}x{height}")
        result = await handler.handle_request(request, GenerateRequest)
        images = result.images if isinstance(result, GenerateResponse) else GenerateResponse(**result).images
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": im.data} for im in images]})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((STATIC / "playground.html").read_text(encoding="utf-8"))

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
