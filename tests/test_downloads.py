"""Image URLs at scale: fetched concurrently on the executor's loop (retried, bounded) and
remembered in the URL store, so a rerun fetches nothing and ``cache="read"`` replays a URL
dataset with the image server gone. The safety rules of image URLs given directly (schemes,
private addresses, bytes that are not an image) are at the end of this file; redirects, DNS
rebinding and the size cap are in tests/test_payload.py (the same fetcher)."""

from __future__ import annotations

import http.server
import io
import ipaddress
import json
import os
import threading
from collections import Counter

import polars as pl
import pytest
from PIL import Image

import gemframe as gf

from .conftest import gemframe_cli


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (i % 256, i // 256, 7)).save(buf, "PNG")
    return buf.getvalue()


class _Images:
    """A loopback image server: ``/img/<i>.png`` is a distinct PNG with an ETag (answering 304
    to a matching If-None-Match). It counts requests and full downloads per path and the most
    requests it served at once; ``hold=N`` makes the first requests wait (up to 10 s) until N
    are in flight together; ``flaky`` paths answer 503 the first time; ``bodies`` serves fixed
    bytes at fixed paths."""

    def __init__(self, hold: int = 0, flaky: tuple[str, ...] = (), bodies: dict[str, bytes] | None = None):
        self.bodies = bodies or {}  # path -> the exact bytes served there (as image/png)
        self.requests: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()
        self.not_modified = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.together = threading.Event()
        self.hold, self.flaky = hold, set(flaky)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    if server.in_flight >= server.hold:
                        server.together.set()
                    first_try = server.requests[self.path] == 1
                try:
                    if server.hold:
                        server.together.wait(10)
                    self._answer(first_try)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, first_try):
                if self.path in server.flaky and first_try:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in server.bodies:
                    body = server.bodies[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")  # whatever it says, the bytes decide
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if not self.path.startswith("/img/"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                i = int(self.path.rsplit("/", 1)[1].split(".")[0])
                etag = f'"v{i}"'
                if self.headers.get("If-None-Match") == etag:
                    server.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = _png(i)
                server.downloads[self.path] += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def urls(self, n: int) -> list[str]:
        return [f"{self.url}/img/{i}.png" for i in range(n)]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def images():
    servers = []

    def start(**knobs) -> _Images:
        servers.append(_Images(**knobs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _client(emulator, cache_dir, **options):
    return gf.Client(
        gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, allow_private_urls=True, **options
    )


def _errors(frame):
    return [e and e["message"] for e in frame["reply"].struct.field("error").to_list()]


def test_url_images_are_fetched_once_concurrently_and_replayed_offline(images, emulator, cache_dir):
    """200 rows of 100 distinct URLs: 100 downloads, several at once; a rerun downloads
    nothing and sends nothing; with the image server gone, cache='read' replays the same
    answers byte for byte."""
    server = images(hold=4)  # the first requests wait until 4 are in flight together
    urls = server.urls(100)
    df = pl.DataFrame({"prompt": ["describe"] * 200, "img": urls + urls})
    with _client(emulator, cache_dir) as client:
        first = df.with_columns(reply=gf.generate("prompt", images="img", client=client, raw=True))
    assert _errors(first) == [None] * 200
    assert sum(server.requests.values()) == 100 and set(server.downloads.values()) == {1}
    assert server.max_in_flight >= 4  # concurrent: one at a time would never get there
    assert emulator.stats.requests == 100
    assert "Image 1: PNG 8x6" in first["reply"][0]["text"]

    emulator.reset_stats()
    with _client(emulator, cache_dir) as client:
        rerun = df.with_columns(reply=gf.generate("prompt", images="img", client=client, raw=True))
    assert sum(server.requests.values()) == 100  # nothing fetched again
    assert emulator.stats.requests == 0
    assert rerun["reply"].struct.field("cached").all()
    assert rerun["reply"].struct.field("raw").to_list() == first["reply"].struct.field("raw").to_list()

    server.stop()
    with _client(emulator, cache_dir, cache="read") as client:
        offline = df.with_columns(reply=gf.generate("prompt", images="img", client=client, raw=True))
    assert _errors(offline) == [None] * 200
    assert offline["reply"].struct.field("raw").to_list() == first["reply"].struct.field("raw").to_list()
    assert emulator.stats.requests == 0


def test_the_same_image_from_a_url_or_a_file_is_one_cached_answer(images, emulator, cache_dir, tmp_path):
    """The cache key holds the image's digest, wherever it came from: answers cached for files
    are not paid for again when the same images come by URL."""
    server = images()
    (tmp_path / "3.png").write_bytes(_png(3))
    with _client(emulator, cache_dir) as client:
        pl.DataFrame({"prompt": ["describe"], "img": [str(tmp_path / "3.png")]}).with_columns(
            reply=gf.generate("prompt", images="img", client=client)
        )
        emulator.reset_stats()
        out = pl.DataFrame({"prompt": ["describe"], "img": server.urls(4)[3:]}).with_columns(
            reply=gf.generate("prompt", images="img", client=client)
        )
    assert out["reply"][0]["cached"] and emulator.stats.requests == 0


def test_a_transient_failure_is_retried_and_a_missing_image_is_the_rows_error(images, emulator, cache_dir):
    server = images(flaky=("/img/1.png",))
    df = pl.DataFrame({"prompt": ["a", "b", "c"], "img": [*server.urls(2), f"{server.url}/missing"]})
    with _client(emulator, cache_dir, backoff=0.01) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    errors = _errors(out)
    assert errors[:2] == [None, None]
    assert server.requests["/img/1.png"] == 2 and server.downloads["/img/1.png"] == 1  # 503, then 200
    assert errors[2].startswith("row 2: ") and f"{server.url}/missing" in errors[2] and "HTTP 404" in errors[2]
    assert server.requests["/missing"] == 1  # a 404 is not tried again
    assert out["reply"][2]["error"]["status"] == "INVALID_INPUT"
    assert emulator.stats.requests == 2


def test_cache_read_without_the_url_stored_sends_and_fetches_nothing(images, emulator, cache_dir):
    server = images()
    df = pl.DataFrame({"prompt": ["a"], "img": server.urls(1)})
    with _client(emulator, cache_dir, cache="read") as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    error = out["reply"][0]["error"]
    assert error["status"] == "CACHE_MISS" and "not in the URL store" in error["message"]
    assert server.requests == Counter() and emulator.stats.requests == 0


def test_revalidation_asks_whether_the_image_changed(images, emulator, cache_dir):
    """revalidate_urls=True sends conditional requests: a 304 keeps the stored image (no
    download, no generateContent)."""
    server = images()
    df = pl.DataFrame({"prompt": ["a", "b"], "img": server.urls(2)})
    with _client(emulator, cache_dir) as client:
        df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    emulator.reset_stats()
    with _client(emulator, cache_dir, revalidate_urls=True) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert _errors(out) == [None, None] and out["reply"].struct.field("cached").all()
    assert server.not_modified == 2 and sum(server.downloads.values()) == 2  # the first run's only
    assert emulator.stats.requests == 0


def test_cache_off_keeps_nothing(images, emulator, cache_dir):
    server = images()
    df = pl.DataFrame({"prompt": ["a", "b"], "img": server.urls(1) * 2})
    with _client(emulator, cache_dir, cache="off") as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert _errors(out) == [None, None] and sum(server.requests.values()) == 1
    assert not os.path.exists(cache_dir / "urls")


def test_cache_commands_cover_the_url_store(images, emulator, cache_dir, tmp_path):
    server = images()
    df = pl.DataFrame({"prompt": ["a", "b", "c"], "img": server.urls(3)})
    with _client(emulator, cache_dir) as client:
        first = df.with_columns(reply=gf.generate("prompt", images="img", client=client, raw=True))

    stats = gemframe_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir))
    assert stats.returncode == 0, stats.stderr
    urls = json.loads(stats.stdout)["urls"]
    assert urls["urls"] == 3 and urls["images"] == 3 and urls["image_bytes"] > 0
    text = gemframe_cli("cache", "stats", "--cache-dir", str(cache_dir)).stdout
    assert "3 image URLs (3 images" in text

    exported = gemframe_cli(
        "cache",
        "export",
        str(tmp_path / "a.parquet"),
        "--urls",
        str(tmp_path / "u.parquet"),
        "--cache-dir",
        str(cache_dir),
    )
    assert exported.returncode == 0 and "exported 3 image URLs" in exported.stdout, exported.stderr
    other = tmp_path / "other-cache"
    imported = gemframe_cli(
        "cache", "import", str(tmp_path / "a.parquet"), "--urls", str(tmp_path / "u.parquet"), "--cache-dir", str(other)
    )
    assert imported.returncode == 0 and "3 image URLs added" in imported.stdout, imported.stderr
    server.stop()  # the imported cache replays the URL dataset on its own
    with _client(emulator, other, cache="read") as client:
        replay = df.with_columns(reply=gf.generate("prompt", images="img", client=client, raw=True))
    assert replay["reply"].struct.field("raw").to_list() == first["reply"].struct.field("raw").to_list()

    kept = gemframe_cli("cache", "clear", "--older-than", "1d", "--cache-dir", str(cache_dir))
    assert kept.returncode == 0 and "0 image URLs" in kept.stdout
    cleared = gemframe_cli("cache", "clear", "--cache-dir", str(cache_dir))
    assert cleared.returncode == 0 and "3 image URLs" in cleared.stdout, cleared.stdout
    after = json.loads(gemframe_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir)).stdout)["urls"]
    assert after["urls"] == 0 and after["images"] == 0


# -- what is refused before any connection (the rules of read_image / UrlFetcher) -----------------


def _on_this_machine(address: str) -> bool:
    """Whether a connection to ``address`` stays on this machine (loopback, 0.0.0.0, their
    IPv4-mapped forms)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


@pytest.fixture
def connections(monkeypatch):
    """Every socket connection this process attempts, by address. One to an address off this
    machine is refused here, so these tests never reach the network, even with the check they
    guard broken (they then fail on what was attempted, at once, not after a connect timeout)."""
    import socket

    attempted: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                attempted.append(address[0])
                if not _on_this_machine(address[0]):
                    raise ConnectionRefusedError(f"test guard: no connection to {address[0]}")
            return real(sock, address)

        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    return attempted


def test_only_http_and_https_image_urls_are_fetched(emulator, cache_dir, connections):
    """A URL of another scheme given as the image is that row's error, naming the scheme, even
    with private URLs allowed; nothing is read or connected to (``file:`` never opens the file)."""
    urls = ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://example.com/1/x.png"]
    df = pl.DataFrame({"prompt": ["a", "b", "c", "no image"], "img": [*urls, None]})
    with _client(emulator, cache_dir) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    errors = _errors(out)
    for row, (url, scheme) in enumerate(zip(urls, ["ftp", "file", "gopher"])):
        assert errors[row] == f"row {row}: image URL {url!r}: only http and https URLs are fetched, not {scheme}:"
    assert errors[3] is None and emulator.stats.requests == 1  # the other row is answered
    assert connections == []


def test_private_and_reserved_image_urls_are_refused_before_connecting(images, emulator, cache_dir, connections):
    """Without the opt-in, an image URL whose host is (or resolves to) a private, shared (CGNAT),
    link-local, unspecified or loopback address is that row's error naming the address and the
    opt-in, and no connection is attempted: the address is checked first. The last three point
    at a live image server on this machine (which the opt-in reaches): it is asked nothing."""
    server = images()
    port = server.url.rsplit(":", 1)[1]
    refused = {
        "http://10.0.0.1/a.png": "10.0.0.1 is a private or reserved address",
        "http://192.168.1.1/a.png": "192.168.1.1 is a private or reserved address",
        "http://100.64.0.1/a.png": "100.64.0.1 is a private or reserved address",
        "http://169.254.1.1/a.png": "169.254.1.1 is a link-local address",
        "http://[fe80::1]/a.png": "fe80::1 is a link-local address",
        f"http://0.0.0.0:{port}/img/1.png": "0.0.0.0 is a private or reserved address",
        f"http://[::ffff:127.0.0.1]:{port}/img/2.png": "::ffff:7f00:1 is a loopback address",
        f"http://localhost:{port}/img/3.png": "localhost resolves to 127.0.0.1, a loopback address",
    }
    urls = list(refused)
    df = pl.DataFrame({"prompt": [f"p{i}" for i in range(len(urls))] + ["no image"], "img": [*urls, None]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    errors = _errors(out)
    for row, (url, reason) in enumerate(refused.items()):
        assert errors[row].startswith(f"row {row}: image URL {url!r}: {reason}; "), errors[row]
        assert errors[row].endswith("unless the client allows private ones: gf.Client(..., allow_private_urls=True)")
    assert errors[-1] is None and emulator.stats.requests == 1
    assert connections == [] and server.requests == Counter()  # refused before connecting

    with _client(emulator, cache_dir) as client:  # allow_private_urls=True: the same server answers
        allowed = df[-4:].with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert _errors(allowed) == [None] * 4
    assert server.requests == Counter({"/img/1.png": 1, "/img/2.png": 1, "/img/3.png": 1})


def test_a_url_that_is_not_an_image_is_never_quoted(images, emulator, cache_dir):
    """A URL serving something else under an image/png header (a token, a page) is that row's
    error saying what it is not, with its size; none of its bytes reach the message, the
    request or the warning."""
    secret = b"SECRET-TOKEN-5f3a9c <html>an admin page, not an image</html>"
    server = images(bodies={"/token.png": secret})
    df = pl.DataFrame({"prompt": ["a", "b"], "img": [f"{server.url}/token.png", f"{server.url}/img/1.png"]})
    with pytest.warns(gf.RowsFailedWarning) as warned, _client(emulator, cache_dir) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    error = _errors(out)[0]
    assert error.startswith(f"row 0: image URL '{server.url}/token.png' is not a PNG, JPEG")
    assert f"file ({len(secret)} bytes)" in error
    assert all(b"SECRET" not in text.encode() for text in [error, *(str(w.message) for w in warned)])
    assert out["reply"][0]["error"]["status"] == "INVALID_INPUT"
    assert _errors(out)[1] is None and server.requests["/token.png"] == 1 and emulator.stats.requests == 1


def test_a_server_that_trickles_its_image_is_given_up_on(emulator, cache_dir, monkeypatch):
    """A server that sends a byte now and then (never pausing as long as the read timeout, which
    restarts with every byte) would hold a row, or gf.show, for days: one attempt has a deadline
    in all, and a server that slow is not asked again."""
    import socket

    monkeypatch.setattr("gemframe._core.payload._URL_DEADLINE", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    connections, stop = [], threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG")
            while not stop.wait(0.05):  # a byte every 50 ms, far inside any read timeout, for ever
                try:
                    conn.sendall(b"\x00")
                except OSError:
                    break

    threading.Thread(target=trickle, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png"
    df = pl.DataFrame({"prompt": ["a", "b"], "img": [url, None]})
    try:
        with pytest.warns(gf.RowsFailedWarning), _client(emulator, cache_dir) as client:
            out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    finally:
        stop.set()
        listener.close()
    assert _errors(out)[0] == (
        f"row 0: could not download image URL '{url}': not fetched within 0.5 s (the server sends too slowly); "
        "download it and pass the local file's path"
    )
    assert _errors(out)[1] is None and emulator.stats.requests == 1 and len(connections) == 1  # not tried again
