import base64

import polars as pl

import gemframe as gf
from gemframe._core.response import ReplyColumn, decode, failed
from gemframe._core.schema import response_schema

PNG = b"\x89PNG\r\n\x1a\nfake"


def _decode(response, **kw):
    return decode(response, cached=False, attempts=1, latency_ms=5.0, **kw)


def test_text_joins_non_thought_parts_and_images_skip_thoughts():
    record = _decode(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [
                            {"text": "thinking...", "thought": True},
                            {"text": "Hello, "},
                            {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}},
                            {"inlineData": {"mimeType": "image/png", "data": "AAAA"}, "thought": True},
                            {"text": "world"},
                        ],
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 3,
                "candidatesTokenCount": 5,
                "totalTokenCount": 12,
                "thoughtsTokenCount": 4,
            },
            "modelVersion": "gemini-x",
            "responseId": "abc",
        }
    )
    assert record["text"] == "Hello, world" and record["thoughts"] == "thinking..."
    assert record["images"] == [{"mime_type": "image/png", "data": PNG}]
    assert (
        record["prompt_tokens"],
        record["candidates_tokens"],
        record["total_tokens"],
        record["thoughts_tokens"],
    ) == (3, 5, 12, 4)
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
    response = {
        "candidates": [
            {"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}}]}}
        ]
    }
    first = _decode(response, image_dir=str(tmp_path))
    again = _decode(response, image_dir=str(tmp_path))
    path = first["images"][0]["path"]
    assert path == again["images"][0]["path"] and path.endswith(".png")
    assert open(path, "rb").read() == PNG


def _column(records, dtype=gf.REPLY_DTYPE, schema=None, chunk=None, arrow_after=None):
    """A ReplyColumn with one row per record (None: a row with nothing to send)."""
    column = ReplyColumn(dtype, schema)
    if chunk:
        column.CHUNK = chunk
    if arrow_after is not None:
        column.ARROW_AFTER = arrow_after
    column.add_rows(len(records))
    for row, record in enumerate(records):
        if record is not None:
            column.point(row, column.add_answer(record)[0])
    return column


def test_series_has_the_declared_dtype():
    records = [
        _decode({"candidates": [{"content": {"parts": [{"text": "x"}]}}]}),
        None,
        failed(gf.RowError(503, "UNAVAILABLE", "busy"), attempts=5),
    ]
    series = _column(records).finish()
    assert series.name == "reply" and series.dtype == gf.REPLY_DTYPE
    assert series.is_null().to_list() == [False, True, False]
    frame = series.to_frame().unnest("reply")
    assert frame["error"].struct.field("status").to_list() == [None, None, "UNAVAILABLE"]
    assert frame["attempts"].to_list() == [1, None, 5]
    assert gf.reply_dtype(raw=True).to_schema()["raw"] == pl.String


def test_rows_share_answers_across_arrow_chunks_in_row_order():
    answers = [_decode({"candidates": [{"content": {"parts": [{"text": f"t{i}"}]}}]}) for i in range(7)]
    column = ReplyColumn(gf.REPLY_DTYPE)
    column.CHUNK = 3  # answers go to Arrow every 3: the rows below span three chunks
    column.add_rows(10)
    index = [column.add_answer(a)[0] for a in answers]
    # rows point at answers out of order, two rows share answer 5, row 4 stays null
    for row, answer in enumerate([6, 0, 5, 5, None, 1, 2, 3, 4, 0]):
        if answer is not None:
            column.point(row, index[answer])
    texts = column.finish("out").struct.field("text").to_list()
    assert texts == ["t6", "t0", "t5", "t5", None, "t1", "t2", "t3", "t4", "t0"]
    assert ReplyColumn(gf.REPLY_DTYPE).finish().len() == 0


def test_schema_parses_each_answer_once_and_marks_misfits():
    schema = response_schema(pl.Struct({"n": pl.Int64}))
    dtype = gf.reply_dtype(parsed=schema.dtype)
    good = _decode({"candidates": [{"content": {"parts": [{"text": '{"n": 3}'}]}, "finishReason": "STOP"}]})
    bad = _decode({"candidates": [{"content": {"parts": [{"text": '{"n": "x'}]}, "finishReason": "MAX_TOKENS"}]})
    frame = _column([good, bad, None], dtype, schema).finish().struct.unnest()
    assert frame["parsed"].to_list() == [{"n": 3}, None, None]
    assert frame["error"].struct.field("status").to_list() == [None, "PARSE_ERROR", None]
    assert "cut at maxOutputTokens" in frame["error"].struct.field("message")[1]


def test_arrow_chunks_hold_exactly_what_polars_would_build(tmp_path):
    """Long calls build chunks through pyarrow (faster); every field must come out as polars
    itself builds it from the same records: images, layout, errors, nulls, raw JSON, paths."""
    image = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG).decode()}, "thoughtSignature": "sig"}
    answers = [
        {
            "candidates": [{"content": {"parts": [{"text": "a"}, image]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 9},
            "modelVersion": "m",
            "responseId": "r",
        },
        {"promptFeedback": {"blockReason": "SAFETY"}},
        {"candidates": [{"content": {"parts": [{"text": "t", "thought": True}]}, "finishReason": "SAFETY"}]},
    ]
    for dtype, kw in (
        (gf.REPLY_DTYPE, {}),
        (gf.reply_dtype(raw=True), {}),
        (gf.reply_dtype(image_files=True), {"image_dir": str(tmp_path)}),
    ):
        records = [_decode(a, **kw) for a in answers] + [
            failed(gf.RowError(429, "RESOURCE_EXHAUSTED", "slow down"), attempts=3)
        ]
        if "raw" in dtype.to_schema():
            records = [{**r, "raw": f"json {i}"} for i, r in enumerate(records)]
        expected = pl.Series("reply", records, dtype=dtype)
        assert _column(records, dtype, arrow_after=0).finish().equals(expected)  # all through pyarrow
        assert _column(records, dtype, chunk=2, arrow_after=1).finish().equals(expected)  # mixed chunks
