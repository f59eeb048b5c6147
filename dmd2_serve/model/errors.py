"""The errors a user's model folder, file or fast-path choice can cause, with messages that say how to fix them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModelFolderError(ValueError):
    """A teacher or generator (folder or single file) that cannot be used; the message says how to fix it."""


class BackendError(RuntimeError):
    """A backend, attention or precision choice that cannot run here; the message says how to fix it."""


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no message): what a one-line message quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def close_names(name: str, names: Iterable[str], n: int = 1) -> list[str]:
    """The names among ``names`` that ``name`` looks like a typo of, closest first (at most ``n``): what a
    "did you mean" offers for an unknown key, field or folder."""
    return difflib.get_close_matches(name, list(names), n=n, cutoff=0.75)


def described(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an error (its first ``limit`` characters), or its type's name alone."""
    return f"{type(e).__name__}: {first_line(e)[:limit]}" if str(e).strip() else type(e).__name__
