"""The emulator as the official google-genai SDK sees it: Files API, context caching and Batch
Mode through ``genai.Client`` pointed at a served emulator (the SDK speaks API version v1)."""

from __future__ import annotations

import datetime
import io

import pytest

# Bound by `_genai_modules` when this module's first test runs, not when the file is collected:
# every xdist worker collects every file, and importing google.genai costs about 0.3 CPU-s.
genai = errors = types = None

PDF_2_PAGES = b"%PDF-1.4\n1 0 obj << /Type /Page >> endobj\n2 0 obj << /Type /Page >> endobj\n%%EOF"
KEY = "test-key"
HOURS = 3600


@pytest.fixture(scope="module", autouse=True)
def _genai_modules():
    """Import the google-genai SDK for this module's tests, or skip them without it."""
    global genai, errors, types
    genai = pytest.importorskip("google.genai")
    from google.genai import errors, types


class Clock:
    """The emulator's injectable clock, moved by the test instead of waited for."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sdk(served_emulator):
    """``sdk(**knobs)`` -> (google-genai client, served emulator, clock)."""

    def start(**knobs):
        clock = Clock()
        server = served_emulator(api_key=KEY, clock=clock, **knobs)
        client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url))
        return client, server, clock

    return start


def upload(client, data: bytes, mime: str, name: str):
    return client.files.upload(file=io.BytesIO(data), config={"mime_type": mime, "display_name": name})


def test_files_upload_get_list_generate_and_delete(sdk, image_bytes):
    client, server, _ = sdk()
    png = upload(client, image_bytes("PNG", (40, 30)), "image/png", "square")
    pdf = upload(client, PDF_2_PAGES, "application/pdf", "two pages")
    assert png.name.startswith("files/") and png.state == types.FileState.ACTIVE
    assert (png.mime_type, png.size_bytes, png.display_name) == (
        "image/png",
        len(image_bytes("PNG", (40, 30))),
        "square",
    )
    assert png.uri == f"{server.url}/v1/{png.name}"
    assert png.expiration_time - png.create_time == datetime.timedelta(hours=48)
    assert png.sha256_hash and png.source == types.FileSource.UPLOADED

    got = client.files.get(name=png.name)
    assert (got.name, got.uri, got.state) == (png.name, png.uri, types.FileState.ACTIVE)
    listed = [f.name for f in client.files.list(config={"page_size": 1})]  # two pages of one
    assert listed == [png.name, pdf.name]

    reply = client.models.generate_content(
        model="gemini-2.5-flash",
        contents=[
            types.Part.from_uri(file_uri=png.uri, mime_type=png.mime_type),
            types.Part.from_uri(file_uri=pdf.uri, mime_type=pdf.mime_type),
            "Describe both.",
        ],
    )
    # Counted and described as the same bytes sent inline would be: 258 per image, per page.
    assert "Image 1: PNG 40x30." in reply.text and "Document 1: PDF" in reply.text
    details = {d.modality.value: d.token_count for d in reply.usage_metadata.prompt_tokens_details}
    assert details == {"TEXT": 4, "IMAGE": 258, "DOCUMENT": 2 * 258}

    client.files.delete(name=png.name)
    with pytest.raises(errors.ClientError) as gone:
        client.files.get(name=png.name)
    assert gone.value.code == 403 and "may not exist" in gone.value.message
    with pytest.raises(errors.ClientError) as used:
        client.models.generate_content(
            model="gemini-2.5-flash",
            contents=[
                types.Part.from_uri(file_uri=png.uri, mime_type="image/png"),
                "Again.",
            ],
        )
    assert used.value.code == 403 and used.value.status == "PERMISSION_DENIED"
    assert [f.name for f in client.files.list()] == [pdf.name]


def test_a_file_is_processing_until_polled_then_active(sdk, image_bytes):
    client, _, _ = sdk(file_polls=2)
    file = upload(client, image_bytes(), "image/png", "slow")
    assert file.state == types.FileState.PROCESSING
    part = types.Part.from_uri(file_uri=file.uri, mime_type="image/png")
    with pytest.raises(errors.ClientError) as early:
        client.models.generate_content(model="gemini-2.5-flash", contents=[part, "Now?"])
    assert (early.value.code, early.value.status) == (400, "FAILED_PRECONDITION")
    assert "is not in an ACTIVE state" in early.value.message
    states = [client.files.get(name=file.name).state for _ in range(3)]
    assert states == [types.FileState.PROCESSING, types.FileState.ACTIVE, types.FileState.ACTIVE]
    assert "Image 1" in client.models.generate_content(model="gemini-2.5-flash", contents=[part, "Now?"]).text


def test_a_file_expires_48_hours_after_upload(sdk, image_bytes):
    client, server, clock = sdk()
    file = upload(client, image_bytes(), "image/png", "brief")
    part = types.Part.from_uri(file_uri=file.uri, mime_type="image/png")
    clock.now += 48 * HOURS - 1
    assert client.files.get(name=file.name).state == types.FileState.ACTIVE
    clock.now += 1
    with pytest.raises(errors.ClientError) as gone:
        client.files.get(name=file.name)
    assert gone.value.code == 403
    with pytest.raises(errors.ClientError) as used:
        client.models.generate_content(model="gemini-2.5-flash", contents=[part, "Still there?"])
    assert used.value.code == 403 and file.name.removeprefix("files/") in used.value.message
    assert list(client.files.list()) == [] and not server.emulator.files.files  # memory freed


def test_caches_create_get_list_update_delete_and_generate(sdk):
    client, _, clock = sdk()
    document = "word " * 5000  # 25,000 characters: 6,250 tokens
    cache = client.caches.create(
        model="gemini-2.5-flash",
        config=types.CreateCachedContentConfig(
            contents=[document],
            system_instruction="Be terse.",
            ttl="300s",
            display_name="manual",
        ),
    )
    assert cache.name.startswith("cachedContents/") and cache.model == "models/gemini-2.5-flash"
    assert cache.usage_metadata.total_token_count == 6250 + 3  # contents and system instruction
    assert (cache.expire_time - cache.create_time).total_seconds() == 300
    assert client.caches.get(name=cache.name).display_name == "manual"
    assert [c.name for c in client.caches.list()] == [cache.name]
    clock.now += 100
    updated = client.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="600s"))
    assert (updated.expire_time - cache.create_time).total_seconds() == 700

    reply = client.models.generate_content(
        model="gemini-2.5-flash",
        contents="Summarise it.",
        config=types.GenerateContentConfig(cached_content=cache.name),
    )
    usage = reply.usage_metadata
    assert usage.cached_content_token_count == 6253
    assert usage.prompt_token_count == 6253 + 4  # the cached tokens count in the prompt too
    assert "(system: Be terse.)" in reply.text  # the cache's system instruction applied

    client.caches.delete(name=cache.name)
    with pytest.raises(errors.ClientError) as gone:
        client.caches.get(name=cache.name)
    assert gone.value.code == 403 and gone.value.message == "CachedContent not found (or permission denied)"


def test_a_cache_under_the_models_minimum_is_refused_and_one_past_its_ttl_is_gone(sdk):
    client, _, clock = sdk()
    with pytest.raises(errors.ClientError) as small:
        client.caches.create(model="gemini-2.5-pro", config={"contents": ["word " * 1000]})
    assert small.value.code == 400
    assert small.value.message == "Cached content is too small. total_token_count=1250, min_total_token_count=4096"
    cache = client.caches.create(model="gemini-2.5-flash", config={"contents": ["word " * 1000]})
    assert (cache.expire_time - cache.create_time).total_seconds() == 3600  # the default TTL
    clock.now += 3600
    with pytest.raises(errors.ClientError) as expired:
        client.models.generate_content(model="gemini-2.5-flash", contents="Hi.", config={"cached_content": cache.name})
    assert expired.value.code == 403 and "CachedContent not found" in expired.value.message


def test_a_cache_holds_uploaded_files(sdk, image_bytes):
    client, _, _ = sdk(cache_min_tokens=100)
    file = upload(client, PDF_2_PAGES, "application/pdf", "doc")
    cache = client.caches.create(
        model="gemini-2.5-flash",
        config={
            "contents": [
                types.Content(role="user", parts=[types.Part.from_uri(file_uri=file.uri, mime_type="application/pdf")]),
            ]
        },
    )
    assert cache.usage_metadata.total_token_count == 2 * 258
    reply = client.models.generate_content(
        model="gemini-2.5-flash", contents="What is in it?", config={"cached_content": cache.name}
    )
    cached = {d.modality.value: d.token_count for d in reply.usage_metadata.cache_tokens_details}
    assert cached == {"DOCUMENT": 516} and reply.usage_metadata.cached_content_token_count == 516


def test_batches_get_shows_the_results_of_a_succeeded_job(sdk):
    client, _, _ = sdk(batch_polls=2)
    job = client.batches.create(
        model="gemini-2.5-flash",
        src=[
            {"contents": [{"role": "user", "parts": [{"text": "first"}]}]},
            {"contents": [{"role": "user", "parts": [{"text": "second"}]}]},
        ],
    )
    assert job.state == types.JobState.JOB_STATE_PENDING and job.dest is None
    polls = [client.batches.get(name=job.name) for _ in range(2)]  # it ends on the second poll
    assert polls[0].state == types.JobState.JOB_STATE_RUNNING and polls[0].dest is None
    job = polls[1]
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED and job.end_time is not None
    texts = [r.response.text for r in job.dest.inlined_responses]
    assert texts == ['Emulated reply to: "first".', 'Emulated reply to: "second".']
