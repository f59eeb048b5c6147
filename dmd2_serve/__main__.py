"""Command line: ``python -m dmd2_serve [--model DIR] [--host H] [--port P] ...``.

With no arguments it serves the bundled digits generator on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from . import BUNDLED_DIGITS_GENERATOR

    p = argparse.ArgumentParser(prog="python -m dmd2_serve", description="Serve a few-step generator over HTTP.")
    p.add_argument("--model", type=Path, default=BUNDLED_DIGITS_GENERATOR, help="exported generator folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per forward batch")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds to wait to fill a batch")
    p.add_argument("--bucket", type=int, default=8, help="images per forward pass (fixed, padded)")
    p.add_argument("--devices", default="auto", help="number of devices, or auto")
    p.add_argument("--workers-per-device", type=int, default=1)
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 503")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait before 504")
    p.add_argument("--api-key", default=os.environ.get("DMD2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $DMD2_API_KEY)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; a bad argument prints one line and exits 2."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .metrics import ensure_multiprocess_dir

    ensure_multiprocess_dir()  # before any worker starts, so they inherit it
    from .api import build_server, default_threads
    from .backbones import ModelFolderError, read_meta

    try:
        meta = read_meta(args.model)
        if "timesteps" not in meta:
            raise ModelFolderError(f"'{args.model}' is a teacher, not a distilled generator (no recorded schedule)")
        for name in ("max_batch_size", "bucket", "workers_per_device", "max_queue"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 1 <= args.port <= 65535:
            raise ValueError("--port must be between 1 and 65535")
        devices = args.devices if args.devices == "auto" else int(args.devices)
        server = build_server(
            args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, bucket=args.bucket,
            api_key=args.api_key, devices=devices, workers_per_device=args.workers_per_device,
            accelerator=args.accelerator, max_queue=args.max_queue, timeout=args.timeout,
            threads=default_threads(args.workers_per_device) if args.accelerator != "cuda" else None,
        )
    except (ModelFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.run(host=args.host, port=args.port, num_api_servers=1, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
