"""The benchmark's bookkeeping: the table it prints, the time budget and its watchdog (the timers are
``dmd2_kernels.timing``, shared with the kernels' own benchmarks)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from dmd2_kernels.renoise_bench import renoise_table

from .profile import profile_table


class OutOfTime(Exception):
    """Raised by the watchdog when the budget is spent."""


class Report:
    """Rows of the result table, printed as they come and written to JSON at the end."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.out = out

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("row:", json.dumps(row), flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("note:", text, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps({"rows": self.rows, "notes": self.notes}, indent=1))

    def table(self) -> str:
        """The end-to-end rows, batch 1's device time by class of kernel and the kernel rows as markdown tables."""
        lines = ["| arch | batch | backend | ms / batch | ms / image | images / s | vs plain | prepare s | peak GiB | check |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        plain = {(r["arch"], r["batch"]): r["ms"] for r in self.rows if r.get("backend") == "plain"}
        for r in self.rows:
            if "arch" not in r or r.get("kind") == "profile":
                continue
            base = plain.get((r["arch"], r["batch"])) if r.get("kind") != "part" else None
            speed = f"{base / r['ms']:.2f}x" if base and r.get("ms") else ""
            lines.append(f"| {r['arch']} | {r['batch']} | {r['backend']} | {_f(r.get('ms'))} | "
                         f"{_f(r['ms'] / r['batch'] if r.get('ms') else None)} | {_f(r.get('images_per_s'), 1)} | {speed} | "
                         f"{_f(r.get('prepare_s'), 1)} | "
                         f"{_f(r.get('peak_gib'), 1)} | {r.get('check', '')} |")
        kernel = any(r.get("kind", "").startswith("renoise") for r in self.rows)
        for table in (profile_table(self.rows), renoise_table(self.rows) if kernel else ""):
            if table:
                lines += ["", table]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _f(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

class Budget:
    """Seconds left for the run; stages that would not fit are skipped with a note."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.end = time.perf_counter() + seconds
        self.report = report

    def left(self) -> float:
        return self.end - time.perf_counter()

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"skipped {what} and everything after it in its stage: {self.left():.0f} s left,"
                            f" about {seconds:.0f} s needed")


def _watchdog(seconds: float) -> None:
    def fire(signum: int, frame: Any) -> None:
        raise OutOfTime(f"the {seconds:.0f} s budget ran out mid-stage")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(max(1, int(seconds)))
