"""Conversations as data: history= columns, gf.turns to continue from a reply, thought
signatures sent back exactly, each turn cached."""

import base64
import io
import json

import polars as pl
import pytest
from PIL import Image

import gemframe as gf

IMAGE_CONFIG = {"response_modalities": ["TEXT", "IMAGE"]}


def _three_turns(df: pl.DataFrame, **kw) -> pl.DataFrame:
    h1 = gf.turns("p1", "r1")
    h2 = gf.turns("p2", "r2", history=h1)
    return (
        df.with_columns(r1=gf.generate("p1", **kw))
        .with_columns(r2=gf.generate("p2", history=h1, **kw))
        .with_columns(r3=gf.generate("p3", history=h2, **kw))
        .with_columns(h2=h2)
    )


@pytest.fixture
def frame():
    return pl.DataFrame(
        {"p1": ["A red fox in the snow", "A lighthouse"], "p2": "Make it night", "p3": "Add a full moon"}
    )


def test_three_turns_send_both_earlier_turns_with_their_signatures(client, emulator, frame):
    out = _three_turns(frame, config=IMAGE_CONFIG, client=client)
    assert emulator.stats.requests == 6
    assert all(out[r].struct.field("error").is_null().all() for r in ("r1", "r2", "r3"))
    # Turn 3's request, exactly as sent: both earlier exchanges, then the new prompt.
    body = json.loads(out.with_columns(q=gf.request("p3", history="h2", config=IMAGE_CONFIG))["q"][0])
    contents = body["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user", "model", "user"]
    assert contents[0]["parts"] == [{"text": "A red fox in the snow"}]
    assert contents[2]["parts"] == [{"text": "Make it night"}]
    assert contents[4]["parts"] == [{"text": "Add a full moon"}]
    for turn, reply in ((contents[1], out["r1"][0]), (contents[3], out["r2"][0])):
        text_part, image_part = turn["parts"]
        assert text_part["text"] == reply["text"]
        assert base64.b64decode(image_part["inlineData"]["data"]) == reply["images"][0]["data"]
        # Each part goes back with the signature the model put on it, and every image has one.
        signatures = [p["thought_signature"] for p in reply["parts"]]
        assert [text_part["thoughtSignature"], image_part["thoughtSignature"]] == signatures
        assert all(signatures) and signatures[0] != signatures[1]
    # The replies reflect the history: turn number, the previous answer, an edit of its image.
    r2, r3 = out["r2"][0], out["r3"][0]
    assert '(turn 3, previously: "Emulated reply to: "Make it night".' in r3["text"]
    assert '(turn 2, previously: "Emulated reply to: "A red fox in the sno...")' in r2["text"]
    image_1, image_2 = (Image.open(io.BytesIO(out[r][0]["images"][0]["data"])) for r in ("r1", "r2"))
    assert image_2.size == (256, 256 + 24)  # an edit of turn 1's image: captioned banner below
    assert image_1.size == (256, 256)


def test_every_turn_is_cached(client, emulator, frame):
    first = _three_turns(frame, config=IMAGE_CONFIG, client=client)
    assert emulator.stats.requests == 6
    again = _three_turns(frame, config=IMAGE_CONFIG, client=client)
    assert emulator.stats.requests == 6  # counted at the server: nothing sent
    assert all(again[r].struct.field("cached").all() for r in ("r1", "r2", "r3"))
    for r in ("r1", "r2", "r3"):
        assert again[r].struct.field("images").to_list() == first[r].struct.field("images").to_list()
    # A different refinement of the same conversation sends one new request per row.
    changed = frame.with_columns(p3=pl.lit("Add a comet"))
    _three_turns(changed, config=IMAGE_CONFIG, client=client)
    assert emulator.stats.requests == 8


def test_an_image_sent_back_without_its_signature_is_rejected(client, emulator, image_bytes):
    boat = image_bytes("PNG", (64, 48), "teal")
    user = {"role": "user", "parts": [{"text": "Draw a boat"}]}
    unsigned = [user, {"role": "model", "parts": [{"data": boat}]}]
    signed = [user, {"role": "model", "parts": [{"data": boat, "thought_signature": "c2lnbmF0dXJl"}]}]
    df = pl.DataFrame(
        {"prompt": ["Make it red", "Make it red"], "history": [unsigned, signed]},
        schema={"prompt": pl.String, "history": gf.HISTORY_DTYPE},  # hand-made turns: give the dtype
    )
    out = df.with_columns(reply=gf.generate("prompt", history="history", config=IMAGE_CONFIG, client=client))
    bad, good = out["reply"].to_list()
    assert bad["error"]["code"] == 400 and bad["error"]["status"] == "INVALID_ARGUMENT"
    assert "Image part is missing a thought_signature" in bad["error"]["message"]
    assert good["error"] is None and len(good["images"]) == 1
    assert emulator.stats.requests == 2


def test_text_turns_and_the_simple_turn_form(client):
    history = [[{"role": "user", "text": "Hello"}, {"role": "model", "text": "Bonjour! How can I help?"}]]
    df = pl.DataFrame({"prompt": ["Say it in English"], "history": history})
    out = df.with_columns(reply=gf.generate("prompt", history="history", client=client))
    assert '(turn 2, previously: "Bonjour! How can I help?")' in out["reply"][0]["text"]
    # Extending a simple-form history gives the canonical dtype, nothing lost.
    extended = out.with_columns(h=gf.turns("prompt", "reply", history="history"))["h"][0].to_list()
    assert [t["role"] for t in extended] == ["user", "model", "user", "model"]
    assert [t["parts"][0]["text"] for t in extended[:3]] == ["Hello", "Bonjour! How can I help?", "Say it in English"]
    with pytest.raises(gf.InputError, match="reply struct"):
        df.with_columns(h=gf.turns("prompt", "prompt"))


def test_a_failed_turn_ends_that_rows_conversation_only(client, emulator):
    df = pl.DataFrame({"p1": ["fine", "[emulator:status=400] broken", None], "p2": ["more", "more", "more"]})
    h1 = gf.turns("p1", "r1")
    out = df.with_columns(r1=gf.generate("p1", client=client)).with_columns(
        r2=gf.generate("p2", history=h1, client=client), h1=h1
    )
    ok, broken, fresh = out["r2"].to_list()
    assert ok["error"] is None and "(turn 2" in ok["text"]
    assert broken["error"]["status"] == "INVALID_INPUT" and "failed" in broken["error"]["message"]
    assert fresh["error"] is None and "(turn" not in fresh["text"]  # nothing asked before: a fresh start
    assert out["h1"][2] is None
    assert emulator.stats.requests == 4  # r1: 2 sent; r2: the broken row sends nothing


def test_conversation_over_image_files_and_an_input_photo(client, emulator, png_path, tmp_path):
    images = tmp_path / "images"
    df = pl.DataFrame({"photo": [str(png_path)], "p1": ["Add a hat"], "p2": ["Now make it blue"]})
    kw = dict(config={"response_modalities": ["IMAGE"]}, client=client, image_dir=str(images))
    h1 = gf.turns("p1", "r1", images="photo")
    run = lambda: df.with_columns(r1=gf.generate("p1", images="photo", **kw)).with_columns(  # noqa: E731
        r2=gf.generate("p2", history=h1, **kw)
    )
    out = run()
    first, second = out["r1"][0]["images"][0]["path"], out["r2"][0]["images"][0]["path"]
    assert first != second and open(first, "rb").read() != open(second, "rb").read()
    body = json.loads(out.with_columns(q=gf.request("p2", history=h1))["q"][0])
    user_1, model_1 = body["contents"][:2]
    assert user_1["parts"][0] == {"text": "Add a hat"}
    assert base64.b64decode(user_1["parts"][1]["inlineData"]["data"]) == png_path.read_bytes()
    (model_image,) = model_1["parts"]  # IMAGE only: one part, signed, read back from its file
    assert model_image["thoughtSignature"] == out["r1"][0]["parts"][0]["thought_signature"]
    assert base64.b64decode(model_image["inlineData"]["data"]) == open(first, "rb").read()
    run()
    assert emulator.stats.requests == 2


def test_history_must_be_a_list_of_turns(client, emulator):
    df = pl.DataFrame({"prompt": ["x"], "history": ["not turns"]})
    with pytest.raises(gf.InputError, match="HISTORY_DTYPE"):
        df.with_columns(reply=gf.generate("prompt", history="history", client=client))
    bad_role = pl.DataFrame({"prompt": ["x"], "history": [[{"role": "assistant", "text": "hi"}]]})
    out = bad_role.with_columns(reply=gf.generate("prompt", history="history", client=client))
    assert "use 'user' or 'model'" in out["reply"][0]["error"]["message"]
    assert emulator.stats.requests == 0
    assert (
        pl.DataFrame({"p": ["a"], "r": [None]}, schema={"p": pl.String, "r": gf.REPLY_DTYPE})
        .with_columns(h=gf.turns("p", "r"))
        .schema["h"]
        == gf.HISTORY_DTYPE
    )
