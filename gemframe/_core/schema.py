"""Structured output: ``response_schema=`` → the generationConfig Gemini needs, the polars dtype
of the parsed reply (known before anything is sent), and the parser that checks each reply.

A schema may be given as

- a **polars dtype** (``pl.Struct``, ``pl.List``/``pl.Array``, ``pl.String``, ``pl.Enum``,
  ``pl.Categorical``, integer, float and ``pl.Boolean``, nested): sent as ``responseSchema``
  with every struct field required;
- a **Python type**: a dataclass or TypedDict (nested), ``str``/``int``/``float``/``bool``,
  ``list[T]``, ``Optional[T]`` (nullable), ``Literal["a", "b"]`` or an ``enum.Enum`` (an enum,
  typed ``pl.Enum``): sent as ``responseSchema``; a field is required unless it has a default
  (dataclass) or is ``NotRequired`` (TypedDict). A pydantic model goes through its JSON schema;
- a **dict**: Gemini's own OpenAPI subset (upper-case ``type`` names, ``nullable``) is sent as
  ``responseSchema``; anything else is taken as JSON Schema and sent as ``responseJsonSchema``
  (``$ref``/``$defs``, ``anyOf`` with null, type lists understood).

``responseSchema`` gets ``propertyOrdering`` so fields come back in declaration order, and
``responseMimeType`` is ``application/json``. The parsed value's dtype follows the schema:
objects are structs, arrays lists, string enums ``pl.Enum``; what polars cannot type (a union of
several types, an object with no properties) is kept as JSON text (``pl.String``).

A reply that is not JSON, or does not fit the schema (wrong type, missing required field, value
outside an enum, an integer out of range of the dtype), raises `SchemaMismatch`; gemframe turns
it into that row's ``PARSE_ERROR``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from .._errors import ConfigError, clip

if TYPE_CHECKING:
    from polars._typing import PolarsDataType  # polars' own alias: a DataType, or its class

__all__ = ["ResponseSchema", "SchemaMismatch", "response_schema"]

_OPENAPI_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL", "TYPE_UNSPECIFIED"}
_MAX_DEPTH = 32


class SchemaMismatch(ValueError):
    """A reply that is not JSON or does not fit the response schema."""


@dataclass(frozen=True)
class _Node:
    """One schema node, whatever form the schema was given in."""

    kind: str  # object, array, string, enum, integer, number, boolean, json
    nullable: bool = False
    fields: tuple[tuple[str, _Node, bool], ...] = ()  # object: (name, node, required)
    items: _Node | None = None  # array
    choices: tuple[str, ...] = ()  # enum
    min_items: int | None = None
    max_items: int | None = None
    low: int | None = None  # integer bounds checked when parsing
    high: int | None = None
    dtype: pl.DataType | None = None  # a polars dtype given by the user, kept as is

    def with_nullable(self, nullable: bool = True) -> _Node:
        return dataclasses.replace(self, nullable=nullable)


@dataclass(frozen=True)
class ResponseSchema:
    """A translated response schema: ``config`` (generationConfig fields), ``dtype`` (of the
    parsed value) and `parse` (reply text → a value of that dtype)."""

    config: dict[str, Any]
    dtype: pl.DataType
    node: _Node

    def parse(self, text: str | None) -> Any:
        """The reply text as a Python value fitting ``dtype``; `SchemaMismatch` if it does not."""
        if text is None:
            raise SchemaMismatch("the reply has no text to parse")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise SchemaMismatch(f"the reply is not JSON ({exc}): {clip(text, 80)}") from None
        return _check(self.node, value, "$")


def response_schema(spec: Any) -> ResponseSchema:
    """Translate a polars dtype, a Python type or a schema dict (see the module docstring)."""
    if isinstance(spec, ResponseSchema):
        return spec
    if isinstance(spec, Mapping):
        schema = dict(spec)
        if _is_openapi(schema):
            key, node = "responseSchema", _from_json_schema(schema, schema, 0)
        else:
            key, node = "responseJsonSchema", _from_json_schema(schema, schema, 0)
        config = {"responseMimeType": "application/json", key: schema}
        return ResponseSchema(config, _dtype(node), node)
    if isinstance(spec, type) and hasattr(spec, "model_json_schema") and not dataclasses.is_dataclass(spec):
        return response_schema(spec.model_json_schema())  # pydantic
    if isinstance(spec, (pl.DataType, type)) and _is_polars(spec):
        node = _from_polars(spec() if isinstance(spec, type) else spec)
    else:
        node = _from_python(spec, ())
    config = {"responseMimeType": "application/json", "responseSchema": _openapi(node)}
    return ResponseSchema(config, _dtype(node), node)


# ---------------------------------------------------------------------------------------------
# Into nodes
# ---------------------------------------------------------------------------------------------


def _is_polars(spec: Any) -> bool:
    return isinstance(spec, pl.DataType) or (isinstance(spec, type) and issubclass(spec, pl.DataType))


_INT_BOUNDS: dict[type[pl.DataType], int] = {
    pl.Int8: 8,
    pl.Int16: 16,
    pl.Int32: 32,
    pl.Int64: 64,
    pl.UInt8: 8,
    pl.UInt16: 16,
    pl.UInt32: 32,
    pl.UInt64: 64,
}


def _dtype_instance(dtype: PolarsDataType) -> pl.DataType:
    """A nested dtype as an instance (``pl.Int64`` -> ``pl.Int64()``): polars types ``Field.dtype``
    and ``List.inner`` as either, though it stores instances."""
    return dtype() if isinstance(dtype, type) else dtype


def _from_polars(dtype: pl.DataType) -> _Node:
    if isinstance(dtype, pl.Struct):
        if not dtype.fields:
            raise ConfigError("a response schema struct needs at least one field")
        fields = tuple((f.name, _from_polars(_dtype_instance(f.dtype)), True) for f in dtype.fields)
        return _Node("object", fields=fields, dtype=dtype)
    if isinstance(dtype, pl.List):
        return _Node("array", items=_from_polars(_dtype_instance(dtype.inner)), dtype=dtype)
    if isinstance(dtype, pl.Array):
        return _Node(
            "array",
            items=_from_polars(_dtype_instance(dtype.inner)),
            min_items=dtype.size,
            max_items=dtype.size,
            dtype=dtype,
        )
    if isinstance(dtype, pl.Enum):
        return _Node("enum", choices=tuple(dtype.categories.to_list()), dtype=dtype)
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Categorical):
        return _Node("string", dtype=dtype)
    if dtype == pl.Boolean:
        return _Node("boolean", dtype=dtype)
    if dtype.is_integer():
        bits = _INT_BOUNDS.get(type(dtype), 64)
        if dtype.is_signed_integer():
            low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            low, high = 0, 2**bits - 1
        return _Node("integer", low=low, high=high, dtype=dtype)
    if dtype.is_float():
        return _Node("number", dtype=dtype)
    raise ConfigError(
        f"cannot use {dtype} in a response schema; use Struct, List, Array, String, Enum, "
        "integer, float or Boolean dtypes (parse dates from strings afterwards)"
    )


def _from_python(tp: Any, seen: tuple[Any, ...]) -> _Node:
    if len(seen) > _MAX_DEPTH:
        raise ConfigError("response schema is nested too deeply")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _from_python(args[0], seen)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise ConfigError(f"cannot use the union {tp} in a response schema; use one type or Optional[T]")
        return _from_python(rest[0], seen).with_nullable(len(rest) < len(args))
    if origin is typing.Literal:
        if not args or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{tp}: a Literal in a response schema must list strings (Gemini enums are strings)")
        return _Node("enum", choices=tuple(dict.fromkeys(args)))
    if origin in (list, tuple, set, frozenset) or origin in (Sequence, typing.Sequence, list):
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(set(args)) != 1:
                raise ConfigError(
                    f"cannot use {tp} in a response schema; a tuple must be tuple[T, ...] or hold one type"
                )
            return _Node("array", items=_from_python(args[0], seen), min_items=len(args), max_items=len(args))
        if not args:
            raise ConfigError(f"give the item type of {tp} in a response schema, e.g. list[str]")
        return _Node("array", items=_from_python(args[0], seen))
    if tp in (list, tuple, set, dict) or origin in (dict, Mapping):
        raise ConfigError(
            f"cannot use {tp} in a response schema: give item types (list[str]) and use a "
            "dataclass or TypedDict for objects (Gemini needs the property names)"
        )
    if tp is bool:
        return _Node("boolean")
    if tp is int:
        return _Node("integer", low=-(2**63), high=2**63 - 1)
    if tp is float:
        return _Node("number")
    if tp is str:
        return _Node("string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value if isinstance(m.value, str) else m.name for m in tp]
        return _Node("enum", choices=tuple(dict.fromkeys(values)))
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        if tp in seen:
            raise ConfigError(f"{tp.__name__} refers to itself; a recursive type cannot be a polars dtype")
        try:
            hints = typing.get_type_hints(tp)
        except NameError as exc:
            raise ConfigError(
                f"cannot resolve the field types of {tp.__name__} ({exc}); define the types it uses at module level"
            ) from None
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            required = {
                f.name
                for f in dataclasses.fields(tp)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            }
        else:
            names = list(hints)
            required = set(getattr(tp, "__required_keys__", names))
        if not names:
            raise ConfigError(f"{tp.__name__} has no fields; a response schema object needs at least one")
        fields = tuple((n, _from_python(hints[n], (*seen, tp)), n in required) for n in names)
        return _Node("object", fields=fields)
    raise ConfigError(
        f"cannot use {tp!r} in a response schema; use str, int, float, bool, list[T], "
        "Optional[T], Literal[...], an Enum, a dataclass or a TypedDict"
    )


def _is_openapi(schema: Mapping[str, Any]) -> bool:
    """Gemini's OpenAPI subset spells types in upper case (``"OBJECT"``) and never uses ``$ref``."""
    kind = schema.get("type")
    return isinstance(kind, str) and kind in _OPENAPI_TYPES


def _key(schema: Mapping[str, Any], camel: str) -> Any:
    """A keyword in camelCase or snake_case."""
    if camel in schema:
        return schema[camel]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return schema.get(snake)


def _from_json_schema(schema: Any, root: Mapping[str, Any], depth: int) -> _Node:
    if depth > _MAX_DEPTH:
        raise ConfigError("response schema is nested too deeply (or refers to itself)")
    if not isinstance(schema, Mapping):
        return _Node("json", nullable=True)
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        if not ref.startswith("#/"):
            raise ConfigError(f"response schema $ref {ref!r}: only local references (#/$defs/...) are supported")
        for step in ref[2:].split("/"):
            target = target.get(step) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            raise ConfigError(f"response schema $ref {ref!r} points nowhere")
        return _from_json_schema(target, root, depth + 1)
    nullable = _key(schema, "nullable") is True
    branches = _key(schema, "anyOf") or _key(schema, "oneOf")
    if isinstance(branches, list) and branches:
        rest = [b for b in branches if not (isinstance(b, Mapping) and str(b.get("type", "")).lower() == "null")]
        node = _from_json_schema(rest[0], root, depth + 1) if len(rest) == 1 else _Node("json")
        return node.with_nullable(nullable or node.nullable or len(rest) < len(branches))
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [str(k).lower() for k in kind]
        nullable = nullable or "null" in named
        named = [k for k in named if k != "null"]
        kind = named[0] if len(named) == 1 else ("json" if named else "null")
    kind = str(kind).lower() if kind is not None else None
    if kind is None or kind == "type_unspecified":
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    choices = _key(schema, "enum")
    if "const" in schema and choices is None:
        choices = [schema["const"]]
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices) and kind in (None, "string"):
        return _Node("enum", nullable, choices=tuple(dict.fromkeys(choices)))
    if kind == "object":
        properties = _key(schema, "properties") or {}
        if not isinstance(properties, Mapping) or not properties:
            return _Node("json", nullable)
        order = _key(schema, "propertyOrdering")
        names = [n for n in order if n in properties] if isinstance(order, list) else []
        names += [n for n in properties if n not in names]
        required = set(_key(schema, "required") or ())
        fields = tuple((n, _from_json_schema(properties[n], root, depth + 1), n in required) for n in names)
        return _Node("object", nullable, fields=fields)
    if kind == "array":
        items = _key(schema, "items")
        min_items, max_items = _key(schema, "minItems"), _key(schema, "maxItems")
        return _Node(
            "array",
            nullable,
            items=_from_json_schema(items, root, depth + 1) if items is not None else _Node("json", True),
            min_items=int(min_items) if isinstance(min_items, (int, str)) else None,
            max_items=int(max_items) if isinstance(max_items, (int, str)) else None,
        )
    if kind == "integer":
        return _Node("integer", nullable, low=-(2**63), high=2**63 - 1)
    if kind in ("number", "boolean", "string"):
        return _Node(kind, nullable)
    if kind == "null":
        return _Node("json", True)
    return _Node("json", nullable)


# ---------------------------------------------------------------------------------------------
# Out of nodes: Gemini's OpenAPI schema and the polars dtype
# ---------------------------------------------------------------------------------------------


def _openapi(node: _Node) -> dict[str, Any]:
    out: dict[str, Any]
    if node.kind == "object":
        out = {
            "type": "OBJECT",
            "properties": {name: _openapi(child) for name, child, _ in node.fields},
            "propertyOrdering": [name for name, _, _ in node.fields],
        }
        required = [name for name, _, is_required in node.fields if is_required]
        if required:
            out["required"] = required
    elif node.kind == "array":
        out = {"type": "ARRAY", "items": _openapi(node.items or _Node("string"))}
        if node.min_items is not None:
            out["minItems"] = node.min_items
        if node.max_items is not None:
            out["maxItems"] = node.max_items
    elif node.kind == "enum":
        out = {"type": "STRING", "format": "enum", "enum": list(node.choices)}
    elif node.kind == "integer":
        out = {"type": "INTEGER"}
        if node.low == 0:
            out["minimum"] = 0
    else:
        out = {"type": {"number": "NUMBER", "boolean": "BOOLEAN"}.get(node.kind, "STRING")}
    if node.nullable:
        out["nullable"] = True
    return out


def _dtype(node: _Node) -> pl.DataType:
    if node.dtype is not None:
        return node.dtype
    if node.kind == "object":
        return pl.Struct([pl.Field(name, _dtype(child)) for name, child, _ in node.fields])
    if node.kind == "array":
        return pl.List(_dtype(node.items or _Node("json")))
    if node.kind == "enum":
        return pl.Enum(list(node.choices))
    return {"integer": pl.Int64(), "number": pl.Float64(), "boolean": pl.Boolean()}.get(node.kind, pl.String())


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _where(path: str) -> str:
    return "the reply" if path == "$" else path


def _check(node: _Node, value: Any, path: str) -> Any:
    """The value, made to fit the node's dtype, or `SchemaMismatch` naming the path."""
    if value is None:
        if node.nullable or node.kind == "json":
            return None
        raise SchemaMismatch(f"{_where(path)} is null but the schema does not allow null")
    kind = node.kind
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "object":
        if not isinstance(value, dict):
            raise SchemaMismatch(f"{_where(path)} should be an object, got {_json_type(value)}")
        out: dict[str, Any] = {}
        for name, child, required in node.fields:
            if name not in value:
                if required:
                    raise SchemaMismatch(f"{path}.{name} is missing (a required field)")
                out[name] = None
                continue
            out[name] = _check(child, value[name], f"{path}.{name}")
        return out
    if kind == "array":
        if not isinstance(value, list):
            raise SchemaMismatch(f"{_where(path)} should be an array, got {_json_type(value)}")
        if node.min_items is not None and len(value) < node.min_items:
            raise SchemaMismatch(f"{_where(path)} has {len(value)} items, fewer than {node.min_items}")
        if node.max_items is not None and len(value) > node.max_items:
            raise SchemaMismatch(f"{_where(path)} has {len(value)} items, more than {node.max_items}")
        items = node.items or _Node("json", True)
        return [_check(items, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind == "enum":
        if value not in node.choices:
            raise SchemaMismatch(f"{_where(path)} is {clip(json.dumps(value), 80)}, not one of {list(node.choices)}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise SchemaMismatch(f"{_where(path)} should be a string, got {_json_type(value)}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise SchemaMismatch(f"{_where(path)} should be a boolean, got {_json_type(value)}")
        return value
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaMismatch(f"{_where(path)} should be an integer, got {_json_type(value)}")
        if (node.low is not None and value < node.low) or (node.high is not None and value > node.high):
            raise SchemaMismatch(f"{_where(path)} is {value}, out of range for {_dtype(node)}")
        return value
    if kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SchemaMismatch(f"{_where(path)} should be a number, got {_json_type(value)}")
        return float(value)
    raise SchemaMismatch(f"{_where(path)}: unsupported schema kind {kind}")  # pragma: no cover


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({clip(json.dumps(value, ensure_ascii=False), 40)})"
    if isinstance(value, list):
        return "an array"
    return "an object"
