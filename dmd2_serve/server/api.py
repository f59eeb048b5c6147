"""The HTTP API: a LitServe ``LitAPI`` (setup / decode / batch / predict / unbatch / encode) plus
the OpenAI Images route, the playground, metrics and the limits around them.

Requests from all generation endpoints enter the same LitServe queue, so they batch together.
One worker holds every served model (``models``). A batch is grouped by (model, LoRA adapter and
scale, image shape, step count, first step); each group runs in fixed-size chunks
(``FewStepPipeline.generate_padded``), so a seed's pixels never depend on its batch-mates.
Every image's noise comes from its own seed (seed + i for the i-th image of a request).

A request is checked against the model and its image decoded in the HTTP process
(:meth:`FewStepAPI.prepare`), before it is queued: LitServe answers a whole batch with the error
when ``decode_request`` raises, so a bad request there would fail the good ones beside it.
"""

# FastAPI reads the routes' annotations at runtime (the OpenAPI schema): no `from __future__ import annotations`.
import asyncio
import math
import os
import secrets
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, File, Form, HTTPException, Request, Security, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..model.adapters import ModelFolderError, adapter
from ..model.backends import FastPath, adapter_conflict
from ..model.errors import first_line
from ..model.pipeline import FewStepPipeline
from ..model.sampling import sdedit_start
from . import metrics
from .cancel import ForgettingRequestHandler, new_ticket
from .docs import serve_docs_offline
from .encoding import (
    MEDIA_TYPES,
    OPENAPI_RESPONSES,
    EncodedImages,
    NotAcceptable,
    Parameters,
    encode_image,
    raw_format,
    to_pixels,
)
from .images import BadImage, from_base64, load_image
from .lifecycle import ServingState, SupervisedServer, bind_to_parent, say, thread_lock_for_progress_bars
from .loop import ServingLoop
from .middleware import (
    KEY_MESSAGE,
    WWW_AUTHENTICATE,
    ServingMiddleware,
    key_matches,
    openai_error,
    too_large_body,
    unauthorized_body,
)
from .models import ModelFacts, RequestProblem, UnknownModel
from .schemas import (
    DEFAULT_STRENGTH,
    GenerateRequest,
    GenerateResponse,
    OpenAIEditRequest,
    OpenAIError,
    OpenAIImagesRequest,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
    largest_seed,
    unknown_field_message,
)

GENERATE_PATH = "/generate"
OPENAI_PATH = "/v1/images/generations"
OPENAI_EDITS_PATH = "/v1/images/edits"
OPENAI_VARIATIONS_PATH = "/v1/images/variations"
MODELS_PATH = "/v1/models"
VARY_ACCEPT = {"Vary": "Accept"}  # /generate's answer depends on Accept: a shared cache must key on it
MODEL_NOT_FOUND = {"model": OpenAIError, "description": "no served model has that name (OpenAI's error shape,"
                                                        " code model_not_found)"}
STATIC = Path(__file__).parent / "static"
INFO_PATH = "/info"  # LitServe's info_path


@dataclass
class Job:
    """One checked request: its images share a prompt; image i uses ``seeds[i]``.

    With an input image, ``init`` holds its pixels at the render size, (H, W, C) uint8, and the
    loop starts at ``start_step`` (which ``strength`` selects; 0: from noise, no image needed).
    ``model`` draws it, with the LoRA adapter in ``lora_folder`` at ``lora_scale`` when not None
    (``lora``: the adapter's name as the request gave it).
    """

    prompt: str
    seeds: list[int]
    steps: int | None
    size: tuple[int, int]
    output_format: str
    init: np.ndarray | None = None
    strength: float = 1.0
    start_step: int = 0
    model: str = ""
    lora: str | None = None
    lora_folder: Path | None = None
    lora_scale: float = 1.0
    output_compression: int | None = None  # JPEG / WebP quality (None: Pillow's default)
    received: float = field(default_factory=time.perf_counter)  # set in the HTTP process: a system-wide clock
    ticket: int = field(default_factory=new_ticket)  # cancelled when its client goes (cancel.py)


@dataclass
class JobFailure:
    """What the worker answers for a job it could not run (an adapter that failed to load): a
    422 naming ``field``, for that job alone, not its batch-mates."""

    field: str
    message: str


@dataclass
class JobResult:
    """What the worker answers for a job: its images' pixels, from which the HTTP process makes the files."""

    images: np.ndarray  # (N, H, W, C) uint8 (encoding.to_pixels)
    seeds: list[int]
    output_format: str
    size: tuple[int, int]  # (width, height) to deliver
    timings_ms: dict[str, float]
    prompt: str  # the rest is what the files' metadata says made them
    steps: int
    strength: float | None  # image to image only
    model: str = ""
    lora: str | None = None  # the adapter's name as the request gave it, and its scale
    lora_scale: float = 1.0
    output_compression: int | None = None
    failure: JobFailure | None = None  # set: no images, answer this instead
    sent: float = 0.0  # perf_counter (system-wide) when the worker finished it (before the sender thread's queue)


def pixels(init: np.ndarray, count: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (count, C, H, W) float32 in [0, 1], the pipeline's image layout."""
    return torch.from_numpy(init).permute(2, 0, 1).float().div(255).expand(count, -1, -1, -1)


def unprocessable(problem: RequestProblem) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, detail=[{"loc": ["body", problem.field], "msg": str(problem), "type": "value_error"}])


class FewStepAPI(ls.LitAPI):
    """The generators behind ``POST /generate`` (and the OpenAI routes, which feed the same queue).

    Args:
        models: name -> generator folder, the first the default; or one folder, named by its name.
        lora_dirs: model name -> folder of exported LoRA adapters that its requests may name.
        lora_cache: adapters kept loaded per model (least recently used evicted).
    """

    def __init__(self, models: Path | Mapping[str, Path], *, lora_dirs: Mapping[str, Path] | None = None,
                 lora_cache: int = 4, max_batch_size: int = 8, batch_timeout: float = 0.0,
                 bucket: int | Sequence[int] = 8, api_key: str | None = None, threads: int | None = None,
                 fast: FastPath | None = None, metadata: bool = True) -> None:
        # Batches of every waiting request, answers sent from a thread (loop.py), whatever the batch size.
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=GENERATE_PATH,
                         loop=ServingLoop())
        models = {Path(models).name: Path(models)} if isinstance(models, (str, Path)) else dict(models)
        lora_dirs = dict(lora_dirs or {})
        self.fast = fast or FastPath()
        _check_models(models, lora_dirs, lora_cache, self.fast)
        self.models = {name: ModelFacts.read(folder, name, lora_dirs.get(name)) for name, folder in models.items()}
        self.default_model = next(iter(self.models))
        self.lora_cache = lora_cache
        self.bucket = (bucket,) if isinstance(bucket, int) else tuple(sorted(bucket))
        self.api_key = api_key
        self.threads = threads
        self.metadata = metadata  # write prompt, seed, steps and model into every image file
        self.server_pid = os.getpid()  # the main process: workers never outlive it
        self.pipes: dict[str, FewStepPipeline] = {}  # in the worker, after setup()

    @property
    def facts(self) -> ModelFacts:
        """The default model's facts."""
        return self.models[self.default_model]

    def model_facts(self, name: str | None) -> ModelFacts:
        """The facts of the model a request names (None: the default); ``UnknownModel`` if not served."""
        if name is None:
            return self.facts
        if name not in self.models:
            raise UnknownModel(name, list(self.models))
        return self.models[name]

    # -- auth (runs in the HTTP process, as a FastAPI dependency) --------------------------------
    def authorize(self, request: Request) -> None:
        """``Authorization: Bearer <key>`` on the guarded routes (the middleware checks the generation
        routes' before their bodies are read; this covers the rest)."""
        if not self.api_key or request.url.path in ("/health", "/", "/metrics"):
            return
        if not key_matches(request.headers.get("authorization", ""), self.api_key):
            raise HTTPException(401, detail=KEY_MESSAGE, headers=WWW_AUTHENTICATE)

    # -- the four phases (run in the inference worker) ------------------------------------------
    def setup(self, device: str) -> None:
        bind_to_parent(self.server_pid)
        thread_lock_for_progress_bars()
        if self.threads:
            torch.set_num_threads(self.threads)
        for name, facts in self.models.items():
            # A LoRA export served with adapters keeps its own beside the weights, so others can take its place.
            pipe = FewStepPipeline.from_folder(facts.folder, device=device, fuse_lora=facts.own_lora is None)
            pipe.loras.capacity = self.lora_cache
            pipe.accelerate(self.fast, self.bucket)
            self.pipes[name] = pipe
            steps, side = len(pipe.timesteps), pipe.backbone.image_size
            # Compilation, engine builds and graph captures happen here, not in a request; the largest
            # bucket first, so the compile backend's one dynamic-batch graph is made for it and reused.
            for size in sorted(self.bucket, reverse=True):
                pipe.generate_padded(["warm-up"] * size, list(range(size)), bucket=self.bucket)
                if pipe.graphed:  # image to image: one graph per first step
                    blank = torch.zeros(size, facts.image_channels, side, side)
                    for start in range(1, steps):
                        pipe.generate_padded(["warm-up"] * size, list(range(size)), bucket=self.bucket, image=blank,
                                             strength=(steps - start) / steps)

    def prepare(self, request: GenerateRequest, image: bytes | None = None) -> Job:
        """Check a request against its model and decode its image (HTTP process; RequestProblem,
        UnknownModel).

        ``image`` is an uploaded file's bytes (the OpenAI edits route); else ``request.image``,
        base64, is used. The image is decoded under a pixel limit and fitted to the render size.
        """
        facts = self.model_facts(request.model)
        size = facts.resolve_size(request.size)
        facts.check_steps(request.steps)
        lora_folder, lora_scale = _adapter(facts, request)
        init, strength, start_step = None, 1.0, 0
        if image is not None or request.image is not None:
            try:
                data = image if image is not None else from_base64(request.image)
                init = load_image(data, facts.render_size(size), facts.image_channels)
            except BadImage as e:
                raise RequestProblem("image", f"image {e}") from None
            strength = DEFAULT_STRENGTH if request.strength is None else request.strength
            steps = request.steps or facts.steps
            try:
                start_step = sdedit_start(strength, steps)
            except ValueError as e:  # every step would run: the image unused
                more = f"; or ask for more steps (this model runs up to {facts.steps})" if steps < facts.steps else ""
                said = "the default " if request.strength is None else ""
                raise RequestProblem("strength" if request.strength is not None else "image",
                                     f"{said}{e}{more}") from None
        elif request.strength is not None:
            raise RequestProblem("strength", "strength applies to an input image: send image too, or drop strength")
        seed = request.seed if request.seed is not None else secrets.randbelow(largest_seed(request.num_images) + 1)
        return Job(request.prompt, [seed + i for i in range(request.num_images)], request.steps, size,
                   request.output_format, init if start_step > 0 else None, strength, start_step, model=facts.name,
                   lora=request.lora if lora_folder is not None or lora_scale == 0 else None,
                   lora_folder=lora_folder, lora_scale=lora_scale, output_compression=request.output_compression)

    def decode_request(self, request):  # a Job from prepare(); unannotated: LitServe's route (replaced) parses nothing
        return request

    def batch(self, inputs: list[Job]) -> list[Job]:
        return inputs

    def predict(self, jobs: list[Job]) -> list[JobResult]:
        """A batch of jobs (a list even at ``--max-batch-size 1``: the loop is always ``ServingLoop``)."""
        return self._run(jobs)

    def _run(self, jobs: list[Job]) -> list[JobResult]:
        assert self.pipes, "setup() has not run"
        metrics.BATCH_SIZE.observe(len(jobs))
        metrics.BATCH_IMAGES.observe(sum(len(j.seeds) for j in jobs))
        started = time.perf_counter()
        # Only jobs that run the same network and steps share a forward pass:
        # (model, adapter, scale, shape, steps, first step) -> job indices
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            key = (job.model, job.lora_folder, job.lora_scale, self._shape(job.model, job.size), job.steps, job.start_step)
            groups[key].append(i)
        images: dict[int, np.ndarray] = {}
        failures: dict[int, JobFailure] = {}
        group_size: dict[int, int] = {}
        for (model, lora, scale, shape, steps, start_step), members in groups.items():
            pipe, group_started = self.pipes[model], time.perf_counter()
            try:
                if pipe.use_lora(lora, scale):
                    metrics.LORA_LOADS.labels(model).inc()
            except ModelFolderError as e:  # checked in the HTTP process, so its files changed or broke since
                say(str(e))
                for i in members:
                    failures[i] = JobFailure("lora", f"the LoRA adapter '{jobs[i].lora}' could not be loaded into the"
                                                     f" model '{model}'; its files may be damaged: export it again")
                continue
            prompts = [jobs[i].prompt for i in members for _ in jobs[i].seeds]
            seeds = [s for i in members for s in jobs[i].seeds]
            init, strength = None, 1.0
            if start_step > 0:  # every member's strength selects this first step; any one of them serves
                init = torch.cat([pixels(jobs[i].init, len(jobs[i].seeds)) for i in members])
                strength = jobs[members[0]].strength
            out = to_pixels(pipe.generate_padded(prompts, seeds, steps, self.bucket, shape, init, strength)).cpu().numpy()
            metrics.MODEL_INFERENCE.labels(model).observe(time.perf_counter() - group_started)
            start = 0
            for i in members:
                images[i] = out[start:start + len(jobs[i].seeds)]
                start += len(jobs[i].seeds)
                group_size[i] = len(members)
                metrics.MODEL_REQUESTS.labels(model, jobs[i].lora or "").inc()
        done = time.perf_counter()
        results = []
        for i, job in enumerate(jobs):
            timings = {"queue": (started - job.received) * 1000, "inference": (done - started) * 1000,
                       "batch_requests": float(len(jobs)), "group_requests": float(group_size.get(i, 0))}
            ran = i in images
            results.append(JobResult(
                images[i] if ran else np.empty(0, np.uint8), job.seeds if ran else [], job.output_format, job.size, timings,
                prompt=job.prompt, steps=job.steps or self.models[job.model].steps,
                strength=job.strength if job.start_step else None, model=job.model, lora=job.lora,
                lora_scale=job.lora_scale, output_compression=job.output_compression, failure=failures.get(i)))
        return results

    def _parameters(self, output: JobResult, seed: int) -> Parameters | None:
        """What the file's metadata says made it (None with --no-metadata)."""
        if not self.metadata:
            return None
        return Parameters(output.prompt, seed, output.steps, output.size, output.model, output.strength, output.lora,
                          output.lora_scale)

    def unbatch(self, output: list[JobResult]) -> list[JobResult]:
        return output

    def encode_response(self, output: JobResult):  # -> JobResult | JobFailure (why unannotated: below)
        """The pixels as they are: the HTTP process makes the files (:meth:`file`), so the worker goes on to its
        next batch at once instead of waiting for a batch's files (a PNG of 512x512 noise: 65 ms on the H200's
        host). A job that could not run answers its JobFailure. No return annotation: LitServe would build its
        route's (replaced) response model from it, and a NumPy array is no Pydantic type."""
        output.sent = time.perf_counter()
        return output if output.failure is None else output.failure  # a failure: the HTTP process answers it

    # -- the files (HTTP process) ---------------------------------------------------------------
    def file(self, result: JobResult, index: int) -> bytes:
        """Image ``index`` of a job's answer as its file, with the metadata that made it (unless ``--no-metadata``)."""
        return encode_image(result.images[index], result.output_format, result.size,
                            self._parameters(result, result.seeds[index]), quality=result.output_compression)

    # -- helpers --------------------------------------------------------------------------------
    def _shape(self, model: str, size: tuple[int, int]) -> tuple[int, int, int] | None:
        """UNet-space shape of ``model`` for an output size (None: the model's own)."""
        facts = self.models[model]
        render = adapter(facts.family).render_size(facts.native, *size)
        if render == (facts.native, facts.native):
            return None
        return self.pipes[model].backbone.shape_for(*render)


def _adapter(facts: ModelFacts, request: GenerateRequest) -> tuple[Path | None, float]:
    """The LoRA adapter folder (None: none) and scale a request runs with; RequestProblem naming the field."""
    if request.lora is None:
        if request.lora_scale is not None:
            raise RequestProblem("lora_scale", "lora_scale applies to a LoRA adapter: send lora too, or drop lora_scale")
        return facts.own_lora, 1.0
    folder = facts.lora_folder(request.lora)
    scale = 1.0 if request.lora_scale is None else request.lora_scale
    if scale == 0:  # the adapter adds nothing: the UNet alone. For a full model that is the model, batched with
        # the requests that name no adapter; for a LoRA export served as the model, its teacher without its own
        # adapter: scale 0 is kept, so that the image's file says which adapter at what scale made it
        return None, 1.0 if facts.own_lora is None else 0.0
    return folder, scale


def _check_models(models: Mapping[str, Path], lora_dirs: Mapping[str, Path], lora_cache: int, fast: FastPath) -> None:
    """Refuse a model/adapter configuration that cannot be served, saying how to fix it (ValueError)."""
    if not models:
        raise ValueError("serve at least one model: --model DIR or --model NAME=DIR")
    for name, folder in lora_dirs.items():
        if name not in models:
            raise ValueError(f"--lora-dir names the model '{name}', which is not served (served: {', '.join(models)});"
                             " write --lora-dir NAME=DIR with the name of a --model")
        if not Path(folder).is_dir():
            raise ValueError(f"--lora-dir '{folder}' is not a folder; give the folder that holds the exported LoRA"
                             " folders (each with pytorch_lora_weights.safetensors and dmd2.json)")
    if lora_dirs and (why := adapter_conflict(fast)):
        raise ValueError(f"--lora-dir: {why}")
    if lora_cache < 1:
        raise ValueError("--lora-cache must be at least 1")


def project_version() -> str:
    """This project's installed version; ``0+unknown`` when it runs from a checkout on ``PYTHONPATH``
    (the GPU benchmark host's way), which has no distribution metadata."""
    try:
        return package_version("dmd2-fast")
    except PackageNotFoundError:
        return "0+unknown"


def build_server(models: Path | Mapping[str, Path], *, lora_dirs: Mapping[str, Path] | None = None,
                 lora_cache: int = 4, max_batch_size: int = 8, batch_timeout: float = 0.0,
                 bucket: int | Sequence[int] = 8, api_key: str | None = None, devices: int | str = "auto",
                 workers_per_device: int = 1, accelerator: str = "auto", max_queue: int = 64, timeout: float = 30.0,
                 max_body_bytes: int = 8 * 2**20, body_timeout_s: float = 30.0, threads: int | None = None,
                 fast: FastPath | None = None, metadata: bool = True) -> SupervisedServer:
    """The LitServer with every route, limit and metric wired in; run it with ``serve``.

    ``models``, ``lora_dirs``, ``lora_cache``: what is served (:class:`FewStepAPI`).
    ``metadata``: write each image's prompt, seed, steps and model into its file (``--no-metadata``: not).
    """

    api = FewStepAPI(models, lora_dirs=lora_dirs, lora_cache=lora_cache, max_batch_size=max_batch_size,
                     batch_timeout=batch_timeout, bucket=bucket, api_key=api_key, threads=threads, fast=fast,
                     metadata=metadata)
    state = ServingState()
    server = SupervisedServer(
        api, accelerator=accelerator, devices=devices, workers_per_device=workers_per_device, timeout=timeout,
        max_payload_size=max_body_bytes, state=state,
        middlewares=[(ServingMiddleware, dict(generation_paths=(GENERATE_PATH, OPENAI_PATH, OPENAI_EDITS_PATH),
                                              known_paths=("/", "/health", "/metrics", INFO_PATH, MODELS_PATH),
                                              item_prefixes=(MODELS_PATH + "/",),
                                              max_queue=max_queue, state=state, max_body_bytes=max_body_bytes,
                                              body_timeout_s=body_timeout_s, api_key=api.api_key))],
        model_metadata={"model": api.default_model, "family": api.facts.family, "models": [
            {"name": m.name, "family": m.family, "steps": m.steps, "image_size": m.native,
             "loras": m.loras is not None} for m in api.models.values()]},
    )
    app = server.app
    app.title, app.version = "dmd2-serve", project_version()
    app.description = ("Few-step text to image (DMD2 generators): POST /generate, or the OpenAI Images API under /v1"
                       " (the served models: GET /v1/models); the playground is at /.")
    # LitServe's index, and its /generate, which would hand the raw body to the worker: ours prepares it first.
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", GENERATE_PATH)]
    if (online_docs := serve_docs_offline(app)) is not None:  # FastAPI's pages fetch their scripts from a CDN
        say(online_docs)
    # The key is checked by api.authorize; with one required, the schema also says so (a bearer scheme on the
    # generation routes), so /docs has an Authorize button and its "Try it out" sends the key.
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")
    guarded = [Depends(api.authorize), *([Security(bearer)] if api.api_key else [])]
    # LitServe's /info (the served models and the server's settings; behind the key) declared as guarded too
    info = next(r for r in app.router.routes if getattr(r, "path", None) == INFO_PATH)
    app.router.routes.remove(info)
    app.add_api_route(INFO_PATH, info.endpoint, methods=["GET"], dependencies=guarded,
                      summary="The served models and the server's settings (LitServe's)")
    handler = ForgettingRequestHandler(api, server, api.loop.cancellations)

    # Images decoded at once (each can take ~100 MB at the pixel limit), so that their memory stays bounded.
    decoding = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    async def prepare(request: GenerateRequest, image: bytes | None = None) -> Job:
        """``api.prepare`` off the event loop (decoding an image takes a while)."""
        with_image = image is not None or request.image is not None
        return await anyio.to_thread.run_sync(api.prepare, request, image, limiter=decoding if with_image else None)

    # The image files are made here, on threads, side by side (PIL's PNG (zlib), JPEG and WebP encoders release the
    # GIL), while the worker runs its next batch.
    encoding = anyio.CapacityLimiter(os.cpu_count() or 1)

    async def run(job: Job) -> EncodedImages:
        """The job's answer: the worker's pixels made into files; RequestProblem when the worker could not run it."""
        try:
            result = await handler.handle_request(job, Job)
        except HTTPException as e:
            if e.status_code != 504:
                raise
            raise queue_timeout(timeout) from None
        if isinstance(result, JobFailure):
            raise RequestProblem(result.field, result.message)
        started = time.perf_counter()
        files = await asyncio.gather(*(anyio.to_thread.run_sync(api.file, result, i, limiter=encoding)
                                       for i in range(len(result.seeds))))
        # reply: from the worker's answer to this coroutine holding it (LitServe's response queue, the event loop)
        timings = dict(result.timings_ms, reply=(started - result.sent) * 1000,
                       encode=(time.perf_counter() - started) * 1000)
        return EncodedImages(files, result.seeds, MEDIA_TYPES[result.output_format], result.model, timings)

    @app.post(GENERATE_PATH, response_model=GenerateResponse, responses={**OPENAPI_RESPONSES, 404: MODEL_NOT_FOUND},
              dependencies=guarded)
    async def generate(body: GenerateRequest, request: Request, response: Response) -> GenerateResponse | Response:
        """Text to image; image to image with ``image`` (and ``strength``). ``Accept: image/png`` (or
        jpeg, webp) answers the one image's file, made in that format whatever ``output_format`` says;
        every answer says ``Vary: Accept`` (a shared cache keeps the JSON and the file apart)."""
        response.headers["Vary"] = "Accept"
        try:  # every Accept header the client sent, as one list
            accept = ", ".join(request.headers.getlist("accept"))
            raw, refused = raw_format(accept, body.output_format, one_image=body.num_images == 1), None
        except NotAcceptable as e:
            raw, refused = None, e
        if raw is not None:
            body = body.model_copy(update={"output_format": raw})
        try:
            job = await prepare(body)
        except RequestProblem as problem:
            raise unprocessable(problem) from None
        if refused is not None:  # after the body's own problems
            return JSONResponse({"detail": str(refused)}, 406, headers=VARY_ACCEPT)
        result = await run(job)
        if raw is not None:  # the seed in a header: a picked one is otherwise in the file's metadata only
            return Response(result.files[0], media_type=result.media_type,
                            headers={**VARY_ACCEPT, SEED_HEADER: str(result.seeds[0])})
        return result.as_json()

    async def openai_answer(request: GenerateRequest, response_format: str, image: bytes | None = None) -> JSONResponse:
        """Run a request from an OpenAI route; problems are OpenAI's 400 naming the parameter."""
        if response_format == "url":
            return JSONResponse(openai_error("response_format 'url' is not supported: this server keeps no image"
                                             " store; use response_format='b64_json'", "response_format"), 400)
        try:
            job = await prepare(request, image)
        except RequestProblem as problem:
            return JSONResponse(openai_error(str(problem), problem.field), 400)
        result = await run(job)
        # gpt-image's answer fields too: a client picking a file's extension from output_format finds it
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": data, "seed": seed}
                                      for data, seed in zip(result.base64_files(), result.seeds, strict=True)],
                             "background": "opaque", "output_format": job.output_format,
                             "size": "{}x{}".format(*job.size)})

    @app.post(OPENAI_PATH, response_model=OpenAIImagesResponse, responses={404: MODEL_NOT_FOUND},
              dependencies=guarded)
    async def openai_images(body: OpenAIImagesRequest) -> JSONResponse:
        """The OpenAI Images API: ``client.images.generate(...)`` works unchanged."""
        return await openai_answer(GenerateRequest(prompt=body.prompt, num_images=body.n, size=body.size,
                                                   seed=body.seed, output_format=body.output_format or "png",
                                                   output_compression=body.output_compression, model=body.model,
                                                   lora=body.lora, lora_scale=body.lora_scale, steps=body.steps),
                                   body.response_format)

    @app.post(OPENAI_EDITS_PATH, response_model=OpenAIImagesResponse, responses={404: MODEL_NOT_FOUND},
              dependencies=guarded)
    async def openai_edits(
        body: Annotated[OpenAIEditRequest, Form()],
        image: Annotated[list[UploadFile] | None, File(description="the PNG, JPEG or WebP to start from: one")] = None,
        images: Annotated[list[UploadFile] | None, File(alias="image[]", description="OpenAI's list form of"
                                                         " image (a client's image=[file]): one file")] = None,
        mask: Annotated[UploadFile | None, File(description="refused: inpainting is not supported yet")] = None,
        markup: Annotated[UploadFile | None, File(description="refused: guided edits are not supported")] = None,
    ) -> JSONResponse:
        """OpenAI's image edits: ``client.images.edit(image=..., prompt=...)`` works unchanged (``image=[file]``
        too, which sends ``image[]``). The whole image is redrawn (image to image, ``strength``); a
        ``mask`` (inpainting), a ``markup`` overlay and more than one image are refused."""
        for name, part in (("mask", mask), ("markup", markup)):
            if part is not None:
                return JSONResponse(openai_error(unsupported_part(name), name), 400)
        given = [*(image or []), *(images or [])]  # every file sent as image or image[] (the last one was taken)
        if len(given) != 1:
            message = ("image: send the image to start from as a file (multipart, e.g. curl -F image=@photo.png)"
                       if not given else f"image: {len(given)} images were sent; this server redraws one image per"
                       " request: send one")
            return JSONResponse(openai_error(message, "image"), 400)
        request = GenerateRequest(prompt=body.prompt, num_images=body.n, size=body.size, strength=body.strength,
                                  seed=body.seed, output_format=body.output_format or "png",
                                  output_compression=body.output_compression, model=body.model,
                                  lora=body.lora, lora_scale=body.lora_scale, steps=body.steps)
        return await openai_answer(request, body.response_format, await given[0].read())

    @app.post(OPENAI_VARIATIONS_PATH, include_in_schema=False)
    async def openai_variations() -> JSONResponse:
        """OpenAI's variations (``client.images.create_variation``): not served; says what is (a bare 404 did not)."""
        return JSONResponse(openai_error("image variations are not supported: redraw an image with"
                                         f" {OPENAI_EDITS_PATH} (client.images.edit(image=..., prompt=...),"
                                         " strength sets how far from it)", "image"), 404)

    def listed(facts: ModelFacts) -> OpenAIModel:
        return OpenAIModel(id=facts.name, created=facts.created)

    @app.get(MODELS_PATH, response_model=OpenAIModelList, dependencies=guarded)
    async def list_models() -> OpenAIModelList:
        """The served models, in OpenAI's shape (``client.models.list()``); the first is the default."""
        return OpenAIModelList(data=[listed(facts) for facts in api.models.values()])

    @app.get(MODELS_PATH + "/{model_id}", response_model=OpenAIModel, responses={404: MODEL_NOT_FOUND},
             dependencies=guarded)
    async def get_model(model_id: str) -> OpenAIModel:
        """One served model (``client.models.retrieve(id)``); 404 in OpenAI's shape if not served."""
        return listed(api.model_facts(model_id))

    @app.exception_handler(UnknownModel)
    async def model_not_found(request: Request, exc: UnknownModel) -> JSONResponse:
        body = openai_error(str(exc), "model")
        body["error"]["code"] = "model_not_found"  # OpenAI's code for it
        return JSONResponse(body, 404)

    @app.exception_handler(RequestProblem)
    async def request_problem(request: Request, exc: RequestProblem) -> JSONResponse:
        """A problem found after the route's own checks (the worker could not run the job)."""
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_error(str(exc), exc.field), 400)
        return JSONResponse({"detail": unprocessable(exc).detail}, 422)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((STATIC / "playground.html").read_text(encoding="utf-8"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """413 in the endpoint's shape; on the OpenAI routes every error in OpenAI's."""
        path = request.url.path
        if exc.status_code == 413:  # the body's rest, if any, must not be read as the next request
            return JSONResponse(too_large_body(path, max_body_bytes), 413, headers={"connection": "close"})
        unread = exc.status_code == 400 and exc.detail == UNPARSED  # FastAPI's words for a body its parser failed on
        if path.startswith("/v1/"):  # 400: a body the parsers could not read (bad UTF-8, a multipart without boundary)
            message = (f"the request body could not be read: {unreadable(exc) if unread else exc.detail}"
                       if exc.status_code == 400 else exc.detail)
            kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
            body = unauthorized_body(path) if exc.status_code == 401 else openai_error(str(message), kind=kind)
            return JSONResponse(body, exc.status_code, headers=exc.headers)
        if unread:  # as a body that is not JSON: 422, in the shape of every other bad body here
            return JSONResponse({"detail": [{"loc": ["body"], "msg": unreadable(exc), "type": "json_invalid"}]}, 422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if request.url.path.startswith("/v1/"):
            message, param = openai_validation_message(request, errors)
            return JSONResponse(openai_error(message, param), 400)
        detail = [{"loc": [p[:40] if isinstance(p, str) else p for p in e.get("loc", ())],  # not a 7 MB key back
                   "msg": problem_message(e, GenerateRequest), "type": e.get("type")} for e in errors]
        content_type = request.headers.get("content-type", "")
        if detail and tuple(detail[0]["loc"] or ()) == ("body",) and "json" not in content_type:
            detail[0]["msg"] = not_json(request.url.path, content_type)  # curl -d sends a form
        elif detail and tuple(detail[0]["loc"] or ()) == ("body",) and detail[0]["type"] == "missing":
            detail[0]["msg"] = f"the body is empty: send a JSON object with at least a prompt, e.g. {EXAMPLE_BODY}"
        return JSONResponse({"detail": detail}, 422)

    return server


def queue_timeout(timeout: float) -> HTTPException:
    """LitServe's 504 for a request that waited ``timeout`` seconds for a worker, saying what to do."""
    wait = min(60, max(1, math.ceil(timeout / 2)))  # the backlog was at least ``timeout`` long: not at once
    return HTTPException(504, detail=f"the request waited over {timeout:g} s in the queue for a worker (--timeout):"
                         f" more work came than the server can serve; retry in {wait} s, or serve with a longer"
                         " --timeout, a lower --max-queue or more workers", headers={"Retry-After": str(wait)})


def not_json(path: str, content_type: str) -> str:
    """What a JSON route says of a body sent as something else."""
    return f"{path} takes a JSON body (Content-Type: application/json), not '{content_type or 'no content type'}'"


EXAMPLE_BODY = '{"prompt": "a lighthouse at dusk"}'
SEED_HEADER = "X-Seed"  # on an answer that is the image file itself
UNPARSED = "There was an error parsing the body"  # FastAPI's 400 for any parser error but a JSONDecodeError


def unreadable(exc: StarletteHTTPException) -> str:
    """Why FastAPI could not parse a body (it says only :data:`UNPARSED`; the parser's error is the cause)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (f"the body is not valid JSON: it is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at"
                f" position {cause.start})")
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON: it is nested too deeply"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"the body is not valid JSON: a number in it has over {sys.get_int_max_str_digits()} digits"
    return f"the body is not valid JSON: {first_line(cause)}" if cause is not None else UNPARSED


def problem_message(error: Mapping[str, Any], model: type[BaseModel] | None = None) -> str:
    """One validation error's message as the client should read it: without pydantic's "Value error, "
    before our validators' own words; for a body that is no JSON, where the parser stopped and why; for a
    field ``model`` does not take, the one it looks like (pydantic said 'Extra inputs are not permitted')."""
    loc = tuple(error.get("loc", ()))[1:]  # after "body"
    if error.get("type") == "extra_forbidden" and model is not None and len(loc) == 1:
        return unknown_field_message(str(loc[0]), model)
    if error.get("type") == "json_invalid":
        where = f" at character {loc[0]}" if loc else ""
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}{where}"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


# The edit form's parts OpenAI's API takes and this server refuses, and what they ask for.
UNSUPPORTED_PARTS = {"mask": "inpainting", "markup": "an overlay that guides the edit"}


def unsupported_part(name: str) -> str:
    """The 400's message for a ``mask`` or ``markup`` sent to the edits route."""
    return (f"{name}: {UNSUPPORTED_PARTS[name]} is not supported yet; send the image without a {name} to redraw all"
            " of it (image to image; strength sets how far)")


def openai_validation_message(request: Request, errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """The first problem of a request to an OpenAI route, as OpenAI's error message and parameter."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))[1:]  # after "body"
    content_type = request.headers.get("content-type", "")
    if request.url.path == OPENAI_EDITS_PATH and not content_type.startswith("multipart/form-data"):
        return (f"{OPENAI_EDITS_PATH} takes multipart/form-data (the image as a file, the other parameters as form"
                f" fields), as OpenAI's client sends it, not '{content_type or 'no content type'}'"), None
    if first.get("type") == "json_invalid":
        return problem_message(first), None
    if first.get("type") == "extra_forbidden":  # one unknown name, or (no loc) the count of many
        if len(loc) != 1:
            return problem_message(first), None
        name, edits = str(loc[0])[:40], request.url.path == OPENAI_EDITS_PATH
        if edits and isinstance(first.get("input"), StarletteUploadFile):  # a file under another name
            if (part := name.split("[", 1)[0]) in UNSUPPORTED_PARTS:  # mask[] (a list of masks): refused as mask
                return unsupported_part(part), part
            return (f"image: send the image to start from as the file part named image (e.g. curl -F"
                    f" image=@photo.png); this route takes no part named '{name}'"), "image"
        model, files = (OpenAIEditRequest, ("image",)) if edits else (OpenAIImagesRequest, ())
        return unknown_field_message(name, model, "parameter", files), name
    if not loc and "json" not in content_type:
        return not_json(request.url.path, content_type), None
    if not loc:  # the body as a whole: absent, or not an object
        return f"the body must be a JSON object with at least a prompt, e.g. {EXAMPLE_BODY}: {problem_message(first)}", None
    if loc and loc[0] in ("image", "image[]", "mask", "markup") and "UploadFile" in str(first.get("msg")):
        return (f"{loc[0]}: must be a file part of the multipart body (e.g. curl -F {loc[0]}=@photo.png), not a text"
                " field"), "image" if loc[0] == "image[]" else loc[0]
    if loc == ("prompt",) and first.get("type") == "missing":
        form = " (an empty form field counts as none)" if request.url.path == OPENAI_EDITS_PATH else ""
        return f"prompt: a prompt is required{form}: say what to draw", "prompt"
    param = ".".join(str(p) for p in loc)
    return f"{param}: {problem_message(first)}", param


def default_threads(workers: int) -> int:
    """CPU threads per worker so that workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
