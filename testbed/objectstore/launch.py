"""Start and stop the ObjectCache server as a subprocess on a free loopback port.

Used by the tests, the experiment harness and the benchmarks::

    from testbed.objectstore.launch import start_server
    with start_server(tmp_path) as srv:           # blocks until the server answers its health check
        s3 = srv.boto3_client()                   # or ObjectCacheClient(srv.url, ..., srv.access_key, ...)
        ...
    # stopped (SIGTERM, then SIGKILL after a grace period); its log is srv.log_path

The server picks its own port (``--port 0``) and reports it through ``--ready-file``, so parallel launches
never race for a port.  ``credentials`` (a list of ``testbed.objectstore.auth.Credential`` or dicts) are written to a
JSON file in the data directory; the first one is the one ``boto3_client`` uses.  The default is the
documented test credential (admin).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed import REPO_ROOT
from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, Credential


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class ServerProcess:
    url: str
    host: str
    port: int
    proc: subprocess.Popen
    data_dir: Path
    log_path: Path
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = field(default=DEFAULT_SECRET_KEY, repr=False)
    region: str = "us-east-1"
    _tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def boto3_client(self, access_key: str | None = None, secret_key: str | None = None, **config_kwargs):
        """A boto3 S3 client for this server (path-style, SigV4, short retries)."""
        import boto3
        from botocore.config import Config

        cfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2, "mode": "standard"},
            **config_kwargs,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/_objectcache/metrics", timeout=5) as r:
            return r.read().decode()

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_bytes:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        stop_process(self.proc, grace_s)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(url: str, deadline: float, proc: subprocess.Popen) -> bool:
    """Poll ``GET /_objectcache/health`` until it answers 200 (True), ``proc`` exits or the monotonic clock
    passes ``deadline`` (False)."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_objectcache/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def write_credentials(path: Path, credentials: Sequence[Credential | dict]) -> Path:
    """The server's ``--credentials`` JSON file (owner-only: it holds secrets)."""
    docs = [asdict(c) if isinstance(c, Credential) else dict(c) for c in credentials]
    path.write_text(json.dumps({"credentials": docs}))
    os.chmod(path, 0o600)
    return path


def _wait_ready_file(ready: Path, deadline: float, proc: subprocess.Popen) -> dict | None:
    """The server's ``--ready-file`` document once written, or None if ``proc`` exits or time runs out."""
    while time.monotonic() < deadline and proc.poll() is None:
        if ready.exists():
            return json.loads(ready.read_text())
        time.sleep(0.02)
    return None


def start_server(
    data_dir: str | os.PathLike | None = None,
    *,
    args: Sequence[str] = (),
    credentials: Sequence[Credential | dict] | None = None,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    python: str = sys.executable,
) -> ServerProcess:
    """Start ``python -m testbed.objectstore`` on ``host`` with a free port; return once it is healthy.

    ``args`` are extra server flags (e.g. ``["--egress-gbps", "10", "--policy", "bandwidth_aware"]``).
    A ``host`` beyond loopback needs ``credentials`` without the documented default pair, or
    ``--insecure-default-credentials`` in ``args`` (addresses private to this machine only): the server
    refuses to start otherwise, and the error below carries its message.
    A temporary data directory is created (and removed on ``stop``) when ``data_dir`` is None.

    Kept whole: the steps (credentials, argv, spawn, wait for the ready file, clean up on failure) share the
    temporary files they must remove on every exit path.
    """
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="objectcache-")
        data_dir = tmp.name
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = data_dir / f"ready-{os.getpid()}-{time.monotonic_ns()}.json"
    log_path = data_dir / "server.log"
    cmd = [
        python,
        "-m",
        "testbed.objectstore.server",
        "--host",
        host,
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
    ]
    cmd += ["--ready-file", str(ready)]
    access_key, secret_key = DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
    if credentials:
        cmd += ["--credentials", str(write_credentials(data_dir / "credentials.json", credentials))]
        first = credentials[0]
        access_key, secret_key = (
            (first.access_key, first.secret_key)
            if isinstance(first, Credential)
            else (
                first["access_key"],
                first["secret_key"],
            )
        )
    cmd += list(args)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    full_env.pop("OBJECTCACHE_ACCESS_KEY", None)
    full_env.pop("OBJECTCACHE_SECRET_KEY", None)
    full_env.pop("OBJECTCACHE_CREDENTIALS", None)
    full_env.update(env or {})
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(REPO_ROOT))
    finally:
        log.close()
    deadline = time.monotonic() + timeout_s
    info = _wait_ready_file(ready, deadline, proc)
    srv = None
    if info is not None:
        srv = ServerProcess(
            info["url"],
            info["host"],
            info["port"],
            proc,
            data_dir,
            log_path,
            access_key,
            secret_key,
            _tmpdir=tmp,
        )
        if wait_healthy(srv.url, deadline, proc):
            return srv
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    if tmp is not None:
        tmp.cleanup()
    raise RuntimeError(
        f"objectcache server did not become ready within {timeout_s}s (exit {proc.returncode}):\n{tail}"
    )
