"""Notebooks read the latest run when there is one, else the golden results, and never write committed files."""

from __future__ import annotations

from pathlib import Path

from sim.notebook import locate


def make_root(tmp_path: Path, run: bool) -> Path:
    (tmp_path / "results" / "golden" / "context_sweep").mkdir(parents=True)
    if run:
        d = tmp_path / "results" / "sim" / "context_sweep"
        d.mkdir(parents=True)
        (d / "requests.csv").write_text("request_id\n")
    return tmp_path


def test_golden_results_by_default_with_figures_outside_the_repository(tmp_path, monkeypatch):
    root = make_root(tmp_path, run=False)
    monkeypatch.setenv("OBJECTCACHE_ROOT", str(root))
    monkeypatch.delenv("OBJECTCACHE_RESULTS", raising=False)
    monkeypatch.delenv("OBJECTCACHE_FIGURES", raising=False)
    where = locate("context_sweep")
    assert (where.results, where.source) == (root / "results" / "golden", "golden")
    assert not where.figures.resolve().is_relative_to(root.resolve())


def test_the_latest_run_wins_and_its_figures_go_beside_it(tmp_path, monkeypatch):
    root = make_root(tmp_path, run=True)
    monkeypatch.setenv("OBJECTCACHE_ROOT", str(root))
    monkeypatch.delenv("OBJECTCACHE_RESULTS", raising=False)
    monkeypatch.delenv("OBJECTCACHE_FIGURES", raising=False)
    where = locate("context_sweep")
    assert (where.results, where.source) == (root / "results" / "sim", "latest run")
    assert where.figures == root / "results" / "sim" / "figures"
    # An experiment without a run of its own still reads the golden results.
    assert locate("trace").source == "golden"
    assert locate("context_sweep", runs=None).source == "golden"


def test_the_environment_overrides_both(tmp_path, monkeypatch):
    root = make_root(tmp_path, run=True)
    monkeypatch.setenv("OBJECTCACHE_ROOT", str(root))
    monkeypatch.setenv("OBJECTCACHE_RESULTS", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("OBJECTCACHE_FIGURES", str(tmp_path / "figs"))
    where = locate("context_sweep")
    assert (where.results, where.figures, where.source) == (tmp_path / "elsewhere", tmp_path / "figs", "env")
