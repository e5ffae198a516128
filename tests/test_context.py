"""Context caching through the public API (`gemframe._core.context`): ``context=`` sends shared
leading material before every row; ``gf.Client(cache_context=...)`` sends it once, as a
``cachedContents`` resource of the served emulator, counted at the server."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap
import warnings
from pathlib import Path

import polars as pl
import pytest

import gemframe as gf
from gemframe.emulator import Emulator

from ._zygote import python_c
from .conftest import ServedEmulator, gemframe_cli

KEY = "test-key"
MODEL = "gemini-2.5-flash"
SYSTEM = "Answer from the handbook only."
HANDBOOK = "Section: every employee waters the office plants on Mondays. " * 300  # 18,300 characters
PREFIX_TOKENS = len(HANDBOOK) // 4 + len(SYSTEM) // 4 + 1  # the emulator's rule: ceil(chars / 4) a part
ROWS = 8


class Recorder:
    """ASGI middleware in front of the emulator: every request's method, path and body, as the
    server received them."""

    def __init__(self, app: Emulator) -> None:
        self.app = app
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.seen.append((scope["method"], scope["path"], body))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def calls(self, method: str, suffix: str) -> list[bytes]:
        return [body for m, path, body in self.seen if m == method and path.endswith(suffix)]

    def generates(self) -> list[dict]:
        return [json.loads(body) for body in self.calls("POST", ":generateContent")]


@pytest.fixture
def served():
    """``served(**knobs)`` -> (server URL, emulator, recorder): an emulator with a key, over TCP."""
    servers: list[ServedEmulator] = []

    def start(**knobs):
        emulator = Emulator(api_key=KEY, **knobs)
        recorder = Recorder(emulator)
        servers.append(ServedEmulator(recorder))  # type: ignore[arg-type]  # any ASGI app serves
        return servers[-1].url, emulator, recorder

    yield start
    for server in servers:
        server.stop()


def client_for(url: str, cache_dir: Path, **options) -> gf.Client:
    return gf.Client(
        "google", api_key=KEY, base_url=url, model=MODEL, cache_dir=str(cache_dir), progress=False, **options
    )


def frame(n: int = ROWS, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"prompt": [f"Who waters the plants, case {i}?" for i in range(start, start + n)]})


def ask(client: gf.Client, data: pl.DataFrame, **options) -> pl.DataFrame:
    reply = gf.generate("prompt", system=SYSTEM, context=HANDBOOK, client=client, **options)
    return data.with_columns(reply=reply).unnest("reply")


def test_context_goes_first_and_history_after_it():
    spec = gf.RequestSpec(system=SYSTEM, context=["Read this.", b"%PDF-1.4 two pages %%EOF"])
    history = [{"role": "user", "text": "Hi"}, {"role": "model", "text": "Hello"}]
    body = spec.builder.build("And now?", history=history)
    first, *rest = body["contents"]
    assert first == {
        "role": "user",
        "parts": [
            {"text": "Read this."},
            {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0xLjQgdHdvIHBhZ2VzICUlRU9G"}},
        ],
    }
    assert [c["parts"][0]["text"] for c in rest] == ["Hi", "Hello", "And now?"]
    assert spec.describe(MODEL)["context"][1] == {
        "mime_type": "application/pdf",
        "bytes": 24,
        "sha256": "d516e726fe1b54a276180f794e54338f7bb3122cc7df5074cb828ef22fa95a21",
    }


@pytest.mark.parametrize(
    ("context", "says"),
    [
        (3, "context is of type int; give text (str), a file as pathlib.Path"),
        (Path("no-such.pdf"), "context: cannot read image file 'no-such.pdf'"),
        (["fine", b"not an image"], "context item 1: image bytes is not a PNG, JPEG"),
        ({"path": "https://example.com/a.png"}, "is an image URL"),
        ([""], "context is empty"),
    ],
)
def test_a_bad_context_is_a_config_error_when_the_spec_is_made(context, says):
    with pytest.raises(gf.ConfigError, match=re.escape(says)):
        gf.generate("prompt", context=context)


def test_rows_name_one_cache_and_carry_no_prefix(served, cache_dir):
    url, emulator, recorder = served()
    with client_for(url, cache_dir, cache_context=True) as client:
        out = ask(client, frame())
        creates = recorder.calls("POST", "/v1beta/cachedContents")
        assert len(creates) == 1
        created = json.loads(creates[0])
        assert created["model"] == f"models/{MODEL}" and created["ttl"] == "3600s"
        assert created["systemInstruction"] == {"parts": [{"text": SYSTEM}]}
        assert created["contents"] == [{"role": "user", "parts": [{"text": HANDBOOK}]}]
        (name,) = emulator.caches.caches
        bodies = recorder.generates()
        assert len(bodies) == ROWS
        assert all(
            b["cachedContent"] == name and "systemInstruction" not in b and len(b["contents"]) == 1 for b in bodies
        )
        sizes = [len(body) for body in recorder.calls("POST", ":generateContent")]
        assert max(sizes) < 200 < len(HANDBOOK) / 50  # the prefix went once, not with each row
        assert out["error"].null_count() == ROWS
        assert out["cached_content_tokens"].to_list() == [PREFIX_TOKENS] * ROWS
        assert (out["prompt_tokens"] - out["cached_content_tokens"]).to_list() == [
            8
        ] * ROWS  # its own turn: 30 characters
        ask(client, frame(4, start=100))  # a second call of the same client: the same cache
        assert len(recorder.calls("POST", "/v1beta/cachedContents")) == 1
        assert {b["cachedContent"] for b in recorder.generates()} == {name}
        assert not recorder.calls("DELETE", name)
    assert len(recorder.calls("DELETE", f"/v1beta/{name}")) == 1  # deleted when the client closed
    assert emulator.caches.list(None, None) == {"cachedContents": []}


def test_keep_context_cache_leaves_it_to_expire(served, cache_dir):
    url, emulator, recorder = served()
    with client_for(url, cache_dir, cache_context="2h", keep_context_cache=True) as client:
        ask(client, frame(3))
    assert not [call for call in recorder.seen if call[0] == "DELETE"]
    (cache,) = emulator.caches.list(None, None)["cachedContents"]
    assert json.loads(recorder.calls("POST", "/v1beta/cachedContents")[0])["ttl"] == "7200s"
    assert cache["usageMetadata"]["totalTokenCount"] == PREFIX_TOKENS


def test_a_prefix_under_the_minimum_goes_inline_with_one_warning(served, cache_dir):
    url, emulator, recorder = served(cache_min_tokens=100_000)
    with client_for(url, cache_dir, cache_context=True) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ask(client, frame())
            again = ask(client, frame(2, start=50))  # the next call knows: no second try
    said = [str(w.message) for w in caught if "context cache" in str(w.message)]
    assert said == [
        f"context cache skipped for {MODEL}: the prefix (system instruction and context) is "
        f"{PREFIX_TOKENS:,} tokens, under the 100,000 tokens {MODEL} caches at least; the "
        "prefix is sent inline with each row"
    ]
    assert len(recorder.calls("POST", "/v1beta/cachedContents")) == 1
    assert emulator.caches.created == 0
    assert out["error"].null_count() == ROWS and again["error"].null_count() == 2
    bodies = recorder.generates()
    assert len(bodies) == ROWS + 2
    assert all("cachedContent" not in b and b["contents"][0]["parts"][0]["text"] == HANDBOOK for b in bodies)
    assert out["cached_content_tokens"].null_count() == ROWS  # nothing cached, nothing said


def test_a_cache_deleted_behind_our_back_is_made_again_once(served, cache_dir):
    url, emulator, recorder = served()
    with client_for(url, cache_dir, cache_context=True) as client:
        ask(client, frame(2))
        (first,) = emulator.caches.caches
        emulator.caches.delete(first)  # someone else's cleanup, mid-job
        out = ask(client, frame(start=10))
        assert out["error"].null_count() == ROWS
        assert out["cached_content_tokens"].to_list() == [PREFIX_TOKENS] * ROWS
        assert len(recorder.calls("POST", "/v1beta/cachedContents")) == 2  # made again once
        (second,) = emulator.caches.caches
        named = [b["cachedContent"] for b in recorder.generates()[2:]]
        # every row of the call was sent with the old name (all at once), then again with the new
        assert named.count(first) == ROWS and named.count(second) == ROWS and len(named) == 2 * ROWS
    assert emulator.caches.list(None, None) == {"cachedContents": []}


def test_turning_the_option_on_or_off_reruns_from_the_answer_cache(served, cache_dir):
    url, _, recorder = served()
    with client_for(url, cache_dir) as inline:
        first = ask(inline, frame())
    assert len(recorder.generates()) == ROWS
    with client_for(url, cache_dir, cache_context=True) as cached:
        again = ask(cached, frame())
        fresh = ask(cached, frame(2, start=20))
    with client_for(url, cache_dir) as inline:
        last = ask(inline, frame(2, start=20))
    assert len(recorder.generates()) == ROWS + 2  # only the two new rows, sent once
    assert again["cached"].all() and last["cached"].all() and not fresh["cached"].any()
    assert again["text"].to_list() == first["text"].to_list()
    assert (
        recorder.calls("POST", "/v1beta/cachedContents") and len(recorder.calls("POST", "/v1beta/cachedContents")) == 1
    )


def test_a_per_call_option_and_batch_mode(served, cache_dir):
    url, emulator, recorder = served()
    with client_for(url, cache_dir) as client:
        ask(client, frame(2), cache_context="10m")
        assert json.loads(recorder.calls("POST", "/v1beta/cachedContents")[0])["ttl"] == "600s"
        # the frame namespace takes the option as gf.generate does (the cache made above is reused)
        out = frame(2, start=9).gemini.generate(system=SYSTEM, context=HANDBOOK, client=client, cache_context="10m")
        assert out["reply"].struct.field("cached_content_tokens").min() > 0
        assert len(recorder.calls("POST", "/v1beta/cachedContents")) == 1
        with pytest.raises(gf.ConfigError, match="mode='batch' cannot use a context cache.*cache_context=False"):
            ask(client, frame(2, start=5), cache_context=True, mode="batch")
        assert not recorder.calls("POST", ":batchGenerateContent")
        ask(client, frame(2, start=5), mode="batch", poll_interval=0.01)  # the client's default: inline
    assert len(recorder.calls("POST", ":batchGenerateContent")) == 1
    assert emulator.caches.list(None, None) == {"cachedContents": []}
    with pytest.raises(gf.ConfigError, match="cache_context must be True"):
        gf.generate("prompt", cache_context="soon")


def test_a_provider_without_context_caching_is_refused_up_front():
    with pytest.raises(gf.ConfigError, match="provider 'segmind' has no context caching.*google"):
        gf.Client("segmind", api_key="k", cache_context=True)


def test_the_google_genai_sdk_sees_the_cache(served, cache_dir):
    genai = pytest.importorskip("google.genai")
    url, _, _ = served()
    sdk = genai.Client(api_key=KEY, http_options=genai.types.HttpOptions(base_url=url))
    with client_for(url, cache_dir, cache_context=True) as client:
        ask(client, frame(2))
        (cache,) = sdk.caches.list()
        assert sdk.caches.get(name=cache.name).usage_metadata.total_token_count == PREFIX_TOKENS
        assert cache.display_name == "gemframe" and cache.model == f"models/{MODEL}"
    assert list(sdk.caches.list()) == []


def test_a_client_never_closed_deletes_its_cache_at_exit(served, tmp_path):
    url, emulator, recorder = served()
    script = textwrap.dedent(
        f"""
        import polars as pl, gemframe as gf
        client = gf.Client("google", api_key={KEY!r}, base_url={url!r}, model={MODEL!r},
                           cache_dir={str(tmp_path / "c")!r}, progress=False, cache_context=True)
        out = pl.DataFrame({{"prompt": ["Q?"]}}).with_columns(
            reply=gf.generate("prompt", context={HANDBOOK!r}, client=client))
        assert out["reply"].struct.field("cached_content_tokens")[0] > 0
        """
    )
    done = python_c(script)  # through the zygote: a fresh `python -c`, without its imports
    assert done.returncode == 0, done.stderr
    assert emulator.caches.created == 1
    assert len(recorder.calls("DELETE", "")) == 1
    assert emulator.caches.list(None, None) == {"cachedContents": []}


# --- what it costs: hand computations at these rates (USD per 1M tokens; storage per 1M tokens
# per hour), given as prices= so the figures do not move with the price table
PRICES = {MODEL: {"input": 0.30, "cached_input": 0.075, "output": 2.50, "cache_storage": 1.00}}


def test_the_manifest_prices_rows_and_the_cache_from_the_reply_columns_and_its_record(served, cache_dir):
    url, _, _ = served()
    with client_for(url, cache_dir, cache_context="2h") as client:
        replies = frame().with_columns(reply=gf.generate("prompt", system=SYSTEM, context=HANDBOOK, client=client))
        out = replies.unnest("reply")
        alive = gf.manifest(replies, client=client, system=SYSTEM, context=HANDBOOK, prices=PRICES)
    closed = gf.manifest(replies, client=client, system=SYSTEM, context=HANDBOOK, prices=PRICES)
    (cache,) = alive["context_caches"]
    assert cache["tokens"] == PREFIX_TOKENS == 4583 and cache["model"] == MODEL
    assert cache["deleted"] is None and cache["storage_hours"] == 2.0  # alive: priced to its expiry
    assert cache["creation_usd"] == round(4583 * 0.30 / 1e6, 9) == 0.0013749
    assert cache["storage_usd"] == round(4583 * 2.0 * 1.00 / 1e6, 9) == 0.009166
    # the rows: each 4591 prompt tokens of which 4583 cached, and its output
    output = int(out["candidates_tokens"].sum())
    rows = ROWS * 8 * 0.30 / 1e6 + ROWS * 4583 * 0.075 / 1e6 + output * 2.50 / 1e6
    assert alive["cost"]["this_run"] == pytest.approx(rows + 0.0013749 + 0.009166, abs=1e-9)
    assert alive["cost"]["this_run_split"]["context_cache"] == pytest.approx(0.0105409, abs=1e-9)
    assert alive["cost"]["this_run_split"]["cached_input"] == pytest.approx(ROWS * 4583 * 0.075 / 1e6, abs=1e-9)
    paid = replies.select(gf.cost_expr(MODEL, reply="reply", prices=PRICES).sum()).item()
    assert alive["cost"]["this_run"] == pytest.approx(paid + cache["creation_usd"] + cache["storage_usd"], abs=1e-9)
    (gone,) = closed["context_caches"]  # deleted at close: stored only until then
    assert gone["deleted"] is not None and gone["storage_hours"] < 0.1
    assert gone["storage_usd"] == round(4583 * gone["storage_hours"] * 1.00 / 1e6, 9)


def test_estimate_prices_the_prefix_as_cached_plus_the_cache(served, cache_dir):
    url, _, _ = served()
    with client_for(url, cache_dir, cache_context="2h") as client:
        est = gf.estimate(
            frame(), "prompt", system=SYSTEM, context=HANDBOOK, client=client, output_tokens=100, prices=PRICES
        )
        inline = gf.estimate(
            frame(),
            "prompt",
            system=SYSTEM,
            context=HANDBOOK,
            client=client,
            output_tokens=100,
            cache_context=False,
            prices=PRICES,
        )
    assert (est.context_cache_tokens, est.context_cache_hours) == (4583, 2.0)
    assert est.input_tokens == inline.input_tokens == ROWS * (4583 + 8)
    assert est.cached_input_tokens == ROWS * 4583
    by_hand = ROWS * 8 * 0.30 + ROWS * 4583 * 0.075 + ROWS * 100 * 2.50 + 4583 * 0.30 + 4583 * 2.0 * 1.00
    assert est.cost["usd"] == pytest.approx(by_hand / 1e6, abs=1e-9)
    assert est.cost["context_cache_usd"] == pytest.approx((4583 * 0.30 + 4583 * 2.0) / 1e6, abs=1e-9)
    assert inline.cost["usd"] == pytest.approx((ROWS * 4591 * 0.30 + ROWS * 100 * 2.50) / 1e6, abs=1e-9)
    assert "context cache" in str(est) and "context cache" not in str(inline)


def test_run_records_the_cache_and_the_report_shows_it(served, cache_dir, tmp_path):
    url, _, _ = served()
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    frame().write_parquet(source)
    with client_for(url, cache_dir, cache_context="2h") as client:
        manifest = gf.run(
            str(source), str(output), system=SYSTEM, context=HANDBOOK, client=client, progress=False, prices=PRICES
        )
    (cache,) = manifest["context_caches"]
    assert (cache["tokens"], cache["storage_hours"], cache["deleted"]) == (4583, 2.0, None)  # written before close
    assert manifest["context"] == [
        {"text_chars": len(HANDBOOK), "sha256": hashlib.sha256(HANDBOOK.encode()).hexdigest()}
    ]
    rep = gf.report(str(output), prices=PRICES)
    assert rep.data["cost"]["this_run"] == pytest.approx(manifest["cost"]["this_run"], abs=1e-9)
    line = next(line for line in rep.text.splitlines() if "context caches" in line)
    assert "$0.0105" in line and "1 cache, 4,583 tokens" in line
    assert "<td>context cache</td>" in rep.html


def test_cli_context_files_and_cache_context(served, tmp_path):
    url, emulator, recorder = served()
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    frame(3).write_parquet(source)
    (tmp_path / "handbook.txt").write_text(HANDBOOK)
    common = [str(source), str(output), "--provider", "google", "--base-url", url, "--model", MODEL]
    common += ["--system", SYSTEM, "--context", str(tmp_path / "handbook.txt"), "--cache-dir", str(tmp_path / "c")]

    def gemframe(*args: str) -> subprocess.CompletedProcess:
        return gemframe_cli("run", *common, *args, GEMINI_API_KEY=KEY)

    dry = gemframe("--cache-context", "2h", "--dry-run", "--output-tokens", "10")
    assert dry.returncode == 0, dry.stderr
    assert "context cache          4,583  (tokens, kept 2 h; 13,749 of the input tokens read from it)" in dry.stdout
    assert not recorder.seen  # a dry run sends nothing
    done = gemframe("--cache-context", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert len(recorder.calls("POST", "/v1beta/cachedContents")) == 1 and len(recorder.calls("DELETE", "")) == 1
    assert [b["cachedContent"] for b in recorder.generates()] == [recorder.generates()[0]["cachedContent"]] * 3
    (cache,) = gf.read_manifest(output)["context_caches"]
    assert cache["tokens"] == 4583 and cache["storage_hours"] == 1.0  # written before the client closed


def test_a_streaming_collect_makes_one_cache_for_all_its_morsels(emulator, cache_dir, monkeypatch):
    with gf.Client(
        gf.EmulatorProvider(app=emulator), model=MODEL, cache_dir=str(cache_dir), progress=False, cache_context=True
    ) as client:
        calls = []
        send = client.send
        monkeypatch.setattr(client, "send", lambda *a, **k: calls.append(1) or send(*a, **k))
        lazy = pl.LazyFrame({"prompt": [f"Question {i}?" for i in range(1000)]})
        out = lazy.with_columns(reply=gf.generate("prompt", system=SYSTEM, context=HANDBOOK, client=client))
        replies = out.collect(engine="streaming")["reply"]
        assert len(calls) > 1  # polars called the expression once per morsel
        assert emulator.caches.created == 1 and emulator.stats.requests == 1000
        assert replies.struct.field("cached_content_tokens").unique().to_list() == [PREFIX_TOKENS]
    assert emulator.caches.caches == {}


class _OddCacheAnswers:
    """The emulator, except that creating a cache answers 200 with ``answer`` (a server that
    is not the API, or a hostile one)."""

    def __init__(self, emulator: Emulator, answer: bytes) -> None:
        self.emulator, self.answer, self.creates = emulator, answer, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/cachedContents"):
            while (await receive()).get("more_body"):
                pass
            self.creates += 1
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.answer})
            return
        await self.emulator(scope, receive, send)


@pytest.mark.parametrize(
    "answer",
    [b"not json", b"[1, 2]", b'{"name": "cachedContents/x", "usageMetadata": [1]}', b'{"usageMetadata": {}}'],
)
def test_an_answer_that_is_not_a_cache_sends_the_prefix_inline(cache_dir, answer):
    """A create call answered 200 with something that is not a cachedContents resource: one
    warning saying so, and every row answered with the prefix inline (never a crash)."""
    emulator = Emulator(api_key=KEY)
    app = _OddCacheAnswers(emulator, answer)
    server = ServedEmulator(app)  # type: ignore[arg-type]  # any ASGI app serves
    try:
        with pytest.warns(UserWarning, match="its answer is not a cachedContents resource"):
            with client_for(server.url, cache_dir, cache_context=True) as client:
                out = ask(client, frame(3))
    finally:
        server.stop()
    assert app.creates == 1 and out["error"].is_null().all() and emulator.stats.requests == 3
