"""The worker agent: runs the testbed's per-host worker on a GPU node for a remote coordinator.

With ``topology=cluster`` the harness (the *coordinator*, any machine) drives one agent per GPU node::

    python -m testbed.harness.agent --host <addr> --port 9200 --token-file /etc/objectcache/agent.token

An action spawns exactly ``python -m testbed.harness.worker <action> --plan P --out O [--go-file G --ready-file R]``
-- the command the ``local`` and ``netns`` topologies start themselves -- so the request path is identical
on every topology.  Protocol (HTTP/1.1, JSON bodies, every request signed, ``testbed.harness.agent_auth``):

* ``GET /clock`` -> ``{"time_s": this host's wall clock (s), "busy": bool, "host": name, "pid": int}``: the
  coordinator estimates this host's clock offset from it (Cristian's algorithm, ``testbed.harness.coordinator``).
* ``POST /action`` ``{"action": "warmup"|"probe"|"run", "plan": {...}, "timeout_s": s}`` -> ``202 {"job": id}``;
  ``409`` while another action is unfinished (one at a time: two workers on one GPU would skew both).
* ``GET /action`` -> the current (or last) job: ``{"job", "action", "state", "rc", "result", "log_tail",
  "wall_s"}``; ``state`` is ``starting`` -> (``run`` only: ``ready``, waiting for the start) -> ``running``
  -> ``finished``; ``result`` is the worker's output JSON (the rows for ``run``), ``log_tail`` its last
  output (shown by the coordinator when the worker failed).
* ``POST /action/start`` ``{"job": id, "start_s": t}``: release a ``run`` at the common start ``t``, given on
  *this host's* wall clock (the coordinator converts its own start time with the measured offset); the agent
  writes it to the worker's go file.  Answers ``{"late_s": now - t}`` (positive: the start was missed).
* ``POST /action/cancel`` ``{"job": id}``: kill the worker (and its process group).

Security: the agent runs a worker on request, so every request is authenticated.  The coordinator and the
agents share a token (``--token-file``, or ``OBJECTCACHE_AGENT_TOKEN``); a request carries ``X-OC-Time`` (the
sender's wall clock), ``X-OC-Nonce`` and ``X-OC-Signature`` = hex HMAC-SHA256 over method, path, time, nonce
and the body, compared in constant time.  A request more than ``MAX_SKEW_S`` from this host's clock, or with a
nonce seen before, is refused (no replay); failures get ``401`` with the reason.  Bodies are bounded
(``--max-body-mib``), socket reads time out, a worker is killed after its ``timeout_s`` (at most
``--max-action-s``).  The agent binds 127.0.0.1 by default and warns when it binds beyond loopback; without a
token it accepts the documented test token ``DEFAULT_AGENT_TOKEN`` on loopback only.  There is no TLS: use it
on a trusted cluster network (or through an SSH tunnel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from testbed import REPO_ROOT
from testbed.harness.agent_auth import DEFAULT_AGENT_TOKEN, TOKEN_ENV, Verifier, load_token

log = logging.getLogger("objectcache.agent")

ACTIONS = ("warmup", "probe", "run")
LOG_TAIL_CHARS = 3000
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# --- one action ------------------------------------------------------------------------------------------


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop(TOKEN_ENV, None)  # the worker has no use for the token
    return env


class Job:
    """One ``python -m testbed.harness.worker`` process and its files; a watcher thread enforces ``timeout_s``."""

    def __init__(self, action: str, plan: dict, timeout_s: float, root: Path) -> None:
        self.id = secrets.token_hex(8)
        self.action = action
        self.dir = root / f"job-{self.id}"
        self.dir.mkdir(parents=True)
        (self.dir / "plan.json").write_text(json.dumps(plan))
        self.out, self.log_path = self.dir / "out.json", self.dir / "log.txt"
        self.go, self.ready_file = self.dir / "go", self.dir / "ready"
        argv = [sys.executable, "-m", "testbed.harness.worker", action, "--plan", str(self.dir / "plan.json")]
        argv += ["--out", str(self.out)]
        if action == "run":
            argv += ["--go-file", str(self.go), "--ready-file", str(self.ready_file)]
        self.t0 = time.monotonic()
        self.released = False
        self.rc: int | None = None
        self.wall_s: float | None = None
        self.why = ""
        with open(self.log_path, "ab") as f:
            # Its own process group: a cancel or timeout also ends the worker's children (reader processes).
            self.proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=_python_env(),
                start_new_session=True,
            )
        threading.Thread(target=self._watch, args=(timeout_s,), name=f"job-{self.id}", daemon=True).start()

    def _watch(self, timeout_s: float) -> None:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.why = f"killed after its timeout of {timeout_s:.0f} s"
            self.kill()
            rc = self.proc.wait()
        self.wall_s = time.monotonic() - self.t0
        self.rc = rc

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def finished(self) -> bool:
        return self.rc is not None

    def state(self) -> str:
        if self.finished:
            return "finished"
        if self.action == "run" and not self.released:
            return "ready" if self.ready_file.exists() else "starting"
        return "running"

    def release(self, start_s: float) -> float:
        """Write the go file (the worker maps this wall-clock time to its own monotonic clock); return how
        late the release is (s; negative: ahead of the start, as it should be)."""
        tmp = self.dir / "go.tmp"
        tmp.write_text(f"{start_s:.6f}")
        tmp.replace(self.go)
        self.released = True
        return time.time() - start_s

    def status(self) -> dict:
        st = {
            "job": self.id,
            "action": self.action,
            "state": self.state(),
            "rc": self.rc,
            "wall_s": self.wall_s,
        }
        if self.finished:
            try:
                st["result"] = json.loads(self.out.read_text()) if self.out.exists() else None
            except ValueError:
                st["result"] = None
            tail = (
                self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log_path.exists() else ""
            )
            st["log_tail"] = (self.why + "\n" if self.why else "") + tail
        return st


class Refused(Exception):
    """A request the agent answers with an error status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Agent:
    """The agent's state: at most one unfinished job (the current one), the verifier and the limits."""

    def __init__(self, token: str, work_dir: Path, max_body_bytes: int, max_action_s: float) -> None:
        self.verifier = Verifier(token)
        self.work_dir = work_dir
        self.max_body_bytes = max_body_bytes
        self.max_action_s = max_action_s
        self.job: Job | None = None
        self.lock = threading.Lock()

    def start(self, doc: dict) -> tuple[int, dict]:
        action, plan = doc.get("action"), doc.get("plan")
        if action not in ACTIONS:
            raise Refused(400, f"unknown action {action!r}: {', '.join(ACTIONS)}")
        if not isinstance(plan, dict) or not isinstance(plan.get("requests"), list):
            raise Refused(400, "plan must be the harness's plan object (with requests)")
        timeout_s = doc.get("timeout_s", self.max_action_s)
        if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise Refused(400, "timeout_s must be a positive number of seconds")
        with self.lock:
            if self.job is not None and not self.job.finished:
                raise Refused(409, f"busy: job {self.job.id} ({self.job.action}) is {self.job.state()}")
            if self.job is not None:  # keep only the last job's files (for the status and debugging)
                shutil.rmtree(self.job.dir, ignore_errors=True)
            self.job = Job(action, plan, min(float(timeout_s), self.max_action_s), self.work_dir)
            log.info("job %s: %s, %d requests", self.job.id, action, len(plan["requests"]))
            return 202, {"job": self.job.id, "state": self.job.state()}

    def current(self, doc: dict | None = None) -> Job:
        """The current job; with ``doc``, only if ``doc["job"]`` names it (a stale id is an error)."""
        job = self.job
        if job is None:
            raise Refused(404, "no job")
        if doc is not None and doc.get("job") != job.id:
            raise Refused(404, f"job {doc.get('job')!r} is not this agent's current job ({job.id})")
        return job

    def shutdown(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.kill()


# --- HTTP ----------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "ObjectCacheAgent/1"
    timeout = 30  # seconds to read a request: a stalled peer cannot hold a thread forever

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = self.headers.get("Content-Length")
        if self.command == "POST" and length is None:
            return self._reply(411, {"error": "Content-Length is required"})
        try:
            n = int(length or 0)
        except ValueError:
            return self._reply(400, {"error": "bad Content-Length"})
        if n < 0 or n > self.agent.max_body_bytes:
            self.close_connection = True  # the body stays unread
            return self._reply(413, {"error": f"body of {n} bytes exceeds {self.agent.max_body_bytes}"})
        body = self.rfile.read(n) if n else b""
        why = self.agent.verifier.check(self.command, self.path, self.headers, body)
        if why is not None:
            log.warning("refused %s %s from %s: %s", self.command, self.path, self.client_address[0], why)
            return self._reply(401, {"error": why})
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            return self._reply(400, {"error": "body is not valid JSON"})
        if doc is not None and not isinstance(doc, dict):
            return self._reply(400, {"error": "body must be a JSON object"})
        try:
            self._reply(*self._route(doc or {}))
        except Refused as e:
            self._reply(e.status, {"error": str(e)})
        except Exception as e:  # a bug or a broken work dir: say so instead of dropping the connection
            log.exception("%s %s failed", self.command, self.path)
            self._reply(500, {"error": f"agent error: {type(e).__name__}: {e}"})

    def _route(self, doc: dict) -> tuple[int, dict]:
        agent, route = self.agent, (self.command, self.path)
        if route == ("GET", "/clock"):
            busy = agent.job is not None and not agent.job.finished
            return 200, {
                "time_s": time.time(),
                "busy": busy,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        if route == ("POST", "/action"):
            return agent.start(doc)
        if route == ("GET", "/action"):
            return 200, agent.current().status()
        if route == ("POST", "/action/start"):
            job = agent.current(doc)
            start_s = doc.get("start_s")
            if not isinstance(start_s, int | float) or isinstance(start_s, bool):
                raise Refused(400, "start_s must be a wall-clock time in seconds")
            if job.action != "run" or job.state() != "ready":
                raise Refused(409, f"job {job.id} ({job.action}) is {job.state()}, not ready to start")
            return 200, {"late_s": job.release(float(start_s))}
        if route == ("POST", "/action/cancel"):
            job = agent.current(doc)
            if not job.finished:
                job.why = "cancelled by the coordinator"
                job.kill()
            return 200, {"job": job.id}
        raise Refused(404, f"no route {self.command} {self.path}")


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(args: argparse.Namespace) -> int:
    try:
        token = load_token(args.token_file)
    except (OSError, ValueError) as e:
        log.error("cannot read the token: %s", e)
        return 2
    loopback = args.host in LOOPBACK
    if token is None:
        if not loopback:
            log.error("binding %s needs a token: --token-file FILE or %s", args.host, TOKEN_ENV)
            return 2
        log.warning("no token given: accepting the documented test token (loopback only)")
        token = DEFAULT_AGENT_TOKEN
    elif args.token_file and os.stat(args.token_file).st_mode & 0o077:
        log.warning("token file %s is readable by other users (chmod 600 it)", args.token_file)
    tmp = None
    if args.work_dir:
        work_dir = Path(args.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="objectcache-agent-")
        work_dir = Path(tmp.name)
    agent = Agent(token, work_dir, int(args.max_body_mib * (1 << 20)), float(args.max_action_s))
    server_cls = _Server6 if ":" in args.host else ThreadingHTTPServer
    httpd = server_cls((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.agent = agent  # type: ignore[attr-defined]
    host, port = httpd.server_address[:2]
    if not loopback:
        log.warning(
            "listening on %s: reachable beyond loopback (requests must be signed with the token)", host
        )
    log.info("objectcache agent on http://%s:%d, work dir %s", host, port, work_dir)
    if args.ready_file:
        tmp_ready = args.ready_file + ".tmp"
        doc = {"host": host, "port": port, "pid": os.getpid(), "url": f"http://{host}:{port}"}
        Path(tmp_ready).write_text(json.dumps(doc))
        os.replace(tmp_ready, args.ready_file)

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever to return: call it off the main thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        agent.shutdown()
        httpd.server_close()
        if tmp is not None:
            tmp.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.harness.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=9200, help="TCP port; 0 picks a free one (see --ready-file)")
    p.add_argument(
        "--token-file", default=None, help=f"shared token (else ${TOKEN_ENV}; required off loopback)"
    )
    p.add_argument("--work-dir", default=None, help="plans, logs and rows of the jobs (default: a temp dir)")
    p.add_argument("--max-body-mib", type=float, default=64.0, help="largest request body (a plan)")
    p.add_argument("--max-action-s", type=float, default=7200.0, help="longest a worker may run")
    p.add_argument("--ready-file", default=None, help="write {host, port, pid, url} JSON here once listening")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
