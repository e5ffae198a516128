"""Recreate sample_data/: a few small images drawn with Pillow and prompts.parquet.

Run from the repository root: ``python sample_data/make_sample_data.py``. The outputs are
committed; this script documents how they were made.
"""

from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
IMAGES = HERE / "images"


def _canvas(size=(160, 120), color="white"):
    image = Image.new("RGB", size, color)
    return image, ImageDraw.Draw(image)


def make_images() -> None:
    IMAGES.mkdir(exist_ok=True)
    image, draw = _canvas(color="#f4f1e8")
    draw.ellipse((45, 25, 115, 95), fill="#d62828", outline="black", width=3)
    image.save(IMAGES / "red_circle.png", optimize=True)

    image, draw = _canvas(color="#7fb7e6")
    draw.rectangle((0, 80, 160, 120), fill="#4c9a2a")
    draw.polygon([(40, 80), (70, 50), (100, 80)], fill="#8b5a2b")
    draw.rectangle((48, 80, 92, 110), fill="#c8a165")
    draw.ellipse((120, 10, 145, 35), fill="#ffd60a")
    image.save(IMAGES / "house.jpg", quality=80)

    image, draw = _canvas(size=(160, 100), color="white")
    for i, height in enumerate((30, 55, 80, 45)):
        draw.rectangle(
            (20 + i * 32, 95 - height, 42 + i * 32, 95), fill=("#264653", "#2a9d8f", "#e9c46a", "#e76f51")[i]
        )
    image.save(IMAGES / "bar_chart.webp", quality=80)

    image, draw = _canvas(size=(180, 60), color="#1d3557")
    draw.text((12, 18), "GEMFRAME", fill="#f1faee", font=ImageFont.load_default(size=24))
    image.save(IMAGES / "sign.png", optimize=True)


ROWS = [
    ("Describe this image in one sentence.", "sample_data/images/red_circle.png", "caption"),
    ("What is in this picture? List the objects.", "sample_data/images/house.jpg", "caption"),
    ("Which bar is the tallest, and what colour is it?", "sample_data/images/bar_chart.webp", "caption"),
    ("Read the text on this sign.", "sample_data/images/sign.png", "caption"),
    ("Render the words 'OPEN 24/7' as a neon sign on a brick wall.", None, "text_rendering"),
    ("A poster that says 'Data Day 2026' in bold serif letters.", None, "text_rendering"),
    ("Make the circle blue and add a soft shadow.", "sample_data/images/red_circle.png", "edit"),
    ("Turn this house into a winter scene with snow on the roof.", "sample_data/images/house.jpg", "edit"),
    ("Write a haiku about dataframes.", None, "text"),
    ("Explain in two sentences what a parquet file is.", None, "text"),
    (None, None, "empty"),
    ("Summarise: polars is a fast dataframe library written in Rust.", None, "text"),
]


def make_prompts() -> None:
    prompt, image_path, task = zip(*ROWS)
    frame = pl.DataFrame(
        {"id": list(range(len(ROWS))), "task": list(task), "prompt": list(prompt), "image_path": list(image_path)},
        schema={"id": pl.Int64, "task": pl.String, "prompt": pl.String, "image_path": pl.String},
    )
    frame.write_parquet(HERE / "prompts.parquet")


if __name__ == "__main__":
    make_images()
    make_prompts()
