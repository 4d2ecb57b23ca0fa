"""The coordinator's side of ``topology=cluster``: the worker agents and the storage server's pacer.

The harness on the coordinator machine reaches every GPU node's agent (``python -m testbed.harness.agent``) over
HTTP and the storage node's ObjectCache server over S3:

* ``AgentClient``: signed requests (``testbed.harness.agent.signed_headers``) to one agent, each bounded by
  ``timeout_s``; failures raise ``AgentError`` saying what went wrong (unreachable, token refused, busy).
* ``AgentClient.clock_sample``: the agent's clock offset by **Cristian's algorithm**: ask the agent for its
  wall clock ``T`` between the coordinator's ``t0`` (request sent) and ``t1`` (answer read); the agent read
  ``T`` somewhere in ``[t0, t1]``, so ``offset = T - (t0 + t1) / 2`` is off by at most ``(t1 - t0) / 2``.
  Of a few tries the one with the shortest round trip is kept (the tightest bound).
* ``AgentJob``: a ``testbed.harness.jobs.WorkerJob`` run by an agent; the common start (coordinator clock) is
  converted to the agent's clock with the offset measured before the run.
* ``set_pacer`` / ``storage_health``: the server's admin operation ``POST /?objectcache-pacer`` (SigV4-signed;
  the server must run with ``--allow-pacer-control``) and its health document.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from testbed.harness.agent_auth import signed_headers
from testbed.harness.jobs import WorkerFailed, WorkerJob, WorkerResult

AGENT_HINT = "start it there with `python -m testbed.harness.agent --host <addr> --port 9200 --token-file F`"
TOKEN_HINT = (
    "the coordinator's token (topology.agent_token_file, topology.agent_token or OBJECTCACHE_AGENT_TOKEN) "
    "must be the one the agent was started with (--token-file)"
)


class AgentError(RuntimeError):
    """An agent could not be reached, refused the coordinator, or answered something unexpected."""


class StorageControlError(RuntimeError):
    """The storage server could not be reached or refused the pacer change."""


@dataclass
class ClockSample:
    """One agent's clock against the coordinator's: ``offset_s`` = agent clock - coordinator clock (s),
    uncertain by at most ``rtt_s / 2``."""

    url: str
    offset_s: float
    rtt_s: float
    host: str = ""


def _split_url(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise AgentError(f"agent URL {url!r} must look like http://<host>:<port>")
    return u.hostname, u.port or 80


class AgentClient:
    """Signed JSON requests to the agent at ``url``; ``clock`` is the coordinator's wall clock (seconds)."""

    def __init__(
        self, url: str, token: str, timeout_s: float = 10.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url.rstrip("/")
        self.host, self.port = _split_url(self.url)
        self.token = token
        self.timeout_s = float(timeout_s)
        self.clock = clock

    def _exchange(self, method: str, path: str, doc: dict | None) -> tuple[int, dict, float, float]:
        """One request on a fresh connection: (status, JSON answer, send time, answer time)."""
        body = json.dumps(doc).encode() if doc is not None else b""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.connect()  # outside the timed part: a clock sample's round trip is the request alone
            headers = signed_headers(self.token, method, path, body, self.clock())
            if body:
                headers["Content-Type"] = "application/json"
            t0 = self.clock()
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            t1 = self.clock()
        except TimeoutError:
            raise AgentError(
                f"agent {self.url} did not answer {method} {path} within {self.timeout_s:g} s "
                "(topology.agent_timeout_s)"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise AgentError(
                f"agent {self.url} is unreachable ({type(e).__name__}: {e}); {AGENT_HINT}"
            ) from None
        finally:
            conn.close()
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"error": data[:200].decode(errors="replace")}
        if resp.status == 401:
            raise AgentError(
                f"agent {self.url} refused the coordinator (401: {answer.get('error')}); {TOKEN_HINT}"
            )
        return resp.status, answer, t0, t1

    def call(self, method: str, path: str, doc: dict | None = None, ok: tuple[int, ...] = (200,)) -> dict:
        status, answer, _, _ = self._exchange(method, path, doc)
        if status not in ok:
            raise AgentError(f"agent {self.url}: {method} {path} -> {status}: {answer.get('error', answer)}")
        return answer

    def clock_sample(self, tries: int = 5) -> ClockSample:
        """The agent's clock offset (Cristian's algorithm, best of ``tries`` round trips)."""
        best: ClockSample | None = None
        for _ in range(max(1, int(tries))):
            status, answer, t0, t1 = self._exchange("GET", "/clock", None)
            if status != 200 or not isinstance(answer.get("time_s"), int | float):
                raise AgentError(f"agent {self.url}: GET /clock -> {status}: {answer}")
            s = ClockSample(
                self.url, float(answer["time_s"]) - (t0 + t1) / 2, t1 - t0, str(answer.get("host", ""))
            )
            if best is None or s.rtt_s < best.rtt_s:
                best = s
        return best


class AgentJob(WorkerJob):
    """A worker action run by the agent behind ``client`` for host ``host``.  ``offset_s()`` returns the
    agent's latest measured clock offset (applied when the run is released)."""

    def __init__(
        self,
        client: AgentClient,
        host: int,
        action: str,
        plan: dict,
        timeout_s: float,
        offset_s: Callable[[], float],
    ) -> None:
        self.client, self.host, self.action = client, host, action
        self.offset_s = offset_s
        doc = {"action": action, "plan": plan, "timeout_s": float(timeout_s)}
        self.id = client.call("POST", "/action", doc, ok=(202,))["job"]
        self._ready = False
        self._final: dict | None = None

    def status(self) -> dict:
        st = self.client.call("GET", "/action")
        if st.get("job") != self.id:
            raise AgentError(f"agent {self.client.url} no longer has job {self.id} (was it restarted?)")
        if st.get("state") == "finished":
            self._final = st
        return st

    def _failure(self, what: str) -> WorkerFailed:
        st = self._final or {}
        return WorkerFailed(
            f"worker {self.action} on host {self.host} ({self.client.url}) {what} ({st.get('rc')}):\n"
            f"{st.get('log_tail', '')}"
        )

    def ready(self) -> bool:
        if not self._ready:
            st = self.status()
            if st["state"] == "finished":
                raise self._failure("exited early")
            self._ready = st["state"] == "ready"
        return self._ready

    def go(self, start_s: float) -> float:
        doc = {"job": self.id, "start_s": start_s + self.offset_s()}
        return float(self.client.call("POST", "/action/start", doc)["late_s"])

    def wait(self, timeout_s: float) -> WorkerResult:
        deadline = time.monotonic() + timeout_s
        pause_s = 0.02  # short jobs (warm-up) come back quickly; long runs are polled a few times a second
        while self._final is None:
            if time.monotonic() > deadline:
                self.cancel()
                for _ in range(50):  # the agent kills it at once: collect its log tail
                    if self.status()["state"] == "finished":
                        break
                    time.sleep(0.1)
                st = self._final or {}
                return WorkerResult(-9, None, f"timed out after {timeout_s:g} s\n{st.get('log_tail', '')}")
            time.sleep(pause_s)
            pause_s = min(0.25, pause_s * 1.5)
            self.status()
        st = self._final
        tail = f"[agent {self.client.url}]\n{st.get('log_tail', '')}"
        return WorkerResult(int(st["rc"]), st.get("result"), tail, float(st.get("wall_s") or math.nan))

    def cancel(self) -> None:
        if self._final is None:
            with contextlib.suppress(AgentError):
                self.client.call("POST", "/action/cancel", {"job": self.id})


# --- the storage server ------------------------------------------------------------------------------------


def _storage_conn(url: str, timeout_s: float) -> http.client.HTTPConnection:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise StorageControlError(f"storage URL {url!r} must look like http://<host>:<port>")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=timeout_s)


def _storage_request(url: str, method: str, path: str, body: bytes, headers: dict, timeout_s: float):
    conn = _storage_conn(url, timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise StorageControlError(f"storage server {url} is unreachable ({type(e).__name__}: {e})") from None
    finally:
        conn.close()


def storage_health(url: str, timeout_s: float = 10.0) -> dict:
    """The server's ``/_objectcache/health`` document (policy, egress_gbps, active_streams, ...)."""
    status, data = _storage_request(url, "GET", "/_objectcache/health", b"", {}, timeout_s)
    if status != 200:
        raise StorageControlError(f"storage server {url}: health check -> {status}")
    return json.loads(data)


def set_pacer(
    url: str,
    policy: str,
    egress_Gbps: float,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    timeout_s: float = 10.0,
    busy_wait_s: float = 30.0,
    policy_kwargs: dict | None = None,
) -> dict:
    """Set the server's pacer (``egress_Gbps`` 0: unpaced; ``policy_kwargs``: the policy's keyword arguments,
    empty for its defaults) through its admin operation; return the new settings.  While streams of an earlier run are still open (409) it retries for up to ``busy_wait_s``."""
    from testbed.client.signed import SignedHTTP

    url = url.rstrip("/")
    path = "/?objectcache-pacer"
    # policy_kwargs always goes along: an omitted key would keep the tunables of the previous run.
    doc = {
        "policy": policy,
        "policy_kwargs": dict(policy_kwargs or {}),
        "egress_gbps": float(egress_Gbps or 0.0),
    }
    body = json.dumps(doc).encode()
    signer = SignedHTTP(
        url, access_key, secret_key, region, timeout_s=timeout_s
    )  # the client's SigV4 signing
    deadline = time.monotonic() + busy_wait_s
    while True:
        headers = signer.signed_headers("POST", path, {"Content-Type": "application/json"}, body)
        status, data = _storage_request(url, "POST", path, body, headers, timeout_s)
        if status == 200:
            return json.loads(data)
        m = re.search(rb"<Message>(.*?)</Message>", data, re.S)
        msg = (m.group(1) if m else data[:200]).decode(errors="replace")
        if status == 409 and time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        if status == 403:
            raise StorageControlError(
                f"storage server {url} refused pacer control (403: {msg}): start it with --allow-pacer-control "
                "and give the harness an admin credential (topology.access_key/secret_key), or set "
                "topology.pacer_control=false to keep the pacer it was started with"
            )
        raise StorageControlError(f"storage server {url}: setting the pacer -> {status}: {msg}")
