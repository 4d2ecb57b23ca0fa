"""A short soak (CI): 64 concurrent clients mixing PUT, GET, gather and existence checks for ~12 s against one
server.  Zero errors, no lost objects, no hung clients, bounded server RSS, no leaked descriptors.  The long
version is ``python -m testbed.bench.soak --duration-s 120 --clients 64`` (results/bench/soak.json)."""

from __future__ import annotations

from testbed.bench.soak import run_soak

MiB = 1 << 20


def test_short_soak_64_clients_no_errors_no_leaks():
    doc = run_soak(duration_s=12.0, clients=64, seed=1, sample_s=0.5)
    rss = doc["server_rss_bytes"]
    print(
        f"\n[soak] {doc['ops_total']} ops in {doc['elapsed_s']:.1f} s ({doc['ops']}), errors {doc['errors']}, "
        f"lost {doc['lost_objects']}, RSS {rss['start'] / MiB:.0f}->{rss['max'] / MiB:.0f}->{rss['end'] / MiB:.0f} MiB, "
        f"fds {doc['server_fds']}, p99 ms { ({k: round(v['p99']) for k, v in doc['latency_ms'].items()}) }"
    )
    assert doc["errors"] == 0, doc["error_samples"]
    assert doc["hung_clients"] == []
    assert doc["lost_objects"] == 0 and doc["objects_listed"] == doc["objects_written"] > 0
    assert all(doc["ops"].get(op, 0) > 0 for op in ("put", "get", "gather", "exists")), doc["ops"]
    assert rss["max"] - rss["start"] < 128 * MiB and rss["growth_after_warmup"] < 32 * MiB
    assert doc["server_fds"]["end"] <= doc["server_fds"]["start"] + 2
    assert doc["server_fds"]["max"] > doc["server_fds"]["start"]  # the clients really were connected
    assert doc["ok"]
