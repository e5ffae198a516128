"""gf.generate / gf.request / gf.send and the .gemini namespaces, end to end on the emulator."""

import json
import random
import warnings

import polars as pl
import pytest

import gemframe as gf
from gemframe.emulator import Emulator


def _text(frame: pl.DataFrame, column: str = "reply") -> list:
    return frame[column].struct.field("text").to_list()


def test_generate_text_and_images(client, emulator, png_path):
    df = pl.DataFrame({"prompt": ["Describe it", "Say hi"], "image_path": [str(png_path), None]})
    out = df.with_columns(reply=gf.generate("prompt", images="image_path", client=client)).unnest("reply")
    assert out.columns[:3] == ["prompt", "image_path", "text"]
    assert "Describe it" in out["text"][0] and "PNG 40x30" in out["text"][0]
    assert "Say hi" in out["text"][1] and "Image" not in out["text"][1]
    assert out["finish_reason"].to_list() == ["STOP", "STOP"]
    assert out["prompt_tokens"][0] > out["prompt_tokens"][1]  # the image costs tokens
    assert out["model_version"][0].startswith("emulator")
    assert out["error"].to_list() == [None, None] and out["cached"].to_list() == [False, False]
    assert emulator.stats.requests == 2


def test_lists_of_images_and_bytes(client, image_bytes):
    df = pl.DataFrame({"prompt": ["compare"], "images": [[image_bytes("PNG", (10, 10)), image_bytes("JPEG", (20, 5))]]})
    text = _text(df.with_columns(reply=gf.generate("prompt", images="images", client=client)))[0]
    assert "Image 1: PNG 10x10" in text and "Image 2: JPEG 20x5" in text


def test_second_run_is_served_from_cache(client, emulator):
    df = pl.DataFrame({"prompt": [f"question {i}" for i in range(20)]})
    first = df.with_columns(reply=gf.generate("prompt", client=client))
    assert emulator.stats.requests == 20
    second = df.with_columns(reply=gf.generate("prompt", client=client))
    assert emulator.stats.requests == 20  # counted at the server: nothing sent
    assert second["reply"].struct.field("cached").all()
    assert _text(first) == _text(second)


def test_cache_survives_a_new_client(emulator, cache_dir):
    df = pl.DataFrame({"prompt": ["a", "b"]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as one:
        df.with_columns(reply=gf.generate("prompt", client=one))
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as two:
        out = df.with_columns(reply=gf.generate("prompt", client=two))
    assert emulator.stats.requests == 2 and out["reply"].struct.field("cached").all()


def test_cache_modes(client, emulator):
    df = pl.DataFrame({"prompt": ["x", "y"]})
    replay = df.with_columns(reply=gf.generate("prompt", client=client, cache="read")).unnest("reply")
    assert emulator.stats.requests == 0
    assert replay["error"].struct.field("status").to_list() == ["CACHE_MISS", "CACHE_MISS"]
    df.with_columns(reply=gf.generate("prompt", client=client))
    assert emulator.stats.requests == 2
    replay = df.with_columns(reply=gf.generate("prompt", client=client, cache="read")).unnest("reply")
    assert replay["cached"].all() and replay["error"].is_null().all() and emulator.stats.requests == 2
    df.with_columns(reply=gf.generate("prompt", client=client, cache="refresh"))
    assert emulator.stats.requests == 4
    off = df.with_columns(reply=gf.generate("prompt", client=client, cache="off")).unnest("reply")
    assert emulator.stats.requests == 6 and not off["cached"].any()


def test_identical_rows_send_one_request(client, emulator):
    df = pl.DataFrame({"prompt": ["same"] * 50 + ["other"] * 50})
    out = df.with_columns(reply=gf.generate("prompt", client=client))
    assert emulator.stats.requests == 2 and len(emulator.stats.by_body) == 2
    assert set(_text(out)) == {t for t in _text(out)} and len(set(_text(out))) == 2


def test_samples_are_distinct_cache_entries(client, emulator):
    df = pl.DataFrame({"prompt": ["same"]})
    df.with_columns(reply=gf.generate("prompt", client=client, sample=0))
    df.with_columns(reply=gf.generate("prompt", client=client, sample=1))
    df.with_columns(reply=gf.generate("prompt", client=client, sample=1))
    assert emulator.stats.requests == 2


def test_row_order_with_concurrency_and_random_latency(emulator, cache_dir):
    jittery = Emulator(latency=0.001, jitter=0.02, seed=3)
    prompts = [f"row {i}" for i in range(300)]
    random.Random(0).shuffle(prompts)
    with gf.Client(gf.EmulatorProvider(app=jittery), cache_dir=str(cache_dir), concurrency=32, progress=False) as c:
        out = pl.DataFrame({"prompt": prompts}).with_columns(reply=gf.generate("prompt", client=c))
    assert [t.split('"')[1] for t in _text(out)] == prompts
    assert jittery.stats.max_in_flight > 1


def test_concurrency_limit_is_respected(cache_dir):
    slow = Emulator(latency=0.02)
    with gf.Client(gf.EmulatorProvider(app=slow), cache_dir=str(cache_dir), concurrency=5, progress=False) as c:
        pl.DataFrame({"prompt": [str(i) for i in range(60)]}).with_columns(reply=gf.generate("prompt", client=c))
    assert slow.stats.max_in_flight == 5


def test_nulls_send_nothing(client, emulator, png_path):
    df = pl.DataFrame({"prompt": [None, "text", None], "img": [None, None, str(png_path)]})
    out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert out["reply"].is_null().to_list() == [True, False, False]
    assert emulator.stats.requests == 2
    all_null = pl.DataFrame({"prompt": [None, None]}, schema={"prompt": pl.String})
    assert all_null.with_columns(reply=gf.generate("prompt", client=client))["reply"].is_null().all()
    assert emulator.stats.requests == 2


def test_empty_frame(client):
    empty = pl.DataFrame({"prompt": []}, schema={"prompt": pl.String})
    out = empty.with_columns(reply=gf.generate("prompt", client=client))
    assert out.height == 0 and out.schema["reply"] == gf.REPLY_DTYPE


def test_bad_image_is_a_row_error_and_the_rest_goes_on(client, emulator, tmp_path):
    df = pl.DataFrame({"prompt": ["a", "b"], "img": [str(tmp_path / "missing.png"), None]})
    out = df.with_columns(reply=gf.generate("prompt", images="img", client=client)).unnest("reply")
    assert out["error"][0]["status"] == "INVALID_INPUT" and "row 0" in out["error"][0]["message"]
    assert "missing.png" in out["error"][0]["message"]
    assert out["error"][1] is None and emulator.stats.requests == 1


def test_a_row_that_breaks_while_being_built_is_its_error_and_the_call_goes_on(client, emulator, tmp_path):
    """Rows whose building raises something unforeseen (here a path with a NUL byte, which
    os.stat refuses with ValueError, and image data that is not base64) are their own errors;
    the answers around them are kept."""
    rows = 300  # the broken row comes after a first lookup batch of 256 is in flight
    paths = [None] * rows
    paths[280] = str(tmp_path / "a\x00b.png")
    frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(rows)], "img": paths})
    out = frame.with_columns(reply=gf.generate("prompt", images="img", client=client)).unnest("reply")
    errors = out.filter(pl.col("error").is_not_null())["error"].to_list()
    assert len(errors) == 1 and errors[0]["status"] == "INVALID_INPUT" and errors[0]["message"].startswith("row 280: ")
    assert out["text"].is_not_null().sum() == rows - 1 and emulator.stats.requests == rows - 1
    images = pl.Series([{"mime_type": "image/png", "data": "bm90IGJhc2U2NA"}, None])  # padding cut off
    out = (
        pl.DataFrame({"prompt": ["x", "y"], "img": images})
        .with_columns(reply=gf.generate("prompt", images="img", client=client))
        .unnest("reply")
    )
    assert out["error"][0]["status"] == "INVALID_INPUT" and out["error"][0]["message"].startswith("row 0: ")
    assert out["error"][1] is None and emulator.stats.requests == rows


def test_wrong_column_type_fails_before_sending(client, emulator):
    with pytest.raises(gf.InputError, match=r"cast\(pl.String\)"):
        pl.DataFrame({"prompt": [1, 2]}).with_columns(reply=gf.generate("prompt", client=client))
    with pytest.raises(gf.ConfigError):
        gf.generate("prompt", config={"bogus": 1}, client=client)
    assert emulator.stats.requests == 0


def test_per_row_api_errors_do_not_stop_the_run(client):
    df = pl.DataFrame({"prompt": ["fine", "[emulator:status=400] broken", "[emulator:block] no"]})
    out = df.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
    assert out["error"][0] is None
    assert out["error"][1]["code"] == 400 and out["error"][1]["status"] == "INVALID_ARGUMENT"
    assert out["block_reason"][2] == "SAFETY"


def test_transient_errors_are_retried(cache_dir):
    flaky = Emulator(fail_first=2, fail_status=503, retry_after=0)
    with gf.Client(gf.EmulatorProvider(app=flaky), cache_dir=str(cache_dir), progress=False) as c:
        out = pl.DataFrame({"prompt": ["p1", "p2"]}).with_columns(reply=gf.generate("prompt", client=c)).unnest("reply")
    assert out["error"].is_null().all() and out["attempts"].to_list() == [3, 3]
    assert flaky.stats.requests == 6


def test_fatal_errors_stop_the_run_with_a_clear_message(cache_dir):
    guarded = Emulator(api_key="the-right-key")
    with gf.Client("emulator", app=guarded, api_key="a-wrong-key", cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.AuthenticationError, match="API key not valid") as info:
            pl.DataFrame({"prompt": [str(i) for i in range(200)]}).with_columns(reply=gf.generate("prompt", client=c))
    assert "a-wrong-key" not in str(info.value)
    assert guarded.stats.requests < 200


def test_config_system_and_safety_reach_the_server(client):
    df = pl.DataFrame({"prompt": ["tell me a long story about many things"]})
    out = df.with_columns(
        reply=gf.generate(
            "prompt",
            client=client,
            system="Be terse.",
            config={"max_output_tokens": 3},
            safety={"harassment": "block_only_high"},
        )
    ).unnest("reply")
    assert out["finish_reason"][0] == "MAX_TOKENS" and len(out["text"][0]) <= 12


def test_lazy_schema_and_streaming_sink(client, emulator, tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pl.DataFrame({"prompt": [f"p{i}" for i in range(500)]}).write_parquet(src)
    lazy = pl.scan_parquet(src).with_columns(reply=gf.generate("prompt", client=client))
    assert lazy.collect_schema()["reply"] == gf.REPLY_DTYPE
    assert emulator.stats.requests == 0  # planning sends nothing
    lazy.sink_parquet(dst)
    out = pl.read_parquet(dst)
    assert out.height == 500 and emulator.stats.requests == 500
    assert [t.split('"')[1] for t in _text(out)] == [f"p{i}" for i in range(500)]


def test_namespaces(client, emulator):
    df = pl.DataFrame({"prompt": ["one", "two"]})
    via_expr = df.with_columns(reply=pl.col("prompt").gemini.generate(client=client))
    via_frame = df.gemini.generate("prompt", client=client, unnest=True)
    via_lazy = df.lazy().gemini.generate("prompt", client=client).collect()
    assert _text(via_expr) == via_frame["text"].to_list() == _text(via_lazy)
    assert emulator.stats.requests == 2


def test_request_then_send(client, emulator, png_path):
    df = pl.DataFrame({"prompt": ["hello", None], "img": [str(png_path), None]})
    requests = df.with_columns(request=gf.request("prompt", images="img", system="sys", config={"temperature": 0}))
    body = json.loads(requests["request"][0])
    assert body["contents"][0]["parts"][0] == {"text": "hello"}
    assert body["contents"][0]["parts"][1]["inlineData"]["mimeType"] == "image/png"
    assert body["systemInstruction"] == {"parts": [{"text": "sys"}]} and requests["request"][1] is None
    assert emulator.stats.requests == 0
    sent = requests.with_columns(reply=gf.send("request", client=client))
    direct = df.with_columns(
        reply=gf.generate("prompt", images="img", system="sys", config={"temperature": 0}, client=client)
    )
    assert _text(sent) == _text(direct) and emulator.stats.requests == 1  # same request, same cache key
    broken = pl.DataFrame({"request": ["{not json"]}).with_columns(reply=gf.send("request", client=client))
    assert "not JSON" in broken["reply"][0]["error"]["message"]


def test_send_with_requests_it_cannot_send_fails_those_rows_only(client, emulator):
    """Bodies that parse as JSON but cannot be sent (an integer beyond 64 bits, contents of the
    wrong shape) are their rows' errors; the other rows are answered."""
    good = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hello"}]}]})
    huge = good[:-1] + ', "generationConfig": {"seed": 123456789012345678901234567890}}'
    frame = pl.DataFrame({"r": [good, huge, '{"contents": [1]}', '{"contents": [{"parts": "x"}]}']})
    out = frame.with_columns(reply=gf.send("r", client=client)).unnest("reply")
    assert out["error"].struct.field("status").to_list() == [None] + ["INVALID_INPUT"] * 3
    messages = out["error"].struct.field("message").to_list()
    assert messages[1].startswith("row 1: the request cannot be encoded") and "64-bit" in messages[1]
    assert messages[2].startswith("row 2: request 'contents' must be a list") and messages[3].startswith("row 3: ")
    assert out["text"][0] is not None and emulator.stats.requests == 1


def test_raw_json_on_request(client):
    out = pl.DataFrame({"prompt": ["x"]}).with_columns(reply=gf.generate("prompt", client=client, raw=True))
    assert json.loads(out["reply"][0]["raw"])["candidates"][0]["finishReason"] == "STOP"


def test_default_client_uses_the_emulator_without_keys(emulator):
    out = pl.DataFrame({"prompt": ["no key here"]}).with_columns(reply=gf.generate("prompt", progress=False))
    assert out["reply"][0]["model_version"].startswith("emulator")


def test_client_may_be_a_provider_name(monkeypatch):
    """client="emulator" is that provider's one shared Client (a second call finds the first
    call's answers in its cache); anything else that is not a Client names gf.Client(...) at once."""
    from gemframe._core import client as client_module

    monkeypatch.setattr(client_module, "_named_clients", {})  # this test's cache directory
    frame = pl.DataFrame({"prompt": ["by name"]})
    first = frame.with_columns(gf.generate("prompt", client="emulator", progress=False)).unnest("reply")
    again = frame.with_columns(gf.generate("prompt", client="emulator", progress=False)).unnest("reply")
    assert first["model_version"][0].startswith("emulator") and first["cached"].to_list() == [False]
    assert again["cached"].to_list() == [True]
    client_module._named_clients["emulator"].close()
    with pytest.raises(
        TypeError,
        match=r"client must be a gf.Client or a provider name, not Emulator; build one with gf.Client\(\.\.\.\)",
    ):
        gf.generate("prompt", client=Emulator())
    with pytest.raises(ValueError, match=r"'gemini-2.5-flash' is a model id: pass it as model='gemini-2.5-flash'"):
        gf.generate("prompt", client="gemini-2.5-flash")
    with pytest.raises(ValueError, match=r"unknown provider 'emulater'; .* did you mean 'emulator'\?"):
        gf.generate("prompt", client="emulater")


def test_a_string_that_is_no_column_says_what_it_was_taken_for(client, emulator):
    frame = pl.DataFrame({"prompt": ["a"], "img": [None]}, schema={"prompt": pl.String, "img": pl.String})
    with pytest.raises(
        gf.InputError,
        match=r"prompt='Describe this' was taken for a column name, but the frame "
        r"has no such column; .* pass pl.lit\('Describe this'\)",
    ):
        frame.with_columns(gf.generate("Describe this", client=client))
    lazy = frame.lazy().with_columns(gf.generate("prompt", images="photo.jpg", client=client))
    assert lazy.collect_schema()["reply"] == gf.reply_dtype()  # the schema is still known up front
    with pytest.raises(
        gf.InputError,
        match=r"images='photo.jpg' was taken for a column name, .* "
        r"pass pathlib.Path\('photo.jpg'\) \(a file\) or pl.lit\('photo.jpg'\)",
    ):
        lazy.collect()
    with pytest.raises(gf.InputError, match="history='turns' was taken for a column name"):
        frame.with_columns(gf.request("prompt", history="turns"))
    assert emulator.stats.requests == 0
    named = frame.with_columns(gf.generate("prompt", images="img", client=client)).unnest("reply")
    assert named["error"].is_null().all() and emulator.stats.requests == 1  # real columns work as before


def test_unnest_renames_the_reply_fields_that_input_columns_already_name(client, emulator):
    """Input columns named text, images and error used to make ``unnest=True`` raise polars'
    DuplicateError; the colliding reply fields are now reply_text, ... with a warning naming them."""
    df = pl.DataFrame(
        {"prompt": ["one", "two"], "text": ["mine", "also mine"], "images": ["a.png", None], "error": [None, "old"]}
    )
    with pytest.warns(
        UserWarning,
        match=r"input columns \['error', 'images', 'text'\] .* "
        r"\['reply_error', 'reply_images', 'reply_text'\]",
    ):
        out = df.gemini.generate("prompt", client=client, unnest=True)
    assert out.columns[:4] == df.columns and out.select(df.columns).equals(df)  # the inputs untouched
    assert {"reply_text", "reply_images", "reply_error", "finish_reason", "cached"} <= set(out.columns)
    assert "text" not in set(out.columns) - set(df.columns) and "reply_finish_reason" not in out.columns
    assert out["reply_text"][0] == 'Emulated reply to: "one".' and out["reply_error"].is_null().all()
    with pytest.warns(UserWarning, match="reply_text"):
        lazy = df.lazy().gemini.generate("prompt", client=client, unnest=True).collect()
    how = ["cached", "attempts", "latency_ms"]  # how each row was answered: here from the cache
    assert lazy.drop(how).equals(out.drop(how)) and lazy["cached"].all()
    # An explicit prefix names every reply field, and says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = df.gemini.generate("prompt", client=client, unnest=True, prefix="r_", name="answer")
    assert named.columns == [*df.columns, *(f"r_{f}" for f in gf.REPLY_DTYPE.to_schema())]
    with pytest.raises(gf.InputError, match=r"\['r_text'\] are both input columns and reply fields"):
        df.rename({"text": "r_text"}).gemini.generate("prompt", client=client, unnest=True, prefix="r_")
    assert emulator.stats.requests == 2  # "one" and "two"; the refused frame sent nothing


def test_generated_images_go_back_in_as_images(client):
    """A reply's ``images`` (a list of structs) is an images column for the next request."""
    kw = dict(config={"response_modalities": ["TEXT", "IMAGE"]}, client=client)
    out = pl.DataFrame({"prompt": ["draw"]}).with_columns(reply=gf.generate("prompt", **kw))
    again = out.with_columns(r2=gf.generate("prompt", images=pl.col("reply").struct.field("images"), **kw))
    assert again["r2"][0]["error"] is None and "Image 1: PNG" in again["r2"][0]["text"]
