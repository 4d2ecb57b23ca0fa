"""The Hydra entry point end to end: tables, figures, headline.json; the golden results are reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from scheduler.records import COLUMNS
from sim.app import run_experiments
from sim.config import register_configs

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "results" / "golden"
EXPERIMENTS = ("context_sweep", "shared_bandwidth", "chunk_size", "first_layer", "trace", "load_sweep")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=smoke",
                f"results_dir={out}",
                f"figures_dir={out / 'figures'}",
                "progress=false",
            ],
        )
    results = run_experiments(cfg)
    return out, results


def test_every_experiment_writes_tables_with_hash_and_seed(smoke_run):
    out, results = smoke_run
    assert set(results) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        req = pd.read_csv(out / name / "requests.csv")
        summ = pd.read_csv(out / name / "summary.csv")
        assert set(COLUMNS) <= set(req.columns)
        assert len(req) > 0 and len(summ) > 0
        assert req.config_hash.nunique() == 1 and (req.seed == 0).all()
        assert summ.config_hash.nunique() == 1
        assert (req.ttft_s > 0).all()
        assert list((out / "figures").glob(f"{name}_*.png")), f"no figure for {name}"


def test_headline_has_the_required_keys(smoke_run):
    out, _ = smoke_run
    h = json.loads((out / "headline.json").read_text())
    for key in (
        "ttft_ratio_64k_vs_dram",
        "added_ms_4k_vs_dram_layerwise",
        "bw_aware_vs_equal_best",
        "bw_aware_vs_equal_min",
        "bw_aware_vs_bound_max",
        "bw_aware_vs_srtf_best",
        "bw_aware_vs_srtf_min",
        "load_sweep",
        "command",
        "sim_requests_per_s",
    ):
        assert key in h, key
    r = h["ttft_ratio_64k_vs_dram"]
    assert {"vs_dram_layerwise", "vs_dram_whole"} <= set(r)
    assert r["vs_dram_layerwise"] > 1.0  # the object tier is slower than local DRAM on 100 Gbps
    assert h["sim_requests_per_s"] > 0
    assert set(h["targets"]) >= {"bw_aware_vs_equal_best", "added_ms_4k_vs_dram_layerwise"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_golden_results_are_reproduced_exactly(smoke_run, name):
    """results/golden/ is `python -m sim experiment=smoke results_dir=results/golden figures=false`."""
    out, _ = smoke_run
    got = pd.read_csv(out / name / "requests.csv")
    want = pd.read_csv(GOLDEN / name / "requests.csv")
    assert list(got.request_id) == list(want.request_id)
    for col in ("ttft_s", "first_layer_wait_s", "stall_s", "baseline_ttft_s", "bytes_fetched"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-9, atol=1e-12, err_msg=f"{name}.{col}")
    assert list(got.path) == list(want.path)


def test_cli_runs_one_experiment(tmp_path):
    cmd = [
        sys.executable, "-m", "sim", "experiment=chunk_size", "experiment.params.chunk_size.chunk_tokens=[256]",
        "experiment.params.chunk_size.paths=[gather,s3_whole]", f"results_dir={tmp_path}",
        f"figures_dir={tmp_path / 'fig'}", "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "chunk_size" / "requests.csv")
    assert sorted(df.path) == ["gather", "s3_whole"]
    assert not (tmp_path / "headline.json").exists()  # only headline runs write it


def test_object_tier_never_lowers_the_hit_rate(smoke_run):
    out, _ = smoke_run
    s = pd.read_csv(out / "trace" / "summary.csv")
    on = s[s.object_tier].set_index("dram_capacity_GiB").hit_rate_tokens
    off = s[~s.object_tier].set_index("dram_capacity_GiB").hit_rate_tokens
    assert (on >= off - 1e-12).all()
    assert (s.hit_rate_tokens > 0).all()


def test_figures_go_under_the_runs_results_dir(tmp_path):
    """No run writes the committed figures: they follow ``results_dir`` (a sweep's included)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        default = compose(config_name="config")
        sweep = compose(config_name="config", overrides=[f"results_dir={tmp_path / 'seed3'}"])
    assert default.figures_dir == "results/sim/figures"
    assert sweep.figures_dir == str(tmp_path / "seed3" / "figures")
