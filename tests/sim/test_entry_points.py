"""Every command a newcomer may try answers ``--help`` and changes nothing: no file in the repository, none in
the directory it runs in.  ``python -m sim`` refuses a testbed experiment with a message naming the testbed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WATCHED = ("results", "configs", "notebooks", "sim")


def snapshot() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under the directories an entry point could write to."""
    out = {}
    for top in WATCHED:
        for p in (ROOT / top).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                st = p.stat()
                out[str(p.relative_to(ROOT))] = (st.st_mtime_ns, st.st_size)
    return out


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_help_is_harmless(module: str, tmp_path: Path) -> str:
    """Run ``python -m <module> --help`` from an empty directory; return its output."""
    before = snapshot()
    res = run_module(module, ["--help"], tmp_path)
    assert res.returncode == 0, f"{module} --help failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert res.stdout.strip(), f"{module} --help printed nothing"
    assert list(tmp_path.iterdir()) == [], f"{module} --help wrote {list(tmp_path.iterdir())}"
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{module} --help changed {changed}"
    return res.stdout


@pytest.mark.parametrize("module", ["sim", "sim.golden", "sim.bench"])
def test_sim_entry_points_answer_help_without_side_effects(module, tmp_path):
    assert_help_is_harmless(module, tmp_path)


def test_sim_help_says_testbed_experiments_belong_to_the_testbed(tmp_path):
    out = assert_help_is_harmless("sim", tmp_path)
    assert "python -m testbed" in out


def test_sim_refuses_a_testbed_experiment_and_names_the_testbed(tmp_path):
    before = snapshot()
    res = run_module("sim", ["experiment=testbed_smoke", f"hydra.run.dir={tmp_path / 'hydra'}"], tmp_path)
    assert res.returncode != 0
    assert "python -m testbed experiment=testbed_smoke" in res.stderr
    assert "Traceback" not in res.stderr and "KeyError" not in res.stderr
    assert snapshot() == before
