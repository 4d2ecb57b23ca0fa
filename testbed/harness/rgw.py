"""Start and stop a throw-away one-node Ceph RGW (S3 gateway) on loopback, from Debian's packages.

ObjectCache's plain-S3 baseline and the backend of the S3-proxy store.  ``testbed/scripts/start-rgw.sh`` does
the work (one ``ceph-mon``, one memstore or bluestore-on-a-file ``ceph-osd``, ``radosgw`` with the beast
frontend on ``127.0.0.1``, an S3 user; about 2 s once the packages are installed) and
``testbed/scripts/stop-rgw.sh`` stops the daemons by their pid files only.  This module wraps them for Python
callers (tests, benchmarks) and picks free ports and a private state directory, so several instances can run
side by side and never collide with a system Ceph.

Command line::

    python -m testbed.harness.rgw start [--dir DIR] [--port P] [--objectstore memstore|bluestore] [--store-gib G]
    python -m testbed.harness.rgw stop --dir DIR
    python -m testbed.harness.rgw check          # prints why RGW cannot run here, exit 1, or "ok"

``start`` prints ``export AWS_...`` lines (``eval "$(python -m testbed.harness.rgw start)"``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed import REPO_ROOT

SCRIPTS = REPO_ROOT / "testbed" / "scripts"
REQUIRED_COMMANDS = (
    "ceph-mon",
    "ceph-osd",
    "radosgw",
    "radosgw-admin",
    "ceph",
    "ceph-authtool",
    "monmaptool",
)
APT_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
DEFAULT_ACCESS_KEY = "testaccesskey"
DEFAULT_SECRET_KEY = "testsecretkey"


class RGWUnavailable(RuntimeError):
    """RGW cannot be started here; the message says why (missing packages, start failure with log tail)."""


def missing_commands() -> list[str]:
    return [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]


def unavailable_reason() -> str | None:
    """Why RGW cannot be started on this machine, or None if it can be tried."""
    missing = missing_commands()
    if missing:
        return (
            f"Ceph RGW not installed (missing {', '.join(missing)}); install with "
            f"`apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)}`"
        )
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now (the kernel picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RGW:
    """A running RGW started by ``start_rgw``; ``stop()`` it (tests do so at session end)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    state_dir: Path
    port: int
    region: str = "us-east-1"
    owns_dir: bool = False

    def env(self) -> dict[str, str]:
        return {
            "RGW_DIR": str(self.state_dir),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def boto3_client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def pids(self) -> dict[str, int]:
        """Daemon name -> pid, from the pid files of this instance."""
        out = {}
        for pf in (self.state_dir / "run").glob("*.pid"):
            try:
                out[pf.stem] = int(pf.read_text().strip())
            except (OSError, ValueError):
                continue
        return out

    def stop(self, wipe: bool = True) -> None:
        stop_rgw(self.state_dir, wipe=wipe)


def start_rgw(
    state_dir: str | os.PathLike | None = None,
    port: int | None = None,
    objectstore: str = "memstore",
    store_bytes: int = 4 << 30,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    timeout_s: float = 120.0,
    install: bool = False,
    extra_conf: str = "",
) -> RGW:
    """Bootstrap a fresh one-node cluster and its gateway; raises ``RGWUnavailable`` with the reason.

    ``state_dir`` (default: a new temp dir, deleted by ``stop``) holds config, data, logs and pid files.
    ``objectstore="memstore"`` keeps objects in the OSD's RAM (RSS ~2x the bytes stored);
    ``"bluestore"`` in a sparse file of ``store_bytes`` under ``state_dir``.
    """
    if objectstore not in ("memstore", "bluestore"):
        raise ValueError(f"objectstore must be memstore or bluestore, got {objectstore!r}")
    if not install:
        reason = unavailable_reason()
        if reason:
            raise RGWUnavailable(reason)
    owns = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="objectcache-rgw-") if owns else state_dir).resolve()
    s3_port, mon_port, mon_port_v1 = free_ports(3)
    if port is not None:
        s3_port = port
    env = dict(
        os.environ,
        RGW_DIR=str(state),
        RGW_PORT=str(s3_port),
        RGW_MON_PORT=str(mon_port),
        RGW_MON_PORT_V1=str(mon_port_v1),
        RGW_OBJECTSTORE=objectstore,
        RGW_STORE_BYTES=str(int(store_bytes)),
        RGW_ACCESS_KEY=access_key,
        RGW_SECRET_KEY=secret_key,
        RGW_NO_INSTALL="0" if install else "1",
        RGW_TIMEOUT=str(int(timeout_s)),
        RGW_EXTRA_CONF=extra_conf,
    )
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPTS / "start-rgw.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s * 4 + 60,
        )
    except subprocess.TimeoutExpired as e:
        stop_rgw(state, wipe=owns)
        raise RGWUnavailable(f"start-rgw.sh did not finish in {e.timeout:.0f} s") from e
    if proc.returncode != 0:
        stop_rgw(state, wipe=owns)
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-30:])
        raise RGWUnavailable(f"start-rgw.sh failed (exit {proc.returncode}):\n{tail}")
    return RGW(f"http://127.0.0.1:{s3_port}", access_key, secret_key, state, s3_port, owns_dir=owns)


def stop_rgw(state_dir: str | os.PathLike, wipe: bool = True) -> None:
    """Stop the daemons of the instance in ``state_dir`` (by pid file only) and optionally delete it."""
    env = dict(os.environ, RGW_DIR=str(state_dir))
    args = ["bash", str(SCRIPTS / "stop-rgw.sh")] + (["--wipe"] if wipe else [])
    subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.harness.rgw", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start RGW; prints export lines")
    st.add_argument("--dir", default=None, help="state dir (default: a new temp dir)")
    st.add_argument("--port", type=int, default=None, help="S3 port on 127.0.0.1 (default: a free one)")
    st.add_argument("--objectstore", default="memstore", choices=["memstore", "bluestore"])
    st.add_argument("--store-gib", type=float, default=4.0)
    st.add_argument("--install", action="store_true", help="apt-get install the Ceph packages if missing")
    sp = sub.add_parser("stop", help="stop the RGW whose state is in --dir")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--keep", action="store_true", help="keep the state dir")
    sub.add_parser("check", help="say whether RGW can be started here")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        reason = unavailable_reason()
        print(reason or "ok")
        return 1 if reason else 0
    if args.cmd == "stop":
        stop_rgw(args.dir, wipe=not args.keep)
        return 0
    try:
        rgw = start_rgw(
            args.dir,
            port=args.port,
            objectstore=args.objectstore,
            store_bytes=int(args.store_gib * (1 << 30)),
            install=args.install,
        )
    except RGWUnavailable as e:
        print(f"RGW unavailable: {e}", file=sys.stderr)
        return 1
    for k, v in rgw.env().items():
        print(f"export {k}={v}")
    print(f"# stop with: python -m testbed.harness.rgw stop --dir {rgw.state_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
