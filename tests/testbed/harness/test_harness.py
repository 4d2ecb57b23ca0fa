"""The testbed harness: topologies, the emulated worker's layer model, workloads, the Hydra entry point."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scheduler.records import COLUMNS
from testbed.harness.emulate import emulated_request
from testbed.harness.plan import PlannedRequest
from testbed.harness.requests import sweep_requests, workload_requests
from testbed.harness.runner import RunSpec
from testbed.harness.topology import (
    NetnsTopology,
    cleanup_stale,
    list_namespaces,
    netns_available,
)

ROOT = Path(__file__).resolve().parents[3]
TINY = ["model.name=tiny", "model.chunk_tokens=256", "topology=local", "progress=false"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from testbed.harness.experiments import register_testbed_configs

    register_testbed_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("testbed", overrides=list(overrides))


# --- the emulated GPU -------------------------------------------------------------------------------------


class FakeClient:
    """Yields layer l at ``t0 + arrive_s[l]`` (a scripted network)."""

    last_path = "gather"

    def __init__(self, arrive_s, layer_bytes=100):
        self.arrive_s = arrive_s
        self.layer_bytes = layer_bytes

    def load_layers(self, names, compute_per_layer_s=None, timings=None):
        t0 = time.perf_counter()
        for layer, t in enumerate(self.arrive_s):
            left = t0 + t - time.perf_counter()
            if left > 0:
                time.sleep(left)
            yield layer, memoryview(bytearray(self.layer_bytes))


def expected_ttft(arrive_s, c, overhead):
    busy, stall = 0.0, 0.0
    for layer, r in enumerate(arrive_s):
        begin = max(r, busy)
        if layer:
            stall += begin - busy
        busy = begin + c
    return busy + overhead, stall


def test_emulated_worker_follows_the_layer_model():
    """Layer l computes from max(arrival of l, end of l-1) for compute_per_layer_s; stall = GPU idle after layer 0."""
    # Slow network first (stalls), then fast (layers queue up behind compute).
    arrive = [0.020, 0.045, 0.070, 0.072, 0.074, 0.076]
    c, over = 0.010, 0.005
    req = PlannedRequest("r", 0.0, 512, 64, [1, 2, 3], c, over)
    t0 = time.perf_counter()
    out = emulated_request(FakeClient(arrive), ["a"], req, len(arrive), t0)
    want_ttft, want_stall = expected_ttft(arrive, c, over)
    assert out["ttft_s"] == pytest.approx(want_ttft, abs=0.006)
    assert out["stall_s"] == pytest.approx(want_stall, abs=0.006)
    assert out["first_layer_wait_s"] == pytest.approx(arrive[0], abs=0.004)
    assert out["bytes_fetched"] == 100 * len(arrive)
    # Layers arrived in order and no earlier than scripted.
    assert all(b >= a - 1e-3 for a, b in zip(arrive, out["ready_s"]))
    assert out["ttft_s"] >= len(arrive) * c + over


def test_emulated_worker_reports_a_broken_stream():
    class Broken(FakeClient):
        def load_layers(self, names, compute_per_layer_s=None, timings=None):
            yield 0, memoryview(bytearray(10))
            raise ConnectionError("storage went away")

    req = PlannedRequest("r", 0.0, 512, 64, [1], 0.001, 0.0)
    with pytest.raises(RuntimeError, match="layer 1 never arrived"):
        emulated_request(Broken([0.0]), ["a"], req, 3, time.perf_counter())


# --- workloads -----------------------------------------------------------------------------------------------


def test_workload_requests_reuse_earlier_prefixes():
    from testbed.harness.runner import build_harness

    cfg = compose([*TINY, "workload.num_requests=12", "workload.arrival=closed", "workload.clients=2"])
    with build_harness(cfg) as h:
        reqs = workload_requests(h.setup.model.chunk_tokens, h.workload, np.random.default_rng(0))
    assert len(reqs) == 12
    ct = h.setup.model.chunk_tokens
    assert all(r.cached_tokens % ct == 0 and r.new_tokens >= 1 for r in reqs)
    assert reqs[0].cached_tokens == 0  # nothing is cached before the first request
    assert any(r.cached_tokens > 0 for r in reqs[1:])  # later turns of a session hit the object tier
    assert {r.client for r in reqs} <= {0, 1}


# --- local end to end ------------------------------------------------------------------------------------------


def test_workload_experiment_runs_open_loop():
    """The simulator's synthetic workload (Poisson sessions) against the object tier, with its warm-up."""
    from testbed.harness.experiments import exp_workload
    from testbed.harness.runner import build_harness

    cfg = compose(
        [*TINY, "workload.num_requests=6", "workload.rate_per_s=50", "workload.system_prompt_tokens=1024"]
    )
    with build_harness(cfg) as h:
        recs = exp_workload(h, {"num_requests": 6})
    assert len(recs) == 6 and all(math.isfinite(r.ttft_s) for r in recs)
    hits = [r for r in recs if r.cached_tokens > 0]
    assert hits and all(r.bytes_fetched == h.setup.spec.kv_bytes(r.cached_tokens) for r in hits)
    assert all(r.path == "recompute" for r in recs if r.cached_tokens == 0)


def test_local_context_sweep_rows(tmp_path):
    """Two single requests on loopback: one row each, the simulator's columns, bytes and times consistent."""
    from testbed.harness.experiments import write_table
    from testbed.harness.runner import build_harness

    cfg = compose(TINY)
    with build_harness(cfg) as h:
        reqs = sweep_requests([512, 1024], [64], repeats=1, gap_s=0.01)
        run = RunSpec("context_sweep", "equal", 0.0, 0.0, 1, "test")
        recs = h.records(run, reqs, h.run_batch(run, reqs))
        spec = h.setup.spec
        df = write_table(recs, tmp_path, "sweep", {"command": "test"})
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert (tmp_path / "sweep" / "requests.csv").exists() and (tmp_path / "sweep" / "summary.csv").exists()
    assert len(df) == 2 and df.ttft_s.notna().all()
    assert set(df.source) == {"testbed"} and set(df.compute_mode) == {"emulated"}
    assert list(df.bytes_fetched) == [spec.kv_bytes(512), spec.kv_bytes(1024)]
    # TTFT covers the emulated compute and the wait for the first layer, and is not wildly more.
    assert (df.ttft_s >= df.compute_s + df.first_layer_wait_s - 1e-3).all()
    assert (df.ttft_s < df.compute_s + 1.0).all()
    assert (df.first_layer_wait_s > 0).all() and (df.stall_s >= 0).all()


def test_the_configured_policy_kwargs_reach_the_local_server():
    """``policy.kwargs`` of the configured policy start the server with ``--policy-kwargs``; a policy the
    experiment only compares against runs with its defaults."""
    from testbed.harness.coordinator import storage_health
    from testbed.harness.experiments import policy_kwargs
    from testbed.harness.runner import build_harness

    cfg = compose([*TINY, "policy=bandwidth_aware", "+policy.kwargs.protect=always"])
    with build_harness(cfg) as h:
        assert policy_kwargs(h, "bandwidth_aware") == {"protect": "always"}
        assert policy_kwargs(h, "equal") == {}
        url = h.storage_url("bandwidth_aware", 1.0, policy_kwargs(h, "bandwidth_aware"))
        doc = storage_health(url)
        assert (doc["policy"], doc.get("policy_kwargs")) == ("bandwidth_aware", {"protect": "always"})
        url = h.storage_url("equal", 1.0, policy_kwargs(h, "equal"))
        assert "policy_kwargs" not in storage_health(url)


def test_cpu_compute_mode_runs_the_torch_engine():
    pytest.importorskip("torch")
    from testbed.harness.runner import build_harness

    cfg = compose([*TINY, "compute_mode=cpu"])
    with build_harness(cfg) as h:
        reqs = sweep_requests([512], [32], repeats=1, gap_s=0.01)
        run = RunSpec("context_sweep", "equal", 0.0, 0.0, 1, "cpu")
        rows = h.run_batch(run, reqs)
        (rec,) = h.records(run, reqs, rows)
    assert not rows[0]["error"] and not rows[0].get("note"), rows[0]  # no fallback to recompute
    assert rec.compute_mode == "cpu" and rec.path == "gather"
    assert rec.bytes_fetched == h.setup.spec.kv_bytes(512)
    assert math.isfinite(rec.ttft_s) and rec.ttft_s > 0


def test_python_m_testbed_writes_the_tables(tmp_path):
    """The Hydra entry point: a context sweep and a shared-bandwidth point (two policies) on loopback."""
    cmd = [
        sys.executable, "-m", "testbed", *TINY, f"results_dir={tmp_path}",
        "experiment.params.context_sweep.prefix_tokens=[512]",
        "experiment.params.shared_bandwidth.concurrency=[2]",
        "experiment.params.shared_bandwidth.prefix_choices=[512,1024]",
        "experiment.params.shared_bandwidth.new_choices=[64]",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = pd.read_csv(tmp_path / "testbed_smoke_context_sweep" / "requests.csv")
    shared = pd.read_csv(tmp_path / "testbed_smoke_shared_bandwidth" / "requests.csv")
    assert len(sweep) == 1 and len(shared) == 4
    assert set(shared.policy) == {"equal", "bandwidth_aware"}
    assert shared.ttft_s.notna().all() and (shared.concurrency == 2).all()
    assert (tmp_path / "testbed_smoke_shared_bandwidth" / "run.json").exists()


# --- topologies --------------------------------------------------------------------------------------------


@pytest.mark.netns
def test_netns_topology_is_built_shaped_and_removed():
    ok, why = netns_available()
    if not ok:
        print(f"skipping: {why}")
        pytest.skip(why)
    from testbed.harness.runner import Harness, build_harness

    cfg = compose([*TINY, "topology=netns", "topology.hosts=2", "topology.storage_Gbps=0.5"])
    with build_harness(cfg) as h:
        assert isinstance(h, Harness) and isinstance(h.topology, NetnsTopology)
        names = list(h.topology.namespaces)
        assert len(names) == 4 and set(names) <= set(list_namespaces())  # sw, storage, h0, h1
        qdisc = subprocess.run(
            [*h.topology.prefix("storage"), "tc", "qdisc", "show"], capture_output=True, text=True
        ).stdout
        assert "htb" in qdisc
        # A 4 MiB prefix through a 0.5 Gbps storage link takes at least ~60 ms.
        reqs = sweep_requests([16384], [64], repeats=1, gap_s=0.01)
        run = RunSpec("context_sweep", "equal", 0.0, 0.5, 1, "netns")
        (rec,) = h.records(run, reqs, h.run_batch(run, reqs))
        assert rec.bytes_fetched == h.setup.spec.kv_bytes(16384)
        assert rec.ttft_s >= rec.bytes_fetched / (0.5e9 / 8)
    assert not set(names) & set(list_namespaces())


@pytest.mark.netns
def test_stale_namespaces_of_dead_harnesses_are_removed():
    ok, why = netns_available()
    if not ok:
        print(f"skipping: {why}")
        pytest.skip(why)
    # A pid that cannot be alive (above pid_max) names a namespace left by a killed harness.
    stale = "ocnet4999999-sw"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
        assert stale not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_concurrent_sleepers_do_not_drift():
    """Emulated compute sleeps to absolute deadlines: 8 threads x 20 layers stay within a few ms."""
    from testbed.harness.emulate import sleep_until

    errs = []

    def run():
        t0 = time.perf_counter()
        busy = t0
        for _ in range(20):
            busy += 0.002
            sleep_until(busy)
        errs.append(time.perf_counter() - t0 - 0.04)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(errs) < 0.02 and min(errs) >= 0
