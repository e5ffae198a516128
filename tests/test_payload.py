import base64
import io
import json
import os

import orjson
import polars as pl
import pytest
from PIL import Image

import gemframe as gf
from gemframe._core.payload import RequestBuilder, image_parts, inline_data, request_json


def _image_bytes(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, mime",
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_sniff_real_images(fmt, mime):
    assert gf.sniff_mime(_image_bytes(fmt)) == mime


@pytest.mark.parametrize(
    "head, mime",
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "image/heic"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00", "image/heif"),
        (b"%PDF-1.7\n%\xe2\xe3", "application/pdf"),
        (b"hello, world", None),
        (b"", None),
    ],
)
def test_sniff_magic_numbers(head, mime):
    assert gf.sniff_mime(head) == mime


def test_text_only_body_is_exact():
    assert gf.build_request("Hello") == {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}


def test_full_body_is_exact(tmp_path):
    png = _image_bytes("PNG")
    path = tmp_path / "picture.jpg"  # misleading extension: the MIME comes from the bytes
    path.write_bytes(png)
    body = gf.build_request(
        "What's in this image?",
        str(path),
        system="You are a helpful assistant.",
        config={"temperature": 0, "max_output_tokens": 64, "response_modalities": ["text", "image"], "seed": 7},
        safety={"harassment": "block_none"},
    )
    assert body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What's in this image?"},
                    {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}},
                ],
            }
        ],
        "systemInstruction": {"parts": [{"text": "You are a helpful assistant."}]},
        "generationConfig": {
            "temperature": 0,
            "maxOutputTokens": 64,
            "responseModalities": ["TEXT", "IMAGE"],
            "seed": 7,
        },
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }


def test_images_as_bytes_list_and_reply_dict():
    png, jpeg = _image_bytes("PNG"), _image_bytes("JPEG")
    parts = image_parts([png, None, {"mime_type": "image/jpeg", "data": jpeg}])
    assert [p["inlineData"]["mimeType"] for p in parts] == ["image/png", "image/jpeg"]
    assert base64.b64decode(parts[1]["inlineData"]["data"]) == jpeg


def test_image_only_row_and_empty_row():
    builder = RequestBuilder()
    assert builder.build(None, None) is None
    body = builder.build(None, _image_bytes("PNG"))
    assert list(body["contents"][0]["parts"][0]) == ["inlineData"]


def test_file_read_once_and_reread_after_edit(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(_image_bytes("PNG"))
    opened = []
    real_open = os.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("os.open", counting_open)  # image files are opened by os.open (non-blocking)
    first = [inline_data(str(path)) for _ in range(100)]
    assert len(opened) == 1 and all(f is first[0] for f in first)
    path.write_bytes(_image_bytes("JPEG"))  # an edit (size changes) is seen
    assert inline_data(str(path))["mimeType"] == "image/jpeg"


def test_bad_images_name_the_problem(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(gf.InputError, match="is not a PNG, JPEG"):
        inline_data(str(tmp_path / "notes.txt"))
    with pytest.raises(gf.InputError, match="cannot read image file"):
        inline_data(str(tmp_path / "missing.png"))
    with pytest.raises(gf.InputError, match="unsupported image value of type int"):
        inline_data(42)


def test_config_snake_and_camel_and_unknown_key():
    builder = RequestBuilder(
        config={"topP": 0.5, "top_k": 3, "stop_sequences": "END", "thinking_config": {"include_thoughts": True}}
    )
    assert builder.config == {
        "topP": 0.5,
        "topK": 3,
        "stopSequences": ["END"],
        "thinkingConfig": {"includeThoughts": True},
    }
    with pytest.raises(gf.ConfigError, match="Did you mean 'temperature'"):
        RequestBuilder(config={"temprature": 0})


def test_safety_forms_and_errors():
    listed = RequestBuilder(safety=[{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_ONLY_HIGH"}])
    assert listed.safety == [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_ONLY_HIGH"}]
    with pytest.raises(gf.ConfigError, match="unknown safety category"):
        RequestBuilder(safety={"rudeness": "BLOCK_NONE"})
    with pytest.raises(gf.ConfigError, match="unknown safety threshold"):
        RequestBuilder(safety={"harassment": "sometimes"})


def test_non_string_prompt_is_an_input_error():
    with pytest.raises(gf.InputError, match="prompt must be a string"):
        RequestBuilder().build(3)


def test_request_json_is_the_body_as_compact_json_with_images_spliced_in():
    image = base64.b64encode(bytes(range(256)) * 600).decode()  # ~200 kB of base64: spliced
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": 'quotes " and \\ and \x01 and é'},
                    {"inlineData": {"mimeType": "image/png", "data": image}},
                    {"inlineData": {"mimeType": "image/png", "data": image[::-1]}},
                ],
            }
        ],
        "generationConfig": {"temperature": 0.5, "long": "\x02" + 'x"' * 40_000},  # long, escaped
    }
    encoded = request_json(body)
    assert json.loads(encoded) == body
    assert encoded == orjson.dumps(body)  # byte for byte what encoding it at once gives
    assert body["contents"][0]["parts"][1]["inlineData"]["data"] == image  # the body is untouched
    text_only = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    assert request_json(text_only) == orjson.dumps(text_only)


# -- reading image values safely: URLs, odd paths, bad structs (through gf.generate) ----------


def _errors(frame):
    return [e and e["message"] for e in frame["reply"].struct.field("error").to_list()]


def test_loopback_image_urls_need_the_client_opt_in(image_server, emulator, cache_dir, tmp_path):
    png = _image_bytes("PNG")
    server = image_server({"/fox.png": (200, {"Content-Type": "image/png"}, png)})
    df = pl.DataFrame({"prompt": ["describe", "describe"], "img": [f"{server.url}/fox.png", None]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as client:
        refused = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    message = _errors(refused)[0]
    assert message.startswith("row 0: ") and f"{server.url}/fox.png" in message
    assert "127.0.0.1 is a loopback address" in message and "allow_private_urls=True" in message
    assert _errors(refused)[1] is None  # the other row is answered
    assert server.requested == [] and emulator.stats.requests == 1  # nothing was fetched
    with gf.Client(
        gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, allow_private_urls=True
    ) as client:
        allowed = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert _errors(allowed) == [None, None] and "Image 1: PNG 8x6" in allowed["reply"][0]["text"]
    assert server.requested == ["/fox.png"]


def test_the_checked_address_is_the_one_connected_to(image_server, emulator, cache_dir, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and elsewhere
    afterwards is fetched from the checked address (with its own Host header); a second
    lookup is never made."""
    import socket

    real = socket.getaddrinfo
    answers = iter([("127.0.0.1",)])  # the first answer only; a second lookup would fail

    def rebinding(host, port, *args, **kwargs):
        if host != "images.test":
            return real(host, port, *args, **kwargs)
        address = next(answers, ("169.254.169.254",))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address[0], port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    server = image_server({"/fox.png": (200, {}, _image_bytes("PNG"))})
    port = server.url.rsplit(":", 1)[1]
    df = pl.DataFrame({"prompt": ["describe"], "img": [f"http://images.test:{port}/fox.png"]})
    with gf.Client(
        gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, allow_private_urls=True
    ) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    assert _errors(out) == [None] and "Image 1: PNG 8x6" in out["reply"][0]["text"]
    assert server.hosts == [f"images.test:{port}"]


def test_redirects_are_checked_at_every_hop(image_server, client, emulator, monkeypatch):
    """A public host (here: 127.0.0.1, which this test alone counts as public) that redirects
    to a metadata service, to loopback or to another scheme is refused before that hop is
    fetched, with no opt-in; a plain URL from it still works."""
    from gemframe._core import payload

    real = payload._refusal
    monkeypatch.setattr(payload, "_refusal", lambda address: None if str(address) == "127.0.0.1" else real(address))
    png = _image_bytes("PNG")
    server = image_server(
        {
            "/fox.png": (200, {}, png),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-metadata-name": (301, {"Location": "http://metadata.google.internal/computeMetadata/v1/"}, b""),
            "/to-loopback": (307, {"Location": "http://[::1]:1/fox.png"}, b""),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/relative": (302, {"Location": "/fox.png"}, b""),
        }
    )
    paths = ["/to-metadata", "/to-metadata-name", "/to-loopback", "/to-file", "/relative", "/fox.png"]
    df = pl.DataFrame({"prompt": [f"p{i}" for i in range(len(paths))], "img": [server.url + p for p in paths]})
    out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    errors = _errors(out)
    assert (
        "redirected to 'http://169.254.169.254/latest/meta-data/'" in errors[0]
        and "a cloud metadata address" in errors[0]
    )
    assert "metadata.google.internal is a cloud metadata host" in errors[1]
    assert "::1 is a loopback address" in errors[2]
    assert "only http and https URLs are fetched, not file:" in errors[3]
    assert all("allow_private_urls=True" in e for e in errors[:3])
    assert errors[4:] == [None, None]
    assert sorted(server.requested) == sorted([*paths, "/fox.png"])  # never a refused hop
    assert emulator.stats.requests == 2  # rows 4 and 5


def test_url_downloads_stop_at_the_inline_limit(image_server, emulator, cache_dir):
    total = 64 * 2**20
    server = image_server(
        {
            "/endless.png": (200, {}, total),  # chunked: no size given up front
            "/declared.png": (200, {"Content-Length": str(total)}, total),
        }
    )
    df = pl.DataFrame({"prompt": ["a", "b"], "img": [f"{server.url}/endless.png", f"{server.url}/declared.png"]})
    with gf.Client(
        gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False, allow_private_urls=True
    ) as client:
        out = df.with_columns(reply=gf.generate("prompt", images="img", client=client))
    errors = _errors(out)
    assert all("is larger than 20 MB, the most the API takes inline" in e for e in errors), errors
    server.wait_done("/endless.png", "/declared.png")
    assert server.sent["/endless.png"] < total and server.sent["/declared.png"] < total  # stopped reading
    assert emulator.stats.requests == 0


def test_odd_paths_and_bad_structs_are_row_errors(client, emulator, tmp_path):
    """A directory, a FIFO, /dev/zero, a missing file and a non-image file (whose bytes are
    never quoted) are each their row's error at once; the other rows are answered."""
    png = tmp_path / "ok.png"
    png.write_bytes(_image_bytes("PNG"))
    secret = tmp_path / "notes.txt"
    secret.write_text("sk-live-0123456789 do not share")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    paths = [str(tmp_path), str(fifo), "/dev/zero", str(tmp_path / "missing.png"), str(secret), str(png)]
    df = pl.DataFrame({"prompt": [f"p{i}" for i in range(len(paths))], "img": paths})
    errors = _errors(df.with_columns(reply=gf.generate("prompt", images="img", client=client)))
    assert errors[0] == f"row 0: image file {str(tmp_path)!r} is a directory; pass the path of an image file"
    assert errors[1].startswith(f"row 1: image file {str(fifo)!r} is not a regular file (a FIFO, device or socket)")
    assert errors[2].startswith("row 2: image file '/dev/zero' is not a regular file")
    assert errors[3] == f"row 3: cannot read image file {str(tmp_path / 'missing.png')!r}: No such file or directory"
    assert "is not a PNG, JPEG, WEBP, GIF, HEIC/HEIF, PDF, video (" in errors[4] and "sk-live" not in errors[4]
    assert "or audio (WAV, MP3, AIFF, AAC, OGG, FLAC) file (31 bytes)" in errors[4]
    assert errors[5] is None and emulator.stats.requests == 1


def test_bad_base64_in_an_image_struct_is_a_row_error(client, emulator):
    good = base64.b64encode(_image_bytes("JPEG")).decode()
    structs = pl.DataFrame(
        {
            "prompt": ["a", "b", "c"],
            "img": [
                {"mime_type": "image/jpeg", "data": good},
                {"mime_type": "image/png", "data": "%%not base64"},
                {"mime_type": "image/png", "data": "aGVsbG8=\n"},
            ],
        }
    )
    errors = _errors(structs.with_columns(reply=gf.generate("prompt", images="img", client=client)))
    assert errors[0] is None
    assert errors[1] == "row 1: image struct data is text but not valid base64; pass the image bytes"
    assert errors[2].startswith("row 2: image struct data is not a PNG")  # valid base64 of "hello"
    assert emulator.stats.requests == 1


def test_an_invalid_response_modality_is_one_config_error_before_anything_is_sent(client, emulator):
    frame = pl.DataFrame({"prompt": ["a", "b"]})
    with pytest.raises(
        gf.ConfigError,
        match=r"unknown response modality 'IMAGES' in response_modalities\. "
        r"Did you mean 'IMAGE'\? Valid values: AUDIO, IMAGE, TEXT\.",
    ):
        frame.with_columns(gf.generate("prompt", client=client, config={"response_modalities": ["IMAGES"]}))
    with pytest.raises(gf.ConfigError, match="responseModalities must be a list"):
        gf.generate("prompt", client=client, config={"responseModalities": 3})
    ok = frame.with_columns(gf.generate("prompt", client=client, config={"response_modalities": ["text", "Image"]}))
    assert ok["reply"].struct.field("error").is_null().all() and emulator.stats.requests == 2  # only the valid call


# --- video and audio ---------------------------------------------------------------------------


def _mp4(payload: int = 1000, brand: bytes = b"isom") -> bytes:
    """An MP4 as far as its container goes: an ``ftyp`` box and an ``mdat`` box (no codec)."""
    ftyp = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x02\x00isommp41"
    return ftyp + (8 + payload).to_bytes(4, "big") + b"mdat" + bytes(payload)


def _wav(frames: int = 1600) -> bytes:
    """A 16 kHz mono 16-bit WAV of silence."""
    import struct

    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    data = b"data" + struct.pack("<I", 2 * frames) + bytes(2 * frames)
    return b"RIFF" + struct.pack("<I", 4 + len(fmt) + len(data)) + b"WAVE" + fmt + data


@pytest.mark.parametrize(
    "head, mime",
    [
        (_mp4(), "video/mp4"),
        (_mp4(brand=b"mp42"), "video/mp4"),
        (_mp4(brand=b"qt  "), "video/mov"),
        (_mp4(brand=b"3gp4"), "video/3gpp"),
        (_mp4(brand=b"M4A "), None),  # MP4 audio: the API lists no audio/mp4
        (b"RIFF\x00\x10\x00\x00AVI LIST", "video/avi"),
        (bytes.fromhex("1a45dfa3a34286810142f7810142f2810442f381084282847765626d"), "video/webm"),
        (bytes.fromhex("1a45dfa3a34286810142f7810142f281044282886d6174726f736b61"), None),  # matroska
        (b"\x00\x00\x01\xba\x44\x00\x04\x00", "video/mpeg"),
        (b"FLV\x01\x05\x00\x00\x00\x09", "video/x-flv"),
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + bytes(8), "video/wmv"),
        (_wav(), "audio/wav"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "audio/mp3"),
        (b"\xff\xfb\x90\x64\x00", "audio/mp3"),  # MPEG-1 layer III frame
        (b"\xff\xf1\x50\x80\x02\x1f\xfc", "audio/aac"),  # ADTS
        (b"OggS\x00\x02" + bytes(10), "audio/ogg"),
        (b"fLaC\x00\x00\x00\x22", "audio/flac"),
        (b"FORM\x00\x00\x10\x00AIFFCOMM", "audio/aiff"),
        (b"\xff\xfeh\x00i\x00", None),  # UTF-16 text, not an MPEG frame
        (b"RIFF\x00\x00\x00\x00XXXX", None),
    ],
)
def test_sniff_video_and_audio(head, mime):
    assert gf.sniff_mime(head) == mime


def test_a_small_video_and_a_wav_are_answered_inline(client, emulator, tmp_path):
    """A video and an audio file go where images go: sniffed, sent inline under the limit,
    answered, counted per second by the emulator (on main both were 'not a PNG, JPEG...' row
    errors and nothing was sent)."""
    (tmp_path / "clip.bin").write_bytes(_mp4())  # the name says nothing: the bytes do
    (tmp_path / "note.wav").write_bytes(_wav())
    df = pl.DataFrame({"prompt": ["v", "a"], "media": [str(tmp_path / "clip.bin"), str(tmp_path / "note.wav")]})
    out = df.with_columns(reply=gf.generate("prompt", images="media", client=client)).unnest("reply")
    assert out["error"].to_list() == [None, None] and emulator.stats.requests == 2 and emulator.stats.uploads == 0
    assert out["text"].to_list() == [
        'Emulated reply to: "v". Video 1: video/mp4, 1032 bytes.',
        f'Emulated reply to: "a". Audio 1: audio/wav, {len(_wav())} bytes.',
    ]
    assert out["prompt_tokens"].to_list() == [1 + 263, 1 + 32]  # a second each, at least
    body = gf.build_request("v", [_mp4(), str(tmp_path / "note.wav")])
    assert [p["inlineData"]["mimeType"] for p in body["contents"][0]["parts"][1:]] == ["video/mp4", "audio/wav"]


def test_a_file_named_mp4_holding_text_is_the_rows_error(client, emulator, tmp_path):
    fake = tmp_path / "holiday.mp4"
    fake.write_text("sk-live-0123456789 not a video at all")
    df = pl.DataFrame({"prompt": ["fake", "real"], "media": [str(fake), None]})
    errors = _errors(df.with_columns(reply=gf.generate("prompt", images="media", client=client)))
    assert errors[0].startswith(f"row 0: image file {str(fake)!r} is not a PNG, JPEG, WEBP, GIF, HEIC/HEIF, PDF, video")
    assert "file (37 bytes); pass the bytes, path or URL of an image, a PDF, a video or an audio file" in errors[0]
    assert "sk-live" not in errors[0] and errors[1] is None and emulator.stats.requests == 1
