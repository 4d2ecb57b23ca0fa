"""Every notebook runs top to bottom against the committed golden results, writes its figures where it is told
and changes no committed file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernelspec for this interpreter (the venv's python), registered in a temp dir."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernels")
    install(kernel_name="objectcache-test", prefix=str(prefix))
    os.environ["JUPYTER_PATH"] = (
        str(prefix / "share" / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    )
    return "objectcache-test"


def test_there_is_one_notebook_per_experiment():
    names = {p.stem for p in NOTEBOOKS}
    assert {"context_sweep", "shared_bandwidth", "chunk_size", "first_layer", "trace"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_name, tmp_path, monkeypatch):
    from tests.sim.test_entry_points import snapshot

    monkeypatch.setenv("OBJECTCACHE_ROOT", str(ROOT))
    monkeypatch.setenv("OBJECTCACHE_RESULTS", str(ROOT / "results" / "golden"))
    monkeypatch.setenv("OBJECTCACHE_FIGURES", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name=kernel_name, resources={"metadata": {"path": str(ROOT)}}
    )
    before = snapshot()
    client.execute()
    pngs = list(tmp_path.glob(f"{path.stem}*.png"))
    assert pngs, f"{path.name} saved no figure"
    assert snapshot() == before, f"{path.name} changed files in the repository"
