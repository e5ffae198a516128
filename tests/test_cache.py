import base64

import pytest

import gemframe as gf
from gemframe.cache import ResponseCache


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


def test_store_and_batch_lookup(tmp_path):
    cache = ResponseCache(tmp_path)
    cache.set_many([("k1", "m", b'{"candidates": []}'), ("k2", "m", b"{}")])
    assert cache.get_many(["k1", "k2", "k3"]) == {"k1": b'{"candidates": []}', "k2": b"{}"}
    assert len(cache) == 2
    cache.close()
    reopened = ResponseCache(tmp_path)  # another process/session sees the same entries
    assert reopened.get_many(["k2"]) == {"k2": b"{}"}
    assert reopened.clear() == 2 and len(reopened) == 0


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMFRAME_CACHE_DIR", str(tmp_path / "c"))
    assert gf.default_cache_dir() == str(tmp_path / "c")
    assert ResponseCache().directory == str(tmp_path / "c")


def test_newer_entry_format_is_refused(tmp_path):
    cache = ResponseCache(tmp_path)
    cache._store.set("k", b'{"format": 99}\n{}')
    with pytest.raises(ValueError, match="newer"):
        cache.get_many(["k"])
