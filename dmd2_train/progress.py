"""Training progress: tqdm's bar on a terminal (or in a notebook); in a log file, a plain line now and then.

tqdm redraws its bar with carriage returns several times a second. A terminal shows one line; a log
file (SLURM's ``slurm-*.out``, ``docker logs``, the systemd journal, ``nohup``) keeps every redraw on
one ever-growing line: the bundled 5-minute run wrote 150 KB of it, a day's SDXL run megabytes that
no one can read. Off a terminal, :class:`LineProgress` writes tqdm's own meter (steps, percentage,
elapsed, remaining, rate, the latest losses) as one line every ``interval`` seconds, and at the end.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close``, written as whole lines at most every ``interval`` s."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", interval: float = 30.0) -> None:
        self.total, self.n, self.initial, self.desc, self.unit = total, initial, initial, desc, unit
        self.interval = interval
        self.started = self.said_at = time.monotonic()
        self.said_n = initial
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.said_at >= self.interval:
            self._say()

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **more}.items())

    def close(self) -> None:
        if self.n != self.said_n:
            self._say()

    def line(self) -> str:
        """The meter as it stands (tqdm's ``format_meter``: the rate counts this start's steps only)."""
        meter = tqdm.format_meter(self.n, self.total, time.monotonic() - self.started, prefix=self.desc,
                                  unit=self.unit, postfix=self.postfix or None, initial=self.initial,
                                  bar_format=LINE_FORMAT)
        return re.sub(r" {2,}", " ", meter)  # (tqdm pads its numbers for a bar redrawn in place)

    def _say(self) -> None:
        self.said_at, self.said_n = time.monotonic(), self.n
        try:
            print(self.line(), file=sys.stderr, flush=True)
        except OSError:  # a terminal that hung up: training goes on without its progress lines
            pass


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False,
             interval: float = 30.0) -> Any:
    """A progress meter for ``total`` steps from ``initial``: tqdm's bar where one is drawn in place (a
    terminal, a notebook), else :class:`LineProgress`; ``disable``: tqdm's, silent (the other processes)."""
    if disable or sys.stderr.isatty() or "ipykernel" in sys.modules:
        return auto_tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return LineProgress(total, initial, desc, unit, interval)
