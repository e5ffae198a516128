"""The offline Gemini emulator (see `gemframe.emulator.app`)."""

from __future__ import annotations

from typing import Any

__all__ = ["Emulator", "Stats", "serve"]


def __getattr__(name: str) -> Any:
    """Load the app (starlette, Pillow) only when it is first asked for."""
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
