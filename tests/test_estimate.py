"""Dry runs and cost: gf.estimate / gemframe run --dry-run count what would be sent and what it
would cost, and send nothing to generateContent; the price table is overridable."""

import json

import polars as pl
import pytest

import gemframe as gf
from gemframe._cli import main
from gemframe._core.tokens import count_tokens

IMAGE_CONFIG = {"response_modalities": ["TEXT", "IMAGE"]}


def test_estimate_counts_rows_requests_and_input_tokens_without_sending(client, emulator, sample_input):
    est = gf.estimate(sample_input, images="image_path", system="Be brief.", client=client)
    assert emulator.stats.requests == 0
    assert (est.rows, est.rows_without_prompt, est.invalid_rows) == (12, 1, 0)
    assert (est.requests, est.distinct_requests, est.cache_hits, est.to_send) == (11, 11, 0, 11)
    assert est.token_method == "local" and est.output_basis.startswith("a default guess")
    # The local estimate follows the emulator's own rule, so it matches what the run reports.
    out = pl.read_parquet(sample_input).with_columns(
        reply=gf.generate("prompt", images="image_path", system="Be brief.", client=client)
    )
    assert est.input_tokens == out["reply"].struct.field("prompt_tokens").sum()
    assert est.cost is not None and est.cost["usd"] > 0 and est.cost["priced_as"] == gf.DEFAULT_MODEL
    text = str(est)
    assert "to send" in text and "est. cost" in text and f"{est.input_tokens:,}" in text


def test_after_a_first_try_the_estimate_counts_hits_and_uses_the_observed_output(client, emulator, sample_input):
    df = pl.read_parquet(sample_input)
    kw = dict(images="image_path", config=IMAGE_CONFIG, client=client)
    tried = df.head(4).with_columns(reply=gf.generate("prompt", **kw))  # try on a few rows
    sent = emulator.stats.requests
    est = gf.estimate(df.lazy(), **kw)  # then estimate the whole frame
    assert emulator.stats.requests == sent == 4
    assert (est.cache_hits, est.to_send) == (4, 7)
    assert est.output_basis == "mean of 4 cached answers of this job"
    replies = tried["reply"].struct
    text_out = (replies.field("candidates_tokens") - 1290 * replies.field("images").list.len()).mean()
    assert est.output_tokens_per_request == pytest.approx(text_out)
    assert est.images_per_request == 1 and est.images == 7
    assert est.cost["images_usd"] == pytest.approx(7 * 0.039)


def test_duplicates_samples_and_invalid_rows(client, emulator, tmp_path):
    df = pl.DataFrame(
        {"prompt": ["a", "a", "b", None, "c"], "image": [None, None, None, None, str(tmp_path / "nope.png")]}
    )
    est = gf.estimate(df, images="image", client=client, samples=3)
    assert (est.rows, est.rows_without_prompt, est.invalid_rows) == (5, 1, 1)
    assert (est.requests, est.distinct_requests, est.to_send) == (9, 6, 6)
    assert est.input_tokens == 6 * 1 and "cannot be sent" in " ".join(est.notes)
    assert emulator.stats.requests == 0


def test_read_mode_counts_misses_instead_of_sends(client, sample_input):
    est = gf.estimate(sample_input, images="image_path", client=client, cache="read")
    assert (est.to_send, est.cache_misses) == (0, 11) and est.cost["usd"] == 0
    assert "CACHE_MISS" in str(est)


def test_exact_counts_come_from_count_tokens(client, emulator, sample_input):
    local = gf.estimate(sample_input, images="image_path", client=client)
    exact = gf.estimate(sample_input, images="image_path", client=client, exact=True)
    assert exact.token_method == "countTokens" and exact.input_tokens == local.input_tokens
    assert emulator.stats.requests == 0  # countTokens is not generateContent


def test_exact_over_http_with_the_google_dialect(served_emulator, sample_input, cache_dir):
    server = served_emulator()
    with gf.Client("google", api_key="k", base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        exact = gf.estimate(sample_input, images="image_path", client=c, exact=True)
        local = gf.estimate(sample_input, images="image_path", client=c)
    assert exact.token_method == "countTokens" and exact.input_tokens == local.input_tokens > 0
    assert server.emulator.stats.requests == 0


def test_exact_on_segmind_falls_back_to_local(cache_dir, sample_input):
    with gf.Client(
        "segmind", api_key="k", base_url="http://127.0.0.1:9", cache_dir=str(cache_dir), progress=False
    ) as c:
        est = gf.estimate(sample_input, images="image_path", client=c, exact=True)
    assert est.token_method == "local" and "no countTokens" in est.notes[0]


PDF_3_PAGES = (
    b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 3 >> endobj\n"
    + b"".join(b"%d 0 obj << /Type /Page /Parent 1 0 R >> endobj\n" % n for n in (2, 3, 4))
    + b"%%EOF"
)


def test_local_estimate_counts_a_pdf_by_its_pages_as_the_api_does(client, emulator):
    # Gemini bills a PDF at 258 tokens a page; the local rule used to count 258 a document.
    df = pl.DataFrame({"prompt": ["Summarize this."], "doc": [PDF_3_PAGES]})
    est = gf.estimate(df, images="doc", client=client)
    out = df.with_columns(reply=gf.generate("prompt", images="doc", client=client))
    assert est.input_tokens == out["reply"].struct.field("prompt_tokens").sum() == 4 + 3 * 258


def _google_at(server, cache_dir):
    return gf.Client(
        "google",
        api_key="k",
        base_url=server.url,
        cache_dir=str(cache_dir),
        progress=False,
        max_attempts=2,
        backoff=0.01,
    )


@pytest.mark.parametrize(
    "fault, why", [("reset", "CONNECTION_ERROR"), ("malformed", "a countTokens answer without a token count")]
)
def test_exact_falls_back_to_local_when_count_tokens_gets_no_usable_answer(
    fault_server, cache_dir, sample_input, fault, why
):
    # A connection reset (the executor's TransportFailure) or an HTML 200 must not escape
    # gf.estimate as a non-gemframe exception: those requests are counted locally, with a note.
    server = fault_server(fail_first=1000, faults=(fault,))
    with _google_at(server, cache_dir) as c:
        exact = gf.estimate(sample_input, images="image_path", client=c, exact=True)
        local = gf.estimate(sample_input, images="image_path", client=c)
    assert server.stats.statuses[fault] >= exact.to_send == 11  # every countTokens was tried
    assert exact.token_method == "countTokens+local" and exact.input_tokens == local.input_tokens > 0
    assert f"11 requests counted locally: countTokens failed ({why}" in " ".join(exact.notes)


def test_estimate_splits_thinking_and_prices_batch_mode_at_the_batch_rate(client, emulator, sample_input):
    """After a try with thinking on, the estimate counts the thinking part of the output and
    prices it at the output rate; ``mode="batch"`` (as gf.run takes it) halves every part."""
    df = pl.read_parquet(sample_input)
    kw = dict(
        images="image_path", config={**IMAGE_CONFIG, "thinking_config": {"include_thoughts": True}}, client=client
    )
    tried = df.head(4).with_columns(reply=gf.generate("prompt", **kw)).unnest("reply")
    live, batch = gf.estimate(df, **kw), gf.estimate(df, mode="batch", **kw)
    assert live.thoughts_per_request == pytest.approx(tried["thoughts_tokens"].mean())
    assert live.thoughts_per_request > 0
    assert live.thoughts_tokens == round(live.thoughts_per_request * 7)
    assert live.cost["thinking_usd"] == pytest.approx(live.thoughts_tokens * 0.40 / 1e6)
    assert live.cost["output_usd"] == pytest.approx((live.output_tokens - live.thoughts_tokens) * 0.40 / 1e6)
    assert batch.batch and not live.batch
    for part in ("usd", "input_usd", "output_usd", "thinking_usd", "images_usd"):
        assert batch.cost[part] == pytest.approx(live.cost[part] / 2)
    assert "of which thinking" in str(live) and "Batch Mode rate" in str(batch)
    with pytest.raises(gf.InputError, match="mode"):
        gf.estimate(df, mode="bulk", **kw)


def test_output_assumption_order(client, sample_input):
    given = gf.estimate(sample_input, client=client, output_tokens=50)
    assert (given.output_tokens_per_request, given.output_basis) == (50, "as given")
    capped = gf.estimate(sample_input, client=client, config={"max_output_tokens": 64})
    assert capped.output_tokens_per_request == 64 and "maxOutputTokens" in capped.output_basis
    assert capped.output_tokens == 64 * capped.to_send


def test_count_tokens_rule():
    body = {
        "systemInstruction": {"parts": [{"text": "abcde"}]},  # 2
        "contents": [
            {"role": "user", "parts": [{"text": "abcd"}, {"inlineData": {"mimeType": "image/png", "data": "x"}}]}
        ],
    }
    assert count_tokens(body) == 2 + 1 + 258


def test_cli_dry_run_sends_nothing_and_writes_nothing(served_emulator, sample_input, tmp_path, capsys):
    server = served_emulator()
    out = tmp_path / "o.parquet"
    prices = tmp_path / "p.json"
    prices.write_text(
        json.dumps({"gemini-2.0-flash-preview-image-generation": {"input": 1000, "output": 0, "image": 0}})
    )
    code = main(
        [
            "run",
            str(sample_input),
            str(out),
            "--images",
            "image_path",
            "--emulator",
            "--base-url",
            server.url,
            "--cache-dir",
            str(tmp_path / "c"),
            "--dry-run",
            "--samples",
            "2",
            "--count-tokens",
            "--prices",
            str(prices),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0 and not out.exists() and server.emulator.stats.requests == 0
    assert "requests                  22" in printed.out and "exact, from the API's countTokens" in printed.out
    assert "nothing was sent" in printed.err
    tokens = int(printed.out.split("input tokens")[1].split()[0].replace(",", ""))
    assert f"${tokens * 1000 / 1e6:,.4f}" in printed.out  # priced from the override file


def test_estimate_counts_a_big_local_video_and_agrees_with_the_run(emulator, cache_dir, tmp_path):
    """A 25 MB video (over the inline limit): the estimate digests it streaming as generate
    does, counts its tokens per second (263 a second, the length from the size) and finds it in
    the cache once answered; a client that cannot upload it calls it invalid, naming the fix.
    (On main: one invalid row, 'larger than 20 MB'.)"""
    import math

    video = tmp_path / "talk.mp4"
    size = 25 * 2**20
    with open(video, "wb") as f:  # sparse: an ftyp box, then one mdat box of zeros
        f.write(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41" + (size - 24).to_bytes(4, "big") + b"mdat")
        f.truncate(size)
    df = pl.DataFrame({"prompt": ["What happens?"], "video": [str(video)]})
    tokens = 4 + 263 * math.ceil(size / 125_000)  # 13 characters of text: 4 tokens
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as client:
        est = gf.estimate(df, images="video", client=client)
        assert (est.invalid_rows, est.to_send, est.input_tokens) == (0, 1, tokens) and emulator.stats.requests == 0
        exact = gf.estimate(df, images="video", client=client, exact=True)
        assert exact.input_tokens == tokens and exact.token_method == "countTokens+local"
        assert "1 requests counted locally: they hold a file over the inline limit" in exact.notes[0]
        out = df.with_columns(reply=gf.generate("prompt", images="video", client=client)).unnest("reply")
        assert out["prompt_tokens"].to_list() == [tokens] and emulator.stats.uploads == 1
        again = gf.estimate(df, images="video", client=client)
        assert (again.cache_hits, again.to_send) == (1, 0)
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, upload="never") as c:
        never = gf.estimate(df, images="video", client=c)
    assert never.invalid_rows == 1 and "larger than 20 MB" in never.notes[0] and "upload='auto'" in never.notes[0]
