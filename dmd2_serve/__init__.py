"""dmd2_serve: run few-step generators. A library first, then a server.

    model/    the model side: backbone adapters (one per family), the schedule, the sampling
              loop, the pipeline and its fast-path backends;
    server/   the HTTP side: the LitServe API, middleware, schemas, metrics, launching, load test;
    bench/    the GPU benchmark of the fast path.

``from dmd2_serve import FewStepPipeline`` loads a generator folder as a library (torch is
imported on first use of the name, so the command line starts fast).
"""

from pathlib import Path
from typing import Any

from .import_noise import quiet_import_noise

quiet_import_noise()  # torchao's import warnings about kernels this project never calls (see import_noise)

# The generator distilled from the bundled digits teacher by ``python -m dmd2_train --preset digits``.
BUNDLED_DIGITS_GENERATOR = Path(__file__).parent / "assets" / "digits-generator"

__all__ = ["BUNDLED_DIGITS_GENERATOR", "FewStepPipeline"]


def __getattr__(name: str) -> Any:
    if name == "FewStepPipeline":
        from .model.pipeline import FewStepPipeline

        return FewStepPipeline
    raise AttributeError(f"module 'dmd2_serve' has no attribute {name!r}")
