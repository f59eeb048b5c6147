"""A terminal that hung up: after SIGHUP (an SSH session or terminal closed), every write to it fails
with EIO, so a process that goes on to drain or save would die on its next message instead."""

from __future__ import annotations

import os
import stat


def leave_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal (a character device); files and
    pipes (a log, systemd's journal) keep them."""
    devnull = None
    for fd in (1, 2):
        try:
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                devnull = os.open(os.devnull, os.O_WRONLY) if devnull is None else devnull
                os.dup2(devnull, fd)
        except OSError:
            pass
    if devnull is not None:
        os.close(devnull)
