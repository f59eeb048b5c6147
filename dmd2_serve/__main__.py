"""Command line: ``python -m dmd2_serve [--model [NAME=]DIR ...] [--lora-dir [NAME=]DIR] [--host H] [--port P] ...``.

With no arguments it serves the bundled digits generator on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size or a comma-separated list of sizes") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("bucket sizes must be at least 1")
    return sizes


def _named_folder(text: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a bare ``DIR`` -> (None, DIR). An existing path is taken whole."""
    name, sep, folder = text.partition("=")
    if not sep or Path(text).exists():
        return None, Path(text)
    if not (folder and MODEL_NAME.fullmatch(name)):
        raise argparse.ArgumentTypeError(
            f"'{text}' is neither a folder nor NAME=DIR: a name is letters, digits, '.', '_' or '-' (for example"
            " sd=/models/sd15), and a folder follows the '='")
    return name, Path(folder)


def _served(specs: list[tuple[str | None, Path]]) -> dict[str, Path]:
    """Model name -> folder, in the order given (the first is the default); a bare folder is named by its name."""
    models: dict[str, Path] = {}
    for name, folder in specs:
        name = name or folder.name or folder.resolve().name
        if name in models:
            raise ValueError(f"two models are named '{name}'; name them apart: --model a={models[name]}"
                             f" --model b={folder}")
        models[name] = folder
    return models


def _lora_dirs(specs: list[tuple[str | None, Path]], models: dict[str, Path]) -> dict[str, Path]:
    """Model name -> its LoRA folder; a bare folder serves the default (first) model."""
    dirs: dict[str, Path] = {}
    for name, folder in specs:
        name = name or next(iter(models))
        if name in dirs:
            raise ValueError(f"two --lora-dir for the model '{name}'; give one folder per model")
        dirs[name] = folder
    return dirs


HOSTS = {"127.0.0.1": "this machine only", "0.0.0.0": "every IPv4 interface", "::": "every interface"}


def _host(text: str) -> str:
    """An argparse type: an address LitServe can listen on (it takes these three; localhost is the first)."""
    host = "127.0.0.1" if text == "localhost" else text
    if host not in HOSTS:
        raise argparse.ArgumentTypeError(
            f"{text}: LitServe listens on {', '.join(HOSTS)} only; to reach one interface alone, listen on"
            " 127.0.0.1 behind a reverse proxy (or a firewall rule) on that interface")
    return host


def _devices(text: str) -> str | int:
    """An argparse type: auto or a number of devices, 1 or more."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a number of devices, 1 or more, or auto")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    from . import BUNDLED_DIGITS_GENERATOR

    p = argparse.ArgumentParser(prog="python -m dmd2_serve", description="Serve a few-step generator over HTTP.",
                                allow_abbrev=False)  # --workers must not pass for --workers-per-device
    p.add_argument("--model", type=_named_folder, action="append", metavar="[NAME=]DIR",
                   help="exported generator folder, or its lora/ folder (a LoRA run: served on the teacher it names);"
                        " repeat to serve several, chosen per request by 'model' (default: the first; a bare DIR is"
                        f" named by its folder name; default: the bundled {BUNDLED_DIGITS_GENERATOR.name})")
    p.add_argument("--lora-dir", type=_named_folder, action="append", metavar="[NAME=]DIR",
                   help="a folder of exported LoRA folders that requests to model NAME (default: the first) may name"
                        " with 'lora'; added to the model per request (needs --backend eager); once per model")
    p.add_argument("--lora-cache", type=int, default=4, metavar="N",
                   help="LoRA adapters kept loaded per model; the least recently used is dropped for the next"
                        " (default 4)")
    p.add_argument("--host", type=_host, default="127.0.0.1",
                   help=f"address to listen on: {', '.join(f'{h} ({w})' for h, w in HOSTS.items())}; default 127.0.0.1")
    p.add_argument("--port", type=int, metavar="PORT", default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch-size", type=int, metavar="N", default=8, help="requests per forward batch (default 8)")
    p.add_argument("--batch-timeout", type=float, metavar="S", default=0.0,
                   help="seconds a batch waits for more requests once it has taken every waiting one (default 0:"
                        " none; at one client the wait is pure latency, under load the queue fills the batches)")
    p.add_argument("--bucket", type=_sizes, default=(8,), metavar="N[,N...]",
                   help="images per forward pass, padded: one size (a seed's pixels never depend on its batch)"
                        " or several, e.g. 1,4,16 (lower latency for small batches; equal within float rounding)")
    p.add_argument("--backend", default="eager", choices=["eager", "compile", "aoti", "tensorrt"],
                   help="how the UNet and VAE decoder run: eager PyTorch, torch.compile, the same code compiled ahead"
                        " of time by AOTInductor (a restart loads it without tracing: faster warm starts), or"
                        " TensorRT engines")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention kernels")
    p.add_argument("--compile-cache", type=Path, metavar="DIR", default=None,
                   help="folder for compiled artefacts (Inductor's caches, AOTInductor packages) and TensorRT"
                        " engines (default: $DMD2_CACHE_DIR or ~/.cache/dmd2-fast)")
    p.add_argument("--compile-scope", default="full", choices=["full", "regional"],
                   help="with --backend compile: the whole UNet and decoder, or only their repeated blocks"
                        " (much faster to compile)")
    p.add_argument("--compile-tuning", default="default", choices=["default", "decoder", "all"],
                   help="with --backend compile or aoti: Inductor's max-autotune for the VAE decoder, or for the UNet"
                        " too (faster kernels, minutes more compiling; cached like the rest)")
    p.add_argument("--compile-freeze", action="store_true",
                   help="with --backend compile: Inductor's freezing, the weights compiled in as constants (folded"
                        " and laid out once; on the CPU the UNet runs about twice as fast, but every start compiles"
                        " again)")
    p.add_argument("--vae-slicing", action="store_true",
                   help="decode a batch one image at a time (image to image's encode too): one batch-1 decoder graph"
                        " serves every bucket (compile, aoti) and the decode needs one image's memory")
    p.add_argument("--subpixel-upsample", action="store_true",
                   help="compute the UNet's and the VAE decoder's upsamplers (repeat each pixel, then a 3x3"
                        " convolution) as one stride-2 transposed convolution of the small image: the same sums,"
                        " 4/9 of the multiply-adds (not with LoRA adapters or tensorrt)")
    p.add_argument("--compile-text-encoder", action="store_true",
                   help="with --backend compile or aoti: torch.compile the prompt encoder(s) too (fewer launches per"
                        " request; seconds more at start)")
    p.add_argument("--graph-text-encoder", action="store_true",
                   help="run the prompt encoder(s) inside each batch's CUDA graph, from the token ids (SD and SDXL"
                        " families; one replay instead of a launch per op; falls back with a warning if a capture"
                        " fails)")
    p.add_argument("--precision", default="default", choices=["default", "fp8"],
                   help="default: float16 UNet on CUDA (float32 on the CPU); fp8: float8 matmuls in the UNet's"
                        " attention blocks through torchao (GPUs of compute capability 8.9+; pip install"
                        " 'dmd2-fast[fp8]')")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="do not capture the sampling loop in CUDA graphs")
    p.add_argument("--devices", type=_devices, metavar="N|auto", default="auto",
                   help="GPUs to serve on, one inference worker set each: a number, or auto (every visible GPU; one"
                        " CPU worker without a GPU)")
    p.add_argument("--workers-per-device", type=int, metavar="N", default=1,
                   help="inference workers per device, each with its own copy of the model (default 1)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda")
    p.add_argument("--max-queue", type=int, metavar="N", default=64,
                   help="requests admitted at once; more get 503 (default 64)")
    p.add_argument("--max-body-mb", type=float, metavar="MB", default=8.0,
                   help="largest request body in MiB (an input image, base64 or uploaded, is most of it); larger: 413"
                        " (default 8)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds an admitted request's body may take to arrive whole before 408 (a stalled or"
                        " trickling upload gives its queue place back; default 30)")
    p.add_argument("--timeout", type=float, metavar="S", default=30.0,
                   help="seconds a request may wait in the queue before 504 (-1: no limit; default 30)")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, SIGINT or SIGHUP: stop admitting (503, /health 503) and give the requests already"
                        " admitted up to S seconds to finish before stopping (a process manager's stop timeout"
                        " should exceed it by ~10 s; default 30)")
    p.add_argument("--no-metadata", dest="metadata", action="store_false",
                   help="do not write the prompt, seed, steps and model into the image files (PNG 'parameters' text,"
                        " EXIF UserComment for JPEG and WebP)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("DMD2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $DMD2_API_KEY)")
    return p


def _stop_starting(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP before the server takes over its signals (while torch imports, models are checked):
    stop at once, with exit handlers. As PID 1 of a container, without a handler, the kernel ignored it until
    the runtime's SIGKILL."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad argument prints one line and exits 2."""
    previous = {sig: signal.signal(sig, _stop_starting) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .server.metrics import ensure_multiprocess_dir

    ensure_multiprocess_dir()  # before any worker starts, so they inherit it
    from . import BUNDLED_DIGITS_GENERATOR
    from .model.adapters import ModelFolderError
    from .model.backends import BackendError, FastPath, check_fast_path
    from .server.api import build_server, default_threads
    from .server.models import check_servable

    try:
        models = _served(args.model or [(None, BUNDLED_DIGITS_GENERATOR)])
        for folder in models.values():
            check_servable(folder)
        lora_dirs = _lora_dirs(args.lora_dir or [], models)
        fast = FastPath(backend=args.backend, attention=args.attention, cache_dir=args.compile_cache,
                        cuda_graphs=args.cuda_graphs, compile_scope=args.compile_scope,
                        tuning=args.compile_tuning, precision=args.precision,
                        text_encoder=args.compile_text_encoder, text_in_graph=args.graph_text_encoder,
                        freeze=args.compile_freeze, vae_slicing=args.vae_slicing,
                        subpixel_upsample=args.subpixel_upsample)
        check_fast_path(fast)  # a missing optional install fails here, before any worker starts
        for name in ("max_batch_size", "workers_per_device", "max_queue"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not args.max_body_mb > 0:
            raise ValueError("--max-body-mb must be a positive number of MiB")
        if not 1024 <= args.port <= 65535:  # LitServe's own range: it refused a lower one with a traceback
            raise ValueError(f"--port must be between 1024 and 65535, not {args.port} (serve on a high port and"
                             " map the low one to it: a proxy, or docker run -p 80:8000)")
        if not args.grace >= 0:
            raise ValueError("--grace must be a number of seconds, 0 or more")
        if not args.body_timeout > 0:
            raise ValueError("--body-timeout must be a positive number of seconds")
        if not (args.timeout > 0 or args.timeout == -1):
            raise ValueError("--timeout must be a positive number of seconds, or -1 for none")
        _check_api_key(args.api_key)
        if args.accelerator == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--accelerator cuda, but torch sees no CUDA device (torch.cuda.is_available() is"
                                 " False): check the driver and CUDA_VISIBLE_DEVICES, or use --accelerator auto")
        devices = args.devices
        if isinstance(devices, int) and args.accelerator != "cpu":
            import torch

            if torch.cuda.is_available() and torch.cuda.device_count() < devices:  # a worker on a GPU that is not here
                raise ValueError(f"--devices {devices}, but torch sees {torch.cuda.device_count()} CUDA device(s)"
                                 " (CUDA_VISIBLE_DEVICES narrows them): give at most that many, or --devices auto")
        check_port_free(args.host, args.port)  # before the model loads: uvicorn's own says only "Errno 98"
        server = build_server(
            models, lora_dirs=lora_dirs, lora_cache=args.lora_cache, max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout, bucket=args.bucket,
            api_key=args.api_key, devices=devices, workers_per_device=args.workers_per_device,
            accelerator=args.accelerator, max_queue=args.max_queue, timeout=args.timeout,
            max_body_bytes=int(args.max_body_mb * 2**20), body_timeout_s=args.body_timeout,
            threads=default_threads(args.workers_per_device) if args.accelerator != "cuda" else None, fast=fast,
            metadata=args.metadata,
        )
    except (ModelFolderError, BackendError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .server.lifecycle import say

    say("an API key is required on the generation and model routes" if args.api_key else
        "no API key: every route is open to whoever reaches this port (--api-key or DMD2_API_KEY to require one)")
    return server.serve(host=args.host, port=args.port, grace_s=args.grace)


def check_port_free(host: str, port: int) -> None:
    """``ValueError`` naming the address when another process listens on it (bound as uvicorn binds)."""
    import errno
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # no IPv6: raises here
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        why = "is in use by another process" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise ValueError(f"{host}:{port} {why}: stop that process or give another --port") from None


def _check_api_key(key: str | None) -> None:
    """An empty key (an unset shell variable in --api-key "$KEY") would serve without authentication;
    a key outside printable ASCII could never arrive in an HTTP header."""
    if key is None:
        return
    if not key.strip():
        raise ValueError("the API key is empty (--api-key '' or DMD2_API_KEY='': an unset variable?); give the key,"
                         " or neither to serve without authentication")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ValueError("the API key must be printable ASCII without spaces (HTTP headers carry nothing else)")


if __name__ == "__main__":
    sys.exit(main())
