"""``topology=cluster`` end to end on loopback: a real server and two real agents started with the documented
commands, the harness as the coordinator (emulated compute, tiny model, a few short requests)."""

from __future__ import annotations

import http.client
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.harness.agent_auth import signed_headers
from testbed.harness.coordinator import AgentClient, AgentError
from testbed.harness.jobs import WorkerFailed
from testbed.harness.requests import Req, fresh_prompt
from testbed.harness.runner import RunSpec
from testbed.harness.topology import ClusterTopology, TopologyConfig, TopologyError
from testbed.objectstore.launch import stop_process
from tests.testbed.harness.test_harness import compose

ROOT = Path(__file__).resolve().parents[3]
START_TOL_S = 0.1  # how far an arrival may be from its planned offset after the common start (2 busy cores)


def start_agent(tmp: Path, token_file: Path | None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """``python -m testbed.harness.agent`` on a free port (``--port 0`` + ready file); returns (process, URL)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    cmd = [
        sys.executable,
        "-m",
        "testbed.harness.agent",
        "--host",
        host,
        "--port",
        "0",
        "--ready-file",
        str(ready),
    ]
    cmd += ["--work-dir", str(tmp / "work")] + (["--token-file", str(token_file)] if token_file else [])
    env = {k: v for k, v in os.environ.items() if k != "OBJECTCACHE_AGENT_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    with open(tmp / "agent.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, 2)
            raise RuntimeError(f"agent did not start:\n{(tmp / 'agent.log').read_text()}")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())["url"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A server with --allow-pacer-control and two agents sharing a token file: (server, [agent URLs], token)."""
    from testbed.objectstore.launch import start_server
    from tests.fixtures.servers import TEST_CREDENTIALS

    tmp = tmp_path_factory.mktemp("cluster")
    token_file = tmp / "agent.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    srv = start_server(
        tmp / "storage", args=["--no-fsync", "--allow-pacer-control"], credentials=TEST_CREDENTIALS
    )
    agents = []
    try:
        for i in range(2):
            agents.append(start_agent(tmp / f"agent{i}", token_file))
        yield srv, [url for _, url in agents], token_file
    finally:
        for proc, _ in agents:
            stop_process(proc, 5)
        srv.stop()


def cluster_cfg(cluster, *extra):
    srv, urls, token_file = cluster
    return compose(
        [
            "model.name=tiny", "model.chunk_tokens=256", "progress=false", "topology=cluster",
            f"topology.storage_url={srv.url}", f"topology.workers=[{','.join(urls)}]",
            f"topology.agent_token_file={token_file}", *extra,
        ]
    )  # fmt: skip


def open_loop(n: int, gap_s: float = 0.03) -> list[Req]:
    """``n`` open-loop requests ``gap_s`` apart, alternating 512 and 1024 cached tokens (+64 new)."""
    return [
        Req(f"q{i}", gap_s * i, 512 * (1 + i % 2), 64, fresh_prompt(512 * (1 + i % 2) + 64)) for i in range(n)
    ]


def check_rows(h, reqs, rows) -> None:
    """Rows from every host as planned (request i on host i % 2), real bytes, TTFT at least the emulated
    compute, and arrivals at their offset from the one common start (on the coordinator's clock)."""
    assert [r["request_id"] for r in rows] == [q.request_id for q in reqs]
    assert {r["host"] for r in rows} == {0, 1}
    for i, (q, r) in enumerate(zip(reqs, rows)):
        assert r["host"] == i % 2 and not r["error"], r
        assert math.isfinite(r["ttft_s"]) and r["ttft_s"] >= r["compute_s"] > 0
        assert r["bytes_fetched"] == h.setup.spec.kv_bytes(q.cached_tokens)
        assert abs(r["arrival_s"] - q.arrival_s) < START_TOL_S
        assert abs(r["arrival_abs_s"] - r["start_s"] - q.arrival_s) < START_TOL_S
    assert len({r["start_s"] for r in rows}) == 1


def health(srv) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{srv.url}/_objectcache/health", timeout=5) as r:
        return json.loads(r.read())


def test_two_agents_run_a_batch_and_the_policy_switch_reaches_the_server(cluster):
    from testbed.harness.runner import build_harness

    srv = cluster[0]
    with build_harness(cluster_cfg(cluster)) as h:
        assert isinstance(h.topology, ClusterTopology) and h.topology.hosts == 2
        for policy, egress_Gbps in (("equal", 0.5), ("bandwidth_aware", 0.8)):
            reqs = open_loop(4)
            run = RunSpec("shared_bandwidth", policy, egress_Gbps, 1.0, len(reqs))
            rows = h.run_batch(run, reqs)
            # The server enforces what this run asked for (set through the admin operation, not a restart).
            assert (health(srv)["policy"], health(srv)["egress_gbps"]) == (policy, pytest.approx(egress_Gbps))
            check_rows(h, reqs, rows)
            recs = h.records(run, reqs, rows)
            assert [r.policy for r in recs] == [policy] * 4 and all(r.note.endswith("cluster") for r in recs)
        desc = h.topology.describe()
    assert 'objectcache_pacer_policy{policy="bandwidth_aware"} 1' in srv.metrics_text()
    assert [c["server"]["policy"] for c in desc["pacer_changes"]] == ["equal", "bandwidth_aware"]
    # The clock offsets are measured when the topology is built and before every run, and recorded.
    clock = desc["clock"]
    assert len(clock["measurements"]) == 3 and len(clock["agents"]) == 2
    assert all(abs(a["offset_s"]) <= clock["max_clock_offset_s"] and a["rtt_s"] > 0 for a in clock["agents"])


def test_the_common_start_is_converted_to_each_agents_clock(cluster):
    """The coordinator's clock runs 3 s ahead of the agents': the measured offsets say so, and the workers
    still start together at the common start (converted per agent); past the bound it is an error."""
    from testbed.harness.runner import build_harness

    with build_harness(cluster_cfg(cluster, "topology.max_clock_offset_s=10")) as h:
        h.topology.clock = lambda: time.time() + 3.0
        reqs = open_loop(2, gap_s=0.05)
        rows = h.run_batch(RunSpec("shared_bandwidth", "equal", 0.0, 1.0, 2), reqs)
        check_rows(h, reqs, rows)
        assert all(r["clock_offset_s"] == pytest.approx(-3.0, abs=0.02) for r in rows)
        assert [a["offset_s"] for a in h.topology.describe()["clock"]["agents"]] == [
            pytest.approx(-3.0, abs=0.02)
        ] * 2
        h.topology.cfg.max_clock_offset_s = 1.0
        with pytest.raises(TopologyError, match=r"clock offset of agent .* is -(29|30)\d\d\.\d ms.*NTP"):
            h.topology.sync_clocks()


def test_a_failing_worker_shows_its_log_tail(cluster):
    from testbed.harness.runner import build_harness

    with build_harness(cluster_cfg(cluster)) as h:
        plan = h.plan(cluster[0].url, open_loop(1))
        plan["requests"][0]["cached_tokens"] = 10 * 256  # more than the prompt holds: the worker raises
        t0 = time.monotonic()
        with pytest.raises(
            WorkerFailed, match=r"(?s)warmup on host 1 failed \(1\).*agent http.*plan caches 10"
        ):
            h.run_worker_action("warmup", plan, host=1)
        assert time.monotonic() - t0 < 10


def test_wrong_token_unsigned_and_oversized_requests_are_refused(cluster):
    srv, urls, _ = cluster
    cfg = TopologyConfig(name="cluster", storage_url=srv.url, workers=urls, agent_token="not-the-token")
    with pytest.raises(AgentError, match=r"refused the coordinator \(401: bad signature.*agent_token_file"):
        ClusterTopology(cfg)
    host, port = urls[0].removeprefix("http://").split(":")

    def raw(method, path, body=b"", headers=None):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    status, answer = raw("GET", "/clock")  # unsigned
    assert status == 401 and "unsigned" in answer["error"]
    # Signed with the right token, but the body was changed on the way: the signature covers it.
    token = cluster[2].read_text().strip()
    headers = signed_headers(token, "POST", "/action", b'{"action": "warmup"}', time.time())
    status, answer = raw("POST", "/action", b'{"action": "probe"}', headers)
    assert status == 401 and "bad signature" in answer["error"]
    # A replayed request (same nonce) is refused even with a valid signature.
    headers = signed_headers(token, "GET", "/clock", b"", time.time())
    assert raw("GET", "/clock", headers=headers)[0] == 200
    assert raw("GET", "/clock", headers=headers) == (401, {"error": "replayed request (nonce seen before)"})
    # Bodies are bounded before they are read (or authenticated).
    status, answer = raw("POST", "/action", headers={"Content-Length": str(1 << 30)})
    assert status == 413


def test_one_action_at_a_time(cluster):
    from testbed.harness.runner import build_harness

    srv, urls, token_file = cluster
    client = AgentClient(urls[0], token_file.read_text().strip(), timeout_s=5)
    with build_harness(cluster_cfg(cluster)) as h:
        plan = h.plan(srv.url, open_loop(1))
    job = client.call("POST", "/action", {"action": "run", "plan": plan, "timeout_s": 30}, ok=(202,))["job"]
    try:
        with pytest.raises(AgentError, match=r"-> 409: busy"):
            client.call("POST", "/action", {"action": "warmup", "plan": plan}, ok=(202,))
        with pytest.raises(AgentError, match="-> 404"):
            client.call("POST", "/action/start", {"job": "someone-else", "start_s": time.time()})
        assert client.call("GET", "/clock")["busy"] is True
    finally:
        client.call("POST", "/action/cancel", {"job": job})
    deadline = time.monotonic() + 10
    while (st := client.call("GET", "/action"))["state"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert st["rc"] != 0 and "cancelled by the coordinator" in st["log_tail"]
    assert client.call("GET", "/clock")["busy"] is False


def test_unreachable_and_silent_agents_fail_within_the_timeout(cluster):
    srv, urls, token_file = cluster
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(AgentError, match=rf"agent {closed} is unreachable .*python -m testbed.harness.agent"):
        ClusterTopology(
            TopologyConfig(
                name="cluster",
                storage_url=srv.url,
                workers=[urls[0], closed],
                agent_token_file=str(token_file),
            )
        )
    assert time.monotonic() - t0 < 5
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = TopologyConfig(name="cluster", storage_url=srv.url, workers=[url], agent_timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(AgentError, match=r"did not answer GET /clock within 1 s"):
            ClusterTopology(cfg)
        assert time.monotonic() - t0 < 5


def test_an_agent_dying_between_runs_fails_the_next_run_quickly(cluster, tmp_path):
    from testbed.harness.runner import build_harness

    proc, url = start_agent(tmp_path / "doomed", cluster[2])
    cfg = cluster_cfg(cluster)
    cfg.topology.workers = [cluster[1][0], url]
    try:
        with build_harness(cfg) as h:
            stop_process(proc, 5)
            t0 = time.monotonic()
            with pytest.raises(AgentError, match=rf"agent {url} is unreachable"):
                h.run_batch(RunSpec("shared_bandwidth", "equal", 0.0, 1.0, 2), open_loop(2))
            assert time.monotonic() - t0 < 15
    finally:
        stop_process(proc, 5)
    client = AgentClient(cluster[1][0], cluster[2].read_text().strip())
    assert client.call("GET", "/clock")["busy"] is False  # the live agent is not left running a worker


def test_policy_kwargs_reach_the_pacer_and_are_reset_by_the_next_run(cluster):
    from testbed.harness.runner import build_harness

    srv = cluster[0]
    with build_harness(cluster_cfg(cluster)) as h:
        h.storage_url("bandwidth_aware", 0.8, {"protect": "always"})
        assert health(srv)["policy_kwargs"] == {"protect": "always"}
        h.storage_url("bandwidth_aware", 0.8, {})
        assert "policy_kwargs" not in health(srv)
        assert [c["requested"].get("policy_kwargs") for c in h.topology.describe()["pacer_changes"]] == [
            {"protect": "always"},
            None,
        ]


def test_a_server_without_pacer_control_is_a_clear_error(cluster, start_objectcache_server):
    plain = start_objectcache_server()
    _, urls, token_file = cluster
    cfg = TopologyConfig(
        name="cluster", storage_url=plain.url, workers=urls, agent_token_file=str(token_file)
    )
    topo = ClusterTopology(cfg)
    with pytest.raises(TopologyError, match=r"refused pacer control \(403.*--allow-pacer-control"):
        topo.start_storage("bandwidth_aware", 1.0)
    cfg.pacer_control = False  # keep the server's own settings, and record them
    assert topo.start_storage("bandwidth_aware", 1.0) == plain.url
    assert topo.describe()["pacer"] == {"policy": "equal", "egress_gbps": None}
    topo.close()


def test_agent_off_loopback_needs_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OBJECTCACHE_AGENT_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-m", "testbed.harness.agent", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 2 and "needs a token" in res.stderr


def test_cluster_config_errors_are_clear():
    with pytest.raises(TopologyError, match="storage_url"):
        ClusterTopology(TopologyConfig(name="cluster"))
    with pytest.raises(TopologyError, match=r"topology.workers.*python -m testbed.harness.agent"):
        ClusterTopology(TopologyConfig(name="cluster", storage_url="http://127.0.0.1:9"))


@pytest.mark.netns
def test_cluster_over_network_namespaces(tmp_path):
    """The cluster roles on separate network stacks: the server in a storage namespace behind a shaped
    link, an agent in each of two GPU-host namespaces bound to its own address (so with a token file), and
    the coordinator -- the documented ``python -m testbed topology=cluster`` command -- in a third host
    namespace, so every hop (coordinator -> agents, coordinator -> server, workers -> server) crosses the
    emulated network, as on real machines."""
    from testbed.harness.topology import NetnsTopology, netns_available

    ok, why = netns_available()
    if not ok:
        print(f"skipping: {why}")
        pytest.skip(why)
    token_file = tmp_path / "agent.token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    token_file.chmod(0o600)
    cfg = TopologyConfig(name="netns", hosts=3, storage_Gbps=0.5, server_args=["--allow-pacer-control"])
    procs = []
    with NetnsTopology(cfg) as topo:
        storage_url = topo.start_storage("equal", 0.0)
        urls = []
        for i in (1, 2):
            d = tmp_path / f"agent{i}"
            d.mkdir()
            argv = [sys.executable, "-m", "testbed.harness.agent", "--host", topo.host_addr(i), "--port", "9200",
                    "--token-file", str(token_file), "--ready-file", str(d / "ready.json"),
                    "--work-dir", str(d / "work")]  # fmt: skip
            procs.append(topo.popen_on_host(i, argv, d / "agent.log"))
            urls.append(f"http://{topo.host_addr(i)}:9200")
        try:
            deadline = time.monotonic() + 20
            while not all((tmp_path / f"agent{i}" / "ready.json").exists() for i in (1, 2)):
                dead = [p for p in procs if p.poll() is not None]
                assert not dead and time.monotonic() < deadline, [
                    (tmp_path / f"agent{i}" / "agent.log").read_text() for i in (1, 2)
                ]
                time.sleep(0.05)
            results = tmp_path / "results"
            cmd = [sys.executable, "-m", "testbed", "topology=cluster", f"topology.storage_url={storage_url}",
                   f"topology.workers=[{','.join(urls)}]", f"topology.agent_token_file={token_file}",
                   "model.name=tiny", "model.chunk_tokens=256", "compute_mode=emulated", "progress=false",
                   "experiment=testbed_smoke", "experiment.runs=[shared_bandwidth]",
                   f"results_dir={results}"]  # fmt: skip
            log = tmp_path / "coordinator.log"
            coord = topo.popen_on_host(0, cmd, log)
            rc = coord.wait(180)
            assert rc == 0, log.read_text()[-3000:]
        finally:
            for p in procs:
                stop_process(p, 5)
    import pandas as pd

    (table,) = list(results.glob("*/requests.csv"))
    df = pd.read_csv(table)
    meta = json.loads((table.parent / "run.json").read_text())
    assert len(df) == 6 and set(df.policy) == {"equal", "bandwidth_aware"}  # 3 requests x 2 policies
    assert df.ttft_s.notna().all() and (df.ttft_s >= df.compute_s).all()
    assert (df.bytes_fetched > 0).all()
    topo_meta = meta["topology"]
    assert topo_meta["topology"] == "cluster" and len(topo_meta["workers"]) == 2
    # The coordinator measured both agents' clocks across the emulated network before every run, and the
    # server confirmed each pacer switch.
    clock = topo_meta["clock"]
    assert [a["url"] for a in clock["agents"]] == urls
    assert len(clock["measurements"]) >= 2 and all(len(m["offsets_s"]) == 2 for m in clock["measurements"])
    assert all(abs(a["offset_s"]) < 0.05 and a["rtt_s"] > 0 for a in clock["agents"])
    changes = topo_meta["pacer_changes"]
    assert [c["server"]["policy"] for c in changes] == ["equal", "bandwidth_aware"]
    assert all(c["server"] == c["requested"] for c in changes)
