"""Image generation, edits, composition and consistent visuals, through the public API."""

import base64
import hashlib
import io
import json
from pathlib import Path

import polars as pl
from PIL import Image, ImageChops

import gemframe as gf

IMAGE_ONLY = {"response_modalities": ["IMAGE"]}


def _images(frame: pl.DataFrame, column: str = "reply") -> list[bytes]:
    return [img["data"] for images in frame[column].struct.field("images").to_list() for img in images]


def _pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_generation_returns_pngs_of_the_prompt(client):
    df = pl.DataFrame({"prompt": ["A poster that says OPEN", "A red fox"]})
    both = df.with_columns(
        reply=gf.generate("prompt", config={"response_modalities": ["TEXT", "IMAGE"]}, client=client)
    )
    only = df.with_columns(reply=gf.generate("prompt", config=IMAGE_ONLY, client=client)).unnest("reply")
    assert both["reply"].struct.field("text").is_not_null().all()
    assert only["text"].is_null().all() and only["images"].list.len().to_list() == [1, 1]
    pngs = _images(both)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs) and pngs[0] != pngs[1]
    assert _pixels(pngs[0]).size == (256, 256)


def test_a_cached_rerun_returns_byte_identical_images(client, emulator, tmp_path):
    df = pl.DataFrame({"prompt": [f"A lighthouse, style {i}" for i in range(4)]})
    kw = dict(config={**IMAGE_ONLY, "seed": 7}, client=client)
    first = df.with_columns(reply=gf.generate("prompt", **kw))
    again = df.with_columns(reply=gf.generate("prompt", **kw))
    assert emulator.stats.requests == 4  # the rerun sent nothing
    assert again["reply"].struct.field("cached").all()
    assert _images(again) == _images(first)
    # As files: the same content-hash names, the same bytes.
    files = df.with_columns(reply=gf.generate("prompt", image_dir=str(tmp_path / "img"), **kw))
    paths = [i["path"] for images in files["reply"].struct.field("images").to_list() for i in images]
    assert emulator.stats.requests == 4
    assert [Path(p).read_bytes() for p in paths] == _images(first)
    assert all(Path(p).stem == hashlib.sha256(Path(p).read_bytes()).hexdigest()[:32] for p in paths)


def test_the_same_seed_gives_the_same_image_even_without_the_cache(client, emulator):
    df = pl.DataFrame({"prompt": ["A red fox in the snow"]})
    run = lambda seed: _images(  # noqa: E731
        df.with_columns(reply=gf.generate("prompt", config={**IMAGE_ONLY, "seed": seed}, cache="off", client=client))
    )[0]
    one, two, other = run(42), run(42), run(43)
    assert emulator.stats.requests == 3  # every call went to the server
    assert one == two and one != other


def test_one_reference_image_and_system_for_every_row(client, emulator, png_path):
    reference = png_path.read_bytes()
    df = pl.DataFrame({"prompt": ["A mug in this style", "A lamp in this style", "A chair in this style"]})
    for images in (pl.lit(reference), reference, png_path, pl.lit(str(png_path))):
        out = df.with_columns(
            reply=gf.generate(
                "prompt",
                images=images,
                system="Flat pastel illustration.",
                config={"response_modalities": ["TEXT", "IMAGE"]},
                client=client,
            )
        ).unnest("reply")
        assert out["error"].is_null().all()
        assert all("Image 1: PNG 40x30" in t and "(system: Flat pastel illustration.)" in t for t in out["text"])
    assert emulator.stats.requests == 3  # bytes or path, the same image is the same request
    body = json.loads(df.with_columns(q=gf.request("prompt", images=pl.lit(reference)))["q"][2])
    assert base64.b64decode(body["contents"][0]["parts"][1]["inlineData"]["data"]) == reference


def test_an_edit_returns_an_image_that_differs_from_the_input(client, image_bytes):
    photo = image_bytes("PNG", (120, 80), (30, 120, 200))
    df = pl.DataFrame({"prompt": ["Add a party hat"], "photo": [photo]})
    edited = _images(df.with_columns(reply=gf.generate("prompt", images="photo", config=IMAGE_ONLY, client=client)))[0]
    drawn = _images(df.with_columns(reply=gf.generate("prompt", config=IMAGE_ONLY, client=client)))[0]
    source, result = _pixels(photo), _pixels(edited)
    assert result.width == 256 and edited != drawn
    picture = result.crop((0, 0, result.width, result.height - 24)).resize(source.size)  # without the caption
    assert ImageChops.difference(picture, source).getbbox() is not None  # visibly changed


def test_composition_sends_each_image_as_its_own_inline_part(client, emulator, image_bytes):
    subject, style = image_bytes("PNG", (32, 32), "red"), image_bytes("JPEG", (48, 24), "green")
    df = pl.DataFrame(
        {"prompt": ["Put the subject of the first in the style of the second"], "images": [[subject, style]]}
    )
    body = json.loads(df.with_columns(q=gf.request("prompt", images="images"))["q"][0])
    text, first, second = body["contents"][0]["parts"]
    assert text == {"text": df["prompt"][0]}
    assert [first["inlineData"]["mimeType"], second["inlineData"]["mimeType"]] == ["image/png", "image/jpeg"]
    assert [base64.b64decode(p["inlineData"]["data"]) for p in (first, second)] == [subject, style]
    out = df.with_columns(
        reply=gf.generate("prompt", images="images", config={"response_modalities": ["TEXT", "IMAGE"]}, client=client)
    )
    reply = out["reply"][0]
    assert "Image 1: PNG 32x32" in reply["text"] and "Image 2: JPEG 48x24" in reply["text"]
    assert len(reply["images"]) == 1 and emulator.stats.requests == 1
