"""Offline, deterministic Gemini-compatible HTTP server: gemframe's default backend.

`Emulator` is an ASGI app. Use it in-process with ``httpx.ASGITransport(app=Emulator())`` (no
port, no network), or serve it over TCP with `serve` (uvicorn)::

    from gemframe.emulator import Emulator, serve
    serve(Emulator(latency=0.5, jitter=0.5, fail_first=1), port=8080)

Routes
------
Every Google route is served under ``/v1beta/...`` and ``/v1/...`` alike (gemframe speaks
v1beta; the google-genai SDK 3.x speaks v1); paths below say v1beta.

``POST /v1beta/models/{model}:generateContent``
    Google AI dialect. Key in ``x-goog-api-key`` or ``?key=``. The model must be a Gemini model
    id (``validation.GEMINI_MODELS``, also with a version suffix such as ``-001``, ``-latest``,
    ``-preview-05-20``) or start with ``emulator``, else 404 NOT_FOUND with the real API's
    message (``models/gemini-2.5-flsh is not found for API version v1beta, ...``); the same
    check guards ``countTokens`` and ``batchGenerateContent``. Errors use Google's envelope
    ``{"error": {"code", "message", "status"[, "details"]}}``.
``POST /v1beta/models/{model}:countTokens``
    ``{"contents": [...]}`` or ``{"generateContentRequest": {...}}`` -> ``{"totalTokens": N,
    "promptTokensDetails": [...]}``, counted exactly like ``usageMetadata.promptTokenCount``.
``POST /v1/{slug}``
    Segmind dialect: the Google body wrapped as ``{"messages": {...}}`` (its
    ``system_instruction.parts`` may be one object). Key in ``x-api-key`` or
    ``Authorization: Bearer``. Slugs must start with ``gemini`` (else 404). Needs
    ``Content-Type: application/json`` (else 406). Errors are plain ``{"error": "<message>"}``;
    successes are the same body as the Google route.
``POST /v1beta/models/{model}:batchGenerateContent``, ``GET /v1beta/batches/{id}``,
``POST /v1beta/batches/{id}:cancel``, ``GET /v1beta/batches``
    Batch Mode with inlined requests, as long-running operations (see `gemframe.emulator.batch`).
    Knobs: ``batch_polls`` (polls until done), ``batch_outcome`` (final state),
    ``batch_fail_every`` (every k-th request gets a per-request error), ``batch_keep``
    (finished jobs kept, default 100; older ones are deleted and answer 404). A succeeded job's
    results are in the batch resource's ``output`` (the operation's ``metadata``, which the
    google-genai SDK reads as ``dest``) and in the operation's ``response``, as the API answers.
``POST /upload/v1beta/files`` (resumable), ``GET /v1beta/files``, ``GET|DELETE /v1beta/files/{id}``
    The Files API (see `gemframe.emulator.files`): a resumable upload (``start``, then
    ``upload``/``finalize`` chunks to the ``X-Goog-Upload-URL``) makes ``files/<id>`` with
    ``uri``, ``sizeBytes``, ``sha256Hash``, ``createTime``, ``expirationTime`` (+48 h) and
    ``state``. A file past its expiration is gone (403 "You do not have permission to access the
    File <id> or it may not exist.", as a deleted or unknown one). A ``fileData`` part whose
    ``fileUri`` names a file (``.../files/<id>``) is answered and counted as the same bytes
    inline would be (an image 258 tokens, a PDF 258 a page; text files their characters / 4;
    other types 258); one not ACTIVE is a 400 FAILED_PRECONDITION. Other URIs (YouTube) are
    counted 258 and not looked up. Knobs: ``file_polls`` (gets a new file answers PROCESSING
    to; default 0: ACTIVE at once), ``file_outcome`` (``ACTIVE`` or ``FAILED``),
    ``file_max_bytes`` (a file; default the API's 2 GiB), ``files_total_bytes`` (stored files
    plus uploads in progress; default 2 GiB, as files are held in memory): a size over them is
    a 413, refused before the bytes are read. Files keep what answers need (an image's bytes,
    a PDF's page count), not every byte.
``POST|GET /v1beta/cachedContents``, ``GET|PATCH|DELETE /v1beta/cachedContents/{id}``
    Context caching (see `gemframe.emulator.caches`): a cache of contents and a system
    instruction for one model, its ``usageMetadata.totalTokenCount`` at least the model's
    minimum (``cache_min_tokens``; default the API's 1,024, or 4,096 for Pro models), expiring
    after ``ttl`` (default 1 h) or at ``expireTime`` (PATCH moves only that). A generate call
    with ``"cachedContent": "cachedContents/<id>"`` is answered with the cache's turns first and
    reports ``cachedContentTokenCount`` / ``cacheTokensDetails`` (``promptTokenCount`` includes
    them, as the API counts); countTokens too. At most 1,000 caches made from 256 MiB of request
    bytes live at once (then 429), as caches are held in memory.
``GET /emulator/stats`` / ``POST /emulator/reset``
    Stats as ``{"requests", "distinct_bodies", "max_in_flight", "in_flight", "bytes_received",
    "uploads"}`` / reset them.

Knobs (constructor arguments, also plain attributes that may be changed between requests)
----------------------------------------------------------------------------------------
``latency``      seconds added to every generate call (both routes, failures included).
``jitter``       extra uniform delay in ``[0, jitter]`` from ``random.Random`` seeded by
                 ``(seed, sha256(body))``: the same body always waits the same.
``api_key``      None accepts any key or none. Otherwise Google answers 403 PERMISSION_DENIED
                 without a key and 400 API_KEY_INVALID for a wrong one; Segmind answers 401.
``fail_first``   the first K attempts of each distinct body answer ``fail_status`` (Google's
                 message for that status) before the body is answered normally. Counted per
                 raw body bytes, after auth and validation succeed (a real frontend rejects bad
                 requests before it looks at load).
``retry_after``  when not None, emulated failures (``fail_first`` and ``[emulator:status=N]``)
                 carry ``Retry-After: <retry_after>``; Google 429s also carry a
                 ``google.rpc.RetryInfo`` detail (``retryDelay``) and Segmind 429s an
                 ``x-rate-limit-reset-at-utc`` header, as the real services do.
``markers``      True (default) honours the test markers below; False treats them as plain
                 prompt text (``gemframe emulator --no-markers``), for a server other people's
                 prompts reach.
``models``       the Gemini model ids served (default ``GEMINI_MODELS``; versions of them and
                 ``emulator...`` names too); None serves any model name.
``clock``        ``() -> epoch seconds`` (default ``time.time``) for file and cache times and
                 expiry: a test moves it instead of waiting 48 hours.

``emu.stats`` counts generate calls (``requests``, ``by_body`` keyed by sha256 hex of the raw
body, ``in_flight``, ``max_in_flight``; a body refused as too large counts in ``requests``
only), ``bytes_received`` the request body bytes received on every route (uploads included)
and ``uploads`` the files created by uploads. ``emu.reset_stats()`` zeroes the counters (and so restarts ``fail_first``);
``in_flight`` is left alone because those requests are still running.

Answers
-------
The reply text echoes the last user turn and describes its inline data::

    Emulated reply to: "<prompt>". Image 1: PNG 64x48. Document 1: PDF, 1234 bytes.

then `` (system: <first 40 chars>)`` with a system instruction and, when there is more than one
content, `` (turn N, previously: "<first 40 chars of the last model text>")`` with N the number
of user turns. Inline data must be an image Pillow can decode or a PDF (``%PDF``); anything else
is a 400. Generation config is honoured:

- ``maxOutputTokens=M``: a text longer than M tokens is cut to ``4*M`` characters and the
  candidate ends with ``MAX_TOKENS`` (JSON replies are cut too, as the real API does).
- ``stopSequences``: the text is cut before the first occurrence.
- ``responseMimeType: application/json``: ``{"reply": "<text>"}``, or with ``responseSchema``
  (OpenAPI subset; unknown schema fields are a 400, as in the real API) or
  ``responseJsonSchema`` (JSON Schema incl. ``$ref``/``anyOf``/type lists) a value that follows
  the schema: strings ``"<property>: <first words of the prompt>"``, integers in ``[1, 100]`` (or
  ``minimum``..``maximum``), numbers with two decimals, booleans, arrays of 2 items (clamped to
  ``minItems``/``maxItems``, at most 16); numbers, booleans and enum choices are hashes of
  (prompt, seed, candidate, path).
  ``text/x.enum`` with an enum schema answers one enum value.
- ``candidateCount=N``: N candidates; candidate i>0 has `` [candidate i]`` appended (inside the
  strings of a JSON reply) and its own hash-derived values and image.
- ``thinkingConfig.includeThoughts``: a first part ``{"text": "Thinking about: ...",
  "thought": true}`` and ``thoughtsTokenCount`` in usageMetadata.
- ``responseModalities`` with ``IMAGE``: an ``inlineData`` PNG part. Without input images, a
  256 px image (``imageConfig.aspectRatio`` honoured) of the prompt on a colour from
  (prompt, seed); with one, an edited copy of the first image of the last user turn (or, when
  that turn has none, of the latest image earlier in the conversation): fitted to 256 px,
  inverted, tinted and captioned. As Gemini's image models do, the first non-thought part of
  an image reply and every image part carry a ``thoughtSignature``. ``["IMAGE"]`` alone means
  no text part.

Multi-turn: the reply text notes the turn and the previous model answer (see above), and an
image reply with no image in the prompt turn edits the latest image of the conversation. A
``model`` turn's image part must be sent back with its ``thoughtSignature`` (every image the
emulator returns has one), else the request is a 400 INVALID_ARGUMENT "Image part is missing a
thought_signature ...", as the real API answers for its image models; a signature must be
base64, and the documented placeholder ``skip_thought_signature_validator`` is accepted.

Tokens: ``max(1, ceil(len(text)/4))`` per non-empty text part, 258 per input image, 258 per PDF
page, an uploaded file's part as its bytes inline (else 258 a ``fileData`` part), 1290 per
generated image. ``promptTokenCount`` covers the
system instruction and every content; ``totalTokenCount`` adds candidates and thoughts.
Zero counts are omitted, as in proto3 JSON.

Test markers (in the last user turn's text)
-------------------------------------------
These make the emulator fail on purpose, for tests. They are on by default; anyone who can
send a prompt can trigger them (``sleep`` holds a connection as long as asked), so turn them off
with ``Emulator(markers=False)`` or ``gemframe emulator --no-markers`` (its startup line says
so) when the server is not only for tests. Off, a marker is plain prompt text, answered
normally (echoed in the reply). They apply to generateContent (both routes); in a batch job
the answer-shaping ones (safety, block, recitation, empty) apply.

``[emulator:safety]``      one candidate, finishReason SAFETY, no content, one HIGH rating.
``[emulator:block]``       no candidates; ``promptFeedback.blockReason`` SAFETY.
``[emulator:recitation]``  one candidate, finishReason RECITATION, no content.
``[emulator:empty]``       ``"candidates": []`` with usageMetadata.
``[emulator:status=NNN]``  HTTP NNN (400-599) with the dialect's error body.
``[emulator:sleep=S]``     wait S more seconds before answering (for timeout tests).

Precedence: a body over 20 MiB is refused first (413, before it is read), then a request is
delayed (latency, jitter), then checked (auth, route, body), then ``fail_first`` applies,
then ``sleep``, then ``status``, then block > empty > safety > recitation.

Determinism: every answer is a pure function of the request (route, model, raw body; the
constructor's ``seed`` only moves the delay), so the same request gets byte-identical bodies
(only Segmind's ``x-rate-limit-reset-at-utc`` header depends on the clock). ``responseId`` is
the first 22 URL-safe base64 characters of sha256(body); ``thoughtSignature`` derives from it.
Responses are compact JSON with ``content-type: application/json``. Image replies are drawn in a
worker thread, so a slow one never holds up the answers to other requests.

Validation follows the real API: 400 INVALID_ARGUMENT for non-JSON bodies, unknown fields
(camelCase and snake_case both accepted), missing contents, bad roles, empty or data-less parts,
bad base64, unknown generationConfig keys, out-of-range candidateCount, unknown safety
categories or thresholds, unsupported response MIME types or modalities, a schema without a
JSON (or ``text/x.enum``) MIME type. A body over 20 MiB (``MAX_BODY_BYTES``) is answered 413 with
the real API's message (``Request payload size exceeds the limit: 20971520 bytes.``, status
INVALID_ARGUMENT) before it is buffered: a declared ``Content-Length`` over the limit is refused
unread, a chunked body as soon as it passes the limit.

Layout
------
A test oracle: nothing here imports gemframe's client side except `provider`, which speaks the
provider contract. Importing this package is cheap; the app (starlette, Pillow) loads on first
use.

``validation``  the real API's figures and messages, `ErrorAnswer`, the parsed `GenRequest`.
``answers``     `build_reply`: the success body of a validated request, token counts, the
                schema faker.
``render``      Pillow: inspecting input images, drawing image replies.
``batch``       Batch Mode jobs (`BatchStore`).
``files``       the Files API (`FileStore`): uploads, expiry, fileData parts resolved.
``caches``      context caching (`CacheStore`).
``timefmt``     timestamps and durations as the API writes them.
``app``         HTTP: `Emulator` (the ASGI app), `Stats`, `serve`.
``provider``    `EmulatorProvider`, registered as ``"emulator"`` (how the client reaches it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Emulator, Stats, serve
    from .provider import EmulatorProvider

__all__ = ["Emulator", "EmulatorProvider", "Stats", "serve"]

# Public name -> the submodule defining it, imported on first access (PEP 562), so that
# ``import gemframe`` (which imports the light `provider`) never pays for starlette and Pillow.
_LAZY = {"Emulator": "app", "Stats": "app", "serve": "app", "EmulatorProvider": "provider"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
