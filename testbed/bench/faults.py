"""Fault injection for the object tier: kill servers at chosen points, damage stored objects, fill disks,
take network links down.  Used by tests/testbed/bench/test_faults.py and the soak benchmark; everything here runs
as root on a plain Linux box (no special kernel modules), and says why when it cannot (``FaultUnavailable``).

* ``ServerZygote``: a parent process that has already imported the server and forks a fresh server on
  demand in a few milliseconds (a cold ``python -m testbed.objectstore`` start costs ~0.9 s of imports), so a
  test can run many kill -9 / restart trials on the same data directory.  Forked servers are ordinary
  ``testbed.objectstore.launch.ServerProcess`` objects (``kill()`` sends SIGKILL).
* ``object_path`` / ``flip_bits`` / ``truncate_object`` / ``clobber_header`` / ``corrupt_slice_checksum``:
  damage one object file of the filesystem store in place (``<data>/store/buckets/<b>/obj/<quoted key>``;
  object bytes first, then the store's metadata trailer).
* ``slow_put``: a raw SigV4-signed PUT whose body trickles in small pieces (to be killed mid-upload).
* ``tmpfs``: a size-limited tmpfs mount (disk-full tests); ``VethNamespace``: a network namespace joined to
  the host by a veth pair, with a server inside it and ``link_down()`` / ``link_up()``.

One module (a little over 400 lines) on purpose: the fault tests, the fuzz tests and the soak reach every
helper as ``faults.<name>``, and each helper is a few lines of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from urllib.parse import quote

from testbed import REPO_ROOT
from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, Credential
from testbed.objectstore.launch import ServerProcess, start_server, wait_healthy
from testbed.objectstore.launch import write_credentials as launch_credentials
from testbed.objectstore.objectfile import TRAILER_TAIL, read_trailer
from testbed.wire import kvformat


class FaultUnavailable(RuntimeError):
    """This machine cannot inject the fault (not root, no tmpfs, no namespaces); the message says why."""


# --- servers that can be killed cheaply ---------------------------------------------------------------------

_ZYGOTE_SRC = r"""
import json, os, signal, sys
import testbed.objectstore.server as server           # the expensive imports, done once
signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps forked servers: no zombies
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = server.main(req["argv"])
        except BaseException:
            import traceback; traceback.print_exc(); code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    sys.stdout.write(f"{pid}\n"); sys.stdout.flush()
"""


class _PidProc:
    """The ``subprocess.Popen`` subset ``ServerProcess`` uses, for a process that is not our child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
                with open(f"/proc/{self.pid}/stat") as f:  # a zombie is dead too
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        self.returncode = -9
            except (ProcessLookupError, FileNotFoundError):
                self.returncode = -9
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def write_credentials(
    data_dir: Path, credentials: Sequence[Credential | dict] | None
) -> tuple[str, str, list]:
    """Credentials file for a server in ``data_dir``; returns (access key, secret key, server argv)."""
    if not credentials:
        return DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, []
    path = launch_credentials(data_dir / "credentials.json", credentials)
    first = credentials[0] if isinstance(credentials[0], dict) else asdict(credentials[0])
    return first["access_key"], first["secret_key"], ["--credentials", str(path)]


class ServerZygote:
    """Forks ObjectCache servers from a pre-imported parent (see the module docstring).

    ``start(data_dir, args, credentials)`` returns a ``ServerProcess`` once the server answers its health
    check; ``close()`` ends the zygote (forked servers still running are SIGKILLed by the caller's ``stop``).
    """

    def __init__(self, python: str = sys.executable) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for k in ("OBJECTCACHE_ACCESS_KEY", "OBJECTCACHE_SECRET_KEY", "OBJECTCACHE_CREDENTIALS"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            [python, "-c", _ZYGOTE_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(REPO_ROOT),
            text=True,
        )

    def start(
        self,
        data_dir: str | os.PathLike,
        args: Sequence[str] = (),
        credentials: Sequence[Credential | dict] | None = None,
        timeout_s: float = 20.0,
        log_path: str | os.PathLike | None = None,
    ) -> ServerProcess:
        """Fork a server on ``data_dir`` (its log goes to ``log_path``, default ``data_dir/server.log``)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        ready = data_dir / f"ready-{uuid.uuid4().hex}.json"
        access, secret, cred_args = write_credentials(data_dir, credentials)
        argv = ["--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir), "--ready-file", str(ready)]
        argv += cred_args + list(args)
        log_path = Path(log_path) if log_path is not None else data_dir / "server.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        proc = _PidProc(pid)
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise RuntimeError(f"forked server {pid} did not start:\n{tail}")
            time.sleep(0.005)
        info = json.loads(ready.read_text())
        ready.unlink()
        srv = ServerProcess(info["url"], info["host"], info["port"], proc, data_dir, log_path, access, secret)
        if not wait_healthy(srv.url, deadline, proc):
            proc.kill()
            raise RuntimeError(f"forked server {pid} never became healthy")
        return srv

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> ServerZygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kill_hard(srv: ServerProcess) -> None:
    """SIGKILL a server and wait until it is gone (no cleanup runs: a crash)."""
    srv.proc.kill()
    srv.proc.wait(10)


# --- damaging stored objects (filesystem store) ---------------------------------------------------------


def object_path(data_dir: str | os.PathLike, bucket: str, key: str) -> Path:
    """File of ``bucket/key`` in the filesystem store under a server's ``--data-dir``."""
    return Path(data_dir) / "store" / "buckets" / bucket / "obj" / quote(key, safe="")


def quarantine_dir(data_dir: str | os.PathLike, bucket: str) -> Path:
    return Path(data_dir) / "store" / "buckets" / bucket / "quarantine"


def object_size(path: Path) -> int:
    """Object bytes in a store file (the file minus its metadata trailer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, _ = read_trailer(fd, os.fstat(fd).st_size, path.name)
        return size
    finally:
        os.close(fd)


def _rewrite(path: Path, fn) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        fn(data)
        f.seek(0)
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def flip_bits(path: Path, offsets: Sequence[int] | None = None, n: int = 1, seed: int = 0) -> list[int]:
    """Flip one bit at each object byte offset (default: ``n`` random offsets in the layer payload)."""
    size = object_size(path)
    if offsets is None:
        with open(path, "rb") as f:
            header = kvformat.parse_header(f.read(kvformat.HEADER_PROBE_BYTES))
        rng = random.Random(seed)
        offsets = [rng.randrange(header.header_bytes, size) for _ in range(n)]
    offsets = list(offsets)

    def flip(data: bytearray) -> None:
        for i, off in enumerate(offsets):
            if not 0 <= off < size:
                raise ValueError(f"offset {off} outside the object ({size} bytes)")
            data[off] ^= 1 << (i % 8)

    _rewrite(path, flip)
    return offsets


def truncate_object(path: Path, keep_bytes: int, keep_trailer: bool = True) -> None:
    """Cut the object to ``keep_bytes``.  ``keep_trailer``: the store still sees a well-formed (shorter)
    object, as if a torn write had been committed; otherwise the file itself is cut (trailer lost too)."""
    size = object_size(path)

    def cut(data: bytearray) -> None:
        trailer = bytes(data[size:])
        del data[keep_bytes:]
        if keep_trailer:
            data += trailer

    _rewrite(path, cut)


def clobber_header(path: Path, field_offset: int = 32, value: int = 7) -> None:
    """Overwrite a u32 header field (default ``num_layers`` at byte 32): the header checksum no longer
    matches (a stray write over the header)."""
    _rewrite(
        path, lambda d: d.__setitem__(slice(field_offset, field_offset + 4), value.to_bytes(4, "little"))
    )


def corrupt_slice_checksum(path: Path, layer: int) -> None:
    """Change the stored checksum of one layer and re-seal the header checksum: a header that parses but
    disagrees with its payload (a writer bug, or a flip before the header was sealed)."""

    def edit(data: bytearray) -> None:
        h = kvformat.parse_header(bytes(data[: kvformat.HEADER_PROBE_BYTES]))
        sums = list(h.checksums)
        sums[layer] ^= 0x1
        fixed = dataclasses.replace(h, checksums=tuple(sums)).encode()
        data[: h.header_bytes] = fixed

    _rewrite(path, edit)


# --- slow uploads ------------------------------------------------------------------------------------------


def signed_put_headers(srv: ServerProcess, path: str, body_len: int, extra: dict | None = None) -> dict:
    """SigV4 headers (``UNSIGNED-PAYLOAD``) for a raw PUT of ``body_len`` bytes to ``path``."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {"x-amz-content-sha256": "UNSIGNED-PAYLOAD", "Content-Length": str(body_len), **(extra or {})}
    req = AWSRequest(method="PUT", url=srv.url + path, headers=headers)

    class Signer(S3SigV4Auth):
        def payload(self, request):
            return "UNSIGNED-PAYLOAD"

    Signer(Credentials(srv.access_key, srv.secret_key), "s3", srv.region).add_auth(req)
    return dict(req.headers.items())


def slow_put(
    srv: ServerProcess,
    path: str,
    body: bytes,
    piece_bytes: int = 64 * 1024,
    pause_s: float = 0.002,
    timeout_s: float = 10.0,
    extra_headers: dict | None = None,
) -> int | None:
    """PUT ``body`` in pieces with pauses; returns the HTTP status, or None if the connection broke."""
    headers = signed_put_headers(srv, path, len(body), extra_headers)
    try:
        with socket.create_connection((srv.host, srv.port), timeout=timeout_s) as s:
            head = f"PUT {path} HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() != "host")
            s.sendall((head + "\r\n").encode())
            view = memoryview(body)
            for off in range(0, len(body), piece_bytes):
                s.sendall(view[off : off + piece_bytes])
                if pause_s:
                    time.sleep(pause_s)
            reply = s.recv(4096)
    except OSError:
        return None
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


# --- disk full ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(size_bytes: int, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` on a fresh directory; raises ``FaultUnavailable`` if not permitted."""
    mnt = Path(tempfile.mkdtemp(prefix="oc-tmpfs-", dir=parent))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        mnt.rmdir()
        raise FaultUnavailable(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


# --- network namespaces ---------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise FaultUnavailable(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r


class VethNamespace:
    """A network namespace ``ns`` joined to the host by a veth pair (``host_ip`` <-> ``ns_ip``, a /30).

    ``start_server(data_dir, ...)`` runs an ObjectCache server inside the namespace, bound to ``ns_ip``;
    ``link_down()`` takes the namespace side of the link down (packets stop; established connections see
    silence, not a reset), ``link_up()`` restores it.  ``close()`` removes everything.
    """

    def __init__(self, subnet_octet: int | None = None) -> None:
        if shutil.which("ip") is None:
            raise FaultUnavailable("the `ip` tool (iproute2) is not installed")
        if os.geteuid() != 0:
            raise FaultUnavailable("network namespaces need root")
        tag = uuid.uuid4().hex[:6]
        self.ns = f"oc-{tag}"
        self.host_if, self.ns_if = f"och{tag}", f"ocn{tag}"
        octet = subnet_octet if subnet_octet is not None else random.randrange(1, 250)
        self.host_ip, self.ns_ip = f"10.251.{octet}.1", f"10.251.{octet}.2"
        self._wrapper: Path | None = None
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.ns)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _ip("-n", self.ns, "link", "set", self.ns_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def start_server(self, data_dir, **kwargs) -> ServerProcess:
        """``testbed.objectstore.launch.start_server`` inside the namespace, listening on ``ns_ip``."""
        if self._wrapper is None:
            fd, name = tempfile.mkstemp(prefix="oc-netns-python-", suffix=".sh")
            os.write(fd, f'#!/bin/sh\nexec ip netns exec {self.ns} "{sys.executable}" "$@"\n'.encode())
            os.close(fd)
            os.chmod(name, 0o755)
            self._wrapper = Path(name)
        # ns_ip is on a veth pair private to this machine; the tests sign with the default credential.
        kwargs["args"] = [*kwargs.get("args", ()), "--insecure-default-credentials"]
        return start_server(data_dir, host=self.ns_ip, python=str(self._wrapper), **kwargs)

    def link_down(self) -> None:
        _ip("-n", self.ns, "link", "set", self.ns_if, "down")

    def link_up(self) -> None:
        _ip("-n", self.ns, "link", "set", self.ns_if, "up")

    def close(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.ns, check=False)
        if self._wrapper is not None:
            self._wrapper.unlink(missing_ok=True)
            self._wrapper = None

    def __enter__(self) -> VethNamespace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- inspection -----------------------------------------------------------------------------------------


def process_fds(pid: int) -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def store_leftovers(data_dir: str | os.PathLike, bucket: str) -> list[str]:
    """Temporary (uncommitted) files left in a bucket of the filesystem store."""
    tmp = Path(data_dir) / "store" / "buckets" / bucket / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


TRAILER_TAIL_BYTES = TRAILER_TAIL.size
