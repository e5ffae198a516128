"""The emulator's answers: the success body of a validated request (`build_reply`), its token
counts, and values that follow a response schema (`_Faker`). Pure functions of the request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import render
from .validation import (
    IMAGE_OUTPUT_TOKENS,
    RATED_CATEGORIES,
    Config,
    GenRequest,
    _camel,
    _clip,
    tokens,
)


@dataclass
class _Tally:
    """Candidate-side token counts, summed over candidates."""

    text: int = 0
    image: int = 0
    thoughts: int = 0


def prompt_tokens(req: GenRequest) -> dict[str, int]:
    """Prompt tokens by modality (TEXT first), zero entries dropped."""
    totals: dict[str, int] = {"TEXT": 0}
    for turn in ((req.system,) if req.system else ()) + req.turns:
        for part in turn.parts:
            totals["TEXT"] += part.tokens
            if part.media:
                totals[part.media.modality] = totals.get(part.media.modality, 0) + part.media.tokens
    return {modality: count for modality, count in totals.items() if count}


def build_reply(req: GenRequest, model: str, digest: str) -> dict[str, Any]:
    """The success body for a validated request: a pure function of its arguments."""
    markers = req.markers
    tally = _Tally()
    if "block" in markers:
        feedback = {"blockReason": "SAFETY", "safetyRatings": _ratings()}
        head: dict[str, Any] = {"promptFeedback": feedback}
    elif "empty" in markers:
        head = {"candidates": []}
    elif "safety" in markers:
        head = {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": _ratings()}]}
    elif "recitation" in markers:
        head = {"candidates": [{"finishReason": "RECITATION", "index": 0, "safetyRatings": []}]}
    else:
        count = req.config.candidates
        head = {"candidates": [_candidate(req, i, digest, tally) for i in range(count)]}
    return {
        **head,
        "usageMetadata": _usage(prompt_tokens(req), tally, dict(req.cached)),
        "modelVersion": f"emulator-{model}",
        "responseId": base64.urlsafe_b64encode(bytes.fromhex(digest)).decode()[:22],
    }


def _ratings() -> list[dict[str, Any]]:
    """Ratings of a blocked answer: dangerous content HIGH, the rest NEGLIGIBLE."""
    high, low = {"probability": "HIGH", "blocked": True}, {"probability": "NEGLIGIBLE"}
    return [{"category": c, **(high if c == "HARM_CATEGORY_DANGEROUS_CONTENT" else low)} for c in RATED_CATEGORIES]


def _usage(prompt: dict[str, int], tally: _Tally, cached: dict[str, int]) -> dict[str, Any]:
    """usageMetadata. Tokens from a cachedContent are in the prompt counts too (as the API
    counts them) and also reported apart: cachedContentTokenCount, cacheTokensDetails."""
    prompt_total = sum(prompt.values())
    candidates = tally.text + tally.image
    usage: dict[str, Any] = {"promptTokenCount": prompt_total}
    if candidates:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt_total + candidates + tally.thoughts
    if cached:
        usage["cachedContentTokenCount"] = sum(cached.values())
    usage["promptTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in prompt.items()]
    if cached:
        usage["cacheTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in cached.items() if n]
    if tally.image:
        split = (("TEXT", tally.text), ("IMAGE", tally.image))
        usage["candidatesTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in split if n]
    if tally.thoughts:
        usage["thoughtsTokenCount"] = tally.thoughts
    return usage


def _candidate(req: GenRequest, index: int, digest: str, tally: _Tally) -> dict[str, Any]:
    config = req.config
    parts: list[dict[str, Any]] = []
    if config.thoughts:
        thought = f'Thinking about: "{_clip(req.prompt, 60)}"'
        parts.append({"text": thought, "thought": True})
        tally.thoughts += tokens(thought)
    finish = "STOP"
    if config.text:
        text, finish = _limit(_reply_text(req, index), config)
        parts.append({"text": text})
        tally.text += tokens(text)
    if config.image:
        image = {"inlineData": {"mimeType": "image/png", "data": _image(req, index)}}
        parts.append({**image, "thoughtSignature": _signature(f"{digest}|{index}|image")})
        tally.image += IMAGE_OUTPUT_TOKENS
        signed = 1 if config.thoughts else 0
        if "thoughtSignature" not in parts[signed]:
            parts[signed] = {**parts[signed], "thoughtSignature": _signature(f"{digest}|{index}")}
    return {
        "content": {"parts": parts, "role": "model"},
        "finishReason": finish,
        "index": index,
        "safetyRatings": [],
    }


def _signature(key: str) -> str:
    """An opaque, deterministic thoughtSignature (base64, as the API sends them)."""
    return base64.b64encode(hashlib.sha256(f"thoughtSignature|{key}".encode()).digest()).decode()


def _limit(text: str, config: Config) -> tuple[str, str]:
    """Apply stop sequences, then maxOutputTokens; return (text, finishReason)."""
    cuts = [text.find(s) for s in config.stop if s in text]
    if cuts:
        text = text[: min(cuts)]
    if config.max_tokens is not None and tokens(text) > config.max_tokens:
        return text[: config.max_tokens * 4], "MAX_TOKENS"
    return text, "STOP"


def _reply_text(req: GenRequest, index: int) -> str:
    suffix = f" [candidate {index}]" if index else ""
    config = req.config
    if config.schema is None:
        text = describe(req) + suffix
        if config.mime == "application/json":
            return json.dumps({"reply": text}, ensure_ascii=False)
        return text
    value = _Faker(config.schema, req.prompt, f"{config.seed}|{index}", suffix).value(config.schema)
    return str(value) if config.mime == "text/x.enum" else json.dumps(value, ensure_ascii=False)


def describe(req: GenRequest) -> str:
    """The plain-text reply: echo the prompt, describe its inline data, note system and history."""
    pieces = [f'Emulated reply to: "{req.prompt}".']
    seen: Counter[str] = Counter()
    for media in req.prompt_turn.media if req.prompt_turn else ():
        seen[media.kind] += 1
        pieces.append(f"{media.kind} {seen[media.kind]}: {media.label}.")
    if req.system and req.system.text:
        pieces.append(f"(system: {req.system.text[:40]})")
    if len(req.turns) > 1:
        pieces.append(f"(turn {sum(t.role == 'user' for t in req.turns)}{_previously(req)})")
    return " ".join(pieces)


def _previously(req: GenRequest) -> str:
    """A short mention of the last model turn, so replies visibly depend on history."""
    model_turns = [t for t in req.turns if t.role == "model"]
    if not model_turns:
        return ""
    last = model_turns[-1]
    if last.text:
        return f', previously: "{_clip(last.text, 40)}"'
    return ", previously: an image" if last.media else ""


def _image(req: GenRequest, index: int) -> str:
    """Base64 PNG: an edit of the input image if there is one, else the prompt drawn."""
    key = f"{req.prompt}|{req.config.seed}|{index}"
    source = req.edit_source
    if source:
        png = render.edit_image(source.data, req.prompt, key)
    else:
        png = render.render_prompt(req.prompt or "(empty prompt)", key, req.config.image_size)
    return base64.b64encode(png).decode()


class _Faker:
    """Values that follow a response schema (OpenAPI subset or JSON Schema), deterministically.

    Numbers, booleans and enum choices are hashes of (prompt, seed, candidate, path); strings
    are the property name and the prompt's first words, so they are recognisable in tests.
    Malformed keywords are ignored rather than trusted: JSON Schema is not validated up front.
    """

    MAX_DEPTH = 8
    MAX_ITEMS = 16
    MAX_STEPS = 10**6

    def __init__(self, root: dict[str, Any], prompt: str, key: str, suffix: str) -> None:
        self.root = root
        self.words = " ".join(prompt.split()[:6]) or "emulated"
        self.key = f"{prompt}|{key}"
        self.suffix = suffix

    def value(self, schema: Any, path: str = "$", label: str = "value", depth: int = 0) -> Any:
        schema = self._resolve(schema if isinstance(schema, dict) else {})
        branches = _keyword(schema, "any_of", list) or _keyword(schema, "one_of", list)
        if branches:
            return self.value(branches[0], path, label, depth)
        if "const" in schema:
            return schema["const"]
        choices = _keyword(schema, "enum", list)
        if choices:
            return choices[self._hash(path) % len(choices)]
        kind = _schema_kind(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, label, depth)
        if kind == "integer":
            return self._integer(schema, path)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self._hash(path) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path, label)

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """Follow local ``$ref``s (``#/$defs/X``, ``#/definitions/X``)."""
        for _ in range(self.MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return schema
            target: Any = self.root
            for step in ref[2:].split("/"):
                target = target.get(step, {}) if isinstance(target, dict) else {}
            schema = target if isinstance(target, dict) else {}
        return schema

    def _hash(self, path: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.key}|{path}".encode()).digest()[:8], "big")

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        properties = _keyword(schema, "properties", dict) or {}
        if depth >= self.MAX_DEPTH:
            return {}
        order = _keyword(schema, "property_ordering", list) or list(properties)
        return {
            name: self.value(properties[name], f"{path}.{name}", name, depth + 1)
            for name in order
            if isinstance(name, str) and name in properties
        }

    def _array(self, schema: dict[str, Any], path: str, label: str, depth: int) -> list[Any]:
        if depth >= self.MAX_DEPTH:
            return []
        count = min(max(_keyword(schema, "min_items", int) or 0, 2), self.MAX_ITEMS)
        max_items = _keyword(schema, "max_items", int)
        if max_items is not None:
            count = min(count, max_items)
        items = _keyword(schema, "items", dict) or {}
        return [self.value(items, f"{path}[{i}]", f"{label} {i + 1}", depth + 1) for i in range(count)]

    def _bounds(self, schema: dict[str, Any]) -> tuple[float, float]:
        low = _keyword(schema, "minimum", (int, float))
        high = _keyword(schema, "maximum", (int, float))
        if low is None:
            low = 1 if high is None else min(1, high)
        if high is None:
            high = low + 99
        return low, max(low, high)

    def _integer(self, schema: dict[str, Any], path: str) -> int:
        low, high = self._bounds(schema)
        low, high = math.ceil(low), max(math.ceil(low), math.floor(high))
        return low + self._hash(path) % min(high - low + 1, self.MAX_STEPS)

    def _number(self, schema: dict[str, Any], path: str) -> float:
        low, high = self._bounds(schema)
        steps = int(min((high - low) * 100, self.MAX_STEPS))
        return round(low + (self._hash(path) % (steps + 1)) / 100, 2)

    def _string(self, schema: dict[str, Any], path: str, label: str) -> str:
        fmt = schema.get("format")
        day = 1 + self._hash(path) % 28
        if fmt == "date":
            return f"2024-01-{day:02d}"
        if fmt == "date-time":
            return f"2024-01-{day:02d}T12:00:00Z"
        text = f"{label}: {self.words}{self.suffix}"
        max_length = _keyword(schema, "max_length", int)
        return text[: max(max_length, 0)] if max_length is not None else text


def _keyword(schema: dict[str, Any], snake: str, kind: type | tuple[type, ...]) -> Any:
    """A schema keyword in either spelling (JSON Schema camelCase, proto snake_case), or None
    when it is absent or not of the expected JSON type."""
    camel = _camel(snake)
    value = schema[camel] if camel in schema else schema.get(snake)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _schema_kind(schema: dict[str, Any]) -> str:
    """Lower-case type of a schema node; inferred when absent, first non-null of a type list."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if isinstance(k, str) and k.lower() != "null"), "null")
    if isinstance(kind, str) and kind.upper() != "TYPE_UNSPECIFIED":
        return kind.lower()
    if "properties" in schema:
        return "object"
    return "array" if "items" in schema else "string"
