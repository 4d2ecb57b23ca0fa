"""The ObjectCache S3 server's configuration: ``ServerConfig`` and its command line (``parse_args``).

``python -m testbed.objectstore`` (``testbed.objectstore.server.main``) parses its flags here; docs/object_tier.md lists them.
The size constants shared by the server modules (``MiB``, the ~4 MiB batch of body reads, part assembly and
range sends) live here too, so that every server module can import them without importing ``testbed.objectstore.server``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from testbed.objectstore import gather as gather_mod
from testbed.objectstore.pacer import DEFAULT_PIECE_BYTES

MiB = 1 << 20
BATCH_BYTES = 4 * MiB  # body reads, part assembly and range sends go in batches of about this size

# The first paragraph of ``testbed.objectstore.server``'s docstring: the ``--help`` description.
DESCRIPTION = "The ObjectCache S3 server: an S3 API subset plus layer-major gather, on aiohttp."


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    data_dir: str = "objectcache-data"
    store: str = "fs"  # fs | s3proxy
    store_options: dict[str, str] = field(default_factory=dict)
    spool_dir: str | None = None
    credentials_file: str | None = None
    region: str = "us-east-1"
    policy: str = "equal"
    egress_Gbps: float | None = None  # None: unpaced
    piece_bytes: int = DEFAULT_PIECE_BYTES
    max_object_bytes: int = 5 * 1024 * MiB
    max_request_body_bytes: int = MiB  # XML / JSON bodies
    max_gather_keys: int = gather_mod.DEFAULT_MAX_KEYS
    min_part_bytes: int = 5 * MiB
    io_threads: int = 16
    send_threads: int = 64
    sendfile: bool = True  # False: gather payload is read into buffers and written (for A/B measurements)
    fsync: bool = True
    # The admin operation POST /?objectcache-pacer: off unless the operator asks (--allow-pacer-control).
    allow_pacer_control: bool = False
    # A connection with no request in flight (idle keep-alive, or one that never finishes its request
    # headers) is closed after this long; aiohttp's default is an hour.
    idle_timeout_s: float = 75.0
    ready_file: str | None = None
    log_level: str = "INFO"


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="objectcache-server", description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=9000, help="TCP port; 0 picks a free one (see --ready-file)")
    p.add_argument("--data-dir", default="objectcache-data", help="filesystem store and multipart spool")
    p.add_argument("--store", choices=["fs", "s3proxy"], default="fs")
    p.add_argument(
        "--store-option",
        action="append",
        default=[],
        metavar="K=V",
        help="keyword argument of the store (s3proxy: endpoint_url=..., bucket=..., ...)",
    )
    p.add_argument("--spool-dir", default=None, help="multipart part files (default DATA_DIR/multipart)")
    p.add_argument("--credentials", default=None, help="JSON credentials file (see docs/object_tier.md)")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--policy", default="equal", help="bandwidth policy of the pacer (scheduler.policies)")
    p.add_argument("--egress-gbps", type=float, default=None, help="egress capacity to share; unset: unpaced")
    p.add_argument(
        "--piece-kib",
        type=int,
        default=DEFAULT_PIECE_BYTES // 1024,
        help="smallest paced piece (a piece is ~1.5 ms of data at the stream's rate)",
    )
    p.add_argument("--max-object-mib", type=int, default=5 * 1024)
    p.add_argument("--max-gather-keys", type=int, default=gather_mod.DEFAULT_MAX_KEYS)
    p.add_argument("--min-part-mib", type=float, default=5.0, help="minimum multipart part size (not last)")
    p.add_argument("--io-threads", type=int, default=16)
    p.add_argument("--no-fsync", action="store_true", help="skip fsync on writes (benchmarks only)")
    p.add_argument("--no-sendfile", action="store_true", help="gather through buffers, not sendfile (A/B)")
    p.add_argument(
        "--allow-pacer-control",
        action="store_true",
        help="let admin credentials switch the pacer's policy and egress rate (POST /?objectcache-pacer)",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=75.0,
        help="close a connection idle this long (no request, or request headers never finished)",
    )
    p.add_argument("--ready-file", default=None, help="write {host, port, pid, url} JSON here once listening")
    p.add_argument("--log-level", default=os.environ.get("OBJECTCACHE_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    opts = {}
    for item in a.store_option:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--store-option wants K=V, got {item!r}")
        opts[k] = v
    return ServerConfig(
        host=a.host,
        port=a.port,
        data_dir=a.data_dir,
        store=a.store,
        store_options=opts,
        spool_dir=a.spool_dir,
        credentials_file=a.credentials,
        region=a.region,
        policy=a.policy,
        egress_Gbps=a.egress_gbps,
        piece_bytes=a.piece_kib * 1024,
        max_object_bytes=a.max_object_mib * MiB,
        max_gather_keys=a.max_gather_keys,
        min_part_bytes=int(a.min_part_mib * MiB),
        io_threads=a.io_threads,
        fsync=not a.no_fsync,
        sendfile=not a.no_sendfile,
        allow_pacer_control=a.allow_pacer_control,
        idle_timeout_s=a.idle_timeout_s,
        ready_file=a.ready_file,
        log_level=a.log_level,
    )
