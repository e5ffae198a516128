import base64
from datetime import date, datetime, timezone

import polars as pl
import pytest

import gemframe as gf
from gemframe.cache import ResponseCache, parse_when


def _body(text="hi", image: bytes | None = None):
    parts = [{"text": text}]
    if image is not None:
        parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}})
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": {"temperature": 0}}


def test_key_is_canonical_and_separates_what_matters():
    a = gf.cache_key(_body(), provider="google", model="m")
    reordered = {"generationConfig": {"temperature": 0}, "contents": _body()["contents"]}
    assert gf.cache_key(reordered, provider="google", model="m") == a
    assert len({
        a,
        gf.cache_key(_body("other"), provider="google", model="m"),
        gf.cache_key(_body(), provider="segmind", model="m"),
        gf.cache_key(_body(), provider="google", model="m2"),
        gf.cache_key(_body(), provider="google", model="m", sample=1),
    }) == 5


def test_images_enter_the_key_by_content():
    one, two = b"\x89PNG\r\n\x1a\n one", b"\x89PNG\r\n\x1a\n two"
    assert gf.cache_key(_body(image=one), provider="p", model="m") == gf.cache_key(_body(image=one), provider="p", model="m")
    assert gf.cache_key(_body(image=one), provider="p", model="m") != gf.cache_key(_body(image=two), provider="p", model="m")


# Keys written by earlier releases must keep hitting: these were computed with the original
# definition (sha256 of json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)).
PINNED_KEYS = {
    "99c8880d703f91dfc238120138cda1517be69d0d0d0e4cb562fac14b2d80b0d3":
        {"contents": [{"role": "user", "parts": [{"text": 'Describe a cat in 3 words. \u00dcn\u00efcode \u2192 \u2713 "quoted"\n\t\x01'}]}]},
    # floats json spells with an exponent, a negative zero
    "31c0c9e2b636fa07128dc856e81d39bbe3dfafd9664e79ed21be50067947a360":
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {
            "temperature": 0.7, "topP": 1e-05, "presencePenalty": 1e16, "topK": 40, "frequencyPenalty": -0.0}},
    # an int beyond 64 bits
    "95e3856bc6a15b42e49fe2fd6acce2db5bbad2649909e40d8251595d7d98808e":
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {"seed": 2**70}},
    "126aa3d2a9eed406daeb357ca22589946c1800b738d13ca1bbff1e7e715d7bda":
        {"contents": [{"role": "user", "parts": [{"text": "edit"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}],
         "systemInstruction": {"parts": [{"text": "sys"}]}},
    "c32e010fe63e175650251b3759dce7b64130441a8cf71916c700fd2df094daa4":
        {"contents": [{"role": "user", "parts": [{"text": "[:1e5, 0.00001]"}]}]},
}


@pytest.mark.parametrize("expected", PINNED_KEYS)
def test_keys_are_stable_across_releases(expected):
    assert gf.cache_key(PINNED_KEYS[expected], provider="google", model="gemini-2.0-flash", sample=1) == expected


def test_store_and_batch_lookup(tmp_path):
    cache = ResponseCache(tmp_path)
    cache.set_many([("k1", "m", b'{"candidates": []}'), ("k2", "m", b"{}")])
    assert cache.get_many(["k1", "k2", "k3"]) == {"k1": b'{"candidates": []}', "k2": b"{}"}
    assert len(cache) == 2
    cache.close()
    reopened = ResponseCache(tmp_path)  # another process/session sees the same entries
    assert reopened.get_many(["k2"]) == {"k2": b"{}"}
    assert reopened.clear() == 2 and len(reopened) == 0


def test_batch_lookup_reads_big_answers_and_many_keys(tmp_path):
    """Answers diskcache keeps in files (an image answer) come back too, and a lookup of more
    keys than one SQL query takes is split."""
    cache = ResponseCache(tmp_path)
    image_answer = b'{"candidates": [{"content": {"parts": [{"inlineData": {"data": "' + b"A" * 300_000 + b'"}}]}}]}'
    small = {f"k{i}": b'{"i": %d}' % i for i in range(1_200)}
    cache.set_many([("big", "m", image_answer), *((k, "m", v) for k, v in small.items())])
    found = cache.get_many(["big", "absent", *small])
    assert found == {"big": image_answer, **small}


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMFRAME_CACHE_DIR", str(tmp_path / "c"))
    assert gf.default_cache_dir() == str(tmp_path / "c")
    assert ResponseCache().directory == str(tmp_path / "c")


def test_newer_entry_format_is_refused(tmp_path):
    cache = ResponseCache(tmp_path)
    cache._store.set("k", b'{"format": 99}\n{}')
    with pytest.raises(ValueError, match="newer"):
        cache.get_many(["k"])


# -- management: stats, clear by model/age, export/import ---------------------------------------


def _filled(tmp_path):
    cache = ResponseCache(tmp_path / "c")
    cache.set_many([("k1", "m1", b'{"a": 1}'), ("k2", "m1", b"x" * 50_000), ("k3", "m2", b"{}")])
    return cache


def test_stats_by_model(tmp_path):
    cache = _filled(tmp_path)
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["bytes_on_disk"] > 50_000
    assert stats["by_model"]["m1"]["entries"] == 2 and stats["by_model"]["m1"]["bytes"] > 50_000
    assert stats["by_model"]["m2"]["entries"] == 1
    assert stats["oldest"] <= stats["newest"] and stats["newest"].endswith("Z")
    assert ResponseCache(tmp_path / "empty").stats()["entries"] == 0


def test_clear_by_model_and_age(tmp_path):
    cache = _filled(tmp_path)
    assert cache.clear(before="2000-01-01") == 0
    assert cache.clear(model="m1") == 2 and cache.get_many(["k1", "k2", "k3"]).keys() == {"k3"}
    assert cache.clear(before=datetime.now(timezone.utc).timestamp() + 5) == 1 and len(cache) == 0


def test_export_import_round_trip_keeps_bytes_and_dates(tmp_path):
    cache = _filled(tmp_path)
    assert cache.export(tmp_path / "all.parquet") == 3
    assert cache.export(tmp_path / "m2.parquet", model="m2") == 1
    frame = pl.read_parquet(tmp_path / "all.parquet")
    assert frame.columns == ["key", "model", "created", "format", "response"]
    assert frame.filter(pl.col("key") == "k2")["response"][0] == b"x" * 50_000
    other = ResponseCache(tmp_path / "other")
    assert other.import_(tmp_path / "all.parquet") == {"added": 3, "replaced": 0, "kept": 0}
    assert other.get_many(["k1", "k2", "k3"]) == cache.get_many(["k1", "k2", "k3"])
    assert other.stats()["oldest"] == cache.stats()["oldest"]  # the answers keep their dates


def test_import_merges_and_keeps_local_answers_unless_overwrite(tmp_path):
    cache = _filled(tmp_path)
    cache.export(tmp_path / "all.parquet")
    mine = ResponseCache(tmp_path / "mine")
    mine.set_many([("k1", "m1", b"mine"), ("k9", "m1", b"only mine")])
    assert mine.import_(tmp_path / "all.parquet") == {"added": 2, "replaced": 0, "kept": 1}
    assert mine.get_many(["k1", "k9"]) == {"k1": b"mine", "k9": b"only mine"} and len(mine) == 4
    assert mine.import_(tmp_path / "all.parquet", overwrite=True) == {"added": 0, "replaced": 3, "kept": 0}
    assert mine.get_many(["k1"]) == {"k1": b'{"a": 1}'}


def test_import_of_old_answers_then_clear_older_than(tmp_path):
    old = pl.DataFrame({
        "key": ["old"], "model": ["m"], "created": [datetime(2020, 1, 1, tzinfo=timezone.utc)],
        "format": [1], "response": [b"{}"],
    })
    old.write_parquet(tmp_path / "old.parquet")
    cache = _filled(tmp_path)
    cache.import_(tmp_path / "old.parquet")
    assert cache.stats()["oldest"] == "2020-01-01T00:00:00Z"
    assert cache.clear(before=date(2021, 1, 1)) == 1 and len(cache) == 3


def test_import_refuses_other_files(tmp_path):
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a gemframe cache export"):
        ResponseCache(tmp_path / "c").import_(tmp_path / "x.parquet")
    pl.DataFrame({"key": ["k"], "model": ["m"], "created": [0], "format": [99], "response": [b"{}"]}).write_parquet(tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="format 99"):
        ResponseCache(tmp_path / "c").import_(tmp_path / "f.parquet")


def test_parse_when():
    assert parse_when("2025-01-31") == datetime(2025, 1, 31, tzinfo=timezone.utc).timestamp()
    assert parse_when("2025-01-31T12:00Z") == datetime(2025, 1, 31, 12, tzinfo=timezone.utc).timestamp()
    assert parse_when("30d", now=100 * 86400) == 70 * 86400 and parse_when("2h", now=7200) == 0
    with pytest.raises(ValueError, match="not a date"):
        parse_when("last tuesday")


def test_contains_many_does_not_read_values(tmp_path):
    cache = _filled(tmp_path)
    assert cache.contains_many(["k1", "k3", "nope"]) == {"k1", "k3"}
