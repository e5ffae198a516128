"""Pillow drawing for `gemframe.emulator`: inspecting input images and drawing image replies.

Every function is a pure function of its arguments, so the emulator's image replies are
byte-identical for identical requests. Output PNGs are palette images (few colours, optimized)
to keep response bodies small.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont, ImageOps

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

MAX_SIDE = 256
MARGIN = 12
FONT_SIZE = 20
BANNER_FONT_SIZE = 14
BANNER_HEIGHT = 24
WORD = re.compile(r"\S+")  # \s is str.isspace(), the whitespace str.split() splits on
LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # str.splitlines()'s


def inspect_image(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) of an image Pillow can read, or None if it is not one."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "IMAGE", img.size
            img.verify()  # catches truncated or corrupt files without a full decode
    except Exception:  # Pillow signals bad data with many unrelated exception types
        return None
    return fmt, width, height


def colour(key: str) -> tuple[int, int, int]:
    """A deterministic RGB colour for a key."""
    r, g, b = hashlib.sha256(key.encode()).digest()[:3]
    return r, g, b


def render_prompt(text: str, key: str, size: tuple[int, int] = (MAX_SIDE, MAX_SIDE)) -> bytes:
    """A PNG of the prompt text, wrapped, on a background colour derived from key."""
    background = colour(key)
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    font = _font(FONT_SIZE)
    line_height = FONT_SIZE + 4
    max_lines = max(1, (size[1] - 2 * MARGIN) // line_height)
    width = size[0] - 2 * MARGIN
    lines = _wrap(text, font, width, max_lines + 1)  # one more shows whether the text goes on
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], _fit(lines[max_lines - 1] + "...", font, width)]
    for row, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + row * line_height), line, fill=_ink(background), font=font)
    return _png(img, colours=16)


def edit_image(data: bytes, instruction: str, key: str) -> bytes:
    """A visibly edited copy of an input image: fitted to 256 px, inverted, tinted, captioned.

    The caption goes in a banner below the picture so even tiny inputs stay legible.
    """
    with Image.open(io.BytesIO(data)) as src:
        src.draft("RGB", (MAX_SIDE, MAX_SIDE))  # fast JPEG downscale; a no-op for other formats
        upright = ImageOps.exif_transpose(src).convert("RGB")
    picture = ImageOps.contain(upright, (MAX_SIDE, MAX_SIDE))
    tint = colour(key)
    picture = Image.blend(ImageOps.invert(picture), Image.new("RGB", picture.size, tint), 0.3)
    width = max(picture.width, 64)
    out = Image.new("RGB", (width, picture.height + BANNER_HEIGHT), (0, 0, 0))
    out.paste(picture, (0, 0))
    font = _font(BANNER_FONT_SIZE)
    caption = _fit(f"Edit: {' '.join(instruction.split())}", font, width - 8)
    ImageDraw.Draw(out).text((4, picture.height + 4), caption, fill=(255, 255, 255), font=font)
    return _png(out, colours=64)


@lru_cache(maxsize=4)
def _font(size: int) -> Font:
    """Pillow's bundled font; cached because loading it parses an embedded TTF."""
    return ImageFont.load_default(size=size)


def _ink(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on the background."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _wrap(text: str, font: Font, width: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap by rendered width; words wider than a line are split.

    Stops at max_lines lines: a picture shows only a few, and wrapping the rest of a long prompt
    was most of the time spent drawing it. Paragraphs and words are found lazily and fitting is
    measured by `_fitting_prefix`, so the work is bounded by what is drawn, not by the prompt.
    """
    lines: list[str] = []
    for paragraph in _paragraphs(text):
        line = ""
        for match in WORD.finditer(paragraph):  # the words of str.split(), one at a time
            if max_lines is not None and len(lines) >= max_lines:
                return lines
            word = match.group()
            candidate = f"{line} {word}" if line else word
            if _fitting_prefix(candidate, font, width) == len(candidate):
                line = candidate
                continue
            if line:
                lines.append(line)
            while (cut := _fitting_prefix(word, font, width)) < len(word):
                if max_lines is not None and len(lines) >= max_lines:
                    return lines
                lines.append(word[: max(cut, 1)])  # a glyph wider than the line gets one alone
                word = word[max(cut, 1) :]
            line = word
        lines.append(line)
        if max_lines is not None and len(lines) >= max_lines:
            return lines[:max_lines]
    return lines


def _paragraphs(text: str) -> Iterator[str]:
    """``text.splitlines() or [""]``, one line at a time."""
    start = 0
    for match in LINE_BREAK.finditer(text):
        yield text[start : match.start()]
        start = match.end()
    if start < len(text) or not text:
        yield text[start:]


def _fitting_prefix(text: str, font: Font, width: float) -> int:
    """Length of the longest prefix of text no wider than width (0 when not even one glyph fits).

    Rendered width grows with length, so the answer is found by doubling a probe length until
    a prefix is too wide, then bisecting: O(log n) measurements of strings at most twice the
    answer. (Shortening one character at a time from the full length measured the whole text
    again for every character: a 2,000-character unspaced prompt took ~50 s to draw.)
    """
    fits, probe = 0, 1  # text[:fits] fits; text[:probe] is the next length to try
    while probe < len(text) and font.getlength(text[:probe]) <= width:
        fits, probe = probe, probe * 2
    if probe >= len(text):
        if font.getlength(text) <= width:
            return len(text)
        probe = len(text)
    while probe - fits > 1:  # text[:fits] fits, text[:probe] does not
        middle = (fits + probe) // 2
        if font.getlength(text[:middle]) <= width:
            fits = middle
        else:
            probe = middle
    return fits


def _fit(text: str, font: Font, width: int) -> str:
    """text, shortened with '...' if it is wider than width."""
    if _fitting_prefix(text, font, width) == len(text):
        return text
    return text[: max(1, _fitting_prefix(text, font, width - font.getlength("...")))] + "..."


def _png(img: Image.Image, colours: int) -> bytes:
    """Encode as an optimized palette PNG."""
    buffer = io.BytesIO()
    img.quantize(colors=colours).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
