"""The offline Gemini emulator: answers, determinism, validation, auth, faults and stats."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from gemframe.emulator import Emulator, Stats, serve

from .conftest import wait_for

GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"
COUNT = "/v1beta/models/gemini-2.5-flash:countTokens"
SEGMIND = "/v1/gemini-2-flash-image-generation"


# --- helpers ---------------------------------------------------------------------------------


def client(emu: Emulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=emu), base_url="http://emulator")


def post(emu: Emulator, body: Any = None, url: str = GENERATE, **kwargs: Any) -> httpx.Response:
    """One POST; a dict body is sent as JSON, bytes as they are."""
    if isinstance(body, (bytes, str)):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body

    async def go() -> httpx.Response:
        async with client(emu) as c:
            return await c.post(url, **kwargs)

    return asyncio.run(go())


def ask(prompt: str, *media: dict, **config: Any) -> dict:
    """A one-turn request; keyword arguments become generationConfig."""
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}, *media]}]}
    if config:
        body["generationConfig"] = config
    return body


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def inline(data: bytes, mime: str = "image/png") -> dict:
    return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}}


def parts(response: httpx.Response, candidate: int = 0) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["candidates"][candidate]["content"]["parts"]


def text(response: httpx.Response, candidate: int = 0) -> str:
    return "".join(p["text"] for p in parts(response, candidate) if "text" in p and not p.get("thought"))


def png_parts(response: httpx.Response) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(p["inlineData"]["data"]))) for p in parts(response) if "inlineData" in p
    ]


def google_error(response: httpx.Response, code: int, status: str, fragment: str) -> dict:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status
    assert fragment in error["message"], error["message"]
    return error


# --- answers ---------------------------------------------------------------------------------


def test_text_reply_and_usage():
    r = post(Emulator(), ask("Hello there, emulator"))
    assert r.headers["content-type"] == "application/json"
    assert r.content == json.dumps(r.json(), separators=(",", ":"), ensure_ascii=False).encode()
    body = r.json()
    candidate = body["candidates"][0]
    assert candidate["content"] == {
        "parts": [{"text": 'Emulated reply to: "Hello there, emulator".'}],
        "role": "model",
    }
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    assert candidate["safetyRatings"] == []
    usage = body["usageMetadata"]
    reply_tokens = -(-len(text(r)) // 4)
    assert usage == {
        "promptTokenCount": 6,  # 22 characters
        "candidatesTokenCount": reply_tokens,
        "totalTokenCount": 6 + reply_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 6}],
    }
    assert body["modelVersion"] == "emulator-gemini-2.5-flash"
    assert len(body["responseId"]) == 22


def test_describes_png_and_jpeg_inputs():
    png, jpeg = image_bytes("PNG", (64, 48)), image_bytes("JPEG", (30, 20))
    r = post(Emulator(), ask("What is this?", inline(png), inline(jpeg, "image/jpeg")))
    assert text(r) == 'Emulated reply to: "What is this?". Image 1: PNG 64x48. Image 2: JPEG 30x20.'
    usage = r.json()["usageMetadata"]
    assert usage["promptTokenCount"] == 4 + 2 * 258
    assert usage["promptTokensDetails"] == [
        {"modality": "TEXT", "tokenCount": 4},
        {"modality": "IMAGE", "tokenCount": 516},
    ]


def test_describes_pdf_and_rejects_other_bytes():
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n2 0 obj << /Type /Page >> endobj\n%%EOF"
    r = post(Emulator(), ask("Summarise", inline(pdf, "application/pdf")))
    assert text(r).endswith(f"Document 1: PDF, {len(pdf)} bytes.")
    assert r.json()["usageMetadata"]["promptTokensDetails"][1] == {
        "modality": "DOCUMENT",
        "tokenCount": 516,
    }
    bad = post(Emulator(), ask("What?", inline(b"not an image at all")))
    google_error(bad, 400, "INVALID_ARGUMENT", "Unable to process input image")


def test_system_instruction_and_history():
    body = {
        "systemInstruction": {"parts": [{"text": "You are a terse assistant who answers in French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Bonjour! How can I help you today, my friend?"}]},
            {"role": "user", "parts": [{"text": "Tell me more"}]},
        ],
    }
    reply = text(post(Emulator(), body))
    assert reply.startswith('Emulated reply to: "Tell me more".')
    assert "(system: You are a terse assistant who answers in)" in reply
    assert '(turn 2, previously: "Bonjour! How can I help you today, my fr...")' in reply


def test_same_request_same_bytes():
    emu = Emulator(jitter=0.01, seed=7)
    body = ask(
        "Draw a lighthouse",
        inline(image_bytes()),
        responseModalities=["TEXT", "IMAGE"],
        candidateCount=2,
        thinkingConfig={"includeThoughts": True},
    )
    raw = json.dumps(body).encode()
    first, second = post(emu, raw), post(emu, raw)
    assert first.status_code == 200 and first.content == second.content
    other = post(emu, ask("Draw a lighthouse!"))
    assert other.json()["responseId"] != first.json()["responseId"]
    digest = hashlib.sha256(raw).digest()
    assert first.json()["responseId"] == base64.urlsafe_b64encode(digest).decode()[:22]


def test_max_output_tokens_truncates():
    r = post(Emulator(), ask("Write a long story about the sea", maxOutputTokens=3))
    candidate = r.json()["candidates"][0]
    assert candidate["finishReason"] == "MAX_TOKENS"
    assert text(r) == 'Emulated reply to: "Write a long story about the sea".'[:12]
    assert r.json()["usageMetadata"]["candidatesTokenCount"] == 3


def test_stop_sequences_cut_the_text():
    r = post(Emulator(), ask("alpha beta", stopSequences=["beta"]))
    assert text(r) == 'Emulated reply to: "alpha '
    assert r.json()["candidates"][0]["finishReason"] == "STOP"


def test_json_mode_without_schema():
    r = post(Emulator(), ask("Give me JSON", responseMimeType="application/json"))
    assert json.loads(text(r)) == {"reply": 'Emulated reply to: "Give me JSON".'}


PERSON = {
    "type": "OBJECT",
    "properties": {
        "name": {"type": "STRING"},
        "age": {"type": "INTEGER"},
        "height": {"type": "number", "minimum": 1.5, "maximum": 2.0},
        "happy": {"type": "BOOLEAN"},
        "mood": {"type": "STRING", "enum": ["calm", "angry", "sad"]},
        "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
    },
    "required": ["name", "age"],
    "propertyOrdering": ["name", "age", "height", "happy", "mood", "tags"],
}


def test_json_mode_follows_openapi_schema():
    emu = Emulator()
    config = {"responseMimeType": "application/json", "responseSchema": PERSON}
    value = json.loads(text(post(emu, ask("Describe Ada Lovelace briefly", **config))))
    assert list(value) == PERSON["propertyOrdering"]
    assert value["name"] == "name: Describe Ada Lovelace briefly"
    assert isinstance(value["age"], int) and 1 <= value["age"] <= 100
    assert isinstance(value["height"], float) and 1.5 <= value["height"] <= 2.0
    assert isinstance(value["happy"], bool)
    assert value["mood"] in PERSON["properties"]["mood"]["enum"]
    assert value["tags"] == [
        "tags 1: Describe Ada Lovelace briefly",
        "tags 2: Describe Ada Lovelace briefly",
    ]
    by_seed = {text(post(emu, ask("Describe Ada", **config, seed=s))) for s in range(6)}
    assert len(by_seed) > 1  # the seed moves the numbers
    assert text(post(emu, ask("Describe Ada", **config, seed=3))) in by_seed


def test_json_mode_follows_json_schema():
    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 3},
            "note": {"type": ["string", "null"], "maxLength": 8},
            "kind": {"anyOf": [{"const": "fixed"}, {"type": "integer"}]},
            "when": {"type": "string", "format": "date"},
        },
        "$defs": {"item": {"type": "object", "properties": {"qty": {"type": "integer", "maximum": 5}}}},
    }
    config = {"responseMimeType": "application/json", "responseJsonSchema": schema}
    value = json.loads(text(post(Emulator(), ask("Order list", **config))))
    assert len(value["items"]) == 3
    assert all(isinstance(i["qty"], int) and 1 <= i["qty"] <= 5 for i in value["items"])
    assert value["note"] == "note: Or" and value["kind"] == "fixed"
    assert value["when"].startswith("2024-01-")


def test_enum_mode_answers_one_value():
    schema = {"type": "STRING", "enum": ["positive", "negative"]}
    r = post(Emulator(), ask("I love it", responseMimeType="text/x.enum", responseSchema=schema))
    assert text(r) in ("positive", "negative")


def test_candidate_count():
    r = post(Emulator(), ask("Name a colour", candidateCount=3))
    candidates = r.json()["candidates"]
    assert [c["index"] for c in candidates] == [0, 1, 2]
    assert text(r, 0) == 'Emulated reply to: "Name a colour".'
    assert text(r, 2) == 'Emulated reply to: "Name a colour". [candidate 2]'
    assert r.json()["usageMetadata"]["candidatesTokenCount"] == sum(-(-len(text(r, i)) // 4) for i in range(3))


def test_thoughts_part():
    r = post(Emulator(), ask("Why is the sky blue?", thinkingConfig={"includeThoughts": True}))
    first, answer = parts(r)
    assert first["thought"] is True and first["text"].startswith("Thinking about:")
    assert "thought" not in answer
    usage = r.json()["usageMetadata"]
    assert usage["thoughtsTokenCount"] == -(-len(first["text"]) // 4)
    assert usage["totalTokenCount"] == (
        usage["promptTokenCount"] + usage["candidatesTokenCount"] + usage["thoughtsTokenCount"]
    )


def test_image_generation_from_prompt():
    emu = Emulator()
    r = post(emu, ask("A red fox in the snow", responseModalities=["IMAGE"]))
    (part,) = parts(r)
    assert part["inlineData"]["mimeType"] == "image/png" and part["thoughtSignature"]
    (img,) = png_parts(r)
    assert img.format == "PNG" and img.size == (256, 256)
    assert len(base64.b64decode(part["inlineData"]["data"])) < 20_000
    usage = r.json()["usageMetadata"]
    assert usage["candidatesTokenCount"] == 1290
    assert usage["candidatesTokensDetails"] == [{"modality": "IMAGE", "tokenCount": 1290}]
    wide = post(
        emu,
        ask(
            "A red fox in the snow",
            responseModalities=["IMAGE"],
            imageConfig={"aspectRatio": "16:9"},
        ),
    )
    assert png_parts(wide)[0].size == (256, 144)
    reseeded = post(emu, ask("A red fox in the snow", responseModalities=["IMAGE"], seed=42))
    assert png_parts(reseeded)[0].tobytes() != img.tobytes()
    both = parts(post(emu, ask("A red fox", responseModalities=["text", "image"])))
    assert "text" in both[0] and "thoughtSignature" in both[0] and "inlineData" in both[1]


def test_image_edit_differs_from_input_and_from_generation():
    source = image_bytes("PNG", (120, 80), (30, 120, 200))
    edit = png_parts(post(Emulator(), ask("Add a hat", inline(source), responseModalities=["IMAGE"])))[0]
    drawn = png_parts(post(Emulator(), ask("Add a hat", responseModalities=["IMAGE"])))[0]
    original = Image.open(io.BytesIO(source)).convert("RGB")
    assert edit.width == 256 and edit.tobytes() != drawn.tobytes()
    assert edit.convert("RGB").resize(original.size).tobytes() != original.tobytes()
    # A follow-up turn without an image edits the model's previous image.
    follow_up = {
        "contents": [
            {"role": "user", "parts": [{"text": "Draw a boat"}]},
            {"role": "model", "parts": [{**inline(source), "thoughtSignature": "c2ln"}]},
            {"role": "user", "parts": [{"text": "Make it red"}]},
        ],
        "generationConfig": {"responseModalities": ["IMAGE"]},
    }
    again = png_parts(post(Emulator(), follow_up))[0]
    assert again.size == edit.size and again.tobytes() != drawn.tobytes()


def test_every_image_part_is_signed_and_must_come_back_signed():
    emu = Emulator()
    answer = parts(post(emu, ask("A boat", responseModalities=["TEXT", "IMAGE"])))
    assert [("text" in p, bool(p.get("thoughtSignature"))) for p in answer] == [(True, True), (False, True)]
    image = {k: v for k, v in answer[1].items() if k != "thoughtSignature"}

    def follow_up(model_parts: list) -> dict:
        return {
            "contents": [
                {"role": "user", "parts": [{"text": "A boat"}]},
                {"role": "model", "parts": model_parts},
                {"role": "user", "parts": [{"text": "Make it red"}]},
            ],
            "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]},
        }

    assert post(emu, follow_up(answer)).status_code == 200
    google_error(
        post(emu, follow_up([answer[0], image])),
        400,
        "INVALID_ARGUMENT",
        "Image part is missing a thought_signature in content position 2, part position 2",
    )
    skip = {**image, "thoughtSignature": "skip_thought_signature_validator"}
    assert post(emu, follow_up([skip])).status_code == 200  # the documented placeholder
    bad = {**image, "thoughtSignature": "@@"}
    google_error(post(emu, follow_up([bad])), 400, "INVALID_ARGUMENT", "Base64 decoding failed")
    # A user turn's images need no signature.
    assert post(emu, ask("Edit", image, responseModalities=["IMAGE"])).status_code == 200


# --- magic markers ---------------------------------------------------------------------------


def test_safety_marker():
    candidate = post(Emulator(), ask("Tell me [emulator:safety]")).json()["candidates"][0]
    assert candidate["finishReason"] == "SAFETY" and "content" not in candidate
    assert [r["probability"] for r in candidate["safetyRatings"]].count("HIGH") == 1


def test_block_marker():
    body = post(Emulator(), ask("[emulator:block] hi")).json()
    assert "candidates" not in body
    assert body["promptFeedback"]["blockReason"] == "SAFETY"
    assert body["usageMetadata"]["promptTokenCount"] > 0


def test_recitation_and_empty_markers():
    candidate = post(Emulator(), ask("[emulator:recitation]")).json()["candidates"][0]
    assert candidate["finishReason"] == "RECITATION" and "content" not in candidate
    empty = post(Emulator(), ask("[emulator:empty]")).json()
    assert empty["candidates"] == [] and "candidatesTokenCount" not in empty["usageMetadata"]


@pytest.mark.parametrize(
    "code,status",
    [
        (400, "INVALID_ARGUMENT"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
    ],
)
def test_status_marker(code, status):
    google_error(post(Emulator(), ask(f"x [emulator:status={code}]")), code, status, "")


def test_sleep_marker_allows_timeout_tests():
    emu = Emulator()

    async def go() -> None:
        async with client(emu) as c:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.post(GENERATE, json=ask("[emulator:sleep=30]")), 0.05)

    started = time.perf_counter()
    asyncio.run(go())
    assert time.perf_counter() - started < 15  # the timeout ended it, not the 30 s sleep
    assert emu.stats.in_flight == 0


# --- validation ------------------------------------------------------------------------------


def turn(*parts: dict, role: str = "user") -> dict:
    """A request of one content with these parts."""
    return {"contents": [{"role": role, "parts": list(parts)}]}


def blob(data: str, mime: str = "image/png") -> dict:
    return {"inlineData": {"mimeType": mime, "data": data}}


SAY_X = {"text": "x"}
BASE64_ERROR = (
    "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"@@not"
)
OBJECT_WITH_EXTRA = {
    "type": "OBJECT",
    "properties": {"a": {"type": "STRING"}},
    "additionalProperties": False,
}


def safety(category: str, threshold: str) -> dict:
    return {**turn(SAY_X), "safetySettings": [{"category": category, "threshold": threshold}]}


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"{not json", "Invalid JSON payload received."),
        (b'{"contents": NaN}', "Invalid JSON payload received."),
        (b"[1, 2]", "Root element must be a message"),
        ({**turn(SAY_X), "foo": 1}, 'Unknown name "foo": Cannot find field.'),
        ({"contents": []}, "contents is not specified"),
        ({"generationConfig": {}}, "contents is not specified"),
        (turn(SAY_X, role="assistant"), "Please use a valid role: user, model."),
        (turn(), "parts must not be empty"),
        (turn({"thought": True}), "required oneof field 'data'"),
        (turn(SAY_X, blob("@@not base64@@")), BASE64_ERROR),
        (turn(SAY_X, blob("QUJD" * 40)), "Unable to process input image"),
        (ask("x", temprature=0.5), "Unknown name \"temprature\" at 'generation_config'"),
        (ask("x", candidateCount=9), "candidate_count"),
        (ask("x", temperature="hot"), "generation_config.temperature"),
        (ask("x", responseMimeType="text/csv"), "allowed mimetypes"),
        (ask("x", responseModalities=["SMELL"]), "response_modalities[0]"),
        (ask("x", responseSchema={"type": "STRING"}), "must be application/json"),
        (
            ask("x", responseMimeType="application/json", responseSchema=OBJECT_WITH_EXTRA),
            'Unknown name "additionalProperties"',
        ),
        (safety("HARM_CATEGORY_MEAN", "BLOCK_NONE"), "safety_settings[0].category"),
        (safety("HARM_CATEGORY_HARASSMENT", "SOMETIMES"), "safety_settings[0].threshold"),
    ],
)
def test_validation_errors(body, fragment):
    google_error(post(Emulator(), body), 400, "INVALID_ARGUMENT", fragment)


def test_accepts_snake_case_and_url_safe_base64():
    data = base64.urlsafe_b64encode(image_bytes()).decode().rstrip("=")
    body = {
        "system_instruction": {"parts": [{"text": "Be brief"}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Hi"},
                    {"inline_data": {"mime_type": "image/png", "data": data}},
                ],
            }
        ],
        "generation_config": {"max_output_tokens": 100, "candidate_count": 1},
        "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }
    assert "Image 1: PNG 64x48." in text(post(Emulator(), body))


def test_base64_error_echo_is_truncated():
    r = post(Emulator(), ask("x", blob("!" * 500)))
    error = google_error(r, 400, "INVALID_ARGUMENT", "Base64 decoding failed")
    assert len(error["message"]) < 150


def test_payload_too_large():
    body = b'{"contents": [{"parts": [{"text": "' + b"a" * (20 * 1024 * 1024) + b'"}]}]}'
    emu = Emulator()
    error = google_error(post(emu, body), 413, "INVALID_ARGUMENT", "Request payload size exceeds")
    assert error["message"] == "Request payload size exceeds the limit: 20971520 bytes."
    segmind = post(emu, body, url=SEGMIND, headers={"content-type": "application/json"})
    assert segmind.status_code == 413 and "exceeds the limit" in segmind.json()["error"]
    assert emu.stats.requests == 2 and not emu.stats.by_body  # counted, never read
    assert post(emu, body, url=COUNT).status_code == 413


def test_unknown_model_and_method():
    r = post(Emulator(), ask("x"), url="/v1beta/models/gpt-4o:generateContent")
    google_error(r, 404, "NOT_FOUND", "models/gpt-4o is not found for API version v1beta")
    ok = post(Emulator(), ask("x"), url="/v1beta/models/emulator-small:generateContent")
    assert ok.json()["modelVersion"] == "emulator-emulator-small"
    google_error(
        post(Emulator(), ask("x"), url="/v1beta/models/gemini-2.5-flash:dance"),
        404,
        "NOT_FOUND",
        "",
    )


# --- auth ------------------------------------------------------------------------------------


def test_google_api_key():
    emu = Emulator(api_key="sekret")
    google_error(post(emu, ask("x")), 403, "PERMISSION_DENIED", "unregistered callers")
    wrong = google_error(
        post(emu, ask("x"), headers={"x-goog-api-key": "nope"}),
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
    )
    assert wrong["details"][0]["reason"] == "API_KEY_INVALID"
    assert post(emu, ask("x"), headers={"x-goog-api-key": "sekret"}).status_code == 200
    assert post(emu, ask("x"), url=GENERATE + "?key=sekret").status_code == 200
    assert post(Emulator(), ask("x"), headers={"x-goog-api-key": "anything"}).status_code == 200


def test_segmind_api_key():
    emu = Emulator(api_key="sekret")
    body = {"messages": ask("x")}
    missing = post(emu, body, url=SEGMIND)
    assert missing.status_code == 401
    assert missing.json() == {"error": "Missing Authorization or x-api-key in header"}
    wrong = post(emu, body, url=SEGMIND, headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("Unauthorized. API key is invalid")
    assert post(emu, body, url=SEGMIND, headers={"x-api-key": "sekret"}).status_code == 200
    assert post(emu, body, url=SEGMIND, headers={"authorization": "Bearer sekret"}).status_code == 200


# --- Segmind ---------------------------------------------------------------------------------


def test_segmind_unwraps_messages_like_google():
    png = image_bytes()
    google = ask("What's in this image?", inline(png, "image/jpeg"))
    google["systemInstruction"] = {"parts": [{"text": "You are a helpful assistant."}]}
    segmind = {
        "messages": {
            "system_instruction": {"parts": {"text": "You are a helpful assistant."}},
            "contents": google["contents"],
        }
    }
    via_segmind, via_google = post(Emulator(), segmind, url=SEGMIND), post(Emulator(), google)
    assert text(via_segmind) == text(via_google)
    assert "Image 1: PNG 64x48." in text(via_segmind) and "(system: You are a helpful" in text(via_segmind)
    assert via_segmind.json()["usageMetadata"] == via_google.json()["usageMetadata"]


@pytest.mark.parametrize(
    "url,body,headers,code,fragment",
    [
        (SEGMIND, b"{oops", {"content-type": "application/json"}, 400, "Invalid JSON"),
        (SEGMIND, {"contents": []}, {}, 400, "Unsupported parameter: contents"),
        (SEGMIND, {"messages": [1]}, {}, 400, '"messages" must be an object'),
        (
            SEGMIND,
            {"messages": {"contents": [{"role": "bot", "parts": [{"text": "x"}]}]}},
            {},
            400,
            "valid role",
        ),
        (SEGMIND, b'{"messages": {}}', {}, 406, "Content-Type must be application/json"),
        ("/v1/flux-schnell", {"messages": ask("x")}, {}, 404, "Model not found"),
        (SEGMIND, {"messages": ask("[emulator:status=500]")}, {}, 500, "internal error"),
    ],
)
def test_segmind_error_shapes(url, body, headers, code, fragment):
    r = post(Emulator(), body, url=url, headers=headers)
    assert r.status_code == code
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert fragment in r.json()["error"]


# --- faults and stats ------------------------------------------------------------------------


def test_fail_first_with_retry_after():
    emu = Emulator(fail_first=2, retry_after=1.5)
    body = ask("Flaky")
    for _ in range(2):
        r = post(emu, body)
        google_error(r, 503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        assert r.headers["retry-after"] == "1.5"
    assert post(emu, body).status_code == 200
    assert post(emu, ask("Another body")).status_code == 503  # counted per distinct body
    emu.reset_stats()
    assert post(emu, body).status_code == 503  # a reset restarts the count


def test_fail_first_429_carries_retry_info():
    emu = Emulator(fail_first=1, fail_status=429, retry_after=2)
    error = google_error(post(emu, ask("x")), 429, "RESOURCE_EXHAUSTED", "exhausted")
    assert error["details"] == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}]
    segmind = post(emu, {"messages": ask("x")}, url=SEGMIND)
    assert segmind.status_code == 429 and isinstance(segmind.json()["error"], str)
    assert segmind.headers["retry-after"] == "2" and "x-rate-limit-reset-at-utc" in segmind.headers
    assert "retry-after" not in post(Emulator(fail_first=1), ask("x")).headers


def test_stats_count_requests_bodies_and_concurrency():
    emu = Emulator(latency=0.05)

    async def burst() -> list[httpx.Response]:
        async with client(emu) as c:
            return await asyncio.gather(*(c.post(GENERATE, json=ask(f"q{i % 3}")) for i in range(6)))

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    sent = sum(len(r.request.content) for r in answers) + len(b"not json")  # bodies, every route
    # Concurrent, not serial: all six were in flight at once (max_in_flight below), which a
    # loaded machine cannot fake; a wall-clock bound (0.3 s serial) could.
    post(emu, b"not json")  # failures count too
    stats = emu.stats
    assert isinstance(stats, Stats)
    assert stats.requests == 7 and stats.in_flight == 0 and stats.max_in_flight == 6
    assert len(stats.by_body) == 4
    assert stats.by_body[hashlib.sha256(b"not json").hexdigest()] == 1
    assert sorted(stats.by_body.values()) == [1, 2, 2, 2]

    async def over_http() -> tuple[dict, dict]:
        async with client(emu) as c:
            before = (await c.get("/emulator/stats")).json()
            await c.post("/emulator/reset")
            return before, (await c.get("/emulator/stats")).json()

    before, after = asyncio.run(over_http())
    assert before == {
        "requests": 7,
        "distinct_bodies": 4,
        "max_in_flight": 6,
        "in_flight": 0,
        "bytes_received": sent,
        "uploads": 0,
    }
    assert after == {
        "requests": 0,
        "distinct_bodies": 0,
        "max_in_flight": 0,
        "in_flight": 0,
        "bytes_received": 0,
        "uploads": 0,
    }


def test_count_tokens_matches_usage():
    emu = Emulator()
    body = ask("Count these tokens please", inline(image_bytes()))
    body["systemInstruction"] = {"parts": [{"text": "Be nice"}]}
    usage = post(emu, body).json()["usageMetadata"]
    wrapped = post(emu, {"generateContentRequest": {"model": "models/gemini-2.5-flash", **body}}, url=COUNT)
    assert wrapped.json()["totalTokens"] == usage["promptTokenCount"]
    bare = post(emu, {"contents": body["contents"]}, url=COUNT).json()
    assert bare["totalTokens"] == usage["promptTokenCount"] - 2  # without the system instruction
    assert emu.stats.requests == 1  # countTokens is not a generate call
    google_error(post(emu, {"contents": []}, url=COUNT), 400, "INVALID_ARGUMENT", "contents is not specified")


# --- TCP -------------------------------------------------------------------------------------


def test_serves_over_tcp_with_uvicorn():
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    emu = Emulator()
    server = uvicorn.Server(uvicorn.Config(emu, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        # Not a fixed 5 s: a loaded machine may take longer to start it.
        wait_for(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started
        r = httpx.post(f"http://127.0.0.1:{port}{GENERATE}", json=ask("Over the wire"))
        assert r.status_code == 200 and text(r) == 'Emulated reply to: "Over the wire".'
        assert httpx.get(f"http://127.0.0.1:{port}/emulator/stats").json()["requests"] == 1
    finally:
        server.should_exit = True
        thread.join(5)
    assert not thread.is_alive()


def test_serve_runs_uvicorn(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    emu = Emulator()
    serve(emu, port=9999)
    assert calls[0][0] is emu
    assert calls[0][1]["host"] == "127.0.0.1" and calls[0][1]["port"] == 9999


# --- trust at the edges: size limit, rendering off the loop, batch memory, markers off ---------


LIMIT = 20 * 1024 * 1024


def _http_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


def test_declared_oversized_body_is_refused_unread(served_emulator):
    """Content-Length over the limit: 413 at once, while almost none of the body was sent."""
    server = served_emulator()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(
            f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * LIMIT}\r\n\r\n".encode()
            + b'{"contents": ['
            + b" " * 65536
        )  # 64 KiB of a declared 1 GiB: a server that reads the body first never answers
        status, body = _http_response(sock)
    assert status == 413
    assert json.loads(body)["error"] == {
        "code": 413,
        "status": "INVALID_ARGUMENT",
        "message": "Request payload size exceeds the limit: 20971520 bytes.",
    }
    assert server.emulator.stats.requests == 1 and not server.emulator.stats.by_body


def test_chunked_oversized_body_is_refused_while_streaming(served_emulator):
    """No Content-Length: the server stops reading at the limit and answers 413 then, not after
    the client has sent everything (a server that buffers first would wait for all 200 MiB)."""
    server = served_emulator()
    total, piece = 10 * LIMIT, b" " * (1 << 20)
    sent, answered = [0], threading.Event()

    def send(sock: socket.socket) -> None:
        try:
            while sent[0] < total and not answered.is_set():
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent[0] += len(piece)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection after refusing the body
            pass

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        status, body = _http_response(sock)
        sent_when_answered = sent[0]
        answered.set()
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
    assert status == 413 and b"exceeds the limit" in body
    # The limit, plus what loopback socket buffers hold: far from the 200 MiB offered.
    assert sent_when_answered < LIMIT + 24 * 2**20, sent_when_answered


class HeldRenderer:
    """Replaces the emulator's prompt drawing: signals when drawing starts and holds it there
    until released, so a test can act while an image is being drawn; times the real drawing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from gemframe.emulator import render as _emulator_render

        self.started, self.release = threading.Event(), threading.Event()
        self.durations: list[float] = []
        self.original = _emulator_render.render_prompt
        monkeypatch.setattr(_emulator_render, "render_prompt", self.render)

    def render(self, *args: Any, **kwargs: Any) -> bytes:
        self.started.set()
        self.release.wait(30)
        begin = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.durations.append(time.perf_counter() - begin)

    def answer_meanwhile(self, url: str) -> None:
        """Once drawing has started, a small text request must be answered (then release)."""
        try:
            assert self.started.wait(30), "the image request never reached the renderer"
            try:
                small = httpx.post(url + GENERATE, json=ask("small"), timeout=10)
            except httpx.TimeoutException:
                pytest.fail("a text request waited for an image being drawn: the loop was blocked")
            assert text(small) == 'Emulated reply to: "small".'
        finally:
            self.release.set()


def _in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    thread.start()
    return thread, answers


def test_image_rendering_does_not_block_other_requests(served_emulator, monkeypatch):
    """A 2,000-character unspaced prompt drawn as an image: while it is being drawn (held there
    until the small request has its answer), a small text request is answered; and the drawing
    itself takes well under a few seconds (it took ~50 s when wrapping was cubic)."""
    renderer = HeldRenderer(monkeypatch)
    server = served_emulator()
    body = ask("x" * 2000, responseModalities=["IMAGE"])
    worker, heavy = _in_thread(lambda: httpx.post(server.url + GENERATE, json=body, timeout=120))
    renderer.answer_meanwhile(server.url)
    worker.join(120)
    assert len(png_parts(heavy[0])) == 1
    assert renderer.durations[0] < 5, f"drawing 2,000 characters took {renderer.durations[0]:.1f} s"


def test_batch_image_rendering_does_not_block_other_requests(served_emulator, monkeypatch):
    """The poll that finishes a batch job draws its images: other requests go on meanwhile."""
    renderer = HeldRenderer(monkeypatch)
    server = served_emulator(batch_polls=1)
    requests = [{"request": ask(f"draw {i}", responseModalities=["IMAGE"])} for i in range(3)]
    job = {"batch": {"displayName": "images", "inputConfig": {"requests": {"requests": requests}}}}
    create = server.url + "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
    name = httpx.post(create, json=job).json()["name"]
    worker, poll = _in_thread(lambda: httpx.get(f"{server.url}/v1beta/{name}", timeout=120))
    renderer.answer_meanwhile(server.url)
    worker.join(120)
    answers = poll[0].json()["response"]["inlinedResponses"]["inlinedResponses"]
    images = [a["response"]["candidates"][0]["content"]["parts"][0] for a in answers]
    assert len(images) == 3 and all("inlineData" in part for part in images)


def test_finished_batch_jobs_are_freed():
    """Many jobs run to completion: only the last batch_keep finished ones stay (older ones are
    deleted: 404); an unfinished job is never dropped; job names stay unique."""
    emu = Emulator(batch_polls=1, batch_keep=5)
    create = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"

    def job(i: int) -> dict:
        requests = [{"request": ask(f"job {i} row {r}")} for r in range(3)]
        config = {"requests": {"requests": requests}}
        return {"batch": {"displayName": f"j{i}", "inputConfig": config}}

    async def go() -> tuple[str, list[str], dict, httpx.Response, httpx.Response]:
        async with client(emu) as c:
            pending = (await c.post(create, json=job(-1))).json()["name"]  # never polled
            names = []
            for i in range(40):
                name = (await c.post(create, json=job(i))).json()["name"]
                names.append(name)
                assert (await c.get(f"/v1beta/{name}")).json()["done"] is True
            listed = (await c.get("/v1beta/batches")).json()
            first = await c.get(f"/v1beta/{names[0]}")
            last = await c.get(f"/v1beta/{names[-1]}")
            return pending, names, listed, first, last

    pending, names, listed, first, last = asyncio.run(go())
    assert len(set(names)) == 40
    kept = [op["name"] for op in listed["operations"]]
    assert kept == [pending, *names[-5:]] and len(emu.batches.jobs) == 6
    google_error(first, 404, "NOT_FOUND", f"Batch {names[0]} not found.")
    answers = last.json()["response"]["inlinedResponses"]["inlinedResponses"]
    assert [a["response"]["candidates"][0]["content"]["parts"][0]["text"] for a in answers] == [
        f'Emulated reply to: "job 39 row {r}".' for r in range(3)
    ]


MARKED = "Tell me [emulator:status=500] [emulator:safety] [emulator:block] [emulator:sleep=30]"


def test_markers_off_answers_marker_prompts_normally():
    emu = Emulator(markers=False)
    r = post(emu, ask(MARKED))
    assert text(r) == f'Emulated reply to: "{MARKED}".'
    assert r.json()["candidates"][0]["finishReason"] == "STOP"
    assert post(Emulator(), ask("Tell me [emulator:status=500]")).status_code == 500  # default


@pytest.mark.parametrize("flags", [[], ["--no-markers"]])
def test_cli_emulator_startup_line_says_how_to_turn_markers_off(flags):
    import os
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prompt = "Tell me [emulator:status=500]"
    command = [sys.executable, "-m", "gemframe", "emulator", "--port", str(port), *flags]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"gemframe emulator on http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:  # until uvicorn accepts connections
            try:
                r = httpx.post(f"http://127.0.0.1:{port}{GENERATE}", json=ask(prompt), timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    if flags:
        assert "test markers off" in line
        assert text(r) == f'Emulated reply to: "{prompt}".'
    else:
        assert "--no-markers turns them off" in line
        assert r.status_code == 500


def test_the_emulator_imports_nothing_of_the_client_side(repo_root):
    """A test oracle must not share code with what it tests: only emulator/provider.py (the
    "emulator" provider, speaking gemframe's provider contract) imports from the core."""
    import ast

    modules = sorted((repo_root / "gemframe" / "emulator").glob("*.py"))
    assert {"app.py", "answers.py", "validation.py", "render.py", "batch.py", "provider.py"} <= {
        p.name for p in modules
    }
    reaching_out = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("gemframe")):
                reaching_out.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("gemframe") for a in node.names):
                reaching_out.append(f"{path.name}: import {node.names[0].name}")
    assert reaching_out == ["provider.py: from .._core.providers"]


# --- model names: refused like the real API ----------------------------------------------------


def test_a_model_no_gemini_model_has_is_the_real_apis_404():
    emu = Emulator()
    for action in ("generateContent", "countTokens"):
        r = post(emu, ask("x"), url=f"/v1beta/models/gemini-2.5-flsh:{action}")
        error = google_error(r, 404, "NOT_FOUND", "")
        assert error["message"] == (
            f"models/gemini-2.5-flsh is not found for API version v1beta, or is not supported for {action}. "
            "Call ListModels to see the list of available models and their supported methods."
        )
    batch = {"batch": {"input_config": {"requests": {"requests": [{"request": ask("x")}]}}}}
    google_error(
        post(emu, batch, url="/v1beta/models/gemini-2.5-flsh:batchGenerateContent"),
        404,
        "NOT_FOUND",
        "gemini-2.5-flsh is not found",
    )
    assert emu.batches.creates == 0
    for model in (
        "gemini-2.5-flash",
        "gemini-2.5-flash-preview-05-20",
        "gemini-2.0-flash-001",
        "gemini-flash-latest",
        "gemini-2.0-flash-preview-image-generation",
        "gemini-2.5-flash-image-preview",
        "emulator-small",
    ):
        assert post(emu, ask("x"), url=f"/v1beta/models/{model}:generateContent").status_code == 200, model
    assert (
        post(Emulator(models=None), ask("x"), url="/v1beta/models/gemini-2.5-flsh:generateContent").status_code == 200
    )
    assert (
        post(Emulator(models=["my-model"]), ask("x"), url="/v1beta/models/my-model-001:generateContent").status_code
        == 200
    )


def test_a_misspelt_model_fails_the_call_once_with_a_did_you_mean(tmp_path):
    import polars as pl

    import gemframe as gf

    emu = Emulator()
    frame = pl.DataFrame({"prompt": ["a", "b", "c"]})
    with gf.Client(
        gf.EmulatorProvider(app=emu), model="gemini-2.5-flsh", cache_dir=str(tmp_path), progress=False, concurrency=1
    ) as client:
        with pytest.raises(gf.NotFoundError) as caught:
            frame.with_columns(gf.generate("prompt", client=client))
    text = str(caught.value)
    assert text.startswith("404 NOT_FOUND: models/gemini-2.5-flsh is not found for API version v1beta")
    assert "Did you mean 'gemini-2.5-flash'? Check the model name" in text
    assert emu.stats.requests == 1  # the first answer stops the call


# --- Files API, context caching, batch output: the raw HTTP shapes ----------------------------

UPLOAD = "/upload/v1beta/files"


def start_upload(c: httpx.AsyncClient, size: int | None, mime: str = "image/png"):
    """Start a resumable upload (a coroutine: await it)."""
    sent = {
        "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Type": mime,
    }
    if size is not None:
        sent["X-Goog-Upload-Header-Content-Length"] = str(size)
    return c.post(UPLOAD, json={"file": {"displayName": "d"}}, headers=sent)


def send_chunk(c: httpx.AsyncClient, url: str, data: bytes, offset: int, command: str = "upload, finalize"):
    return c.post(url, content=data, headers={"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)})


def test_resumable_upload_in_chunks_and_its_protocol_errors():
    emu, png = Emulator(), image_bytes()

    async def go() -> dict[str, httpx.Response]:
        async with client(emu) as c:
            seen = {"simple": await c.post(UPLOAD, content=png, headers={"Content-Type": "image/png"})}
            url = (await start_upload(c, len(png))).headers["x-goog-upload-url"]
            seen["first"] = await send_chunk(c, url, png[:10], 0, "upload")
            seen["query"] = await send_chunk(c, url, b"", 0, "query")
            seen["rest"] = await send_chunk(c, url, png[10:], 10)
            seen["reused"] = await send_chunk(c, url, png, 0)  # the session ended with the file
            url = (await start_upload(c, len(png))).headers["x-goog-upload-url"]
            seen["bad offset"] = await send_chunk(c, url, png, 5)
            seen["after error"] = await send_chunk(c, url, png, 0)
            return seen

    seen = asyncio.run(go())
    google_error(seen["simple"], 400, "INVALID_ARGUMENT", "resumable uploads")
    assert seen["first"].headers["x-goog-upload-status"] == "active"
    assert seen["first"].headers["x-goog-upload-size-received"] == "10"
    assert seen["query"].headers["x-goog-upload-size-received"] == "10"
    assert seen["rest"].headers["x-goog-upload-status"] == "final"
    file = seen["rest"].json()["file"]
    assert file["sizeBytes"] == str(len(png)) and file["state"] == "ACTIVE"  # int64: a string
    assert base64.b64decode(file["sha256Hash"]).decode() == hashlib.sha256(png).hexdigest()
    assert file["uri"] == f"http://emulator/v1beta/{file['name']}"
    for name in ("reused", "after error"):
        assert seen[name].headers["x-goog-upload-status"] == "final"  # else the SDK retries
        google_error(seen[name], 404, "NOT_FOUND", "Upload session not found")
    error = google_error(seen["bad offset"], 400, "INVALID_ARGUMENT", "Invalid X-Goog-Upload-Offset '5'")
    assert seen["bad offset"].headers["x-goog-upload-status"] == "final" and error
    assert not emu.files.sessions and len(emu.files.files) == 1


def test_upload_size_limits_refuse_bytes_before_holding_them():
    """A declared size over a limit is refused at start; bytes past the room left (the declared
    size, the per-file limit, the total) are refused while read, and the session is freed."""
    emu = Emulator(file_max_bytes=1000, files_total_bytes=1500)
    pdf = b"%PDF-1.4 " + b"x" * 891  # 900 bytes

    async def go() -> dict[str, httpx.Response]:
        async with client(emu) as c:
            seen = {"declared too big": await start_upload(c, 1001, "application/pdf")}
            url = (await start_upload(c, 900, "application/pdf")).headers["x-goog-upload-url"]
            seen["stored"] = await send_chunk(c, url, pdf, 0)
            seen["no room left"] = await start_upload(c, 700, "application/pdf")
            url = (await start_upload(c, 10, "application/pdf")).headers["x-goog-upload-url"]
            seen["past declared"] = await send_chunk(c, url, pdf[:11], 0)
            url = (await start_upload(c, None, "application/pdf")).headers["x-goog-upload-url"]
            seen["past total"] = await send_chunk(c, url, pdf[:601], 0)
            return seen

    seen = asyncio.run(go())
    google_error(seen["declared too big"], 413, "INVALID_ARGUMENT", "File size exceeds the limit: 1000 bytes.")
    assert seen["stored"].json()["file"]["sizeBytes"] == "900"
    google_error(seen["no room left"], 413, "INVALID_ARGUMENT", "Files storage limit exceeded: at most 1500 bytes")
    google_error(
        seen["past declared"],
        400,
        "INVALID_ARGUMENT",
        "exceeds the declared X-Goog-Upload-Header-Content-Length of 10 bytes",
    )
    google_error(seen["past total"], 413, "INVALID_ARGUMENT", "Files storage limit exceeded")
    assert not emu.files.sessions and emu.files._used() == 900


def test_an_upload_chunk_over_the_limit_is_refused_unread(served_emulator):
    """A chunk declaring more than the session may take: 413 at once, its bytes never sent."""
    server = served_emulator(file_max_bytes=1 << 20)
    start = httpx.post(
        f"{server.url}{UPLOAD}",
        json={},
        headers={
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Type": "video/mp4",
        },
    )
    path = start.headers["x-goog-upload-url"].removeprefix(server.url)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Goog-Upload-Command: upload, finalize\r\n"
            f"X-Goog-Upload-Offset: 0\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
            + b"\0" * 65536
        )  # 64 KiB of a declared 1 GiB: a server that reads it first never answers
        status, body = _http_response(sock)
    assert status == 413 and b"File size exceeds the limit: 1048576 bytes." in body
    assert not server.emulator.files.sessions and not server.emulator.files.files


def test_file_data_naming_a_missing_file_is_the_apis_403_and_other_uris_stay_flat():
    emu = Emulator()
    missing = {
        "fileData": {
            "mimeType": "image/png",
            "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc123",
        }
    }
    error = google_error(post(emu, ask("x", missing)), 403, "PERMISSION_DENIED", "")
    assert error["message"] == "You do not have permission to access the File abc123 or it may not exist."
    youtube = {"fileData": {"mimeType": "video/mp4", "fileUri": "https://www.youtube.com/watch?v=9hE5-98ZeCg"}}
    r = post(emu, ask("x", youtube))
    assert r.status_code == 200 and "File 1: video/mp4 https://www.youtube.com" in text(r)
    assert r.json()["usageMetadata"]["promptTokensDetails"][1] == {"modality": "VIDEO", "tokenCount": 258}


def test_cached_content_errors_and_counts():
    emu = Emulator(cache_min_tokens=10)
    contents = [{"role": "user", "parts": [{"text": "word " * 40}]}]  # 50 tokens

    async def go() -> dict[str, httpx.Response]:
        async with client(emu) as c:
            seen = {
                "both expiries": await c.post(
                    "/v1beta/cachedContents",
                    json={
                        "model": "models/gemini-2.5-flash",
                        "contents": contents,
                        "ttl": "60s",
                        "expireTime": "2030-01-01T00:00:00Z",
                    },
                )
            }
            seen["bad ttl"] = await c.post(
                "/v1beta/cachedContents",
                json={"model": "models/gemini-2.5-flash", "contents": contents, "ttl": "an hour"},
            )
            seen["unknown model"] = await c.post(
                "/v1beta/cachedContents", json={"model": "models/gemini-2.5-flsh", "contents": contents}
            )
            made = await c.post(
                "/v1beta/cachedContents",
                json={"model": "models/gemini-2.5-flash", "contents": contents, "expireTime": "2099-01-01T00:00:00.5Z"},
            )
            name = made.json()["name"]
            seen["made"] = made
            seen["patch model"] = await c.patch(f"/v1beta/{name}", json={"model": "models/gemini-2.5-pro"})
            seen["with system"] = await c.post(
                GENERATE, json={**ask("q"), "cachedContent": name, "systemInstruction": {"parts": [{"text": "s"}]}}
            )
            seen["other model"] = await c.post(
                "/v1beta/models/gemini-2.0-flash:generateContent", json={**ask("q"), "cachedContent": name}
            )
            seen["missing"] = await c.post(GENERATE, json={**ask("q"), "cachedContent": "cachedContents/nope"})
            seen["count"] = await c.post(
                COUNT,
                json={
                    "generateContentRequest": {"model": "models/gemini-2.5-flash", **ask("q"), "cachedContent": name}
                },
            )
            return seen

    seen = asyncio.run(go())
    google_error(seen["both expiries"], 400, "INVALID_ARGUMENT", "only one of ttl and expire_time")
    google_error(
        seen["bad ttl"],
        400,
        "INVALID_ARGUMENT",
        "Invalid value at 'cached_content.ttl' (type.googleapis.com/google.protobuf.Duration)",
    )
    google_error(
        seen["unknown model"],
        404,
        "NOT_FOUND",
        "models/gemini-2.5-flsh is not found for API version v1beta, or is not supported for createCachedContent",
    )
    assert seen["made"].json()["expireTime"] == "2099-01-01T00:00:00.500000Z"
    assert seen["made"].json()["usageMetadata"] == {"totalTokenCount": 50}
    google_error(seen["patch model"], 400, "INVALID_ARGUMENT", "Only the expiration (ttl or expire_time)")
    google_error(
        seen["with system"],
        400,
        "INVALID_ARGUMENT",
        "CachedContent can not be used with GenerateContent request setting system_instruction, tools or tool_config.",
    )
    google_error(
        seen["other model"],
        400,
        "INVALID_ARGUMENT",
        "Model used by GenerateContent request (models/gemini-2.0-flash) and CachedContent (models/gemini-2.5-flash) has to be the same.",
    )
    google_error(seen["missing"], 403, "PERMISSION_DENIED", "CachedContent not found (or permission denied)")
    assert seen["count"].json() == {
        "totalTokens": 51,
        "cachedContentTokenCount": 50,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 51}],
    }


def test_a_finished_batch_carries_its_output_in_the_batch_resource_and_the_response():
    """The API puts the results in the batch's ``output`` (the operation's metadata: what the
    google-genai SDK reads as ``dest``) and in the operation's ``response`` (what gemframe reads)."""
    emu = Emulator(batch_polls=1)

    async def go() -> dict:
        async with client(emu) as c:
            gone = {"fileData": {"mimeType": "image/png", "fileUri": "files/gone"}}
            requests = [{"request": ask("a")}, {"request": ask("b", gone)}]
            body = {"batch": {"displayName": "j", "inputConfig": {"requests": {"requests": requests}}}}
            name = (await c.post("/v1beta/models/gemini-2.5-flash:batchGenerateContent", json=body)).json()["name"]
            return (await c.get(f"/v1beta/{name}")).json()

    operation = asyncio.run(go())
    output = operation["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert output == operation["response"]["inlinedResponses"]["inlinedResponses"]
    assert output[0]["response"]["candidates"][0]["content"]["parts"][0]["text"] == 'Emulated reply to: "a".'
    assert output[1] == {
        "error": {  # a per-request error keeps its own status
            "code": 403,
            "status": "PERMISSION_DENIED",
            "message": "You do not have permission to access the File gone or it may not exist.",
        }
    }
    assert operation["metadata"]["endTime"] >= operation["metadata"]["createTime"]


# --- video and audio input ---------------------------------------------------------------------


def mp4_bytes(payload: int = 0) -> bytes:
    """An MP4 as far as a signature goes: an ``ftyp`` box (brand isom) and an ``mdat`` box."""
    return (
        b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41"
        + (8 + payload).to_bytes(4, "big")
        + b"mdat"
        + bytes(payload)
    )


def test_video_and_audio_inline_data_count_tokens_per_second():
    """The documented video/audio MIME types are answered and counted as the tokens page says
    (263 a second of video, 32 of audio), the length a stand-in from the size (1 Mbit/s of video,
    128 kbit/s of audio); countTokens says the same; bytes that are not the declared container
    are refused. (On main every one was a 400 "Unable to process input image".)"""
    emu = Emulator()
    video = mp4_bytes(300_000)  # 300,032 bytes: 3 seconds at 125,000 bytes a second
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40_000)  # 40,016 bytes: 3 seconds at 16,000
    body = ask("x", inline(video, "video/mp4"), inline(wav, "audio/wav"))
    r = post(emu, body)
    assert (
        text(r) == f'Emulated reply to: "x". Video 1: video/mp4, {len(video)} bytes. Audio 1: audio/wav, 40016 bytes.'
    )
    details = {d["modality"]: d["tokenCount"] for d in r.json()["usageMetadata"]["promptTokensDetails"]}
    assert details == {"TEXT": 1, "VIDEO": 3 * 263, "AUDIO": 3 * 32}
    assert post(emu, body, url=COUNT).json()["totalTokens"] == 1 + 3 * 263 + 3 * 32
    tiny = post(emu, ask("x", inline(b"fLaC" + bytes(10), "audio/flac")))  # at least one second
    assert tiny.json()["usageMetadata"]["promptTokenCount"] == 1 + 32
    google_error(
        post(emu, ask("x", inline(b"just some text", "video/mp4"))), 400, "INVALID_ARGUMENT", "invalid argument"
    )


def test_an_uploaded_video_is_counted_per_second_by_file_data():
    emu = Emulator()
    video = mp4_bytes(1_000_000)  # 8.0003 seconds at 125,000 bytes a second: 9

    async def go() -> httpx.Response:
        async with client(emu) as c:
            url = (await start_upload(c, len(video), "video/mp4")).headers["x-goog-upload-url"]
            file = (await send_chunk(c, url, video, 0)).json()["file"]
            part = {"fileData": {"mimeType": "video/mp4", "fileUri": file["uri"]}}
            return await c.post(GENERATE, json=ask("x", part))

    r = asyncio.run(go())
    assert f"Video 1: video/mp4, {len(video)} bytes." in text(r)
    assert r.json()["usageMetadata"]["promptTokensDetails"][1] == {"modality": "VIDEO", "tokenCount": 9 * 263}
