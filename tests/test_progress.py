"""The progress bar: total known up front, cache hits, errors and tokens as postfix."""

import polars as pl

import gemframe as gf


def test_bar_shows_total_hits_errors_and_tokens(emulator, cache_dir, capsys):
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=True) as client:
        frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(20)] + ["[emulator:status=400] bad", None]})
        frame.head(10).with_columns(reply=gf.generate("prompt", client=client, progress=False))
        frame.with_columns(reply=gf.generate("prompt", client=client))
    bar = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]
    assert "21/21" in bar  # the null row is not counted: it sends nothing
    assert "cached=10" in bar and "errors=1" in bar and "tokens=" in bar and "tokens=0" not in bar


def test_progress_false_prints_nothing(client, capsys):
    pl.DataFrame({"prompt": ["quiet"]}).with_columns(reply=gf.generate("prompt", client=client, progress=False))
    assert capsys.readouterr().err == ""
