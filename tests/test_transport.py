"""The real network path: httpx over aiohttp's pool, to an emulator served on 127.0.0.1,
in both the Google and the Segmind dialect."""

import polars as pl
import pytest

import gemframe as gf


def test_google_dialect_over_tcp(served_emulator, cache_dir):
    server = served_emulator(api_key="secret-key", latency=0.01)
    with gf.Client(
        "google", api_key="secret-key", base_url=server.url, cache_dir=str(cache_dir), concurrency=8, progress=False
    ) as c:
        out = pl.DataFrame({"prompt": [f"q{i}" for i in range(40)]}).with_columns(reply=gf.generate("prompt", client=c))
    assert out["reply"].struct.field("error").is_null().all()
    assert out["reply"].struct.field("text").str.contains("q").all()
    assert server.emulator.stats.requests == 40 and server.emulator.stats.max_in_flight <= 8


def test_segmind_dialect_over_tcp(served_emulator, cache_dir, png_path):
    server = served_emulator(api_key="seg-key")
    with gf.Client("segmind", api_key="seg-key", base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        out = (
            pl.DataFrame({"prompt": ["What's in this image?"], "img": [str(png_path)]})
            .with_columns(reply=gf.generate("prompt", images="img", system="You are a helpful assistant.", client=c))
            .unnest("reply")
        )
    assert out["error"][0] is None and "PNG 40x30" in out["text"][0] and "system" in out["text"][0]


@pytest.mark.parametrize("provider, error", [("google", gf.AuthenticationError), ("segmind", gf.AuthenticationError)])
def test_bad_key_over_tcp_stops_the_run(served_emulator, cache_dir, provider, error):
    server = served_emulator(api_key="right")
    with gf.Client(provider, api_key="wrong", base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(error) as info:
            pl.DataFrame({"prompt": [str(i) for i in range(500)]}).with_columns(reply=gf.generate("prompt", client=c))
    assert "wrong" not in str(info.value).replace("wrong key", "")
    assert server.emulator.stats.requests <= 64


def test_unknown_model_is_not_found(served_emulator, cache_dir):
    server = served_emulator()
    with gf.Client(
        "google", api_key="k", base_url=server.url, model="no-such-model", cache_dir=str(cache_dir), progress=False
    ) as c:
        with pytest.raises(gf.NotFoundError, match="Check the model name"):
            pl.DataFrame({"prompt": ["x"]}).with_columns(reply=gf.generate("prompt", client=c))


def test_connection_refused_is_a_row_error_after_retries(cache_dir):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with gf.Client(
        "google",
        api_key="k",
        base_url=f"http://127.0.0.1:{port}",
        max_attempts=2,
        cache_dir=str(cache_dir),
        progress=False,
    ) as c:
        out = pl.DataFrame({"prompt": ["x"]}).with_columns(reply=gf.generate("prompt", client=c)).unnest("reply")
    assert out["error"][0]["status"] == "CONNECTION_ERROR" and out["attempts"][0] == 2


def test_slow_answer_times_out_per_request(served_emulator, cache_dir):
    server = served_emulator()
    with gf.Client(
        "google",
        api_key="k",
        base_url=server.url,
        timeout=0.3,
        max_attempts=2,
        cache_dir=str(cache_dir),
        progress=False,
    ) as c:
        out = (
            pl.DataFrame({"prompt": ["[emulator:sleep=2] slow", "fast"]})
            .with_columns(reply=gf.generate("prompt", client=c))
            .unnest("reply")
        )
    assert out["error"][0]["status"] == "TIMEOUT" and out["attempts"][0] == 2
    assert out["error"][1] is None


def test_proxy_environment_is_honoured_once_per_host(monkeypatch):
    from gemframe._core.http import _proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    _proxy_for.cache_clear()
    assert _proxy_for("https", "generativelanguage.googleapis.com") == "http://127.0.0.1:3128"
    assert _proxy_for("http", "127.0.0.1") is None
    _proxy_for.cache_clear()


# -- redirects: never followed, the key and the body never reach another origin ---------------


@pytest.fixture
def redirect_server():
    """``redirect_server(status, location)``: a loopback server answering every request with
    that redirect; ``.seen`` holds each request's headers."""
    from .fault_server import FaultServer

    class RedirectServer(FaultServer):
        def __init__(self, status: int, location: str) -> None:
            super().__init__()
            self.status, self.location, self.seen = status, location, []

        async def _respond(self, headers, body, writer) -> bool:
            self.seen.append(headers)
            self._send(writer, self.status, {"moved": self.location}, {"location": self.location})
            return True

    servers = []

    def start(status: int, location: str) -> RedirectServer:
        servers.append(RedirectServer(status, location).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("provider", ["google", "segmind"])
def test_a_redirect_is_never_followed(provider, status, fault_server, redirect_server, cache_dir):
    other = fault_server()  # the other origin: would answer 200 (and be cached) if reached
    location = f"{other.url}/elsewhere"
    server = redirect_server(status, location)
    frame = pl.DataFrame({"prompt": [f"q{i}" for i in range(20)]})
    seen_before = 0
    for _ in range(2):  # the rerun goes to the base URL again: nothing was cached
        with gf.Client(
            provider, api_key="redirect-key", base_url=server.url, cache_dir=str(cache_dir), progress=False
        ) as c:
            with pytest.raises(gf.APIError) as info:
                frame.with_columns(reply=gf.generate("prompt", client=c))
        text = str(info.value)
        assert f"{status} REDIRECT" in text and location in text and f"Check base_url ({server.url})" in text
        assert len(server.seen) > seen_before
        seen_before = len(server.seen)
    assert other.stats.requests == 0 and other.seen_headers == []  # neither the key nor a body went there
    assert len(gf.ResponseCache(cache_dir)) == 0


def test_control_calls_never_follow_a_redirect(fault_server, redirect_server, cache_dir):
    """countTokens (gf.estimate exact=True) and Batch Mode's calls stop at the 3xx too."""
    other = fault_server()
    server = redirect_server(308, f"{other.url}/v1beta/batches")
    frame = pl.DataFrame({"prompt": ["a", "b"]})
    with gf.Client(
        "google", api_key="redirect-key", base_url=server.url, cache_dir=str(cache_dir), progress=False
    ) as c:
        with pytest.raises(gf.APIError, match="308 REDIRECT.*/v1beta/batches"):
            gf.estimate(frame, "prompt", client=c, exact=True)
        with pytest.raises(gf.APIError, match="308 REDIRECT.*/v1beta/batches"):
            frame.with_columns(reply=gf.generate("prompt", client=c, mode="batch", poll_interval=0.01))
    assert len(server.seen) >= 2 and other.stats.requests == 0


def test_the_in_process_transport_never_follows_a_redirect(cache_dir):
    """The httpx path (in-process app): a 307 is not re-sent, even to the same app."""
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 307, "headers": [(b"location", b"/v1beta/elsewhere")]})
        await send({"type": "http.response.body", "body": b""})

    with gf.Client("emulator", app=app, api_key="k", cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.APIError, match="307 REDIRECT: .* to /v1beta/elsewhere"):
            pl.DataFrame({"prompt": ["x"]}).with_columns(reply=gf.generate("prompt", client=c))
    assert calls and "/v1beta/elsewhere" not in calls
