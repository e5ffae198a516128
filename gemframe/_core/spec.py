"""What to ask: `RequestSpec`, the options every row's request shares, validated once.

The model, system instruction, generationConfig, safety settings, response schema and sample
index describe *what* is asked, whichever face asks it: ``gf.generate``, ``gf.request``,
``gf.estimate``, ``gf.manifest``, ``gf.run``, ``gemframe.ray`` and the CLI. Each face builds
one `RequestSpec` (or takes the user's, ``spec=``) and hands it down; nothing below the face
declares or checks these options again. *How* to run (client, cache mode, progress, image_dir,
raw, batch mode) stays with each call: those differ per face and decide nothing about the
request body or its cache key.

The options are declared once, here: as the fields of `RequestSpec` and, for the keywords the
faces accept (``gf.generate("p", system=..., config=...)``), as the `Ask` TypedDict that types
their ``**ask`` (checkers see every keyword and its type) and `asks`, which lists the keywords
in the faces' ``help()``/``inspect.signature``. A new option is one field here, one `Ask` key,
and what it does to the body in `RequestSpec.__post_init__`.
"""

from __future__ import annotations

import base64
import copy
import difflib
import hashlib
import inspect
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict, TypeVar

from .._errors import ConfigError
from .payload import RequestBuilder, context_content, normalize_config, normalize_safety
from .schema import ResponseSchema
from .schema import response_schema as translate_schema

# The faces annotate ``**ask: Unpack[Ask]``; a runtime name, so typing.get_type_hints reads them.
if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover  (Python 3.10: typing_extensions, which anyio and aiohttp install there)
    try:
        from typing_extensions import Unpack
    except ImportError:  # only checkers need it: the annotations are strings
        Unpack = None  # type: ignore[assignment]  # a runtime stand-in: checkers use the import above

__all__ = ["ASK", "Ask", "RequestSpec", "Unpack", "asks", "request_spec"]

Safety = Mapping[str, str] | Sequence[Mapping[str, str]]
"""``{category: threshold}`` or a list of ``{"category", "threshold"}`` dicts."""


@dataclass(frozen=True)
class RequestSpec:
    """What to ask, for every row: one validated object to build once and reuse.

    ``model`` (None: the client's), ``system`` (the system instruction), ``context`` (shared
    leading material for every row: text, and files as ``pathlib.Path``, bytes or image structs,
    alone or in a list; sent as the first user turn of every request, before a row's history,
    or once by ``cachedContents`` with ``gf.Client(cache_context=...)``), ``config`` (a
    generationConfig, snake_case or camelCase keys), ``safety`` (harm categories to
    thresholds, short names accepted), ``response_schema`` (a polars dtype, a
    dataclass/TypedDict or a JSON-schema dict: asks for JSON and adds a typed ``parsed`` reply
    field) and ``sample`` (a distinct cached answer for the same request).

    Everything is checked when the spec is made (a `ConfigError` naming the fix), before any
    row is read or anything is sent; ``config`` and ``safety`` are stored normalized (camelCase
    keys, full category names). The same spec gives ``gf.generate``, ``gf.request``,
    ``gf.estimate``, ``gf.manifest``, ``gf.run`` and ``gemframe.ray.generate`` the same
    requests and cache keys::

        spec = gf.RequestSpec(system="Be terse.", config={"temperature": 0})
        print(gf.estimate(df, spec=spec, client=client))
        out = df.with_columns(reply=gf.generate("prompt", spec=spec, client=client))
        m = gf.manifest(out, spec=spec, client=client)

    Keywords given with ``spec=`` override its fields (``spec=spec, sample=1``). Treat a spec's
    ``config``/``safety`` as read-only; ``dataclasses.replace`` makes a changed (re-checked) copy.
    """

    model: str | None = None
    system: str | None = None
    config: Mapping[str, Any] | None = None
    safety: Safety | None = None
    response_schema: Any = None
    sample: int = 0
    context: Any = None  # last: the fields before it keep their positions
    # Derived once, at construction: the translated schema and the builder of request bodies.
    schema: ResponseSchema | None = field(init=False, repr=False, compare=False)
    builder: RequestBuilder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ConfigError(f"model must be a model id such as 'gemini-2.5-flash', not {self.model!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise ConfigError(f"system must be a string (the system instruction), not {type(self.system).__name__}")
        try:
            sample = operator.index(self.sample)
        except TypeError:
            sample = -1
        if isinstance(self.sample, bool) or sample < 0:
            raise ConfigError(f"sample must be an integer >= 0 (which cached answer to use), not {self.sample!r}")
        config = normalize_config(self.config)
        safety = normalize_safety(self.safety)
        context = context_content(self.context)  # files read (and checked) here, once
        schema = translate_schema(self.response_schema) if self.response_schema is not None else None
        set_ = object.__setattr__  # frozen: the normalized values are set once, here
        set_(self, "sample", sample)
        set_(self, "config", config)
        set_(self, "safety", safety)
        set_(self, "schema", schema)
        # The builder merges the schema into the config (refusing it twice) and shares the rest.
        set_(self, "builder", RequestBuilder.normalized(self.system, config, safety, schema, context))

    def with_sample(self, sample: int) -> RequestSpec:
        """The same spec asking for another sample index (nothing else changes, nothing is
        checked again): ``gf.run(samples=N)`` asks with ``sample``, ``sample + 1``, ..."""
        if sample == self.sample:
            return self
        other = copy.copy(self)
        object.__setattr__(other, "sample", operator.index(sample))
        return other

    def model_for(self, default: str) -> str:
        """The model asked: this spec's, else ``default`` (the client's)."""
        return self.model or default

    def describe(self, default_model: str) -> dict[str, Any]:
        """What a run manifest records of the spec: model, system, config and safety as sent
        (normalized); ``response_schema`` (its generationConfig part) and ``sample`` only when
        set, so a manifest without them reads as before."""
        out: dict[str, Any] = {
            "model": self.model_for(default_model),
            "system": self.system,
            "config": self.config,
            "safety": self.safety,
        }
        if self.schema is not None:
            out["response_schema"] = self.schema.config
        if self.sample:
            out["sample"] = self.sample
        if self.builder.context is not None:
            out["context"] = describe_context(self.builder.context)
        return out


def describe_context(content: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a manifest records of the context turn: each text part's length and each file's
    MIME type, size and sha256 (never the bytes: a context may be megabytes)."""
    out: list[dict[str, Any]] = []
    for part in content["parts"]:
        if "text" in part:
            out.append({"text_chars": len(part["text"]), "sha256": hashlib.sha256(part["text"].encode()).hexdigest()})
        else:
            inline = part["inlineData"]
            data = base64.b64decode(inline["data"])
            out.append(
                {"mime_type": inline["mimeType"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    return out


class Ask(TypedDict, total=False):
    """The `RequestSpec` options as keywords: what ``gf.generate``, ``gf.request``,
    ``gf.estimate``, ``gf.manifest``, ``gf.run`` and ``gemframe.ray`` take as ``**ask``."""

    model: str | None
    system: str | None
    config: Mapping[str, Any] | None
    safety: Safety | None
    response_schema: Any
    sample: int
    context: Any


ASK = tuple(f.name for f in fields(RequestSpec) if f.init)
"""The names of the options (`RequestSpec`'s fields, `Ask`'s keys)."""
assert set(ASK) == set(Ask.__annotations__), "RequestSpec's fields and Ask's keys are the same options"


def request_spec(spec: RequestSpec | None, ask: Mapping[str, Any], where: str) -> RequestSpec:
    """The spec a face asks with: ``spec`` as given, one made from its keywords, or ``spec``
    with the keywords replacing its fields. The only place a face turns options into a spec,
    so they are checked once per call, when the call (or the expression) is made."""
    unknown = [k for k in ask if k not in ASK]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ASK, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}{hint}")
    if spec is None:
        return RequestSpec(**ask)
    if not isinstance(spec, RequestSpec):
        raise ConfigError(f"{where}: spec must be a gf.RequestSpec, not {type(spec).__name__}")
    return replace(spec, **ask) if ask else spec


F = TypeVar("F", bound=Callable[..., Any])


def asks(function: F) -> F:
    """Show the `Ask` keywords in ``function``'s signature, as ``help()``, notebooks and
    ``inspect.signature`` read it: in place of its ``**ask``, or before another ``**kwargs``
    (which then takes them: see `gemframe.ray.generate`). Declared once, listed everywhere."""
    signature = inspect.signature(function)
    params = list(signature.parameters.values())
    rest = [p for p in params[-1:] if p.kind is inspect.Parameter.VAR_KEYWORD and p.name != "ask"]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields(RequestSpec)
        if f.init
    ]
    function.__signature__ = signature.replace(parameters=params + rest)  # type: ignore[attr-defined]
    return function
