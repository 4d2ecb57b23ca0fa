"""The per-phase timeline of one prefill request (tiny model on the CPU, our server on loopback): every
phase is stamped in order, and the command measures and draws it."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.engine.timeline import Timeline
from tests.testbed.engine.test_prefill import (  # noqa: F401  real_tier is a fixture
    CT,
    SPEC,
    check_same,
    make,
    prompt,
    real_tier,
    reference,
    stored_prefix,
)


@pytest.mark.parametrize("reader", ["thread", "process"])
def test_timeline_orders_the_phases_of_one_request(real_tier, reader):  # noqa: F811
    srv, client = real_tier
    first, engine, _, src = stored_prefix(client, 20, 41, reader, 2)
    try:
        ids = torch.cat([first, prompt(9, 42)])
        engine.prefill(ids, src, save=False, max_cached_chunks=20)  # warm-up (the reader process starts)
        engine.timeline = Timeline("cpu")
        r = engine.prefill(ids, src, save=False, max_cached_chunks=20)
        check_same(r, reference(ids))
        tl = json.loads(json.dumps(engine.timeline.to_dict()))
    finally:
        src.close()
    marks, groups, layers = tl["marks_ms"], tl["groups_ms"], tl["layers"]
    assert [row["layer"] for row in layers] == list(range(SPEC.num_layers))
    assert 0 <= marks["load_start"] < marks["ttft"]
    for g in range(2):
        sent, head, byte, lay0 = (
            groups[k][g] for k in ("request_sent", "response_headers", "first_byte", "first_layer")
        )
        assert marks["load_start"] <= sent <= head <= byte <= lay0 <= layers[0]["arrived_ms"] + 1e-6
    prev_end = 0.0
    for row in layers:
        w0, w1 = row["wait_ms"]
        c0, c1 = row["compute_ms"]
        # A layer is computed after its bytes arrived and after the previous layer's compute.
        assert row["arrived_ms"] <= w1 + 1e-6 and w0 <= w1 <= c0 <= c1 and prev_end <= c0
        prev_end = c1
    assert prev_end <= marks["ttft"]


def test_timeline_command_measures_and_draws(tmp_path):
    from testbed.validation.timeline import main

    out, fig = tmp_path / "tl.json", tmp_path / "tl.png"
    args = ["measure", "--model", "tiny", "--device", "cpu", "--configs", "64+16,256+16", "--chunk-tokens"]
    args += ["16", "--streams", "2", "--min-stream-mib", "0", "--link-gbps", "1", "--warmups", "1"]
    args += ["--reader", "thread", "--out", str(out), "--data-dir", str(tmp_path / "store")]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert [r["config"] for r in doc["requests"]] == ["64+16", "256+16"]
    assert all(r["source"] == "objectcache" and not r["fallback"] for r in doc["requests"])
    assert doc["setup"]["model"] == "tiny" and doc["command"].startswith(
        "python -m testbed.validation.timeline"
    )
    assert main(["plot", str(out), "--out", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
