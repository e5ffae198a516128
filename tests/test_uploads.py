"""Media through the Files API (`gemframe._core.uploads`): media shared by many rows, or over
the inline limit, is uploaded once and named by ``fileData``; files are reused across calls by
digest (per server and key), uploaded again when expired or deleted, waited for while
PROCESSING; the cache key is the same as inline; providers without a Files API and Batch Mode
send media inline. Bytes and uploads are counted at the emulator (``emu.stats``)."""

from __future__ import annotations

import http.server
import io
import random
import sys
import threading
import time

import polars as pl
import pytest
from PIL import Image

import gemframe as gf
from gemframe.emulator import Emulator

from .conftest import ServedEmulator, gemframe_cli

HOURS = 3600
PDF_PAGE = b"1 0 obj << /Type /Page >> endobj\n"


def noise_png(size: int, seed: int = 1) -> bytes:
    """A PNG of about ``size`` bytes (noise does not compress)."""
    side = int((size / 3) ** 0.5)
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shared_png() -> bytes:
    return noise_png(300_000)  # over SHARED_MIN_BYTES (256 kB): uploaded when shared


def frame(image_path, rows: int, tag: str = "row") -> pl.DataFrame:
    return pl.DataFrame({"prompt": [f"{tag} {i}" for i in range(rows)], "image": [str(image_path)] * rows})


def generate(frame: pl.DataFrame, client: gf.Client, fails: bool = False, **options) -> pl.DataFrame:
    """The frame with its reply's fields; ``fails``: rows are expected to fail (the call warns)."""
    expr = gf.generate("prompt", images="image", client=client, **options)
    if not fails:
        return frame.with_columns(reply=expr).unnest("reply")
    with pytest.warns(gf.RowsFailedWarning):
        return frame.with_columns(reply=expr).unnest("reply")


def answered(out: pl.DataFrame, what: str = "Image 1: PNG") -> bool:
    """Every row answered, without error, about its own prompt and image."""
    return out["error"].null_count() == len(out) and all(
        f'"{p}"' in t and what in t for p, t in zip(out["prompt"], out["text"])
    )


def statuses(out: pl.DataFrame) -> list[str | None]:
    return out["error"].struct.field("status").to_list()


def messages(out: pl.DataFrame) -> list[str]:
    return out["error"].struct.field("message").to_list()


def in_process(emulator: Emulator, cache_dir, **options) -> gf.Client:
    return gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, **options)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_image_shared_by_many_rows_is_uploaded_once(served_emulator, tmp_path):
    server = served_emulator()
    image = tmp_path / "reference.png"
    image.write_bytes(noise_png(600_000))
    size, rows = image.stat().st_size, 300
    with gf.Client("emulator", base_url=server.url, cache_dir=str(tmp_path / "cache"), progress=False) as client:
        out = generate(frame(image, rows), client)
    stats = server.emulator.stats
    assert answered(out) and stats.requests == rows
    assert stats.uploads == 1
    # ~1x the image plus 300 small bodies; inline it would be 300 x 800 kB of base64 (240 MB)
    assert stats.bytes_received < size + rows * 1_000, stats.bytes_received
    (stored,) = server.emulator.files.files.values()
    assert stored.size == size and stored.mime == "image/png"


def test_a_rerun_reuses_the_file_by_digest(emulator, cache_dir, tmp_path, shared_png):
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 20), client))
    copy = tmp_path / "b.png"  # the same bytes under another name: the same file
    copy.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(copy, 20, tag="again"), client))
        assert answered(generate(frame(copy, 20), client, cache="refresh"))
    assert emulator.stats.uploads == 1 and emulator.stats.requests == 60


@pytest.mark.parametrize(
    "planted",
    [
        "https://www.youtube.com/watch?v=planted",  # another server: a video of the planter's choosing
        "{origin}/v1beta/files/someoneelses",  # this server, but not the file the record names
        "{origin}/v1beta/{name}?alt=media",
    ],
)
def test_a_planted_upload_record_naming_another_uri_is_not_used(emulator, cache_dir, tmp_path, shared_png, planted):
    """The upload store is in a cache directory that may be shared: a record rewritten to name
    another URI is ignored (the media is uploaded again), never sent, so no answer about
    someone else's file is cached as this row's."""
    import orjson

    from gemframe._core.cache.disk import read_entries
    from gemframe._core.cache.files import UploadStore

    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 4), client))
        origin = client.provider.base_url.split("/v1")[0]
    store = UploadStore(cache_dir / "files")
    keys = [k for (k,) in store._store._sql("SELECT key FROM Cache WHERE key LIKE 'file:%'").fetchall()]
    ((key, raw),) = read_entries(store._store, keys)[0].items()
    record = orjson.loads(raw)
    record["uri"] = planted.format(origin=origin, name=record["name"])
    store._store.set(key, orjson.dumps(record))
    store._store.close()
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 4, tag="again"), client))
    assert emulator.stats.uploads == 2  # uploaded again, the planted record passed over


def test_answers_cached_inline_are_hits_by_file_and_back(emulator, cache_dir, tmp_path, shared_png):
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, upload="never") as client:
        first = generate(frame(image, 10), client)
    assert answered(first) and emulator.stats.requests == 10 and emulator.stats.uploads == 0
    with in_process(emulator, cache_dir) as client:  # upload="auto": these rows would go by file
        again = generate(frame(image, 10), client)
        assert again["cached"].all() and again["text"].to_list() == first["text"].to_list()
        assert emulator.stats.requests == 10 and emulator.stats.uploads == 0
        generate(frame(image, 10, tag="by file"), client)
    assert emulator.stats.requests == 20 and emulator.stats.uploads == 1
    with in_process(emulator, cache_dir, upload="never") as client:
        assert generate(frame(image, 10, tag="by file"), client)["cached"].all()
    assert emulator.stats.requests == 20


def test_an_expired_file_is_uploaded_again(monkeypatch, cache_dir, tmp_path, shared_png):
    from gemframe._core.cache import files as file_store

    clock = Clock()
    emulator = Emulator(clock=clock)
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 10), client))
    assert emulator.stats.uploads == 1
    # 47.5 h later the file still lives on the server, but within the margin: not named
    clock.now += 47.5 * HOURS
    monkeypatch.setattr(file_store, "now", lambda: time.time() + 47.5 * HOURS)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 10, tag="later"), client))
    assert emulator.stats.uploads == 2
    assert emulator.stats.requests == 20  # no row named the old file: none was refused


def test_a_file_deleted_behind_our_back_is_uploaded_again_once(emulator, cache_dir, tmp_path, shared_png):
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 10), client))
    (name,) = emulator.files.files
    emulator.files.delete(name)  # someone else (another tool with the same key) deleted it
    rows = 40
    with in_process(emulator, cache_dir, concurrency=8) as client:
        out = generate(frame(image, rows, tag="after"), client)
    assert answered(out)
    assert emulator.stats.uploads == 2
    # the rows already queued named the old file: each was refused and sent once more (a 403
    # costs no tokens); rows built after the new upload name the new file
    assert rows < emulator.stats.requests - 10 <= 2 * rows
    assert name not in emulator.files.files and len(emulator.files.files) == 1


def test_a_file_gone_again_after_its_second_upload_is_the_rows_error(cache_dir, tmp_path, shared_png):
    class Hasty:  # every reading of the clock is 48 hours after the last: files expire at once
        now = 1_800_000_000.0

        def __call__(self) -> float:
            self.now += 48 * HOURS
            return self.now

    emulator = Emulator(clock=Hasty())
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, upload="always") as client:
        out = generate(frame(image, 1), client, fails=True)
    assert statuses(out) == ["PERMISSION_DENIED"] and "may not exist" in messages(out)[0]
    assert emulator.stats.uploads == 2 and emulator.stats.requests == 2  # sent again once, then given up


def test_a_processing_file_is_waited_for(cache_dir, tmp_path, shared_png):
    emulator = Emulator(file_polls=3)
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, backoff=0.01) as client:
        assert answered(generate(frame(image, 5), client))
    (stored,) = emulator.files.files.values()
    assert stored.gets == 3 and emulator.stats.uploads == 1  # polled until ACTIVE, then named


def test_a_file_that_failed_processing_is_the_rows_error(cache_dir, tmp_path, shared_png):
    emulator = Emulator(file_polls=1, file_outcome="FAILED")
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, backoff=0.01) as client:
        out = generate(frame(image, 3), client, fails=True)
    assert statuses(out) == ["UPLOAD_FAILED"] * 3
    assert all("could not process the uploaded file files/" in e for e in messages(out))
    assert emulator.stats.requests == 0


def test_a_request_over_the_inline_limit_is_uploaded(emulator, cache_dir, tmp_path):
    pdf = tmp_path / "big.pdf"  # 16 MB: 21.3 MB of base64, over the 20 MB inline limit
    pdf.write_bytes(b"%PDF-1.4\n" + PDF_PAGE * 2 + b"%" * (16 * 2**20) + b"\n%%EOF")
    with in_process(emulator, cache_dir) as client:
        out = generate(frame(pdf, 1), client)
    assert answered(out, "Document 1: PDF") and emulator.stats.uploads == 1
    assert emulator.stats.bytes_received < 17 * 2**20
    with in_process(emulator, cache_dir, upload="never", cache="off") as client:
        refused = generate(frame(pdf, 1), client, fails=True)
    assert statuses(refused)[0] == "INVALID_INPUT"
    assert "20 MB inline" in messages(refused)[0] and "upload='auto'" in messages(refused)[0]


def test_segmind_has_no_files_api_so_media_stays_inline(served_emulator, tmp_path, shared_png):
    server = served_emulator()
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with gf.Client(
        "segmind",
        api_key="k",
        base_url=server.url,
        model="gemini-2.5-flash",
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        upload="always",
    ) as client:
        assert answered(generate(frame(image, 5), client))
        assert server.emulator.stats.uploads == 0
        assert server.emulator.stats.bytes_received > 5 * len(shared_png)  # inline, every row
        big = tmp_path / "big.png"
        big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (16 * 2**20))
        refused = generate(frame(big, 1), client, fails=True)
    assert "20 MB inline" in messages(refused)[0] and "'segmind' has no Files API" in messages(refused)[0]


def test_batch_mode_sends_media_inline(emulator, cache_dir, tmp_path, shared_png):
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, upload="always") as client:
        assert answered(generate(frame(image, 1, tag="live"), client))
        assert emulator.stats.uploads == 1  # live: by file
        emulator.reset_stats()
        out = generate(frame(image, 4), client, mode="batch", poll_interval=0.01)
    # a batch job's requests are read up to a day later: its media goes inline
    assert answered(out) and emulator.stats.uploads == 0 and emulator.stats.bytes_received > 4 * len(shared_png)


def test_cache_off_uploads_for_the_call_only(emulator, cache_dir, tmp_path, shared_png):
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, cache="off") as client:
        assert answered(generate(frame(image, 5), client))
        assert answered(generate(frame(image, 5), client))
    assert emulator.stats.uploads == 2 and not (cache_dir / "files").exists()


def test_files_are_kept_apart_by_key_and_the_key_is_never_stored(served_emulator, tmp_path, shared_png):
    server = served_emulator()
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    cache = tmp_path / "team-cache"

    def run(key: str, tag: str) -> None:
        with gf.Client("google", api_key=key, base_url=server.url, cache_dir=str(cache), progress=False) as client:
            assert answered(generate(frame(image, 4, tag=tag), client))

    run("key-of-alice-123456", "alice")
    run("key-of-bob-654321", "bob")  # another project: Alice's file is not Bob's
    run("key-of-alice-123456", "alice again")
    assert server.emulator.stats.uploads == 2
    stored = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    assert b"files/" in stored and b"key-of-alice" not in stored and b"key-of-bob" not in stored


class _Catcher:
    """A loopback server that counts every request it receives (and answers 200)."""

    def __init__(self) -> None:
        self.requests = 0
        catcher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                catcher.requests += 1
                self.send_response(200)
                self.end_headers()

            do_GET = do_PUT = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Redirecting:
    """The emulator, except that the start of an upload answers a session URL elsewhere."""

    def __init__(self, emulator: Emulator, elsewhere: str) -> None:
        self.emulator, self.elsewhere = emulator, elsewhere.encode()

    async def __call__(self, scope, receive, send):
        async def rewrite(message):
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, self.elsewhere + b"/upload/v1beta/files?upload_id=stolen" if k == b"x-goog-upload-url" else v)
                    for k, v in message["headers"]
                ]
            await send(message)

        await self.emulator(scope, receive, rewrite)


def _three_rows_through(app, catcher, tmp_path, shared_png):
    """Three rows sharing one image, through ``app`` served over TCP as the Google API (the
    upload redirected or refused on the way); the servers are stopped after."""
    server = ServedEmulator(app)
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    try:
        with gf.Client(
            "google", api_key="secret-key", base_url=server.url, cache_dir=str(tmp_path / "c"), progress=False
        ) as client:
            return generate(frame(image, 3), client, fails=True)
    finally:
        server.stop()
        catcher.close()


def test_an_upload_url_on_another_origin_is_refused(tmp_path, shared_png):
    catcher = _Catcher()
    emulator = Emulator()
    out = _three_rows_through(_Redirecting(emulator, catcher.url), catcher, tmp_path, shared_png)
    assert statuses(out) == ["UPLOAD_FAILED"] * 3
    assert all("another origin" in e and "nothing was sent there" in e for e in messages(out))
    assert catcher.requests == 0 and emulator.stats.uploads == 0 and emulator.stats.requests == 0


class _RedirectingUpload:
    """The emulator, except that one step of an upload (``start``, or ``upload``: the bytes sent
    to the session URL) answers a redirect to ``elsewhere`` instead; it counts those answers."""

    def __init__(self, emulator: Emulator, step: str, status: int, elsewhere: str) -> None:
        self.emulator, self.step, self.status = emulator, step, status
        self.location = f"{elsewhere}/upload/v1beta/files?upload_id=elsewhere".encode()
        self.redirected = 0

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        command = headers.get(b"x-goog-upload-command", b"").decode()
        if scope["type"] == "http" and scope["path"].startswith("/upload/") and command.startswith(self.step):
            while (await receive()).get("more_body"):  # read the request through, then answer
                pass
            self.redirected += 1
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status,
                    "headers": [(b"location", self.location), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await self.emulator(scope, receive, send)


@pytest.mark.parametrize("step, status", [("start", 307), ("upload", 302)])
def test_a_redirect_during_an_upload_is_never_followed(tmp_path, shared_png, step, status):
    """A 3xx to the start of an upload, or to the bytes sent to the session URL, is not followed
    (a 307 would send the key and the file's bytes to the other origin): the rows that need the
    file get an error naming the Location, and the other origin is asked nothing."""
    catcher, emulator = _Catcher(), Emulator()
    app = _RedirectingUpload(emulator, step, status, catcher.url)
    out = _three_rows_through(app, catcher, tmp_path, shared_png)
    location = app.location.decode()
    doing = "starting the upload" if step == "start" else "uploading"
    expected = f"{doing}: HTTP {status} REDIRECT: the API answered with a redirect to {location}"
    assert catcher.requests == 0  # neither the key nor the bytes went there
    assert statuses(out) == ["UPLOAD_FAILED"] * 3
    assert all(expected in e and "gemframe does not follow redirects" in e for e in messages(out)), messages(out)
    assert app.redirected == 1  # one upload for the three rows, not tried again
    assert emulator.stats.uploads == 0 and emulator.stats.requests == 0  # no file, no generateContent


def test_the_sdk_sees_the_file_gemframe_uploaded_and_deletes_it(served_emulator, tmp_path, shared_png):
    genai = pytest.importorskip("google.genai")
    from google.genai import types

    server = served_emulator(api_key="test-key")
    sdk = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=server.url))
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)

    def run(tag: str) -> pl.DataFrame:
        with gf.Client(
            "google", api_key="test-key", base_url=server.url, cache_dir=str(tmp_path / "c"), progress=False
        ) as client:
            return generate(frame(image, 6, tag=tag), client)

    assert answered(run("first"))
    (listed,) = sdk.files.list()
    file = sdk.files.get(name=listed.name)
    assert file.state == types.FileState.ACTIVE
    assert (file.size_bytes, file.mime_type) == (len(shared_png), "image/png")
    sdk.files.delete(name=file.name)
    assert answered(run("after the delete"))
    assert server.emulator.stats.uploads == 2 and [f.name for f in sdk.files.list()] != [file.name]


def test_the_upload_option_is_checked():
    with pytest.raises(ValueError, match="upload must be one of 'auto', 'always', 'never'"):
        gf.Client("emulator", upload="sometimes")


def test_cache_commands_cover_the_uploaded_files(emulator, cache_dir, tmp_path, shared_png):
    import json
    import subprocess

    def gemframe(*args: str) -> subprocess.CompletedProcess:
        return gemframe_cli(*args, "--cache-dir", str(cache_dir))

    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(image, 3), client))
    stats = gemframe("cache", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["files"] | {"directory": None} == {
        "directory": None,
        "files": 1,
        "live": 1,
        "live_bytes": len(shared_png),
    }
    assert "1 files uploaded to the Files API (1 still live" in gemframe("cache", "stats").stdout
    cleared = gemframe("cache", "clear")
    assert cleared.returncode == 0 and "and 1 uploaded files" in cleared.stdout, cleared.stdout
    assert json.loads(gemframe("cache", "stats", "--json").stdout)["files"]["files"] == 0
    with in_process(emulator, cache_dir) as client:  # forgotten: uploaded again
        assert answered(generate(frame(image, 3, tag="again"), client))
    assert emulator.stats.uploads == 2


def test_a_request_naming_a_missing_file_is_that_rows_error_not_the_runs(client):
    gone = {"fileData": {"mimeType": "image/png", "fileUri": "http://emulator/v1beta/files/gone"}}
    bodies = [
        {"contents": [{"role": "user", "parts": [gone, {"text": "what is it?"}]}]},
        {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
    ]
    with pytest.warns(gf.RowsFailedWarning):
        out = client.send(bodies).struct.unnest()
    assert statuses(out) == ["PERMISSION_DENIED", None]  # a 403 about a file, not about the key
    assert "access the File gone or it may not exist" in messages(out)[0] and "hello" in out["text"][1]


def test_a_context_cache_and_uploaded_media_in_one_call(cache_dir, tmp_path, shared_png):
    emulator = Emulator(cache_min_tokens=1)
    image = tmp_path / "a.png"
    image.write_bytes(shared_png)
    with in_process(emulator, cache_dir, cache_context=True) as client:
        expr = gf.generate("prompt", images="image", context="Read the house rules first.", client=client)
        out = frame(image, 6).with_columns(reply=expr).unnest("reply")
        assert len(emulator.caches.caches) == 1  # the prefix by context cache...
    assert answered(out) and (out["cached_content_tokens"] > 0).all()
    assert emulator.stats.uploads == 1  # ...and the shared image by file, in the same requests
    assert emulator.stats.bytes_received < len(shared_png) + 6 * 1_000


# --------------------------------------------------------------------------- local files over the inline limit


def big_pdf(path, megabytes: float, fill: bytes = b"%") -> bytes:
    """A PDF of about ``megabytes`` MB (one page; ``fill`` repeated), written and returned."""
    data = b"%PDF-1.4\n" + PDF_PAGE + fill * int(megabytes * 2**20) + b"\n%%EOF"
    path.write_bytes(data)
    return data


def opens_of(monkeypatch, path) -> list[str]:
    """Every os.open of ``path`` from now on (the readers open files with os.open)."""
    import os

    opened: list[str] = []
    real = os.open

    def counting(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            opened.append(os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return opened


def test_a_local_file_over_the_inline_limit_is_streamed_to_the_files_api(served_emulator, tmp_path, monkeypatch):
    import hashlib

    server = served_emulator()
    pdf = tmp_path / "report.pdf"
    data = big_pdf(pdf, 30)  # 30 MB: main refused it ("larger than 20 MB") before anything was sent
    cache = str(tmp_path / "cache")
    with gf.Client("emulator", base_url=server.url, cache_dir=cache, progress=False) as client:
        out = generate(frame(pdf, 3), client)
    stats = server.emulator.stats
    assert answered(out, "Document 1: PDF") and stats.requests == 3 and stats.uploads == 1
    # the file once, and three small bodies naming it: no inline copy of it was sent
    assert len(data) < stats.bytes_received < len(data) + 3 * 2_000, stats.bytes_received
    (stored,) = server.emulator.files.files.values()
    assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.mime == "application/pdf"
    server.emulator.reset_stats()
    opened = opens_of(monkeypatch, pdf)
    with gf.Client("emulator", base_url=server.url, cache_dir=cache, progress=False) as client:
        again = generate(frame(pdf, 3), client)
    # the rerun: answered from the cache, the file neither sent nor even opened (its digest is
    # remembered by path, size, mtime and inode)
    assert again["cached"].all() and again["text"].to_list() == out["text"].to_list()
    assert server.emulator.stats.bytes_received == 0 and opened == []


def test_the_streamed_digest_is_the_inline_digest(emulator, cache_dir, tmp_path, monkeypatch):
    import base64

    from gemframe._core import payload
    from gemframe._core.cache.key import _data_digest

    pdf = tmp_path / "ten.pdf"
    data = big_pdf(pdf, 10)  # not a multiple of 3 bytes, over three digest chunks
    assert len(data) % 3 and len(data) > 3 * payload._DIGEST_CHUNK
    with in_process(emulator, cache_dir, upload="never") as client:
        inline = generate(frame(pdf, 2), client)  # read whole and sent inline (under the limit)
    assert answered(inline, "Document 1: PDF") and emulator.stats.uploads == 0
    monkeypatch.setattr(payload, "STREAM_ABOVE", 2**20)  # now the same bytes are streamed
    streamed = payload.inline_data(str(pdf), defer_urls=True)
    assert isinstance(streamed, payload.LocalFile)
    assert streamed.digest == _data_digest(base64.b64encode(data).decode()) and streamed.size == len(data)
    with in_process(emulator, cache_dir) as client:
        again = generate(frame(pdf, 2), client)
    assert again["cached"].all() and emulator.stats.requests == 2 and emulator.stats.uploads == 0


def test_without_a_files_api_a_big_local_file_is_the_rows_error(served_emulator, emulator, cache_dir, tmp_path):
    pdf = tmp_path / "big.pdf"
    big_pdf(pdf, 21)
    server = served_emulator()
    with gf.Client(
        "segmind", api_key="k", base_url=server.url, model="gemini-2.5-flash", cache_dir=str(cache_dir), progress=False
    ) as client:
        segmind = generate(frame(pdf, 1), client, fails=True)
    assert statuses(segmind) == ["INVALID_INPUT"] and server.emulator.stats.bytes_received == 0
    assert f"image file {str(pdf)!r} (21.0 MB) is over the 20 MB the API takes inline" in messages(segmind)[0]
    assert "provider 'segmind' has no Files API" in messages(segmind)[0]
    assert "pass a file of at most 20 MB, or use the Google provider" in messages(segmind)[0]
    with in_process(emulator, cache_dir, upload="never") as client:
        never = generate(frame(pdf, 1), client, fails=True)
        batch = generate(frame(pdf, 1), client, fails=True, mode="batch", poll_interval=0.01)
    assert "gf.Client(upload='auto') (or 'always') uploads it through the Files API" in messages(never)[0]
    assert "Batch Mode sends media inline; send it with mode='live'" in messages(batch)[0]
    assert emulator.stats.bytes_received == 0


def test_a_file_replaced_between_runs_is_uploaded_again(emulator, cache_dir, tmp_path):
    import os

    pdf = tmp_path / "doc.pdf"
    big_pdf(pdf, 21)
    with in_process(emulator, cache_dir) as client:
        assert answered(generate(frame(pdf, 2), client), "Document 1: PDF")
    replacement = tmp_path / "new.pdf"
    data = big_pdf(replacement, 21, fill=b"#")  # the same size, other bytes
    os.replace(replacement, pdf)
    with in_process(emulator, cache_dir) as client:
        out = generate(frame(pdf, 2), client)
    assert answered(out, "Document 1: PDF") and not out["cached"].any()
    assert emulator.stats.uploads == 2 and emulator.stats.requests == 4
    newest = max(emulator.files.files.values(), key=lambda f: f.created)
    import hashlib

    assert newest.sha256 == hashlib.sha256(data).hexdigest()


def test_a_file_changed_after_it_was_read_is_not_uploaded(emulator, cache_dir, tmp_path):
    import os

    pdf = tmp_path / "doc.pdf"
    big_pdf(pdf, 21)
    body = gf.RequestSpec().builder.build("read it", str(pdf), defer_urls=True)  # digest computed here
    with open(pdf, "ab") as f:  # then the file grows before the call uploads it
        f.write(b"% appended\n")
    with in_process(emulator, cache_dir) as client, pytest.warns(gf.RowsFailedWarning):
        out = client.send([body]).struct.unnest()
    assert statuses(out) == ["UPLOAD_FAILED"]
    assert f"image file {str(pdf)!r} (21.0 MB) changed after gemframe read it" in messages(out)[0]
    assert "run again" in messages(out)[0] and emulator.stats.bytes_received == 0
    assert os.path.getsize(pdf) > 21 * 2**20


def test_a_file_changed_while_it_is_uploaded_makes_no_file(emulator, cache_dir, tmp_path, monkeypatch):
    from gemframe._core import uploads

    pdf = tmp_path / "doc.pdf"
    big_pdf(pdf, 21)
    real = uploads._FileBody.read

    def read_then_touch(self, size):  # another program writes to the file mid-upload
        chunk = real(self, size)
        with open(pdf, "r+b") as f:
            f.write(b"%PDF-1.5")
        return chunk

    monkeypatch.setattr(uploads._FileBody, "read", read_then_touch)
    with in_process(emulator, cache_dir) as client:
        out = generate(frame(pdf, 1), client, fails=True)
    assert statuses(out) == ["UPLOAD_FAILED"] and "changed after gemframe read it" in messages(out)[0]
    assert emulator.stats.uploads == 0 and emulator.files.files == {} and emulator.stats.requests == 0


def test_a_big_context_file_names_the_fix(tmp_path):
    from pathlib import Path

    pdf = tmp_path / "manual.pdf"
    big_pdf(pdf, 21)
    with pytest.raises(gf.ConfigError, match=r"context is a file of 21.0 MB, over the 20 MB .*\(images=pathlib.Path"):
        gf.RequestSpec(context=Path(pdf))


def test_a_url_over_the_inline_limit_names_the_fix(emulator, cache_dir):
    class Big(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(64 * 2**20))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/film.pdf"
        with in_process(emulator, cache_dir, allow_private_urls=True) as client:
            out = generate(pl.DataFrame({"prompt": ["p"], "image": [url]}), client, fails=True)
    finally:
        server.shutdown()
        server.server_close()
    assert "is larger than 20 MB, the most the API takes inline per request" in messages(out)[0]
    assert "download it and pass the local file's path instead: gf.generate uploads a local file" in messages(out)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_a_big_upload_streams_in_bounded_memory(served_emulator, tmp_path):
    """A 64 MB file uploaded by a client in a subprocess: its peak RSS grows by far less than
    the file (reading it whole and base64-encoding it would take ~150 MB)."""
    import os
    import subprocess

    server = served_emulator()
    pdf = tmp_path / "big.pdf"
    with open(pdf, "wb") as f:  # sparse: 64 MB on the page cache's word, nothing much on disk
        f.write(b"%PDF-1.4\n" + PDF_PAGE)
        f.truncate(64 * 2**20)
        f.seek(0, 2)
        f.write(b"\n%%EOF")
    small = tmp_path / "small.pdf"
    big_pdf(small, 0.01)
    # Linux's peak RSS of the process (VmHWM), reset just before the call (clear_refs 5): the
    # child's ru_maxrss would start at its parent's (pytest's) peak, inherited through fork.
    script = """
import sys
import polars as pl, gemframe as gf
from gemframe._core import payload

url, big, small = sys.argv[1:]
payload.STREAM_ABOVE = 1024  # the warm-up takes the same path: its one-time costs are not counted

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

with gf.Client("emulator", base_url=url, cache="off", progress=False) as client:
    def ask(path):
        frame = pl.DataFrame({"prompt": ["p"], "image": [path]})
        return frame.with_columns(r=gf.generate("prompt", images="image", client=client)).unnest("r")
    assert ask(small)["error"][0] is None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    out = ask(big)
    peak = status("VmHWM")
print(out["error"][0], (peak - before) / 2**20)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, server.url, str(pdf), str(small)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    error, growth = done.stdout.split()
    assert error == "None" and server.emulator.stats.uploads == 2
    assert float(growth) < 32, f"peak RSS grew {growth} MB uploading a 64 MB file"


def big_mp4(path, megabytes: float) -> int:
    """A sparse MP4 of ``megabytes`` MB: an ``ftyp`` box, then one ``mdat`` box of zeros to the
    end (a container as far as a signature goes; no codec needed). Returns its size."""
    size = int(megabytes * 2**20)
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41" + (size - 24).to_bytes(4, "big") + b"mdat")
        f.truncate(size)
    return size


def test_a_big_video_is_uploaded_once_and_answered(served_emulator, tmp_path):
    """A 25 MB video (over the inline limit) shared by three rows: streamed to the Files API
    once, named by fileData, answered and counted per second (on main: 'not a PNG, JPEG...')."""
    import math

    server = served_emulator()
    video = tmp_path / "talk.mp4"
    size = big_mp4(video, 25)
    with gf.Client("emulator", base_url=server.url, cache_dir=str(tmp_path / "cache"), progress=False) as client:
        out = generate(frame(video, 3), client)
    stats = server.emulator.stats
    assert answered(out, f"Video 1: video/mp4, {size} bytes.") and stats.requests == 3 and stats.uploads == 1
    assert size < stats.bytes_received < size + 3 * 2_000, stats.bytes_received  # no inline copy
    (stored,) = server.emulator.files.files.values()
    assert stored.mime == "video/mp4" and stored.size == size
    assert set(out["prompt_tokens"]) == {2 + 263 * math.ceil(size / 125_000)}  # "row i": 2 tokens of text
