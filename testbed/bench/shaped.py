"""Part 3 of the gather benchmarks (``testbed.bench.gather``): our server and a client on either side of an
HTB-shaped veth link between two network namespaces.

(a) One unpaced gather stream: the fraction of the cap it reaches.  (b) Two concurrent streams with different
compute hints through the server's pacer (``equal``, then ``bandwidth_aware``, pacer capacity 95 % of the cap):
each stream's transfer time against the scheduler's fluid model running the same policy on the same two flows.
The client side runs in its own namespace as ``python -m testbed.bench.shaped SPEC`` (JSON in, JSON out).
Needs root; without it the benchmark reports why it skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scheduler.flows import Link
from scheduler.fluid import FlowState, RequestSpec, advance, next_event_s
from scheduler.geometry import get_model
from scheduler.policies import get_policy
from scheduler.units import Bps_to_gbps, gbps_to_Bps
from testbed import REPO_ROOT
from testbed.bench.common import BUCKET, chunk_names, make_chunk, time_load
from testbed.client import ObjectCacheClient
from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY


def _start_server_in(link, side: str, data_dir: Path, extra: list[str]) -> subprocess.Popen:
    ready = data_dir / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "testbed.objectstore.server", "--host", link.addr[side], "--port", "0"]
    cmd += [
        "--data-dir",
        str(data_dir),
        "--ready-file",
        str(ready),
        "--no-fsync",
        "--log-level",
        "WARNING",
        "--insecure-default-credentials",  # the link's addresses are private to this machine's namespaces
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
    proc = link.popen(side, cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
    log.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"server in {link.ns[side]} did not start: {(data_dir / 'server.log').read_text()[-2000:]}"
            )
        time.sleep(0.05)
    return proc


def _run_client_in(link, side: str, spec: dict) -> dict:
    """Run ``python -m testbed.bench.shaped SPEC`` in the client namespace; returns its JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    res = link.run(
        side,
        [sys.executable, "-m", "testbed.bench.shaped", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
    )
    if res.returncode != 0:
        raise RuntimeError(f"shaped client failed: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def shaped_client(spec: dict) -> dict:
    """Client side of part 3: one stream per entry of ``spec['streams']`` (concurrently), arrivals recorded."""
    model = get_model(spec["model"])
    sb = model.kv_bytes_per_chunk_layer()
    results: list[dict | None] = [None] * len(spec["streams"])
    barrier = threading.Barrier(len(spec["streams"]))
    t_ref = time.perf_counter()

    def one(i: int, st: dict) -> None:
        with ObjectCacheClient(
            spec["url"], BUCKET, DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, mode="gather"
        ) as c:
            ring = [bytearray(len(st["names"]) * sb) for _ in range(2)]
            barrier.wait()
            t0 = time.perf_counter()
            r = time_load(c, st["names"], ring, compute_per_layer_s=st.get("compute_per_layer_s"))
            r["start_s"] = t0 - t_ref
            r["arrivals_s"] = [a + r["start_s"] for a in r["arrivals_s"]]
            results[i] = r

    threads = [threading.Thread(target=one, args=(i, st)) for i, st in enumerate(spec["streams"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a stream failed")
    return {"streams": results}


def fluid_transfer_s(
    policy: str, capacity_Bps: float, layer_bytes: list[int], layers: int, cpl_s: list[float]
):
    """Transfer completion time of each flow (all start at 0) under ``policy`` in the scheduler's fluid model.

    The same model and policy code the simulator uses; the server's pacer asks the same policy at the same
    events, so a paced real run should track it.
    """
    states = [
        FlowState(RequestSpec(f"s{i}", 0.0, float(lb), layers, c, ("egress",)))
        for i, (lb, c) in enumerate(zip(layer_bytes, cpl_s))
    ]
    links = {"egress": Link("egress", capacity_Bps)}
    pol = get_policy(policy)
    now, done = 0.0, {}
    advance(states, {}, now, now)
    for _ in range(8 * layers * len(states) + 16):
        pending = [st for st in states if not st.transfer_done]
        if not pending:
            break
        rates = pol.allocate(now, [st.view(now) for st in pending], links)
        t_next = next_event_s(pending, rates, now)
        advance(pending, rates, now, t_next)
        now = t_next
        for st in pending:
            if st.transfer_done:
                done.setdefault(st.flow_id, now)
    return [done[f"s{i}"] for i in range(len(states))]


def bench_shaped(model, cap_Gbps: float, n_chunks: int, log) -> dict:
    """A benchmark driver: namespaces, server, the two measurements and their fluid-model predictions in the
    order they run."""
    from testbed.harness.netns import NetnsUnavailable, ShapedLink
    from testbed.objectstore.store import FilesystemStore

    sb = model.kv_bytes_per_chunk_layer()
    with tempfile.TemporaryDirectory(prefix="oc-shaped-") as tmp:
        data_dir = Path(tmp)
        store = FilesystemStore(data_dir / "store", fsync=False)
        store.create_bucket(BUCKET)
        names = chunk_names(model, n_chunks, "shaped")
        for i, name in enumerate(names):
            w = store.begin_write(BUCKET, name)
            w.write(make_chunk(model, i))
            w.commit()
        try:
            link = ShapedLink(cap_Gbps)
        except NetnsUnavailable as e:
            return {"skipped": str(e)}
        with link:
            out: dict = {"cap_Gbps": cap_Gbps, "n_chunks": n_chunks}
            proc = _start_server_in(link, "a", data_dir, [])
            url = f"http://{link.addr['a']}:{json.loads((data_dir / 'ready.json').read_text())['port']}"
            spec = {"url": url, "model": model.name, "streams": [{"names": names}]}
            singles = [_run_client_in(link, "b", spec)["streams"][0] for _ in range(2)]
            proc.terminate()
            proc.wait(10)
            best = min(singles, key=lambda r: r["seconds"])
            rate = best["bytes"] / best["seconds"]
            out["single_stream"] = {
                "seconds": best["seconds"],
                "bytes": best["bytes"],
                "Gbps": Bps_to_gbps(rate),
                "fraction_of_cap": Bps_to_gbps(rate) / cap_Gbps,
                "runs_s": [r["seconds"] for r in singles],
            }
            log(
                f"shaped {cap_Gbps} Gbps: one stream {Bps_to_gbps(rate):.3f} Gbps ({rate / gbps_to_Bps(cap_Gbps):.1%})"
            )
            # Two streams, same chunks count each, different compute: one slow GPU (pace 30 % of the cap),
            # one fast (pace 3x the cap: it could use the whole link).
            half = n_chunks // 2
            lb = half * sb
            egress_Gbps = 0.95 * cap_Gbps
            cap_Bps = gbps_to_Bps(egress_Gbps)
            cpls = [lb / (0.3 * cap_Bps), lb / (3.0 * cap_Bps)]
            streams = [
                {"names": names[:half], "compute_per_layer_s": cpls[0]},
                {"names": names[half : 2 * half], "compute_per_layer_s": cpls[1]},
            ]
            out["policies"] = {}
            for policy in ("equal", "bandwidth_aware"):
                proc = _start_server_in(
                    link, "a", data_dir, ["--egress-gbps", str(egress_Gbps), "--policy", policy]
                )
                url = f"http://{link.addr['a']}:{json.loads((data_dir / 'ready.json').read_text())['port']}"
                res = _run_client_in(link, "b", {"url": url, "model": model.name, "streams": streams})
                proc.terminate()
                proc.wait(10)
                spans = [st["arrivals_s"][-1] - st["start_s"] for st in res["streams"]]
                layer_rates = [lb * model.num_layers / t for t in spans]
                # The policy in the fluid model at the pacer's capacity, and at the aggregate rate the pacer
                # actually delivered (separates "does the split follow the policy" from pacer efficiency).
                agg_Bps = 2 * lb * model.num_layers / max(spans)
                fluid = fluid_transfer_s(policy, cap_Bps, [lb, lb], model.num_layers, cpls)
                fluid_cal = fluid_transfer_s(policy, agg_Bps, [lb, lb], model.num_layers, cpls)
                err = [abs(t - f) / f for t, f in zip(spans, fluid)]
                err_cal = [abs(t - f) / f for t, f in zip(spans, fluid_cal)]
                out["policies"][policy] = {
                    "egress_Gbps": egress_Gbps,
                    "compute_per_layer_s": cpls,
                    "transfer_s": spans,
                    "mean_rate_Gbps": [Bps_to_gbps(r) for r in layer_rates],
                    "fluid_transfer_s_at_pacer_rate": fluid,
                    "relative_error_at_pacer_rate": err,
                    "aggregate_Gbps": Bps_to_gbps(agg_Bps),
                    "fluid_transfer_s_at_delivered_rate": fluid_cal,
                    "relative_error_at_delivered_rate": err_cal,
                }
                log(
                    f"shaped {policy}: transfer {[f'{t:.2f}' for t in spans]} s, fluid model "
                    f"{[f'{t:.2f}' for t in fluid]} s at {egress_Gbps:.2f} Gbps, "
                    f"{[f'{t:.2f}' for t in fluid_cal]} s at the delivered {Bps_to_gbps(agg_Bps):.2f} Gbps"
                )
            return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m testbed.bench.shaped SPEC_JSON  (the client side of bench_shaped; internal)")
        sys.exit(0 if len(sys.argv) == 2 else 2)
    print(json.dumps(shaped_client(json.loads(sys.argv[1]))))
