"""The notebooks run top to bottom on the emulator, as a user would run them."""

import base64

import nbformat
import pytest
from nbclient import NotebookClient


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_executes(repo_root, tmp_path, monkeypatch, name):
    monkeypatch.setenv("GEMFRAME_CACHE_DIR", str(tmp_path / "cache"))
    notebook = nbformat.read(repo_root / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(repo_root / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "cached rows: 11 of 11" in text
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG")
