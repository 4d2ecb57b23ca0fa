"""The trace-hour replay: one row per (object tier, policy), token shares that add up, and no object bytes
without the object tier."""

from __future__ import annotations

import json

import pytest

from sim.trace_hour import SAMPLE, main


def test_replay_of_the_bundled_sample_under_two_policies(tmp_path):
    out = tmp_path / "hour.json"
    assert main(["--trace", str(SAMPLE), "--limit", "60", "--policies", "equal,srtf", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python -m sim.trace_hour")
    rows = doc["rows"]
    assert [(r["object_tier"], r["policy"]) for r in rows] == [
        (False, "equal"),
        (False, "srtf"),
        (True, "equal"),
        (True, "srtf"),
    ]
    for r in rows:
        assert r["requests"] == 60
        shares = sum(r[f"{t}_token_share"] for t in ("hbm", "dram", "object", "recompute"))
        assert shares == pytest.approx(1.0)
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
    assert all(r["object_bytes"] == 0 and r["object_token_share"] == 0 for r in rows if not r["object_tier"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_missing_trace_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--trace", str(tmp_path / "nope.jsonl")])
    assert "does not exist" in capsys.readouterr().err
