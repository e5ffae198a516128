"""What tokens cost: the price table and the one pricing rule, and a run's manifest priced
exactly as a hand computation from the output's reply columns says."""

import json

import polars as pl
import pytest

import gemframe as gf
from gemframe._accounting.pricing import (
    BATCH_DISCOUNT,
    cost,
    model_price,
    price_table,
    storage_cost,
)
from gemframe._cli import main
from gemframe.emulator import Emulator


def test_price_table_prefix_override_env_and_batch(tmp_path, monkeypatch):
    assert model_price("gemini-2.5-flash-preview-05-20")[0] == "gemini-2.5-flash"
    assert model_price("models/gemini-2.5-flash-lite")[0] == "gemini-2.5-flash-lite"
    assert model_price("gpt-4") is None and cost("gpt-4", input_tokens=1, output_tokens=1) is None
    one = cost("gemini-2.5-flash", input_tokens=1_000_000, output_tokens=1_000_000)
    assert one["usd"] == pytest.approx(0.30 + 2.50)
    half = cost("gemini-2.5-flash", input_tokens=1_000_000, output_tokens=1_000_000, batch=True)
    assert half["usd"] == pytest.approx(one["usd"] * BATCH_DISCOUNT)
    # Without a per-image price an image is 1290 output tokens.
    assert cost("gemini-2.0-flash", input_tokens=0, output_tokens=0, images=1)["usd"] == pytest.approx(
        1290 * 0.40 / 1e6
    )
    assert cost("gemini-2.0-flash-preview-image-generation", input_tokens=0, output_tokens=0, images=2)[
        "usd"
    ] == pytest.approx(0.078)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-model": {"input": 1, "output": 2}, "gemini-2.5-flash": {"input": 9}}))
    monkeypatch.setenv("GEMFRAME_PRICES", str(path))
    table = price_table()
    assert table["my-model"] == {"input": 1.0, "output": 2.0}
    assert table["gemini-2.5-flash"] == {**gf.PRICES["gemini-2.5-flash"], "input": 9.0}  # key by key
    assert price_table({"my-model": {"input": 3}})["my-model"] == {"input": 3.0, "output": 2.0}  # the argument wins
    assert cost("my-model", input_tokens=2_000_000, output_tokens=0)["usd"] == 2.0
    with pytest.raises(gf.InputError, match="must be"):
        price_table({"m": {"inptu": 1}})
    with pytest.raises(gf.InputError, match="numbers"):
        price_table({"m": {"input": "cheap"}})


def test_the_parts_of_a_cost_at_the_tables_rates():
    """Cached input at the context-cache read rate, thinking at the output rate, images per
    image, Batch Mode at half of every part; storage per 1M tokens per hour."""
    c = cost(
        "gemini-2.5-flash",
        input_tokens=3_000_000,
        cached_input_tokens=1_000_000,
        output_tokens=2_000_000,
        thoughts_tokens=500_000,
    )
    assert (c["input_usd"], c["cached_input_usd"]) == (pytest.approx(2 * 0.30), pytest.approx(0.03))
    assert (c["output_usd"], c["thinking_usd"]) == (pytest.approx(1.5 * 2.50), pytest.approx(0.5 * 2.50))
    assert c["usd"] == pytest.approx(0.60 + 0.03 + 3.75 + 1.25)
    half = cost(
        "gemini-2.5-flash",
        input_tokens=3_000_000,
        cached_input_tokens=1_000_000,
        output_tokens=2_000_000,
        thoughts_tokens=500_000,
        batch=True,
    )
    assert half["usd"] == pytest.approx(c["usd"] * BATCH_DISCOUNT) and half["cached_input_usd"] == pytest.approx(0.015)
    # A model without a cached rate prices cached input as input.
    assert cost("gemini-2.0-flash-lite", input_tokens=10**6, cached_input_tokens=10**6, output_tokens=0)[
        "usd"
    ] == pytest.approx(0.075)
    assert storage_cost("gemini-2.5-pro", 2_000_000, 3) == pytest.approx(2 * 3 * 4.50)
    assert storage_cost("gemini-2.0-flash-lite", 10**6, 1) is None and storage_cost("gpt-4", 1, 1) is None


class ImplicitCaching:
    """The emulator behind a layer that reports implicit caching, as Gemini does: half of each
    answered prompt's tokens (rounded down) read from a context cache, in
    ``usageMetadata.cachedContentTokenCount``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith(":generateContent"):
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def rewrite(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                answer = json.loads(body)
                usage = answer["usageMetadata"]
                usage["cachedContentTokenCount"] = usage["promptTokenCount"] // 2
                body = json.dumps(answer).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


# The test's own copy of the rates (USD): the model's list prices, plus a cached-input rate
# passed as an override (the image model has none in the table).
IN, CACHED, OUT, IMAGE = 0.10, 0.025, 0.40, 0.039


def _by_hand(rows: list[dict]) -> dict[str, float]:
    """The cost of reply rows as the pricing page reads: uncached prompt tokens at the input
    rate, cached ones at the cached rate, text and thinking at the output rate, each image
    (1290 of the candidates tokens) at the image price."""
    usd = {"input": 0.0, "cached_input": 0.0, "output": 0.0, "thinking": 0.0, "images": 0.0}
    for r in rows:
        prompt, cached = r["prompt_tokens"] or 0, r["cached_content_tokens"] or 0
        images = len(r["images"] or [])
        usd["input"] += (prompt - cached) * IN / 1e6
        usd["cached_input"] += cached * CACHED / 1e6
        usd["output"] += ((r["candidates_tokens"] or 0) - 1290 * images) * OUT / 1e6
        usd["thinking"] += (r["thoughts_tokens"] or 0) * OUT / 1e6
        usd["images"] += images * IMAGE
    return usd


def test_manifest_cost_matches_a_hand_computation_from_the_reply_columns(tmp_path):
    """A job with text and image output, thinking, implicit-cache reads, rows answered from
    gemframe's cache, a duplicate row and a failed row: the manifest's cost is what the test
    computes from the output's reply columns at the table's rates, part by part."""
    emulator = Emulator()
    prompts = [
        "A red fox",
        "A boat at dawn",
        "Two kites",
        "A lighthouse",
        "A lighthouse",
        "Rain on a window [emulator:status=400]",
        "A long mountain road",
        "An owl",
    ]
    src, tried = tmp_path / "in.parquet", tmp_path / "try.parquet"
    pl.DataFrame({"prompt": prompts}).write_parquet(src)
    pl.DataFrame({"prompt": prompts[:3]}).write_parquet(tried)
    config = {"response_modalities": ["TEXT", "IMAGE"], "thinking_config": {"include_thoughts": True}}
    model, prices = gf.DEFAULT_MODEL, {gf.DEFAULT_MODEL: {"cached_input": CACHED}}
    assert gf.PRICES[model] == {"input": IN, "output": OUT, "image": IMAGE}
    with gf.Client(
        gf.EmulatorProvider(app=ImplicitCaching(emulator)), cache_dir=str(tmp_path / "c"), progress=False
    ) as client:
        gf.run(str(tried), str(tmp_path / "try_out.parquet"), config=config, client=client, progress=False)
        with pytest.warns(gf.RowsFailedWarning):
            m = gf.run(
                str(src),
                str(tmp_path / "out.parquet"),
                config=config,
                client=client,
                progress=False,
                prices=prices,
                batch_rows=3,
            )
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert (m["cache_hits"], m["requests_sent"], m["errors"]) == (3, 4, {"INVALID_ARGUMENT": 1})
    assert emulator.stats.requests == 3 + 4  # the tried rows, then 3 answers and the failing row (a 400: once)
    # This run paid for the rows it did not read from the cache, each distinct request once.
    paid = out.filter(~pl.col("cached")).unique("response_id", keep="first").to_dicts()
    answered = out.filter(pl.col("error").is_null()).to_dicts()
    this_run, all_rows = _by_hand(paid), _by_hand(answered)
    assert all(this_run[k] > 0 for k in this_run)  # every part is exercised
    cost = m["cost"]
    assert cost["this_run"] == pytest.approx(sum(this_run.values()), rel=1e-9)
    assert cost["all_rows"] == pytest.approx(sum(all_rows.values()), rel=1e-9)
    assert cost["this_run_split"] == pytest.approx(this_run, rel=1e-9)
    assert cost["all_rows_split"] == pytest.approx(all_rows, rel=1e-9)
    assert m["tokens"]["cached_input_paid"] == sum(
        r["cached_content_tokens"] for r in paid if r["cached_content_tokens"]
    )
    # gf.cost_expr reads the same columns by the same rule: the figure is reproducible.
    rows = out.filter(~pl.col("cached")).unique("response_id", keep="first")
    assert rows.select(gf.cost_expr(model, prices=prices).sum()).item() == pytest.approx(cost["this_run"], rel=1e-9)
    split = out.select(gf.cost_expr(model, prices=prices, split=True)).unnest("cost").sum()
    assert split.row(0, named=True)["thinking"] == pytest.approx(all_rows["thinking"], rel=1e-9)


def test_batch_run_is_priced_at_the_batch_rate_by_hand_too(tmp_path, capsys):
    """``gemframe run --batch`` then ``--dry-run --batch`` and ``gemframe report``: the manifest
    is half the hand computation of the live rate, the dry run says the Batch Mode rate, and
    the report shows the manifest's figures for this run and the split."""
    emulator = Emulator(batch_polls=1)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pl.DataFrame({"prompt": ["A red fox", "A boat", "A red fox", "An owl"]}).write_parquet(src)
    common = [
        "--emulator",
        "--cache-dir",
        str(tmp_path / "c"),
        "--no-progress",
        "--config",
        '{"response_modalities": ["TEXT", "IMAGE"]}',
    ]
    prices = tmp_path / "p.json"
    prices.write_text(json.dumps({gf.DEFAULT_MODEL: {"cached_input": CACHED}}))
    with gf.Client("emulator", app=emulator, cache_dir=str(tmp_path / "c"), progress=False) as client:
        m = gf.run(
            str(src),
            str(out),
            config={"response_modalities": ["TEXT", "IMAGE"]},
            client=client,
            progress=False,
            mode="batch",
            poll_interval=0.01,
            prices=str(prices),
            batch_rows=2,
        )
    rows = pl.read_parquet(out).unique("response_id", keep="first").to_dicts()
    assert m["requests_sent"] == len(rows) == 3
    assert m["cost"]["this_run"] == pytest.approx(sum(_by_hand(rows).values()) / 2, rel=1e-9)
    assert (
        main(
            [
                "run",
                str(src),
                str(tmp_path / "x.parquet"),
                *common,
                "--dry-run",
                "--batch",
                "--output-tokens",
                "100",
                "--cache",
                "off",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Batch Mode rate" in printed and "priced at 50% of the standard price" in printed
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"${m['cost']['this_run']:,.4f} this run" in printed and "Batch Mode rate" in printed
    assert "images $0.0585" in printed  # 3 images at $0.039, half price
