import base64
from datetime import date, datetime, timezone

import polars as pl
import pytest

import gemframe as gf
from gemframe._core.cache.manage import parse_when
from gemframe._core.cache.store import ResponseCache

from .conftest import gemframe_cli


def _body(text="hi", image: bytes | None = None):
    parts = [{"text": text}]
    if image is not None:
        parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(image).decode()}})
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": {"temperature": 0}}


def test_key_is_canonical_and_separates_what_matters():
    a = gf.cache_key(_body(), provider="google", model="m")
    reordered = {"generationConfig": {"temperature": 0}, "contents": _body()["contents"]}
    assert gf.cache_key(reordered, provider="google", model="m") == a
    assert (
        len(
            {
                a,
                gf.cache_key(_body("other"), provider="google", model="m"),
                gf.cache_key(_body(), provider="segmind", model="m"),
                gf.cache_key(_body(), provider="google", model="m2"),
                gf.cache_key(_body(), provider="google", model="m", sample=1),
            }
        )
        == 5
    )


def test_images_enter_the_key_by_content():
    one, two = b"\x89PNG\r\n\x1a\n one", b"\x89PNG\r\n\x1a\n two"
    assert gf.cache_key(_body(image=one), provider="p", model="m") == gf.cache_key(
        _body(image=one), provider="p", model="m"
    )
    assert gf.cache_key(_body(image=one), provider="p", model="m") != gf.cache_key(
        _body(image=two), provider="p", model="m"
    )


# Keys written by earlier releases must keep hitting: these were computed with the original
# definition (sha256 of json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)).
PINNED_KEYS = {
    "99c8880d703f91dfc238120138cda1517be69d0d0d0e4cb562fac14b2d80b0d3": {
        "contents": [
            {
                "role": "user",
                "parts": [{"text": 'Describe a cat in 3 words. \u00dcn\u00efcode \u2192 \u2713 "quoted"\n\t\x01'}],
            }
        ]
    },
    # floats json spells with an exponent, a negative zero
    "31c0c9e2b636fa07128dc856e81d39bbe3dfafd9664e79ed21be50067947a360": {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {
            "temperature": 0.7,
            "topP": 1e-05,
            "presencePenalty": 1e16,
            "topK": 40,
            "frequencyPenalty": -0.0,
        },
    },
    # an int beyond 64 bits
    "95e3856bc6a15b42e49fe2fd6acce2db5bbad2649909e40d8251595d7d98808e": {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"seed": 2**70},
    },
    "126aa3d2a9eed406daeb357ca22589946c1800b738d13ca1bbff1e7e715d7bda": {
        "contents": [
            {
                "role": "user",
                "parts": [{"text": "edit"}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}],
            }
        ],
        "systemInstruction": {"parts": [{"text": "sys"}]},
    },
    "c32e010fe63e175650251b3759dce7b64130441a8cf71916c700fd2df094daa4": {
        "contents": [{"role": "user", "parts": [{"text": "[:1e5, 0.00001]"}]}]
    },
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


def test_newer_entry_format_is_a_miss_with_a_warning(tmp_path):
    """An entry a newer gemframe wrote is not read (one warning), and does not end the call."""
    cache = ResponseCache(tmp_path)
    cache._store.set("k", b'{"format": 99}\n{}')
    with pytest.warns(UserWarning, match="1 in entry format 99, newer than this gemframe"):
        assert cache.get_many(["k"]) == {}


# -- management: stats, clear by model/age, export/import ---------------------------------------


# Keys are digests and answers generateContent answers (an import refuses anything else); K2's
# answer is big enough for diskcache to keep it in a file.
K1, K2, K3, K9 = ("%064x" % n for n in (1, 2, 3, 9))
A1 = b'{"candidates": [{"content": {"parts": [{"text": "a"}]}}]}'
A2 = b'{"candidates": [{"content": {"parts": [{"text": "' + b"x" * 50_000 + b'"}]}}]}'
A3 = b'{"candidates": []}'


def _answer(text: str) -> bytes:
    return b'{"candidates": [{"content": {"parts": [{"text": "%s"}]}}]}' % text.encode()


def _filled(tmp_path):
    cache = ResponseCache(tmp_path / "c")
    cache.set_many([(K1, "m1", A1), (K2, "m1", A2), (K3, "m2", A3)])
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
    assert cache.clear(model="m1") == 2 and cache.get_many([K1, K2, K3]).keys() == {K3}
    assert cache.clear(before=datetime.now(timezone.utc).timestamp() + 5) == 1 and len(cache) == 0


def test_export_import_round_trip_keeps_bytes_and_dates(tmp_path):
    cache = _filled(tmp_path)
    assert cache.export(tmp_path / "all.parquet") == 3
    assert cache.export(tmp_path / "m2.parquet", model="m2") == 1
    frame = pl.read_parquet(tmp_path / "all.parquet")
    assert frame.columns == ["key", "model", "created", "format", "response", "prompt"]
    assert frame.filter(pl.col("key") == K2)["response"][0] == A2
    other = ResponseCache(tmp_path / "other")
    assert other.import_(tmp_path / "all.parquet") == {
        "added": 3,
        "replaced": 0,
        "kept": 0,
        "refused": 0,
        "refused_reasons": {},
    }
    assert other.get_many([K1, K2, K3]) == cache.get_many([K1, K2, K3])
    assert other.stats()["oldest"] == cache.stats()["oldest"]  # the answers keep their dates


def test_import_merges_and_keeps_local_answers_unless_overwrite(tmp_path):
    cache = _filled(tmp_path)
    cache.export(tmp_path / "all.parquet")
    mine = ResponseCache(tmp_path / "mine")
    mine.set_many([(K1, "m1", _answer("mine")), (K9, "m1", _answer("only mine"))])
    assert mine.import_(tmp_path / "all.parquet") == {
        "added": 2,
        "replaced": 0,
        "kept": 1,
        "refused": 0,
        "refused_reasons": {},
    }
    assert mine.get_many([K1, K9]) == {K1: _answer("mine"), K9: _answer("only mine")} and len(mine) == 4
    assert mine.import_(tmp_path / "all.parquet", overwrite=True)["replaced"] == 3
    assert mine.get_many([K1]) == {K1: A1}


def test_import_of_old_answers_then_clear_older_than(tmp_path):
    old = pl.DataFrame(
        {
            "key": ["%064x" % 7],
            "model": ["m"],
            "created": [datetime(2020, 1, 1, tzinfo=timezone.utc)],
            "format": [1],
            "response": [A3],
        }
    )
    old.write_parquet(tmp_path / "old.parquet")
    cache = _filled(tmp_path)
    cache.import_(tmp_path / "old.parquet")
    assert cache.stats()["oldest"] == "2020-01-01T00:00:00Z"
    assert cache.clear(before=date(2021, 1, 1)) == 1 and len(cache) == 3


def test_import_refuses_other_files(tmp_path):
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a gemframe cache export"):
        ResponseCache(tmp_path / "c").import_(tmp_path / "x.parquet")
    pl.DataFrame({"key": ["k"], "model": ["m"], "created": [0], "format": [99], "response": [b"{}"]}).write_parquet(
        tmp_path / "f.parquet"
    )
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
    assert cache.contains_many([K1, K3, "nope"]) == {K1, K3}


# -- trust at the edges: the cache directory is hostile ground ----------------------------------

import os
import pickle
import sqlite3
import stat
import warnings

ENTRY = b'{"format": 1, "model": "m", "created": 0}\n'  # the header gemframe writes before an answer


class _Marker:
    """Unpickling this creates a file: proof that something unpickled a planted row."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(cache_dir, key, *, mode, value=None, filename=None, model="m"):
    """Write a row into diskcache's Cache table directly, as an attacker with write access to a
    shared cache directory would (replacing any row of that key)."""
    with sqlite3.connect(os.path.join(cache_dir, "cache.db")) as db:
        db.execute("DELETE FROM Cache WHERE key = ? AND raw = 1", (key,))
        db.execute(
            "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode,"
            " filename, value) VALUES (?, 1, 1e9, NULL, 1e9, 0, ?, 0, ?, ?, ?)",
            (key, model, mode, filename, value),
        )
    db.close()


def _prompts(*texts):
    return pl.DataFrame({"prompt": list(texts)})


def _keys_in(cache_dir):
    with sqlite3.connect(os.path.join(cache_dir, "cache.db")) as db:
        keys = [key for (key,) in db.execute("SELECT key FROM Cache ORDER BY rowid")]
    db.close()
    return keys


def test_planted_pickle_rows_are_misses_never_unpickled(client, emulator, cache_dir, tmp_path):
    """A MODE_PICKLE row (in the database or in a file) is never unpickled by any reading
    path: the row is a miss with one warning, and its request goes to the server again."""
    frame = _prompts("first", "second")
    frame.with_columns(reply=gf.generate("prompt", client=client))
    assert emulator.stats.requests == 2
    first, second = _keys_in(cache_dir)
    marker = tmp_path / "unpickled"
    _plant(cache_dir, first, mode=4, value=pickle.dumps(_Marker(marker)))  # diskcache MODE_PICKLE
    name = "ab/cd/" + "e" * 28 + ".val"
    os.makedirs(cache_dir / "ab" / "cd")
    (cache_dir / name).write_bytes(pickle.dumps(_Marker(marker)))
    _plant(cache_dir, second, mode=4, filename=name)

    with pytest.warns(UserWarning, match=r"2 cache entries in .* not read .*2 stored as diskcache mode 4") as seen:
        out = frame.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
    assert len([w for w in seen if "not read" in str(w.message)]) == 1  # one warning per lookup
    assert not marker.exists()
    assert emulator.stats.requests == 4  # both rows were sent again...
    assert out["cached"].to_list() == [False, False] and out["error"].to_list() == [None, None]
    assert out["text"].null_count() == 0  # ...and answered, not a forged cached=True answer

    _plant(cache_dir, first, mode=4, value=pickle.dumps(_Marker(marker)))
    _plant(cache_dir, second, mode=4, filename=name)
    cache = gf.ResponseCache(cache_dir)
    with pytest.warns(UserWarning, match="not read"):
        assert cache.get_many([first, second]) == {}
    with pytest.warns(UserWarning, match="not read"):
        assert list(cache.entries()) == []  # what export reads
    assert cache._store.get(first) is None and cache._store.get(second) is None  # diskcache's own path
    assert cache.stats()["entries"] == 2
    assert cache.clear(model="m") == 2
    assert not marker.exists()


def _victims(tmp_path):
    """Files outside the cache directory that a planted row names, each holding what would be
    a valid cached answer if it were read."""
    outside = tmp_path / "outside"
    (outside / "cd").mkdir(parents=True)
    answer = ENTRY + b'{"candidates": [{"content": {"parts": [{"text": "forged"}]}}]}'
    victims = [outside / "victim", outside / "cd" / ("f" * 28 + ".val"), outside / "linked"]
    for victim in victims:
        victim.write_bytes(answer)
    return victims


def _plant_escapes(cache_dir, victims):
    """Rows whose file is outside the directory: ../ path, absolute path, a planted directory
    link (ab -> outside), a planted file link inside the directory. Returns their keys."""
    victim, in_linked_dir, linked = victims
    keys = ["%064x" % n for n in range(101, 105)]
    depth = os.path.relpath(victim, cache_dir)  # ../outside/victim
    (cache_dir / "ab").symlink_to(victim.parent, target_is_directory=True)
    os.makedirs(cache_dir / "cc" / "dd", exist_ok=True)
    link_name = "cc/dd/" + "a" * 28 + ".val"
    (cache_dir / link_name).symlink_to(linked)
    for key, filename in zip(keys, [depth, str(victim), "ab/cd/" + "f" * 28 + ".val", link_name]):
        _plant(cache_dir, key, mode=2, filename=filename)  # diskcache MODE_BINARY: value in a file
    return keys


def test_planted_file_names_never_read_or_delete_outside_the_cache(tmp_path):
    cache_dir = tmp_path / "cache"
    cache = gf.ResponseCache(cache_dir)
    cache.set_many([("%064x" % 1, "m", b'{"candidates": []}')])
    victims = _victims(tmp_path)
    keys = _plant_escapes(cache_dir, victims)
    with pytest.warns(UserWarning, match="4 cache entries .* not read") as seen:
        assert cache.get_many(keys) == {}  # nothing outside was read (each would be a hit)
    assert "symbolic link" in str(seen[0].message) and "not a name gemframe writes" in str(seen[0].message)
    assert cache.clear(model="m") == 5
    assert all(v.read_bytes().startswith(ENTRY) for v in victims)  # all still there, untouched
    assert (cache_dir / "ab").is_symlink() and (cache_dir / "cc" / "dd" / ("a" * 28 + ".val")).is_symlink() is False

    os.unlink(cache_dir / "ab")
    keys = _plant_escapes(cache_dir, victims)
    assert cache.clear() == 4
    assert all(v.read_bytes().startswith(ENTRY) for v in victims)
    cache.close()

    # diskcache applies every row of its Settings table: a planted disk__directory would move
    # where answer files are read and deleted, to a directory where a valid-looking name exists
    elsewhere = tmp_path / "elsewhere"
    target = elsewhere / "ab" / "cd" / ("f" * 28 + ".val")
    target.parent.mkdir(parents=True)
    target.write_bytes(victims[0].read_bytes())
    with sqlite3.connect(cache_dir / "cache.db") as db:
        db.execute("INSERT INTO Settings VALUES ('disk__directory', ?)", (str(elsewhere),))
    db.close()
    os.unlink(cache_dir / "ab")
    _plant(cache_dir, keys[0], mode=2, filename="ab/cd/" + "f" * 28 + ".val")
    with gf.ResponseCache(cache_dir) as reopened:
        assert reopened.get_many(keys) == {} and reopened.clear() == 1
    assert target.read_bytes().startswith(ENTRY)

    _plant_escapes(cache_dir, victims)
    result = gemframe_cli("cache", "clear", "--cache-dir", cache_dir)
    assert result.returncode == 0 and "removed 4 entries" in result.stdout, result.stderr
    assert all(v.read_bytes().startswith(ENTRY) for v in victims)


def test_new_cache_is_private_whatever_the_umask(tmp_path):
    """A new cache directory is 0700 and everything gemframe creates in it 0600 (0700 for
    answer subdirectories), under a permissive umask; an existing directory keeps its mode."""
    old = os.umask(0o022)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a new cache gives no warning (its database is never 0 bytes)
            cache = gf.ResponseCache(tmp_path / "new" / "cache")
            cache.set_many([("%064x" % 1, "m", b'{"candidates": []}'), ("%064x" % 2, "m", A2)])
            assert len(gf.ResponseCache(tmp_path / "new" / "cache")) == 2
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        os.chmod(shared, 0o755)
        gf.ResponseCache(shared).set_many([("%064x" % 1, "m", A2)])
    finally:
        os.umask(old)
    root = tmp_path / "new" / "cache"

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(root) == 0o700
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"cache.db", "cache.db-wal", "cache.db-shm"} <= names and any(n.endswith(".val") for n in names)
    assert {str(p.relative_to(root)): mode(p) for p in files} == {str(p.relative_to(root)): 0o600 for p in files}
    assert {mode(p) for p in root.rglob("*") if p.is_dir()} == {0o700}
    assert mode(shared) == 0o755
    assert mode(shared / "cache.db") == 0o600


def test_import_refuses_rows_that_are_not_digest_keys_with_answers(tmp_path, capsys):
    from gemframe._cli import main

    good = {"%064x" % n: _answer(f"answer {n}") for n in range(3)}
    rows = [
        *((key, answer) for key, answer in good.items()),
        ("not-a-digest", _answer("x")),
        ("%064x" % 10, b"not json"),
        ("%064x" % 11, b'{"candidates": [{"content": {"parts": [{"text": 5}]}}]}'),
        ("%064x" % 12, b"[1, 2]"),
    ]
    pl.DataFrame(
        {
            "key": [k for k, _ in rows],
            "model": ["m"] * len(rows),
            "created": [datetime(2024, 1, 1, tzinfo=timezone.utc)] * len(rows),
            "format": [1] * len(rows),
            "response": [a for _, a in rows],
        }
    ).write_parquet(tmp_path / "mixed.parquet")
    cache = ResponseCache(tmp_path / "c")
    counts = cache.import_(tmp_path / "mixed.parquet")
    assert counts == {
        "added": 3,
        "replaced": 0,
        "kept": 0,
        "refused": 4,
        "refused_reasons": {"not a generateContent answer": 3, "key is not a sha256 digest": 1},
    }
    assert len(cache) == 3 and cache.get_many(k for k, _ in rows) == good
    cache.close()
    assert main(["cache", "import", str(tmp_path / "mixed.parquet"), "--cache-dir", str(tmp_path / "other")]) == 0
    assert (
        "3 added, 0 replaced, 0 already present (kept); refused 4: 3 not a generateContent answer, "
        "1 key is not a sha256 digest"
    ) in capsys.readouterr().out


def test_malformed_cached_answer_is_that_rows_error(client, emulator, cache_dir):
    """An answer in the cache that is not a generateContent answer (damaged or planted) becomes
    that row's CACHE_CORRUPT error; the other rows and later calls go on."""
    frame = _prompts("a", "b", "c", "d")
    frame.with_columns(reply=gf.generate("prompt", client=client))
    keys = _keys_in(cache_dir)
    _plant(cache_dir, keys[0], mode=1, value=ENTRY + b"not json")
    _plant(cache_dir, keys[1], mode=1, value=ENTRY + b'{"candidates": [{"content": {"parts": [{"text": 5}]}}]}')
    _plant(
        cache_dir,
        keys[2],
        mode=1,
        value=ENTRY + b'{"candidates": [{"content": {"parts": [{"inlineData": {"data": "AAAAA"}}]}}]}',
    )
    for _ in range(2):  # every later run too
        out = frame.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
        errors = out["error"].to_list()
        assert [e and e["status"] for e in errors] == ["CACHE_CORRUPT"] * 3 + [None]
        assert errors[0]["message"].startswith("row 0: the cached answer") and "cache='refresh'" in errors[0]["message"]
        assert "text is not a string" in errors[1]["message"] and errors[2]["message"].startswith("row 2")
        assert out["text"][3] is not None and out["cached"][3] is True
    assert emulator.stats.requests == 4  # nothing resent
    fixed = frame.with_columns(reply=gf.generate("prompt", client=client, cache="refresh")).unnest("reply")
    assert fixed["error"].null_count() == 4


def test_corrupt_database_is_one_clear_error(emulator, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    db = cache_dir / "cache.db"
    db.write_bytes(b"this is not an SQLite database, it is garbage " * 200)
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.GemframeError, match=r"cache database .*cache\.db is corrupt .*Move it aside"):
            _prompts("a").with_columns(reply=gf.generate("prompt", client=c))
    assert emulator.stats.requests == 0
    for action in ("stats", "clear"):
        result = gemframe_cli("cache", action, "--cache-dir", str(cache_dir))
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"gemframe: error: the cache database {db} is corrupt")
        assert f"mv {db} {db}.corrupt" in result.stderr
    assert db.read_bytes().startswith(b"this is not")  # left for the user to inspect


def test_damaged_pages_in_a_real_database_are_one_clear_error(emulator, cache_dir):
    """Not a file that is not a database but a real one with damaged pages (a bad disk, a copy
    cut short and patched, a crash on a filesystem that lies about fsync): SQLite opens it and
    fails only when it reads a damaged page (SQLITE_CORRUPT, 'malformed'). The run, `cache stats`
    and `cache clear` each give the same one line naming the file and the fix, and nothing is
    sent. `clear` deletes nothing: it used to remove the rows it could reach (100 of 400) before
    it met a damaged page. (Opening the file rewrites a settings page, with the same bytes.)"""
    import random

    frame = pl.DataFrame({"prompt": [f"row {i} " + "x" * 3000 for i in range(400)]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as c:
        frame.with_columns(reply=gf.generate("prompt", client=c))
    db = cache_dir / "cache.db"
    assert db.stat().st_size > 2 * 2**20 and emulator.stats.requests == 400  # about 600 pages of 4 KiB
    assert not (cache_dir / "cache.db-wal").exists()  # all of it in the file damaged below
    with open(db, "r+b") as f:  # 16 pages in the middle; the header and the schema stay whole
        f.seek(db.stat().st_size // 2 // 4096 * 4096)
        f.write(random.Random(0).randbytes(16 * 4096))
    assert db.read_bytes().startswith(b"SQLite format 3\x00")
    fix = f"mv {db} {db}.corrupt"
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.GemframeError) as raised:
            frame.with_columns(reply=gf.generate("prompt", client=c))
    assert type(raised.value).__name__ == "CacheCorruptError"
    message = str(raised.value).splitlines()[0]  # polars adds the expression it was raised in below
    assert message.startswith(f"the cache database {db} is corrupt (database disk image is malformed)")
    assert fix in message and "Move it aside" in message
    assert emulator.stats.requests == 400  # nothing sent
    pages = []
    for action in ("stats", "clear"):
        result = gemframe_cli("cache", action, "--cache-dir", str(cache_dir))
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.strip() == f"gemframe: error: {message}"
        pages.append(db.read_bytes())
    before, after = pages
    changed = sum(before[i : i + 4096] != after[i : i + 4096] for i in range(0, len(before), 4096))
    assert (
        len(pages[0]) == len(pages[1]) and changed <= 3
    )  # clear deleted nothing (the header and settings pages aside)


def test_zero_byte_database_warns(client, emulator, cache_dir, tmp_path):
    cache_dir.mkdir()
    (cache_dir / "cache.db").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"cache\.db is empty \(0 bytes\), so the cache starts empty"):
        out = _prompts("a").with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
    assert out["error"][0] is None and emulator.stats.requests == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "cache.db").write_bytes(b"")
    result = gemframe_cli("cache", "stats", "--cache-dir", str(other))
    assert result.returncode == 0 and "0 entries" in result.stdout
    assert result.stderr.startswith(f"gemframe: warning: the cache database {other / 'cache.db'} is empty (0 bytes)")
    assert "Traceback" not in result.stderr


# -- export: limited by model and age, carrying the prompt of each answer -----------------------

OLD_KEYS = ["%064x" % n for n in (1, 2)]


def _old_export(path):
    """An export as gemframe wrote it before it kept prompts: no prompt column, answers of 2020."""
    pl.DataFrame(
        {
            "key": OLD_KEYS,
            "model": ["gemini-old"] * 2,
            "format": [1] * 2,
            "response": [A1, A3],
            "created": [datetime(2020, 1, 1, tzinfo=timezone.utc)] * 2,
        }
    ).write_parquet(path)
    return path


def test_cache_export_by_age_and_model_carries_prompts(client, cache_dir, tmp_path):
    """`gemframe cache export --newer-than/--older-than/--model` selects; each exported answer
    carries the prompt it answered (the row's own, not its history's; at most 2,000 chars), and
    answers stored without one (before gemframe kept prompts) export a null prompt."""
    rows = _prompts("a red fox", "a blue whale\nin the sea", "x" * 5000)
    rows.with_columns(reply=gf.generate("prompt", client=client))
    talk = pl.DataFrame({"p1": ["draw a cat"], "p2": ["now make it blue"]})
    talk = talk.with_columns(r1=gf.generate("p1", client=client))
    talk.with_columns(r2=gf.generate("p2", history=gf.turns("p1", "r1"), client=client))
    assert (
        gemframe_cli(
            "cache", "import", str(_old_export(tmp_path / "old.parquet")), "--cache-dir", str(cache_dir)
        ).returncode
        == 0
    )

    new, old = tmp_path / "new.parquet", tmp_path / "old-only.parquet"
    result = gemframe_cli("cache", "export", str(new), "--newer-than", "1d", "--cache-dir", str(cache_dir))
    assert result.returncode == 0 and result.stdout.startswith("exported 5 entries"), result
    exported = pl.read_parquet(new)
    assert sorted(exported["prompt"]) == sorted(
        ["a red fox", "a blue whale\nin the sea", "x" * 2000, "draw a cat", "now make it blue"]
    )
    assert set(exported["key"]).isdisjoint(OLD_KEYS)

    result = gemframe_cli("cache", "export", str(old), "--older-than", "1d", "--cache-dir", str(cache_dir))
    assert result.returncode == 0 and result.stdout.startswith("exported 2 entries"), result
    exported = pl.read_parquet(old)
    assert sorted(exported["key"]) == OLD_KEYS and exported["prompt"].null_count() == 2

    assert client.cache.export(tmp_path / "m.parquet", model="gemini-old", after="1d") == 0
    assert client.cache.export(tmp_path / "m.parquet", model="gemini-old") == 2


def test_export_with_prompts_imports_and_round_trips(client, emulator, cache_dir, tmp_path):
    """An export with prompts imports into another cache, whose answers then serve hits, and
    exporting that cache gives the same rows again: prompts (and their nulls) included."""
    _prompts("a red fox", "a blue whale").with_columns(reply=gf.generate("prompt", client=client))
    client.cache.import_(_old_export(tmp_path / "old.parquet"))
    first = tmp_path / "first.parquet"
    assert client.cache.export(first) == 4
    assert sorted(pl.read_parquet(first)["prompt"].drop_nulls()) == ["a blue whale", "a red fox"]

    other = gf.ResponseCache(tmp_path / "other")
    assert other.import_(first) == {"added": 4, "replaced": 0, "kept": 0, "refused": 0, "refused_reasons": {}}
    with gf.Client(
        gf.EmulatorProvider(app=emulator), cache_dir=other.directory, cache="read", progress=False
    ) as reader:
        out = (
            _prompts("a red fox", "a blue whale")
            .with_columns(reply=gf.generate("prompt", client=reader))
            .unnest("reply")
        )
    assert out["error"].null_count() == 2 and out["cached"].all() and emulator.stats.requests == 2

    second = tmp_path / "second.parquet"
    assert other.export(second) == 4
    assert pl.read_parquet(second).sort("key").equals(pl.read_parquet(first).sort("key"))


def test_import_refuses_a_prompt_that_is_not_text(tmp_path):
    pl.read_parquet(_old_export(tmp_path / "old.parquet")).with_columns(prompt=pl.lit(7)).write_parquet(
        tmp_path / "bad.parquet"
    )
    counts = gf.ResponseCache(tmp_path / "c").import_(tmp_path / "bad.parquet")
    assert counts["refused"] == 2 and counts["refused_reasons"] == {"prompt is not text": 2}


def test_clear_refuses_a_database_that_fails_its_check(client, cache_dir):
    """A database SQLite still reads, whose check finds a fault (here a schema edited so that
    rows break a NOT NULL it now declares): `clear` deletes nothing and says what the check
    found, in one line."""
    import sqlite3

    _prompts("a", "b", "c").with_columns(reply=gf.generate("prompt", client=client))
    db = cache_dir / "cache.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA writable_schema=ON")
        con.execute(
            "UPDATE sqlite_master SET sql = replace(sql, 'filename TEXT', 'filename TEXT NOT NULL') WHERE name = 'Cache'"
        )
    result = gemframe_cli("cache", "clear", "--cache-dir", str(cache_dir))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert result.stderr.startswith(
        f"gemframe: error: the cache database {db} is corrupt (quick_check: NULL value in Cache.filename"
    )
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0] == 3  # nothing deleted
