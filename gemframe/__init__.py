"""gemframe: Google Gemini as a polars operation.

Prompt and image columns in; a typed, cached reply struct out::

    import polars as pl, gemframe as gf
    df.with_columns(reply=gf.generate("prompt", images="image_path")).unnest("reply")

Conversations continue with ``gf.generate(..., history=gf.turns("prompt", "reply"))``,
structured output is ``response_schema=``, what to ask can be one ``gf.RequestSpec`` reused by
generate, estimate, manifest and run (``spec=``), and ``gf.show`` / ``gf.save_images`` look at and
keep generated images.
"""

from ._accounting.estimate import Estimate, estimate
from ._accounting.manifest import manifest, read_manifest
from ._accounting.pricing import PRICES, PRICES_AS_OF, cost_expr
from ._accounting.report import Report, report
from ._core.cache import CacheMode, ResponseCache, cache_key, default_cache_dir
from ._core.client import Client
from ._core.payload import RequestBuilder, build_request, sniff_mime
from ._core.progress import RowsFailedWarning
from ._core.providers import DEFAULT_MODEL, GoogleAI, Provider, Segmind, register_provider
from ._core.response import REPLY_DTYPE, reply_dtype
from ._core.spec import RequestSpec
from ._errors import (
    APIError,
    AuthenticationError,
    ConfigError,
    GemframeError,
    InputError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    RowError,
)
from ._pipeline import run
from ._polars import namespace as _namespace  # noqa: F401  (registers the .gemini namespaces)
from ._polars.conversation import HISTORY_DTYPE, turns
from ._polars.display import save_images, show
from ._polars.expr import generate, request, send
from ._version import __version__
from .emulator.provider import EmulatorProvider  # registers the "emulator" provider

__all__ = [
    "DEFAULT_MODEL",
    "HISTORY_DTYPE",
    "PRICES",
    "PRICES_AS_OF",
    "REPLY_DTYPE",
    "APIError",
    "AuthenticationError",
    "CacheMode",
    "Client",
    "ConfigError",
    "EmulatorProvider",
    "Estimate",
    "GemframeError",
    "GoogleAI",
    "InputError",
    "InsufficientCreditsError",
    "NotFoundError",
    "PermissionDeniedError",
    "Provider",
    "Report",
    "RequestBuilder",
    "RequestSpec",
    "ResponseCache",
    "RowError",
    "RowsFailedWarning",
    "Segmind",
    "__version__",
    "build_request",
    "cache_key",
    "cost_expr",
    "default_cache_dir",
    "estimate",
    "generate",
    "manifest",
    "read_manifest",
    "register_provider",
    "reply_dtype",
    "report",
    "request",
    "run",
    "save_images",
    "send",
    "show",
    "sniff_mime",
    "turns",
]
