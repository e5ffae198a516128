"""gf.show (an HTML grid for notebooks) and gf.save_images (images as files)."""

import base64
import hashlib
import os
import re
import sys
from pathlib import Path

import polars as pl
import pytest

import gemframe as gf

IMAGES = {"response_modalities": ["TEXT", "IMAGE"]}


@pytest.fixture
def replies(client):
    df = pl.DataFrame({"prompt": ["A <b>bold</b> poster", "A fox", "A boat", "[emulator:status=400] broken"]})
    return df.with_columns(reply=gf.generate("prompt", config=IMAGES, client=client))


def _srcs(markup: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', markup)


def test_show_a_frame_embeds_images_with_their_prompts(replies):
    grid = gf.show(replies)
    markup = grid._repr_html_() if hasattr(grid, "_repr_html_") else grid.data
    assert markup == grid.data
    assert "A &lt;b&gt;bold&lt;/b&gt; poster" in markup and "<b>bold" not in markup  # prompts are escaped
    srcs = _srcs(markup)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    first = replies["reply"][0]["images"][0]["data"]
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == first
    assert "INVALID_ARGUMENT" in markup  # the failed row says why
    assert len(_srcs(gf.show(replies, n=2).data)) == 2


def test_show_series_and_unnested_frames(replies):
    assert len(_srcs(gf.show(replies["reply"]).data)) == 3
    assert len(_srcs(gf.show(replies["reply"].struct.field("images")).data)) == 3
    unnested = gf.show(replies.unnest("reply"), n=1).data
    assert len(_srcs(unnested)) == 1 and "poster" in unnested
    assert len(_srcs(gf.show(replies.lazy(), n=3).data)) == 3
    with pytest.raises(gf.InputError, match="reply="):
        gf.show(pl.DataFrame({"prompt": ["x"]}))


def test_show_image_files_embedded_or_linked(client, tmp_path):
    out = pl.DataFrame({"prompt": ["A fox"]}).with_columns(
        reply=gf.generate("prompt", config=IMAGES, image_dir=str(tmp_path / "img"), client=client)
    )
    path = out["reply"][0]["images"][0]["path"]
    embedded = gf.show(out).data
    assert _srcs(embedded)[0].startswith("data:image/png;base64,") and f'title="{path}"' in embedded
    assert _srcs(gf.show(out, embed=False).data) == [path]


def test_show_without_ipython(replies, monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    grid = gf.show(replies, n=1)
    assert type(grid).__name__ == "HtmlGrid" and "<img" in grid._repr_html_()


def test_save_images_names_files_by_content(replies, tmp_path):
    paths = gf.save_images(replies["reply"], tmp_path / "saved")
    assert paths.dtype == pl.List(pl.String) and paths.list.len().to_list() == [1, 1, 1, 0]
    for path, reply in zip(paths.to_list()[:3], replies["reply"].to_list()):
        data = Path(path[0]).read_bytes()
        assert data == reply["images"][0]["data"]
        assert Path(path[0]).name == hashlib.sha256(data).hexdigest()[:32] + ".png"
    # As an expression, again: the same files (idempotent), and null replies stay null.
    frame = replies.vstack(pl.DataFrame({"prompt": [None], "reply": [None]}, schema=replies.schema))
    again = frame.with_columns(paths=gf.save_images("reply", tmp_path / "saved"))
    assert again["paths"].to_list()[:4] == paths.to_list() and again["paths"][4] is None
    assert len(list((tmp_path / "saved").iterdir())) == 3


def test_image_files_never_write_through_a_planted_symlink(replies, client, tmp_path):
    """The temp names image files were written through (``NAME.png.<pid>.tmp``, predictable
    from the image's hash and the process id) hold planted symlinks: ``image_dir=`` and
    ``save_images`` still write every image whole and the victim is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    names = [hashlib.sha256(r["images"][0]["data"]).hexdigest()[:32] + ".png" for r in replies["reply"].to_list()[:3]]
    for directory in ("generated", "saved"):
        (tmp_path / directory).mkdir()
        for name in names:
            (tmp_path / directory / f"{name}.{os.getpid()}.tmp").symlink_to(victim)
    files = replies.with_columns(
        reply=gf.generate("prompt", config=IMAGES, image_dir=str(tmp_path / "generated"), client=client)
    )
    saved = gf.save_images(replies["reply"], tmp_path / "saved")
    assert victim.read_bytes() == b"precious"
    written = [i["path"] for r in files["reply"].to_list() for i in r["images"]] + [
        p for ps in saved.to_list() for p in ps
    ]
    assert sorted(Path(p).name for p in written) == sorted(names * 2)
    assert all(not Path(p).is_symlink() and Path(p).read_bytes().startswith(b"\x89PNG") for p in written)


def test_show_and_save_images_embed_only_images(tmp_path, image_bytes):
    """gf.show embeds only bytes that sniff as images (a text file's contents never reach the
    page; a FIFO or /dev/zero is never opened) and says why for the rest; save_images refuses
    what is not an image, naming the row."""
    notes = tmp_path / "notes.txt"
    notes.write_text("sk-live-0123456789 do not share")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    png = image_bytes("PNG", (10, 10))
    values = pl.Series(
        "images", [str(notes), str(fifo), "/dev/zero", str(tmp_path), png, b"<svg onload=alert(1)>"], dtype=pl.Object
    )
    markup = gf.show(pl.Series("images", [[v] for v in values.to_list()], dtype=pl.Object), n=10).data
    srcs = _srcs(markup)
    assert srcs == [f"data:image/png;base64,{base64.b64encode(png).decode()}"]
    assert "sk-live" not in markup and base64.b64encode(b"sk-live").decode()[:8] not in markup
    assert markup.count("is not a PNG, JPEG") == 2 and markup.count("is not a regular file") == 2
    assert "is a directory" in markup
    with pytest.raises(gf.InputError, match=r"save_images: row 1: image bytes is not a PNG, JPEG"):
        gf.save_images(pl.Series("r", [[png], [b"#!/bin/sh\nrm -rf ~"]]), tmp_path / "saved")
    with pytest.raises(gf.InputError, match=r"save_images: row 0: .*is a directory"):
        gf.save_images(pl.Series("r", [[str(tmp_path)]]), tmp_path / "saved")
    assert [p.suffix for p in (tmp_path / "saved").iterdir()] == [".png"]  # nothing but the image


def test_a_video_or_audio_value_is_named_not_embedded(tmp_path, image_bytes):
    """Video and audio now sniff as media the API takes, but they are not images: gf.show says
    what each is instead of an <img>, and save_images refuses them naming the row."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isommp41\x00\x00\x00\x08mdat")
    wav = b"RIFF\x04\x00\x00\x00WAVE"
    png = image_bytes("PNG", (10, 10))
    markup = gf.show(pl.Series("images", [[str(video)], [wav], [png]], dtype=pl.Object), n=10).data
    assert _srcs(markup) == [f"data:image/png;base64,{base64.b64encode(png).decode()}"]
    assert f"{video} is video/mp4, not an image" in markup and "the value is audio/wav, not an image" in markup
    with pytest.raises(gf.InputError, match=r"save_images: row 0: .*clip.mp4 is video/mp4, not an image"):
        gf.save_images(pl.Series("r", [[str(video)]]), tmp_path / "saved")


def test_show_never_hands_an_image_url_to_the_browser(image_server, image_bytes, tmp_path, monkeypatch):
    """An image URL is never put in the page as an <img src> (the viewer's browser would fetch
    it unchecked, from the viewer's own network too): gf.show fetches it as save_images does
    and embeds the bytes, or says why not. A loopback URL is refused without a request, as a
    network-path reference (//host/...) is; with embed=False a URL is shown as escaped text."""
    png = image_bytes("PNG", (12, 9))
    as_png = {"Content-Type": "image/png"}
    server = image_server(
        {"/fox.png": (200, as_png, png), "/token.png": (200, as_png, b"SECRET-TOKEN-77 not an image")}
    )
    fox = f"{server.url}/fox.png"
    hostile = f'{fox}?"><script>alert(1)</script>'
    network_path = "//" + fox.split("//", 1)[1]
    # What a browser still reads as another host (it drops tabs, newlines and leading spaces).
    host = fox.split("//", 1)[1]
    disguised = [f"http:{host}", f"/\\{host}", f"\\/{host}", f" //{host}", f"\t {fox}", f"ht\ntp://{host}"]
    values = [[fox], [{"mime_type": None, "data": None, "path": fox}], [hostile], [network_path], disguised]
    grid = pl.Series("images", values, dtype=pl.Object)
    embedded, linked = gf.show(grid, n=10).data, gf.show(grid, n=10, embed=False).data
    for markup in (embedded, linked):
        assert _srcs(markup) == [] and "<script>" not in markup
    assert embedded.count("127.0.0.1 is a loopback address") == 3 and "cannot read image file" in embedded
    assert linked.count(f"image URL (not fetched, embed=False): {fox}") == 3
    assert server.requested == []  # nothing fetched, by gemframe or (no <img src>) by a browser
    with pytest.raises(gf.InputError, match=r"save_images: row 0: .*127.0.0.1 is a loopback address"):
        gf.save_images(pl.Series("r", [[fox]]), tmp_path / "saved")  # the same rule

    # Were 127.0.0.1 public (this test alone counts it so), the URL is fetched and its bytes
    # embedded when they are an image; bytes that are not are never quoted.
    from gemframe._core import payload

    real = payload._refusal
    monkeypatch.setattr(payload, "_refusal", lambda address: None if str(address) == "127.0.0.1" else real(address))
    markup = gf.show(pl.Series("images", [[fox], [f"{server.url}/token.png"]], dtype=pl.Object), n=10).data
    assert _srcs(markup) == [f"data:image/png;base64,{base64.b64encode(png).decode()}"]
    assert "SECRET" not in markup and "/token.png&#x27; is not a PNG, JPEG" in markup
    assert server.requested == ["/fox.png", "/token.png"]
