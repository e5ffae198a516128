"""The run report: terminal text and an HTML page with inline-SVG charts, sample replies and
thumbnails, from a gemframe output (CLI and Python API)."""

import os
import re
import xml.etree.ElementTree as ET

import polars as pl
import pytest

import gemframe as gf
from gemframe._accounting.report import svg_hbars, svg_histogram
from gemframe._cli import main


@pytest.fixture
def mixed_output(client, sample_input, tmp_path):
    """sample_data plus rows that fail: a safety finish, a 400 and a blocked prompt."""
    frame = pl.read_parquet(sample_input)
    bad = pl.DataFrame(
        {
            "id": [20, 21, 22],
            "task": ["bad"] * 3,
            "image_path": [None] * 3,
            "prompt": ["unsafe [emulator:safety]", "broken [emulator:status=400]", "blocked [emulator:block]"],
        }
    )
    src = tmp_path / "mixed.parquet"
    pl.concat([frame, bad.select(frame.columns)]).write_parquet(src)
    out = tmp_path / "mixed_out.parquet"
    gf.run(
        str(src),
        str(out),
        images="image_path",
        config={"response_modalities": ["TEXT", "IMAGE"]},
        client=client,
        progress=False,
    )
    return out


def _svgs(html: str) -> list[ET.Element]:
    return [ET.fromstring(svg) for svg in re.findall(r"<svg.*?</svg>", html, flags=re.S)]


def test_report_counts_match_the_output(mixed_output, tmp_path):
    page = tmp_path / "r" / "report.html"
    rep = gf.report(mixed_output, html=page)
    d = rep.data
    frame = pl.read_parquet(mixed_output)
    assert (d["rows"], d["rows_without_prompt"], d["answered"], d["error_rows"]) == (15, 1, 11, 3)
    assert d["errors"] == {"SAFETY": 1, "INVALID_ARGUMENT": 1, "BLOCKED": 1}
    assert d["finish_reasons"] == {"STOP": 11, "SAFETY": 1}
    assert d["requests_sent"] == 14 and d["cache_hits"] == 0
    assert d["tokens"]["input"] == frame["prompt_tokens"].sum()
    assert d["images_generated"] == 11 and d["thumbnails"] == 11
    assert d["latency_ms"]["count"] == 14 and d["latency_ms"]["p50"] <= d["latency_ms"]["p90"] <= d["latency_ms"]["max"]
    assert d["cost"]["this_run"] > 0 and d["manifest"]["rows"] == 15
    # The terminal text.
    text = str(rep)
    assert "15: 11 answered · 3 errors · 1 without prompt" in text
    assert "INVALID_ARGUMENT" in text and "SAFETY" in text and "latency ms    p50" in text
    assert "cost (est.)" in text and "sample replies" in text
    # The HTML page: written, self-contained, charts that parse, thumbnails that are PNGs.
    html = page.read_text()
    assert html.startswith("<!doctype html>") and len(html) > 5000 and html == rep.html
    svgs = _svgs(html)
    assert len(svgs) == 5  # finish reasons, errors by status, latency, input and output tokens
    assert len(list(svgs[0].iter("rect"))) == 2  # finish reasons: STOP and SAFETY
    assert len(list(svgs[1].iter("rect"))) == 3  # errors: three statuses
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 11
    assert "errors by status" in html and "Sample replies" in html and "Manifest" in html
    assert "http" not in html.replace("http://emulator", "").replace("http://www.w3.org", "")  # no external assets


def test_report_shows_the_cost_split_of_the_manifest_rule(mixed_output, tmp_path):
    """The report's cost is split into input, cached input, output, thinking and images, the
    same figures as the run's manifest (one pricing rule), in the text and the HTML page."""
    rep = gf.report(mixed_output)
    manifest = gf.read_manifest(mixed_output)
    split = rep.data["cost"]["this_run_split"]
    assert split == manifest["cost"]["this_run_split"] and split["images"] == pytest.approx(11 * 0.039)
    assert sum(split.values()) == pytest.approx(rep.data["cost"]["this_run"])
    line = next(line for line in rep.text.splitlines() if line.strip().startswith("this run"))
    assert "input $" in line and "cached input $" in line and "thinking $" in line and "images $0.4290" in line
    table = rep.html.split("<h2>Cost (est.)</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 7 and "cached input" in table and "$0.4290" in table


def test_cli_report(mixed_output, tmp_path, capsys):
    page = tmp_path / "cli.html"
    assert main(["report", str(mixed_output), "--html", str(page), "--samples", "3"]) == 0
    captured = capsys.readouterr()
    assert "gemframe report:" in captured.out and "3 errors" in captured.out
    assert page.stat().st_size > 5000 and "wrote" in captured.err
    assert captured.out.count(" → ") == 3


def test_report_of_a_frame_and_of_a_cached_rerun(client, sample_input, tmp_path):
    df = pl.read_parquet(sample_input)
    first = df.with_columns(reply=gf.generate("prompt", images="image_path", client=client))
    again = df.with_columns(reply=gf.generate("prompt", images="image_path", client=client))
    rep = gf.report(again, model=gf.DEFAULT_MODEL, samples=2)
    assert rep.data["cache_hits"] == 11 and rep.data["requests_sent"] == 0 and rep.data["replies_shown"] == 2
    assert "no requests sent" in rep.text and rep.data["cost"]["this_run"] == 0
    assert rep._repr_html_().startswith("<div class='gfreport'>")  # shows inline in a notebook
    assert gf.report(first).data["cost"] is None  # no model given, no manifest: no price
    paths = df.with_columns(
        reply=gf.generate(
            "prompt", config={"response_modalities": ["IMAGE"]}, image_dir=str(tmp_path / "img"), client=client
        )
    )
    assert gf.report(paths, thumbnails=3).data["thumbnails"] == 3  # thumbnails from image files


def test_svg_helpers_are_well_formed():
    for svg in _svgs(svg_hbars({"A & B <c>": 3, "D": 1}, "t") + svg_histogram([1, 2, 2, 3, 10], "h", " ms")):
        assert svg.tag.endswith("svg")
    assert "none" in svg_hbars({}, "t") and "no data" in svg_histogram([], "h")
    assert len(_svgs(svg_histogram([5.0] * 4, "constant"))) == 1


def test_html_report_never_writes_through_a_planted_symlink(mixed_output, tmp_path):
    """``--html report.html`` where report.html is a symlink planted to a victim: the page is
    written beside it and renamed over the link; the victim is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    page = tmp_path / "report.html"
    page.symlink_to(victim)
    assert main(["report", str(mixed_output), "--html", str(page)]) == 0
    assert victim.read_bytes() == b"precious"
    assert not page.is_symlink() and page.read_text().startswith("<!doctype html>")


def test_thumbnails_only_from_regular_image_files(client, tmp_path):
    """Image paths in an output that now name a FIFO (opening it would block forever) or a text
    file are skipped; the report still shows the real image."""

    df = pl.DataFrame({"prompt": ["A fox", "A boat", "A kite"]})
    out = df.with_columns(
        reply=gf.generate(
            "prompt", config={"response_modalities": ["IMAGE"]}, image_dir=str(tmp_path / "img"), client=client
        )
    )
    paths = [r["images"][0]["path"] for r in out["reply"].to_list()]
    os.unlink(paths[0])
    os.mkfifo(paths[0])
    with open(paths[1], "w") as f:
        f.write("sk-live-0123456789 do not share")
    rep = gf.report(out, html=tmp_path / "r.html")
    assert rep.data["thumbnails"] == 1
    assert len(re.findall(r'<img src="data:image/png;base64,', rep.html)) == 1


def test_sample_replies_include_failed_rows(mixed_output, tmp_path):
    """The 3 failures are the last of 15 rows: a sample of the first 8 answered rows showed
    none of them. Up to half the sample is failures, each with its status and message."""
    rep = gf.report(mixed_output, samples=8, html=tmp_path / "r.html")
    lines = rep.text.split("sample replies\n", 1)[1].splitlines()
    assert rep.data["replies_shown"] == len(lines) == 8
    failed = [line for line in lines if "[emulator:" in line]
    assert len(failed) == 3
    assert any("[INVALID_ARGUMENT: " in line for line in failed)
    assert any("[BLOCKED: prompt blocked" in line for line in failed)
    table = rep.html.split("<h2>Sample replies</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 9 and "INVALID_ARGUMENT: " in table
    only_two = gf.report(mixed_output, samples=2).text.split("sample replies\n", 1)[1].splitlines()
    assert len(only_two) == 2 and sum("[emulator:" in line for line in only_two) == 1
