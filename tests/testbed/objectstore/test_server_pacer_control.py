"""The server's admin operation ``POST /?objectcache-pacer``: switching policy and egress rate at run time."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from testbed.wire.frames import LAYER_MAGIC, iter_frames
from tests.fixtures.servers import TENANT_ACCESS_KEY, TENANT_SECRET_KEY, signed_request, wait_for_metrics
from tests.testbed.objectstore.test_gather import TINY, server_with_chunks

PACER = "/?objectcache-pacer"


def set_pacer(srv, doc, **kw):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    resp = signed_request(srv, "POST", PACER, body=body, headers={"Content-Type": "application/json"}, **kw)
    return resp.status, resp.read()


def health(srv) -> dict:
    with urllib.request.urlopen(f"{srv.url}/_objectcache/health", timeout=5) as r:
        return json.loads(r.read())


def s3_code(body: bytes) -> str:
    m = re.search(rb"<Code>(.*?)</Code>", body)
    return m.group(1).decode() if m else ""


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """A server started unpaced with --allow-pacer-control, holding two tiny chunks (512 KiB a gather)."""
    with server_with_chunks(
        tmp_path_factory.mktemp("pacerctl"), ["--allow-pacer-control"], "ctl", 2, 31
    ) as sc:
        yield sc


def timed_gather(srv, keys) -> float:
    body = json.dumps({"version": 1, "keys": keys, "stream_id": "ctl"}).encode()
    t0 = time.monotonic()
    resp = signed_request(srv, "POST", "/ctl?gather", body=body)
    frames = list(iter_frames(resp.read))
    assert resp.status == 200 and len(frames) == TINY.num_layers
    return time.monotonic() - t0


def test_allowed_change_sets_the_rate_of_later_gathers(controlled):
    srv, keys = controlled
    stream_bytes = len(keys) * TINY.kv_bytes_per_chunk_layer() * TINY.num_layers  # 512 KiB
    slow_Bps = 2e6
    status, body = set_pacer(srv, {"policy": "bandwidth_aware", "egress_gbps": slow_Bps * 8 / 1e9})
    assert status == 200, body
    assert json.loads(body) == {
        "policy": "bandwidth_aware",
        "egress_gbps": pytest.approx(0.016),
        "active_streams": 0,
    }
    slow_s = timed_gather(srv, keys)
    assert slow_s >= 0.9 * stream_bytes / slow_Bps  # ~0.26 s at 2 MB/s; unpaced it takes a few ms
    # 40x faster: the next stream follows the new rate (the server was not restarted).  A change is refused
    # while a stream is open, and the server books the stream's end just after its last byte.
    wait_for_metrics(srv, ["objectcache_active_streams 0"])
    status, body = set_pacer(srv, {"egress_gbps": 40 * slow_Bps * 8 / 1e9})
    assert status == 200 and json.loads(body)["policy"] == "bandwidth_aware"  # a left-out key is kept
    fast_s = timed_gather(srv, keys)
    assert fast_s < slow_s / 3
    h = health(srv)
    assert (h["policy"], h["egress_gbps"]) == ("bandwidth_aware", pytest.approx(0.64))
    text = wait_for_metrics(srv, ['objectcache_pacer_policy{policy="bandwidth_aware"} 1'])
    assert 'objectcache_pacer_policy{policy="bandwidth_aware"} 1' in text
    changes = int(re.search(r"objectcache_pacer_changes_total (\d+)", text).group(1))
    # Back to unpaced (0 or null both mean it).
    wait_for_metrics(srv, ["objectcache_active_streams 0"])
    status, body = set_pacer(srv, {"policy": "equal", "egress_gbps": 0})
    assert status == 200 and json.loads(body)["egress_gbps"] is None
    assert health(srv)["egress_gbps"] is None and health(srv)["policy"] == "equal"
    assert f"objectcache_pacer_changes_total {changes + 1}" in srv.metrics_text()


def test_refused_while_streams_are_open(controlled):
    srv, keys = controlled
    assert set_pacer(srv, {"policy": "equal", "egress_gbps": 0.016})[0] == 200  # 2 MB/s: ~0.26 s a gather
    body = json.dumps({"version": 1, "keys": keys}).encode()
    resp = signed_request(srv, "POST", "/ctl?gather", body=body)
    assert resp.status == 200 and resp.read(1000)[:4] == LAYER_MAGIC  # the stream is open
    status, err = set_pacer(srv, {"policy": "bandwidth_aware"})
    assert status == 409 and s3_code(err) == "PacerBusy"
    assert health(srv)["policy"] == "equal"
    resp.read()
    wait_for_metrics(srv, ["objectcache_active_streams 0"])
    assert set_pacer(srv, {"policy": "equal", "egress_gbps": None})[0] == 200


def test_unauthorised_callers_get_403(controlled, start_objectcache_server):
    srv, _ = controlled
    before = health(srv)
    status, err = set_pacer(
        srv, {"policy": "srtf"}, access_key=TENANT_ACCESS_KEY, secret_key=TENANT_SECRET_KEY
    )
    assert status == 403 and s3_code(err) == "AccessDenied" and b"admin credential" in err
    status, err = set_pacer(srv, {"policy": "srtf"}, secret_key="not-the-secret")  # a bad signature
    assert status == 403
    assert health(srv) == before
    # Without --allow-pacer-control not even the admin may change it.
    plain = start_objectcache_server()
    status, err = set_pacer(plain, {"policy": "srtf"})
    assert status == 403 and b"--allow-pacer-control" in err
    assert health(plain)["policy"] == "equal"


@pytest.mark.parametrize(
    "doc",
    [
        b"{not json",
        b"[1, 2]",
        b"{}",
        {"policy": "fastest-first"},
        {"policy": 3},
        {"egress_gbps": -1},
        {"egress_gbps": "10"},
        {"egress_gbps": True},
        {"policy": "equal", "burst": 1},
        {"policy_kwargs": [1]},
        {"policy": "bandwidth_aware", "policy_kwargs": {"protect": "sometimes"}},
        {"policy": "equal", "policy_kwargs": {"protect": "never"}},
    ],
)
def test_bad_settings_get_400(controlled, doc):
    srv, _ = controlled
    before = health(srv)
    status, err = set_pacer(srv, doc)
    assert status == 400 and s3_code(err) == "InvalidArgument", err
    assert health(srv) == before


def test_policy_kwargs_reach_the_policy(controlled):
    """``policy_kwargs`` in the request set the policy's tunables; a left-out key keeps them while the policy
    stays, a new policy starts from its defaults; they show in the answer and the health check."""
    srv, keys = controlled
    doc = {"policy": "bandwidth_aware", "policy_kwargs": {"protect": "never"}, "egress_gbps": 0.64}
    status, body = set_pacer(srv, doc)
    assert status == 200, body
    assert json.loads(body)["policy_kwargs"] == {"protect": "never"}
    assert health(srv)["policy_kwargs"] == {"protect": "never"}
    timed_gather(srv, keys)  # the server paces a gather with them
    wait_for_metrics(srv, ["objectcache_active_streams 0"])  # closed on the server too: no 409 next
    status, body = set_pacer(srv, {"egress_gbps": 0})
    assert status == 200 and json.loads(body)["policy_kwargs"] == {"protect": "never"}
    status, body = set_pacer(srv, {"policy": "equal"})
    assert status == 200 and "policy_kwargs" not in json.loads(body)
    assert "policy_kwargs" not in health(srv)


def test_policy_kwargs_from_the_command_line(start_objectcache_server):
    srv = start_objectcache_server(
        ["--policy", "bandwidth_aware", "--policy-kwargs", '{"protect": "always"}']
    )
    assert (health(srv)["policy"], health(srv)["policy_kwargs"]) == ("bandwidth_aware", {"protect": "always"})
