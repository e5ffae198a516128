"""Structured output through the public API: response_schema= as a polars dtype, a dataclass,
a TypedDict or a JSON-schema dict; a typed ``parsed`` field known before running; replies that
do not parse or do not fit become row errors."""

import enum
import json
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import polars as pl
import pytest

import gemframe as gf

try:
    from typing import NotRequired
except ImportError:  # Python 3.10
    from typing_extensions import NotRequired


@dataclass
class Item:
    name: str
    count: int


@dataclass
class Caption:
    subject: str
    mood: Literal["calm", "busy", "eerie"]
    colors: list[str]
    items: list[Item]
    confidence: float | None = None
    tags: list[str] = field(default_factory=list)


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Review(TypedDict):
    stars: int
    mood: Mood
    summary: NotRequired[str]


CAPTION_DTYPE = pl.Struct(
    {
        "subject": pl.String,
        "mood": pl.Enum(["calm", "busy", "eerie"]),
        "colors": pl.List(pl.String),
        "items": pl.List(pl.Struct({"name": pl.String, "count": pl.Int64})),
        "confidence": pl.Float64,
        "tags": pl.List(pl.String),
    }
)


def _body(**options) -> dict:
    frame = pl.DataFrame({"prompt": ["Describe a lighthouse at dusk"]})
    return json.loads(frame.with_columns(request=gf.request("prompt", **options))["request"][0])


def test_dataclass_schema_is_typed_before_running(client, emulator):
    lazy = pl.LazyFrame({"prompt": ["A lighthouse at dusk", "A market at noon"]}).with_columns(
        reply=gf.generate("prompt", response_schema=Caption, client=client)
    )
    reply_dtype = lazy.collect_schema()["reply"]
    assert reply_dtype == gf.reply_dtype(parsed=CAPTION_DTYPE)
    assert reply_dtype.to_schema()["parsed"] == CAPTION_DTYPE
    assert emulator.stats.requests == 0  # planning sends nothing
    parsed = lazy.select(pl.col("reply").struct.field("parsed")).unnest("parsed").collect()
    assert parsed.schema == pl.Schema(CAPTION_DTYPE.to_schema())
    assert parsed["subject"].to_list() == ["subject: A lighthouse at dusk", "subject: A market at noon"]
    assert set(parsed["mood"].to_list()) <= {"calm", "busy", "eerie"}
    assert parsed["items"].list.len().to_list() == [2, 2]
    assert parsed["items"][0][0]["name"].startswith("name")
    assert emulator.stats.requests == 2


def test_dataclass_maps_to_geminis_openapi_schema():
    config = _body(response_schema=Caption)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert schema["type"] == "OBJECT"
    assert schema["propertyOrdering"] == ["subject", "mood", "colors", "items", "confidence", "tags"]
    assert schema["required"] == ["subject", "mood", "colors", "items"]  # fields with defaults are optional
    props = schema["properties"]
    assert props["mood"] == {"type": "STRING", "format": "enum", "enum": ["calm", "busy", "eerie"]}
    assert props["colors"] == {"type": "ARRAY", "items": {"type": "STRING"}}
    assert props["confidence"] == {"type": "NUMBER", "nullable": True}
    assert props["items"]["items"]["properties"]["count"] == {"type": "INTEGER"}
    assert props["items"]["items"]["propertyOrdering"] == ["name", "count"]


def test_polars_dtype_and_typeddict_schemas(client):
    dtype = pl.Struct({"label": pl.Enum(["cat", "dog"]), "legs": pl.UInt8, "scores": pl.Array(pl.Float32, 3)})
    schema = _body(response_schema=dtype)["generationConfig"]["responseSchema"]
    assert schema["required"] == ["label", "legs", "scores"]
    assert schema["properties"]["legs"] == {"type": "INTEGER", "minimum": 0}
    assert schema["properties"]["scores"] == {
        "type": "ARRAY",
        "items": {"type": "NUMBER"},
        "minItems": 3,
        "maxItems": 3,
    }
    out = pl.DataFrame({"prompt": ["an animal"]}).with_columns(
        a=gf.generate("prompt", response_schema=dtype, client=client),
        b=gf.generate("prompt", response_schema=Review, client=client),
        c=gf.generate("prompt", response_schema=pl.List(pl.String), client=client),
    )
    a, b, c = out["a"][0], out["b"][0], out["c"][0]
    assert out.schema["a"].to_schema()["parsed"] == dtype
    assert a["error"] is None and a["parsed"]["label"] in ("cat", "dog") and len(a["parsed"]["scores"]) == 3
    assert out.schema["b"].to_schema()["parsed"] == pl.Struct(
        {"stars": pl.Int64, "mood": pl.Enum(["happy", "sad"]), "summary": pl.String}
    )
    assert b["parsed"]["mood"] in ("happy", "sad") and isinstance(b["parsed"]["stars"], int)
    assert c["parsed"] == ["value 1: an animal", "value 2: an animal"]


def test_json_schema_dict_goes_as_response_json_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "year": {"type": ["integer", "null"], "minimum": 1900, "maximum": 2030},
            "genres": {"type": "array", "items": {"$ref": "#/$defs/genre"}},
        },
        "required": ["title", "year"],
        "$defs": {"genre": {"type": "string", "enum": ["drama", "comedy"]}},
    }
    config = _body(response_schema=schema)["generationConfig"]
    assert config == {"responseMimeType": "application/json", "responseJsonSchema": schema}
    out = pl.DataFrame({"prompt": ["a film"]}).with_columns(
        reply=gf.generate("prompt", response_schema=schema, client=client)
    )
    assert out.schema["reply"].to_schema()["parsed"] == pl.Struct(
        {"title": pl.String, "year": pl.Int64, "genres": pl.List(pl.Enum(["drama", "comedy"]))}
    )
    parsed = out["reply"][0]["parsed"]
    assert parsed["title"] == "title: a film" and 1900 <= parsed["year"] <= 2030
    # Gemini's own OpenAPI subset (upper-case types) is sent as responseSchema.
    openapi = {"type": "OBJECT", "properties": {"ok": {"type": "BOOLEAN"}}}
    assert "responseSchema" in _body(response_schema=openapi)["generationConfig"]


def test_a_reply_that_does_not_parse_is_a_row_error(client, emulator):
    df = pl.DataFrame({"prompt": ["A lighthouse at dusk, described at length", "Short"]})
    out = df.with_columns(
        reply=gf.generate(
            "prompt",
            response_schema=Caption,
            config={"max_output_tokens": 8},
            client=client,
        )
    ).unnest("reply")
    assert out["finish_reason"].to_list() == ["MAX_TOKENS", "MAX_TOKENS"]  # the JSON was cut short
    assert out["error"].struct.field("status").to_list() == ["PARSE_ERROR", "PARSE_ERROR"]
    assert "maxOutputTokens" in out["error"][0]["message"] and "not JSON" in out["error"][0]["message"]
    assert out["parsed"].is_null().all() and out["text"].is_not_null().all()  # the text is kept
    assert emulator.stats.requests == 2


def test_a_reply_that_does_not_fit_is_a_row_error(client):
    # Ask with one schema, read with another: the JSON parses but does not fit.
    requests = pl.DataFrame({"prompt": ["a review", None]}).with_columns(
        request=gf.request("prompt", response_schema=Review)
    )
    out = requests.with_columns(reply=gf.send("request", response_schema=Caption, client=client))
    error = out["reply"][0]["error"]
    assert error["status"] == "PARSE_ERROR" and "$.subject is missing" in error["message"]
    assert out["reply"][1] is None
    fits = requests.with_columns(reply=gf.send("request", response_schema=Review, client=client))
    assert fits["reply"][0]["error"] is None and fits["reply"][0]["parsed"]["stars"] >= 1
    assert fits["reply"][0]["cached"]  # the same request: answered from the cache


def test_bad_schemas_fail_before_sending(client, emulator):
    with pytest.raises(gf.ConfigError, match="union"):
        gf.generate("prompt", response_schema=int | str, client=client)
    with pytest.raises(gf.ConfigError, match="Literal"):
        gf.generate("prompt", response_schema=Literal[1, 2], client=client)
    with pytest.raises(gf.ConfigError, match="dict"):
        gf.generate("prompt", response_schema=dict[str, int], client=client)
    with pytest.raises(gf.ConfigError, match="once"):
        gf.generate("prompt", response_schema=Caption, config={"response_schema": {"type": "STRING"}}, client=client)
    with pytest.raises(gf.ConfigError, match="Datetime"):
        gf.generate("prompt", response_schema=pl.Struct({"at": pl.Datetime()}), client=client)
    assert emulator.stats.requests == 0
