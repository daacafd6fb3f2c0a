"""Paths as the user wrote them and as the process uses them."""

from __future__ import annotations

from pathlib import Path


def resolved(path: str) -> str:
    """``path`` as the process will use it, saying what a relative one was resolved against."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    return f"{Path.cwd() / p} ({path!r} is relative: resolved against the working directory)"
