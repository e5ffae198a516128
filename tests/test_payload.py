import base64
import io
import json

import orjson
import pytest
from PIL import Image

import gemframe as gf
from gemframe.payload import RequestBuilder, image_parts, inline_data, request_json


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
        "generationConfig": {"temperature": 0, "maxOutputTokens": 64, "responseModalities": ["TEXT", "IMAGE"], "seed": 7},
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
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
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
    builder = RequestBuilder(config={"topP": 0.5, "top_k": 3, "stop_sequences": "END", "thinking_config": {"include_thoughts": True}})
    assert builder.config == {"topP": 0.5, "topK": 3, "stopSequences": ["END"], "thinkingConfig": {"includeThoughts": True}}
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
        "contents": [{"role": "user", "parts": [
            {"text": 'quotes " and \\ and \x01 and é'},
            {"inlineData": {"mimeType": "image/png", "data": image}},
            {"inlineData": {"mimeType": "image/png", "data": image[::-1]}},
        ]}],
        "generationConfig": {"temperature": 0.5, "long": "\x02" + 'x"' * 40_000},  # long, escaped
    }
    encoded = request_json(body)
    assert json.loads(encoded) == body
    assert encoded == orjson.dumps(body)  # byte for byte what encoding it at once gives
    assert body["contents"][0]["parts"][1]["inlineData"]["data"] == image  # the body is untouched
    text_only = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    assert request_json(text_only) == orjson.dumps(text_only)
