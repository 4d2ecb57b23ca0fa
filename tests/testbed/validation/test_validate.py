"""Sim-vs-testbed validation: the calibration fit, the error statistics, and a small end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed.validation.calibrate import fit
from testbed.validation.errors import error_stats, per_config

ROOT = Path(__file__).resolve().parents[3]


def synthetic_probes(a_s: float, c_s: float, B_Bps: float, noise: float = 0.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    slice_bytes, layers = 16384, 32
    gathers = []
    for k in (1, 4, 16, 64, 128):
        for _ in range(3):
            lb, tb = k * slice_bytes, k * slice_bytes * layers
            jitter = 1 + noise * rng.standard_normal()
            gathers.append(
                {"chunks": k, "layer_bytes": lb, "total_bytes": tb,
                 "first_layer_s": (a_s + c_s * k + lb / B_Bps) * jitter,
                 "last_byte_s": (a_s + c_s * k + tb / B_Bps) * jitter}
            )  # fmt: skip
    return {
        "gather": gathers,
        "single_get": {"bytes": 524288, "latency_s": [0.004, 0.005]},
        "concurrent_gets": {"n": 8, "bytes_each": 524288, "wall_s": [0.03, 0.031]},
        "compute": {"layer_s": 0.0015, "overshoot_per_layer_s": [1e-5, 2e-5]},
    }


def test_fit_recovers_overhead_per_chunk_cost_and_goodput():
    a, c, B = 2.5e-3, 2.0e-4, 180e6
    res = fit(synthetic_probes(a, c, B), link_Gbps=1.5625)
    assert res["per_request_s"] == pytest.approx(a, rel=1e-6)
    assert res["gather_per_chunk_s"] == pytest.approx(c, rel=1e-6)
    assert res["goodput_Bps"] == pytest.approx(B, rel=1e-6)
    assert res["efficiency"] == pytest.approx(B / (1.5625e9 / 8), rel=1e-6)
    assert res["overrides"]["storage.gather_per_chunk_s"] == pytest.approx(c, rel=1e-3)


def test_fit_is_robust_to_a_little_noise():
    a, c, B = 3e-3, 1.5e-4, 190e6
    res = fit(synthetic_probes(a, c, B, noise=0.01, seed=3), link_Gbps=1.5625)
    assert res["goodput_Bps"] == pytest.approx(B, rel=0.05)
    assert res["per_request_s"] == pytest.approx(a, abs=1.5e-3)


def test_error_stats():
    e = pd.Series([-0.1, 0.02, 0.05, -0.03, np.nan])
    s = error_stats(e)
    assert s["n"] == 4
    assert s["median_abs_err"] == pytest.approx(np.median([0.1, 0.02, 0.05, 0.03]))
    assert s["p90_abs_err"] == pytest.approx(np.percentile([0.1, 0.02, 0.05, 0.03], 90))
    assert s["median_signed_err"] == pytest.approx(np.median([-0.1, 0.02, 0.05, -0.03]))
    assert error_stats(pd.Series([], dtype=float)) == {"n": 0}


def test_per_config_takes_medians_over_repeats():
    rows = []
    for rep, ttft in enumerate([0.10, 0.11, 0.50]):  # one slow outlier
        rows.append({"experiment": "context_sweep", "request_id": f"sweep-1024+128-r{rep}", "policy": "equal",
                     "cached_tokens": 1024, "new_tokens": 128, "note": "sweep;netns", "ttft_s": ttft,
                     "sim_ttft_s": 0.1, "first_layer_wait_s": 0.01, "stall_s": 0.0, "arrival_s": 0.0})  # fmt: skip
    for trial, ttft in enumerate([0.2, 0.4]):
        rows.append({"experiment": "shared_bandwidth", "request_id": "n2-r0-0", "policy": "equal",
                     "cached_tokens": 4096, "new_tokens": 128, "note": f"n2-c1.0-r0-t{trial};netns",
                     "ttft_s": ttft, "sim_ttft_s": 0.3, "first_layer_wait_s": 0.01, "stall_s": 0.0,
                     "arrival_s": 0.0})  # fmt: skip
    out = per_config(pd.DataFrame(rows)).set_index("config")
    assert out.loc["sweep/1024+128", "ttft_s"] == pytest.approx(0.11)
    assert out.loc["sweep/1024+128", "repeats"] == 3
    assert out.loc["sweep/1024+128", "rel_err"] == pytest.approx((0.1 - 0.11) / 0.11)
    assert out.loc["equal/n2-c1.0-r0/n2-r0-0", "ttft_s"] == pytest.approx(0.3)
    assert out.loc["equal/n2-c1.0-r0/n2-r0-0", "rel_err"] == pytest.approx(0.0)


def test_validate_end_to_end_on_loopback(tmp_path):
    """The whole pipeline on a tiny geometry: probes, sweep, shared bandwidth, sim, json."""
    from hydra import compose, initialize_config_dir

    from testbed.harness.experiments import register_testbed_configs
    from testbed.validation.validate import validate

    register_testbed_configs()
    overrides = [
        "model.name=tiny", "model.chunk_tokens=256", "topology=local", "experiment=testbed_validation", "progress=false",
        "experiment.params.probe_repeats=2",
        "experiment.params.context_sweep.prefix_tokens=[512,1024]",
        "experiment.params.context_sweep.new_tokens=[64,256]",
        "experiment.params.context_sweep.repeats=1",
        "experiment.params.shared_bandwidth.concurrency=[2]",
        "experiment.params.shared_bandwidth.caps_Gbps=[0.2]",
        "experiment.params.shared_bandwidth.repeats=1",
        "experiment.params.shared_bandwidth.trials=1",
        "experiment.params.shared_bandwidth.prefix_choices=[1024,2048]",
        "experiment.params.shared_bandwidth.new_choices=[64]",
    ]  # fmt: skip
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("testbed", overrides=overrides)
    res = validate(cfg, out_path=tmp_path / "validation.json", golden_dir=tmp_path / "golden")
    saved = json.loads((tmp_path / "validation.json").read_text())
    for key in (
        "median_abs_err",
        "p90_abs_err",
        "bw_ratio_measured",
        "bw_ratio_sim",
        "command",
        "machine",
        "date_utc",
    ):
        assert key in saved, key
    assert res["n"] == 2 + 4  # 2 held-out sweep configs + 4 shared-bandwidth requests (2 per policy)
    assert math.isfinite(res["median_abs_err"]) and res["p90_abs_err"] >= res["median_abs_err"]
    assert math.isfinite(res["bw_ratio_sim"]) and math.isfinite(res["bw_ratio_measured"])
    table = pd.read_csv(tmp_path / "golden" / "requests.csv")
    assert set(table.split) == {"calibration", "held_out"}
    assert table.sim_ttft_s.notna().all() and table.ttft_s.notna().all()
    bu = saved["bottom_up"]
    assert {"single_get", "concurrent_gets", "gather", "compute_overshoot_per_layer_us"} <= set(bu)


def test_gpu_validation_recovers_the_object_path_and_judges_held_out_configs():
    """``gpu_validation`` on a grid whose 'measured' TTFTs are the simulator's own at known object-path
    parameters (plus the other paths at the defaults): the calibration finds parameters that reproduce the
    held-out configs, and a measurement 30 % off on one held-out point shows up as that point's error."""
    from testbed.validation.gpu_validate import gpu_validation
    from testbed.validation.simulate import SIM_PATH, simulate_ttft_ms

    profile = str(Path(__file__).resolve().parents[3] / "sim/profiles/llama-3.1-8b_h100_measured.csv")
    configs = [(c, n) for c in (4096, 16384, 61440) for n in (128, 4096)]
    raw = {"model": "llama-3.1-8b", "chunk_tokens": 256, "link_Gbps": 100.0, "pinned_h2d_GBps": 55.0,
           "configs": [{"cached_tokens": c, "new_tokens": n, "sources": {}} for c, n in configs]}  # fmt: skip
    truth = simulate_ttft_ms(raw, profile, request_overhead_s=8e-3, ttfb_s=0.0, gather_per_chunk_s=2e-4,
                             efficiency=0.7)  # fmt: skip
    for row in raw["configs"]:
        key = f"{row['cached_tokens']}+{row['new_tokens']}"
        row["sources"] = {s: {"ttft_ms": truth[key][s]} for s in SIM_PATH}
    res = gpu_validation(raw, profile)
    assert res["all_paths"]["n"] == 3 * len(SIM_PATH)  # configs alternate: 3 of 6 held out, every path
    assert res["heldout_n"] == 3 * 2  # the acceptance's two paths
    assert res["all_paths"]["p90_abs_err"] < 0.03 and res["heldout_p90_abs_err"] < 0.03
    assert res["calibration"]["object_calibration_median_abs_err"] < 0.03
    assert 0.6 <= res["calibration"]["efficiency"] <= 0.8
    held = [t for t in res["configs"] if t["split"] == "held_out"]
    off = held[-1]["config"]
    raw["configs"][configs.index(tuple(int(x) for x in off.split("+")))]["sources"]["objectcache_paced"][
        "ttft_ms"
    ] *= 1.3
    res2 = gpu_validation(raw, profile)
    row = next(t for t in res2["configs"] if t["config"] == off and t["path"] == "objectcache_paced")
    assert row["rel_err"] == pytest.approx(1 / 1.3 - 1, abs=0.03)


def test_gpu_validation_fits_the_short_prefix_terms_it_was_given():
    """'Measured' TTFTs and first-layer waits from the simulator with known short-prefix terms (8 streams,
    open per stream and key, handoff per layer, per-stream ceiling): the least-squares calibration on half
    the configs predicts the other half within 2 %, and the noise floor is reported from the repeats."""
    from testbed.validation.gpu_validate import gpu_validation, pooled_validation
    from testbed.validation.simulate import SIM_PATH, gpu_setup, simulate_records

    profile = str(Path(__file__).resolve().parents[3] / "sim/profiles/llama-3.1-8b_h100_measured.csv")
    configs = [(c, n) for c in (2048, 8192, 32768) for n in (128, 1024, 4096)]
    raw = {"model": "llama-3.1-8b", "chunk_tokens": 256, "link_Gbps": 100.0, "pinned_h2d_GBps": 55.0,
           "streams": 8, "gpu": "test GPU",
           "configs": [{"cached_tokens": c, "new_tokens": n, "sources": {}} for c, n in configs]}  # fmt: skip
    truth = simulate_records(
        gpu_setup(
            raw,
            profile,
            request_overhead_s=0.0,
            ttfb_s=0.0,
            rtt_s=0.0,
            gather_streams=8,
            open_per_stream_s=2e-3,
            gather_per_chunk_s=2e-4,
            efficiency=0.9,
            handoff_per_layer_s=2.5e-3,
            stream_ceiling_Bps=1.5e9,
        ),  # fmt: skip
        raw,
    )
    for row in raw["configs"]:
        key = f"{row['cached_tokens']}+{row['new_tokens']}"
        row["sources"] = {
            s: {"ttft_ms": truth[key][s][0], "ttft_ms_all": [truth[key][s][0] * f for f in (0.98, 1.0, 1.02)]}
            for s in SIM_PATH
        }
        row["sources"]["objectcache_paced"]["first_layer_wait_ms"] = truth[key]["objectcache_paced"][1]
    res = gpu_validation(raw, profile)
    assert res["heldout_p90_abs_err"] < 0.02 and res["heldout_median_abs_err"] < 0.01
    assert res["gpu"] == "test GPU"
    assert res["noise_floor"]["objectcache_paced"]["repeat_cv_median"] == pytest.approx(0.0163, abs=1e-3)
    pooled = pooled_validation({"a.json": res, "b.json": res})
    assert pooled["heldout_n"] == 2 * res["heldout_n"] and pooled["met"]
