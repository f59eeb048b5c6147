"""Import-time warnings of optional libraries that say nothing about this project's work.

With torchao installed (the ``fp8`` and ``lowmem`` extras), the first diffusers model import brings
in diffusers' torchao quantizer, which imports torchao. torchao then warns for each CUDA extension
built for another torch or Python (``Failed to load .../torchao/_C_mxfp8...so``: MX and CUTLASS
kernels this project never calls; its fp8 path is ``torch._scaled_mm``), diffusers warns that
torchao's checkpoint tensor classes moved (it only matters for checkpoints saved quantised by
torchao, which this project does not write), and torch warns about the Enums torchao registers.
On every start of the server, its workers and the trainer those lines read like a broken install.
:func:`quiet_import_noise` drops exactly those records; every other warning of these loggers stays.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable


def _from_torchao(record: logging.LogRecord) -> bool:
    """Whether the record's first argument (torch's Enum notice names the class it was given) is torchao's."""
    args = record.args if isinstance(record.args, tuple) else ()
    return bool(args) and str(getattr(args[0], "__module__", "")).startswith("torchao")


# logger name -> the messages dropped from it, and what else a record must be to be dropped
NOISE: dict[str, tuple[re.Pattern[str], Callable[[logging.LogRecord], bool] | None]] = {
    "torchao": (re.compile(r"Failed to load .*torchao[/\\]_C"), None),
    "diffusers.quantizers.torchao.torchao_quantizer": (re.compile(r"Unable to import `torchao` Tensor objects"), None),
    # the same notice for another library's Enum stays
    "torch.utils._pytree": (re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
                            _from_torchao),
}


class _DropNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern[str], also: Callable[[logging.LogRecord], bool] | None) -> None:
        super().__init__()
        self.pattern, self.also = pattern, also

    def filter(self, record: logging.LogRecord) -> bool:
        noise = self.pattern.search(record.getMessage()) and (self.also is None or self.also(record))
        return not noise


def quiet_import_noise() -> None:
    """Attach a filter for :data:`NOISE` to each of its loggers (once; nothing is imported)."""
    for name, (pattern, also) in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(pattern, also))
