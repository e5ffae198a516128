import json
import subprocess
import sys
import time
from email.utils import formatdate

import httpx
import polars as pl
import pytest

import gemframe as gf
from gemframe._core.providers import (
    PROVIDERS,
    RETRYABLE_STATUS,
    Failure,
    Provider,
    parse_retry_after,
    register_provider,
    resolve_provider,
)

KEY = "sk-test-secret-0123456789"


def _response(status: int, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers or {})


def test_google_url_headers_and_body():
    google = gf.GoogleAI(api_key=KEY, base_url="http://127.0.0.1:9/")
    assert google.url("gemini-2.5-flash") == "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:generateContent"
    assert google.url("models/gemini-2.5-flash").endswith("/models/gemini-2.5-flash:generateContent")
    assert google.headers()["x-goog-api-key"] == KEY
    body = {"contents": []}
    assert google.wrap(body) is body


def test_keys_from_environment(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-env")
    assert gf.GoogleAI().headers()["x-goog-api-key"] == "from-google-env"
    monkeypatch.setenv("GEMINI_API_KEY", "from-gemini-env")
    assert gf.GoogleAI().headers()["x-goog-api-key"] == "from-gemini-env"
    monkeypatch.setenv("SEGMIND_API_KEY", "seg")
    assert gf.Segmind().headers()["x-api-key"] == "seg"


def test_provider_resolution(monkeypatch):
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "SEGMIND_API_KEY", "GEMFRAME_PROVIDER"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_provider(None).name == "emulator"
    monkeypatch.setenv("SEGMIND_API_KEY", "s")
    assert resolve_provider(None).name == "segmind"
    monkeypatch.setenv("GEMINI_API_KEY", "g")
    assert resolve_provider(None).name == "google"
    monkeypatch.setenv("GEMFRAME_PROVIDER", "emulator")
    assert resolve_provider(None).name == "emulator"
    with pytest.raises(ValueError, match="unknown provider 'openai'"):
        resolve_provider("openai")


def test_missing_key_fails_before_sending(monkeypatch):
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    with pytest.raises(gf.AuthenticationError, match="SEGMIND_API_KEY"):
        gf.Segmind().check_key()


def test_segmind_wraps_like_the_reference_page():
    segmind = gf.Segmind(api_key=KEY)
    body = gf.build_request("What's in this image?", system="You are a helpful assistant.")
    assert segmind.url(gf.DEFAULT_MODEL) == "https://api.segmind.com/v1/gemini-2-flash-image-generation"
    assert segmind.url("gemini-2.5-flash-image") == "https://api.segmind.com/v1/gemini-2.5-flash-image"
    assert segmind.wrap(body) == {
        "messages": {
            "system_instruction": {"parts": {"text": "You are a helpful assistant."}},
            "contents": [{"role": "user", "parts": [{"text": "What's in this image?"}]}],
        }
    }
    assert segmind.headers() == {"content-type": "application/json", "x-api-key": KEY}
    bearer = gf.Segmind(api_key=KEY, auth_header="Authorization")
    assert bearer.headers()["authorization"] == f"Bearer {KEY}"


def test_key_never_in_repr():
    for provider in (gf.GoogleAI(api_key=KEY), gf.Segmind(api_key=KEY)):
        assert KEY not in repr(provider)
    client = gf.Client("google", api_key=KEY)
    assert KEY not in repr(client) and KEY not in str(vars(client))


@pytest.mark.parametrize(
    "status, body, error, fatal",
    [
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
                }
            },
            "INVALID_ARGUMENT",
            gf.AuthenticationError,
        ),
        (400, {"error": {"code": 400, "message": "bad field", "status": "INVALID_ARGUMENT"}}, "INVALID_ARGUMENT", None),
        (
            403,
            {"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}},
            "PERMISSION_DENIED",
            gf.PermissionDeniedError,
        ),
        (
            404,
            {"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}},
            "NOT_FOUND",
            gf.NotFoundError,
        ),
        (503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}, "UNAVAILABLE", None),
        (502, b"<html>Bad Gateway</html>", "BAD_GATEWAY", None),
    ],
)
def test_google_error_mapping(status, body, error, fatal):
    failure = gf.GoogleAI(api_key=KEY).failure(_response(status, body))
    assert (failure.code, failure.status, failure.fatal) == (status, error, fatal)
    assert failure.retryable == (status in (429, 500, 502, 503, 504))
    assert failure.message


def test_google_retry_delay_from_retry_info_and_header():
    body = {
        "error": {
            "code": 429,
            "message": "quota",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}],
        }
    }
    failure = gf.GoogleAI(api_key=KEY).failure(_response(429, body))
    assert failure.retryable and failure.retry_after == 17.0 and failure.fatal is None
    header = gf.GoogleAI(api_key=KEY).failure(_response(429, {"error": {"code": 429}}, {"Retry-After": "3"}))
    assert header.retry_after == 3.0


@pytest.mark.parametrize(
    "status, body, fatal, status_name",
    [
        (401, {"error": "Missing Authorization or x-api-key in header"}, gf.AuthenticationError, "UNAUTHENTICATED"),
        (403, {"error": "Team not permitted"}, gf.PermissionDeniedError, "PERMISSION_DENIED"),
        (404, {"error": "Model not found"}, gf.NotFoundError, "NOT_FOUND"),
        (
            406,
            {"error": "Insufficient credits. Balance 0.01, cost 0.04"},
            gf.InsufficientCreditsError,
            "INSUFFICIENT_CREDITS",
        ),
        (406, {"error": "Content-Type must be application/json"}, gf.APIError, "NOT_ACCEPTABLE"),
        (410, {"error": "This model has been retired"}, gf.NotFoundError, "GONE"),
        (405, b"<!DOCTYPE html><html><body>Method Not Allowed</body></html>", gf.APIError, "METHOD_NOT_ALLOWED"),
        (500, {"error": "Internal server error"}, None, "INTERNAL"),
        (400, {"error": "Unsupported parameter foo"}, None, "INVALID_ARGUMENT"),
    ],
)
def test_segmind_error_mapping(status, body, fatal, status_name):
    failure = gf.Segmind(api_key=KEY).failure(_response(status, body))
    assert failure.fatal is fatal and failure.status == status_name and failure.code == status
    if status == 405:
        assert "Method Not Allowed" in failure.message


def test_segmind_rate_limit_reset_header():
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30))
    failure = gf.Segmind(api_key=KEY).failure(
        _response(429, {"error": "Too many requests"}, {"x-rate-limit-reset-at-utc": reset})
    )
    assert failure.retryable and 25 <= failure.retry_after <= 31


def test_parse_retry_after_forms():
    assert parse_retry_after("2.5") == 2.5
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_api_error_message_has_hint_not_key():
    failure = gf.GoogleAI(api_key=KEY).failure(
        _response(401, {"error": {"code": 401, "message": "bad", "status": "UNAUTHENTICATED"}})
    )
    text = str(failure.as_api_error())
    assert "GEMINI_API_KEY" in text and KEY not in text


def test_falling_back_to_the_emulator_is_said(monkeypatch, caplog):
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "SEGMIND_API_KEY", "GEMFRAME_PROVIDER"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_provider(None).name == "emulator"
    assert "offline emulator" in caplog.text
    caplog.clear()
    assert resolve_provider("emulator").name == "emulator" and not caplog.text


def test_a_key_over_plain_http_warns_once_per_client_naming_the_host(fault_server, monkeypatch, caplog, cache_dir):
    """http:// to a host that is not loopback (reached here through an HTTP proxy on 127.0.0.1,
    so the traffic stays local) warns once per client; loopback, https and the emulator never."""
    import logging

    import polars as pl

    from gemframe._core.http import _proxy_for

    proxy = fault_server()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _proxy_for.cache_clear()
    caplog.set_level(logging.WARNING, logger="gemframe")

    def ask(provider, base_url, n=3):
        with gf.Client(
            provider, api_key=KEY, base_url=base_url, cache="off", cache_dir=str(cache_dir), progress=False
        ) as c:
            for _ in range(2):  # two calls, one warning
                out = pl.DataFrame({"prompt": [f"p{i}" for i in range(n)]}).with_columns(
                    reply=gf.generate("prompt", client=c)
                )
                assert out["reply"].struct.field("error").is_null().all()

    def warnings():
        return [r.getMessage() for r in caplog.records if "plain http://" in r.getMessage()]

    try:
        ask("google", "http://api.example.test")
        assert warnings() == [
            (
                "sending the API key over plain http:// to api.example.test: anyone on the network path can read it; "
                "use an https:// base_url (only loopback hosts are exempt)"
            )
        ]
        ask("segmind", "http://user:pw@seg.example.test:8080")
        assert len(warnings()) == 2 and "to seg.example.test:" in warnings()[1]
        assert proxy.stats.requests == 12  # the requests really went out (through the proxy)
        caplog.clear()
        ask("emulator", "http://emulator.example.test")  # the emulator: a test key
        ask("google", proxy.url)  # loopback: 127.0.0.1
        ask("google", f"http://localhost:{proxy.port}")
        assert warnings() == [] and proxy.stats.requests == 30
    finally:
        _proxy_for.cache_clear()
    for url in ("https://api.example.test", "http://[::1]:8080", "http://127.8.9.10", "HTTP://LOCALHOST"):
        assert gf.GoogleAI(api_key=KEY, base_url=url).plaintext_host() is None, url
    assert gf.GoogleAI(api_key=None, base_url="http://api.example.test").plaintext_host() is None  # nothing secret


def test_redact_url_hides_the_whole_userinfo():
    from gemframe._core.http import redact_url

    assert redact_url("https://u:p@ss@host:8/v1?x=a@b") == "https://***@host:8/v1?x=a@b"
    assert redact_url("to http://a:b@one/x and https://c@two") == "to http://***@one/x and https://***@two"
    assert redact_url("https://host/path@x") == "https://host/path@x"  # no userinfo: unchanged
    assert gf.Segmind(api_key=KEY, base_url="https://me:pw@gw.example").display_base_url == "https://***@gw.example"


# -- the provider contract: a new provider is one class plus a registration ----------------------


@pytest.fixture
def registry():
    """The provider registry, restored after the test (registrations are process-wide)."""
    saved = dict(PROVIDERS)
    yield PROVIDERS
    PROVIDERS.clear()
    PROVIDERS.update(saved)


def _gateway_class():
    """An OpenAI-compatible-like gateway in front of Gemini, written from the contract alone:
    a bearer token, the body under ``messages``, plain ``{"error": "..."}`` failures, and no
    Batch Mode nor countTokens. (It speaks to the emulator's gateway route.)"""

    class Gateway(Provider):
        name = "toy-gateway"
        default_base_url = "https://gateway.example"
        key_env = ("TOY_GATEWAY_KEY",)
        capabilities = frozenset()

        def url(self, model):
            return f"{self.base_url}/v1/{model}"

        def headers(self):
            return {
                "content-type": "application/json",
                **({"authorization": f"Bearer {self.secret}"} if self.secret else {}),
            }

        def wrap(self, body):
            return {"messages": body}

        def failure(self, response):
            message = str((json.loads(response.content) or {}).get("error", ""))
            fatal = gf.AuthenticationError if response.status_code == 401 else None
            return Failure(
                response.status_code, "GATEWAY", message, response.status_code in RETRYABLE_STATUS, fatal=fatal
            )

    return Gateway


def test_a_new_provider_is_one_class_and_a_registration(registry, served_emulator, cache_dir, sample_input):
    gateway = register_provider(_gateway_class())
    assert registry["toy-gateway"] is gateway
    server = served_emulator(api_key=KEY)  # the emulator checks the bearer token
    frame = pl.DataFrame({"prompt": ["one", "two", "three"]})
    with gf.Client("toy-gateway", api_key=KEY, base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        out = frame.with_columns(reply=gf.generate("prompt", client=c)).unnest("reply")
        assert out["error"].is_null().all()
        assert out["text"].to_list() == [f'Emulated reply to: "{p}".' for p in ("one", "two", "three")]
        assert server.emulator.stats.requests == 3
        # A capability it does not declare gives the clear error, before anything is sent.
        with pytest.raises(gf.ConfigError, match="batch mode needs the google or emulator provider, not 'toy-gateway'"):
            frame.with_columns(reply=gf.generate("prompt", client=c, mode="batch", poll_interval=0.01, cache="off"))
        est = gf.estimate(sample_input, client=c, exact=True)
        assert est.token_method == "local" and "toy-gateway has no countTokens" in est.notes[0]
    assert server.emulator.stats.requests == 3 and server.emulator.batches.creates == 0
    with gf.Client("toy-gateway", api_key="wrong", base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.AuthenticationError, match="Unauthorized"):  # its own failure() decided
            pl.DataFrame({"prompt": ["four"]}).with_columns(reply=gf.generate("prompt", client=c))


def test_capabilities_are_declared_not_detected(registry, served_emulator, cache_dir, sample_input):
    """A Google dialect (it inherits batch_url, operation_url...) in front of which a gateway
    offers neither Batch Mode nor countTokens: it says so, and gemframe believes it."""

    @register_provider
    class PlainGoogle(gf.GoogleAI):
        name = "toy-plain-google"
        capabilities = frozenset()

    server = served_emulator()
    with gf.Client("toy-plain-google", api_key=KEY, base_url=server.url, cache_dir=str(cache_dir), progress=False) as c:
        frame = pl.DataFrame({"prompt": ["a", "b"]})
        assert frame.with_columns(reply=gf.generate("prompt", client=c)).unnest("reply")["error"].is_null().all()
        with pytest.raises(
            gf.ConfigError, match="batch mode needs the google or emulator provider, not 'toy-plain-google'"
        ):
            frame.with_columns(reply=gf.generate("prompt", client=c, mode="batch", cache="off"))
        est = gf.estimate(sample_input, client=c, exact=True)
        assert est.token_method == "local" and "no countTokens" in est.notes[0]
    assert server.emulator.batches.creates == 0 and server.emulator.stats.requests == 2
    # The same dialect declaring the capabilities gets them: batch jobs and exact counts.
    with gf.Client("google", api_key=KEY, base_url=server.url, cache_dir=str(cache_dir / "g"), progress=False) as c:
        assert gf.estimate(sample_input, client=c, exact=True).token_method == "countTokens"


def test_registration_checks_the_declaration(registry):
    class NoFailure(Provider):
        name = "toy-half"

        def url(self, model):
            return "https://x/" + model

        def headers(self):
            return {}

    with pytest.raises(TypeError, match="'toy-half'.*does not implement failure"):
        register_provider(NoFailure)
    with pytest.raises(TypeError, match="abstract"):
        NoFailure()  # an ABC: not even usable unregistered
    with pytest.raises(TypeError, match="declares 'batch' but has no batch_url, operation_url, batches_url"):
        register_provider(
            type("Boasting", (_gateway_class(),), {"name": "toy-boast", "capabilities": frozenset({"batch"})})
        )
    with pytest.raises(ValueError, match="unknown capabilities \\['streaming'\\]"):
        register_provider(
            type("Odd", (_gateway_class(),), {"name": "toy-odd", "capabilities": frozenset({"streaming"})})
        )
    with pytest.raises(ValueError, match="'google' is already registered by gemframe._core.providers.GoogleAI"):
        register_provider(type("Impostor", (_gateway_class(),), {"name": "google"}))
    assert list(registry) == ["google", "segmind", "emulator"]


def test_core_never_imports_the_emulator(repo_root):
    """The emulator is a test oracle the core reaches only through the registry: importing the
    core loads neither its app nor starlette (tests/test_layout.py checks every import statically)."""
    code = (
        "import sys, gemframe._core.providers, gemframe._core.client, gemframe._core.executor, gemframe._core.batch, gemframe._accounting.estimate; "
        "print(sorted(m for m in sys.modules if m.startswith(('gemframe.emulator', 'starlette', 'PIL', 'uvicorn')))); "
        "print(list(gemframe._core.providers.PROVIDERS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['gemframe.emulator', 'gemframe.emulator.provider']", "['google', 'segmind', 'emulator']"]
