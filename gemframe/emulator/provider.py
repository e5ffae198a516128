"""`EmulatorProvider`: the Google dialect answered in-process by the offline emulator.

The one module of the emulator that imports gemframe's client side (the provider contract), and
the seam through which the client side reaches the emulator: it registers itself under
``"emulator"`` when imported (``import gemframe`` imports it), so ``gf.Client("emulator")``
finds it in `gemframe._core.providers.PROVIDERS` and the core never imports the emulator. The app
(starlette, Pillow) is imported only when an in-process transport is first needed.
"""

from __future__ import annotations

from typing import Any

import httpx

from .._core.providers import GoogleAI, register_provider

__all__ = ["EmulatorProvider"]


@register_provider
class EmulatorProvider(GoogleAI):
    """The built-in offline emulator, served in-process; no key, no network."""

    name = "emulator"
    default_base_url = "http://emulator"
    key_env = ()
    key_required = False
    capabilities = frozenset({"batch", "count_tokens", "context_cache", "files"})  # the emulator answers them all

    def __init__(self, api_key: str | None = None, base_url: str | None = None, app: Any = None) -> None:
        super().__init__(api_key, base_url)
        self.app = app

    def plaintext_host(self) -> str | None:
        """None: the emulator's key is a test key, whatever the host."""
        return None

    def transport(self) -> httpx.AsyncBaseTransport | None:
        if self.base_url != self.default_base_url:  # an emulator served over TCP
            return None
        if self.app is None:
            from .app import Emulator

            self.app = Emulator()
        return httpx.ASGITransport(app=self.app)
