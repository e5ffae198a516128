"""The progress bar: rows done out of a total known up front, with cache hits, errors and
tokens as postfix. ``tqdm.auto`` gives notebooks the widget and terminals the text bar."""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

_POSTFIX_SECONDS = 0.25


class Progress:
    """Counts answered rows; draws a bar unless disabled."""

    def __init__(self, total: int | None, enabled: bool, model: str, owned: bool = False) -> None:
        self.owned = owned  # closed by the call that made it
        self.rows = 0
        self.cached = 0
        self.errors = 0
        self.tokens = 0
        self._bar = tqdm(total=total, desc=f"gemframe {model}", unit="row", dynamic_ncols=True) if enabled else None
        self._postfix_at = 0.0
        self._status: dict[str, str] = {}

    def advance(self, record: dict[str, Any]) -> None:
        self.rows += 1
        if record.get("cached"):
            self.cached += 1
        elif record.get("total_tokens"):
            self.tokens += record["total_tokens"]
        if record.get("error") is not None:
            self.errors += 1
        if self._bar is not None:
            self._bar.update(1)
            now = time.monotonic()
            if now - self._postfix_at > _POSTFIX_SECONDS:
                self._postfix_at = now
                self._bar.set_postfix(self.postfix(), refresh=False)

    def postfix(self) -> dict[str, Any]:
        return {"cached": self.cached, "errors": self.errors, "tokens": self.tokens, **self._status}

    def status(self, **fields: str) -> None:
        """Extra postfix fields, e.g. a batch job's state."""
        self._status.update(fields)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self.postfix(), refresh=False)
            self._bar.close()
            self._bar = None
