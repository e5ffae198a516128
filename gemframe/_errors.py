"""One rooted hierarchy of exceptions, so a user can catch `GemframeError` and nothing else.

Per-row problems never raise: they land in the row's ``error`` field (see `RowError`). These
exceptions are for whole-call problems: bad input found before anything is sent, and API answers
that would fail every row the same way (bad key, no credits, unknown model). At the end, the
two helpers every message and display shares: `clip` and `exception_text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class GemframeError(Exception):
    """Root of every error gemframe raises."""


class InputError(GemframeError, ValueError):
    """The frame or an argument is unusable; raised before any request is sent."""


class ConfigError(InputError):
    """A generation config, safety setting or client option is invalid."""


class APIError(GemframeError):
    """The API refused the whole run (bad key, forbidden, unknown model, no credits).

    Built from one message string like every exception (polars re-raises errors from inside an
    expression by calling the class with the message alone); the parts are attributes.
    """

    def __init__(
        self, text: str, *, code: int | None = None, status: str = "", message: str = "", hint: str = ""
    ) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.message = message or text
        self.hint = hint

    @classmethod
    def from_answer(cls, code: int | None, status: str, message: str, hint: str = "") -> APIError:
        """The error for an API answer: ``"401 UNAUTHENTICATED: <message>\n<what to fix>"``."""
        text = f"{code} {status}: {message}" if code else f"{status}: {message}"
        return cls(f"{text}\n{hint}" if hint else text, code=code, status=status, message=message, hint=hint)


class AuthenticationError(APIError):
    """The API key is missing, invalid or revoked."""


class PermissionDeniedError(APIError):
    """The key is valid but not allowed to use this model or endpoint."""


class NotFoundError(APIError):
    """The endpoint or model does not exist (or was retired)."""


class InsufficientCreditsError(APIError):
    """The account has no credits or hit its spend limit (Segmind 406)."""


@dataclass(frozen=True)
class RowError:
    """A per-row failure, stored in the reply struct's ``error`` field."""

    code: int | None
    status: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "message": self.message}


def exception_text(exc: BaseException) -> str:
    """An unexpected exception for a row's error message: its type (with its module when not a
    builtin: ``binascii.Error`` says more than ``Error``) and its message."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {exc}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # left after whitespace collapses: ESC, BEL, C1 codes


def clip(value: Any, limit: int) -> str:
    """A value as one short line, for a message or a display: whitespace runs become one space,
    any other control character "?" (no terminal escape from a hostile value), a text over
    ``limit`` characters is cut to ``limit`` ending in "…", None (a null cell) is "∅". Bytes (an
    answer's body) are decoded from their first ``4 * limit`` bytes only, so a huge or hostile
    body is never read whole to quote a line of it."""
    if value is None:
        return "∅"
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value[: 4 * limit]).decode("utf-8", "replace")
    text = _CONTROL.sub("?", " ".join(str(value).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
