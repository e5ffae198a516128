import base64

import polars as pl

import gemframe as gf
from gemframe.response import decode, failed, to_series

PNG = b"\x89PNG\r\n\x1a\nfake"


def _decode(response, **kw):
    return decode(response, cached=False, attempts=1, latency_ms=5.0, **kw)


def test_text_joins_non_thought_parts_and_images_skip_thoughts():
    record = _decode({
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"text": "thinking...", "thought": True},
                {"text": "Hello, "},
                {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}},
                {"inlineData": {"mimeType": "image/png", "data": "AAAA"}, "thought": True},
                {"text": "world"},
            ]},
            "finishReason": "STOP",
        }],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 5, "totalTokenCount": 12, "thoughtsTokenCount": 4},
        "modelVersion": "gemini-x", "responseId": "abc",
    })
    assert record["text"] == "Hello, world" and record["thoughts"] == "thinking..."
    assert record["images"] == [{"mime_type": "image/png", "data": PNG}]
    assert (record["prompt_tokens"], record["candidates_tokens"], record["total_tokens"], record["thoughts_tokens"]) == (3, 5, 12, 4)
    assert record["error"] is None and record["model_version"] == "gemini-x"


def test_blocked_and_empty_answers_say_why():
    blocked = _decode({"promptFeedback": {"blockReason": "SAFETY"}})
    assert blocked["block_reason"] == "SAFETY" and blocked["error"]["status"] == "BLOCKED"
    safety = _decode({"candidates": [{"finishReason": "SAFETY"}]})
    assert safety["finish_reason"] == "SAFETY" and safety["error"]["status"] == "SAFETY"
    none = _decode({"candidates": []})
    assert none["error"]["status"] == "NO_CANDIDATES"
    truncated = _decode({"candidates": [{"content": {"parts": [{"text": "abc"}]}, "finishReason": "MAX_TOKENS"}]})
    assert truncated["error"] is None


def test_images_to_files(tmp_path):
    response = {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}}]}}]}
    first = _decode(response, image_dir=str(tmp_path))
    again = _decode(response, image_dir=str(tmp_path))
    path = first["images"][0]["path"]
    assert path == again["images"][0]["path"] and path.endswith(".png")
    assert open(path, "rb").read() == PNG


def test_series_has_the_declared_dtype():
    records = [_decode({"candidates": [{"content": {"parts": [{"text": "x"}]}}]}), None, failed(gf.RowError(503, "UNAVAILABLE", "busy"), attempts=5)]
    series = to_series("reply", records, gf.REPLY_DTYPE)
    assert series.dtype == gf.REPLY_DTYPE
    assert series.is_null().to_list() == [False, True, False]
    frame = series.to_frame().unnest("reply")
    assert frame["error"].struct.field("status").to_list() == [None, None, "UNAVAILABLE"]
    assert frame["attempts"].to_list() == [1, None, 5]
    assert gf.reply_dtype(raw=True).to_schema()["raw"] == pl.String
