"""The notebooks run top to bottom on the embedded model (CI executes them; any raised error fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EMBEDDED = Path(__file__).resolve().parent.parent / "promptcontrol" / "assets" / "toy-sd" / "model_index.json"


def test_there_is_a_notebook_per_job():
    assert {p.stem for p in NOTEBOOKS} == {"inspect", "emphasise", "edit"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    assert EMBEDDED.is_file(), "the embedded model must ship with the package"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no picture"
