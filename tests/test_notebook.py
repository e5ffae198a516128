"""The notebooks run top to bottom on the emulator, as a user would run them."""

import base64
import re
import shutil

import pytest


def _check_quickstart(text: str, html: str, pngs: list[str]) -> None:
    assert "cached rows: 11 of 11" in text
    assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG")
    # Experiments: try 4 rows, estimate (4 hits, 7 to send), scale up, report, replay from the cache.
    assert re.search(r"cache hits\s+4\n", text) and re.search(r"to send\s+7\n", text)
    assert "'cache_hits': 4, 'requests_sent': 7" in text and "estimated cost this run: $" in text
    assert "gfreport" in html and html.count("<svg") >= 4
    assert "replayed from the cache: 11 | requests sent: 0 | identical answers: True" in text


def _check_images(text: str, html: str, pngs: list[str]) -> None:
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # posters (2), edits (2), the three turns of a conversation (3), plus the two originals
    assert len(images) >= 7 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "cached: True | byte-identical images: True" in text
    assert "model: text+thoughtSignature | inlineData+thoughtSignature" in text
    assert "(turn 3, previously:" in text
    assert "turns answered from the cache: 6 of 6" in text
    assert "'mood': Enum(categories=['calm', 'busy', 'playful'])" in text


CHECKS = {"quickstart.ipynb": _check_quickstart, "images.ipynb": _check_images}


@pytest.mark.parametrize("name", ["quickstart.ipynb", "images.ipynb"])
def test_notebook_executes(repo_root, tmp_path, monkeypatch, name):
    # Imported here, not when the file is collected: every xdist worker collects every file,
    # and nbformat with nbclient (jsonschema...) costs ~0.2 CPU-s.
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("GEMFRAME_CACHE_DIR", str(tmp_path / "cache"))
    path = repo_root / "notebooks" / name
    saved = nbformat.read(path, as_version=4)
    notebook = nbformat.read(path, as_version=4)
    # Run in a copy of the layout the notebooks expect (notebooks/ next to sample_data/): they
    # write out/ beside sample_data/, which must not be the clone (another run, or the other
    # notebook on another worker, may be writing there).
    (tmp_path / "notebooks").mkdir()
    shutil.copytree(repo_root / "sample_data", tmp_path / "sample_data")
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "notebooks")}}
    ).execute()
    assert (tmp_path / "out").is_dir()  # it ran (and wrote) in the copy
    for run in (notebook, saved):  # as executed now, and as saved (images visible without running it)
        outputs = [o for cell in run.cells if cell.cell_type == "code" for o in cell.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        text = "".join(o.get("text", "") for o in outputs)
        html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
        pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
        CHECKS[name](text, html, pngs)
