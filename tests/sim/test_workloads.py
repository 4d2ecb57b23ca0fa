"""Workloads (synthetic shared-prefix generator, Mooncake loader) and the shared metrics function."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scheduler.records import RequestRecord
from sim.config import WorkloadConfig
from sim.metrics import summarize, to_frame
from sim.workloads import load_mooncake, synthetic, write_mooncake


def test_synthetic_is_seeded_and_shares_prefixes():
    cfg = WorkloadConfig(num_requests=120, system_prompts=3, turns=3)
    a = synthetic(cfg, np.random.default_rng(5))
    b = synthetic(cfg, np.random.default_rng(5))
    assert [(r.request_id, r.arrival_s, r.hash_ids) for r in a] == [
        (r.request_id, r.arrival_s, r.hash_ids) for r in b
    ]
    assert len(a) == 120
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))
    # System prompts are shared across sessions; a session's later turn extends its earlier turn.
    firsts = {tuple(r.hash_ids[: cfg.system_prompt_tokens // cfg.block_tokens]) for r in a}
    assert len(firsts) <= cfg.system_prompts
    by_id = {r.request_id: r for r in a}
    t0, t1 = by_id["s0.0"], by_id["s0.1"]
    assert t1.hash_ids[: len(t0.hash_ids)] == t0.hash_ids and t1.input_length > t0.input_length


def test_closed_loop_assigns_clients():
    cfg = WorkloadConfig(num_requests=30, arrival="closed", clients=4)
    reqs = synthetic(cfg, np.random.default_rng(0))
    assert {r.client for r in reqs} <= set(range(4)) and all(r.arrival_s == 0.0 for r in reqs)
    with pytest.raises(ValueError, match="arrival"):
        synthetic(WorkloadConfig(arrival="bursty"), np.random.default_rng(0))


def test_mooncake_round_trip_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1500, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 2500, "input_length": 600, "output_length": 5, "hash_ids": [1, 9]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reqs = load_mooncake(path)
    assert [r.arrival_s for r in reqs] == [0.0, 2.5]
    assert reqs[1].hash_ids == [1, 9] and reqs[0].input_length == 1500
    out = tmp_path / "w.jsonl"
    write_mooncake(reqs, out)
    again = load_mooncake(out)
    assert [(r.arrival_s, r.input_length, r.hash_ids) for r in again] == [
        (r.arrival_s, r.input_length, r.hash_ids) for r in reqs
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_length": 3}\n')
    with pytest.raises(ValueError, match="Mooncake"):
        load_mooncake(bad)


def _rec(rid, ttft, base, path="gather"):
    return RequestRecord(
        "e",
        "sim",
        "h",
        0,
        rid,
        "m",
        1000,
        900,
        100,
        path,
        "equal",
        100.0,
        2,
        0.0,
        ttft,
        0.01,
        0.002,
        10**9,
        0.04,
        baseline_ttft_s=base,
    )


def test_summarize_by_hand():
    df = to_frame(
        [_rec("a", 0.100, 0.050), _rec("b", 0.300, 0.050), _rec("c", 0.050, 0.050, "dram_layerwise")]
    )
    assert list(df.added_ttft_s.round(9)) == [0.05, 0.25, 0.0]
    s = summarize(df, by=("path",), num_layers=32).set_index("path")
    g = s.loc["gather"]
    assert g.requests == 2
    assert g.ttft_mean_ms == pytest.approx(200.0)
    assert g.added_ttft_mean_ms == pytest.approx(150.0)
    assert g.stall_per_layer_ms == pytest.approx(2.0 / 31)
    # 2 GB fetched in 2 x (10 ms first-layer wait + 2 ms stall) = 24 ms: 16 Gbit / 0.024 s.
    assert g.fetch_goodput_Gbps == pytest.approx(16 / 0.024, rel=1e-9)
    assert isinstance(s, pd.DataFrame) and s.loc["dram_layerwise"].added_ttft_mean_ms == pytest.approx(0.0)
