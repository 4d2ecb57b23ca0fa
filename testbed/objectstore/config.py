"""The ObjectCache S3 server's configuration: ``ServerConfig`` and its command line (``parse_args``).

Every setting is written once, as a ``ServerConfig`` field: its default, its type (the annotation) and its
``--help`` text (``field(metadata={"help": ...})``).  The command line is derived from the fields
(``build_parser``): one flag per field, ``--<field-name>`` unless the metadata names another spelling
(``flag``), sizes given in KiB or MiB on the command line (``scale``: bytes per command-line unit), booleans
as ``--x`` / ``--no-x``, ``dict`` fields as a JSON object (or repeated ``K=V`` with ``form="K=V"``).  A flag
left out keeps the dataclass default, so ``ServerConfig()`` and an empty command line agree.

The size constants shared by the server modules (``MiB``, ``BATCH_BYTES``) live here too, so every server
module can import them without importing ``testbed.objectstore.server``.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields

from scheduler.policies import get_policy, policy_names
from testbed.objectstore.gather import DEFAULT_MAX_KEYS
from testbed.objectstore.pacer import DEFAULT_PIECE_BYTES

KiB = 1 << 10
MiB = 1 << 20
BATCH_BYTES = 4 * MiB  # body reads, part assembly and range sends go in batches of about this size

# The first paragraph of ``testbed.objectstore.server``'s docstring: the ``--help`` description.
DESCRIPTION = "The ObjectCache S3 server: an S3 API subset plus layer-major gather, on aiohttp."


def setting(default=MISSING, help: str = "", *, factory=MISSING, **cli) -> Field:  # noqa: A002
    """A ``ServerConfig`` field with its ``--help`` text; ``cli`` holds how the command line differs from
    the field: ``flag`` (its spelling), ``scale`` (bytes per command-line unit), ``choices``, ``env`` (an
    environment variable that replaces the default), ``form="K=V"`` (a dict given as repeated K=V)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **cli})


@dataclass
class ServerConfig:
    host: str = setting(
        "127.0.0.1",
        "bind address; anything but loopback needs explicit credentials (--credentials or the environment) "
        "and refuses the documented default credential",
    )
    port: int = setting(9000, "TCP port; 0 picks a free one (see --ready-file)")
    data_dir: str = setting("objectcache-data", "filesystem store (DATA_DIR/store) and multipart spool")
    store: str = setting("fs", "object store: fs (embedded filesystem) or s3proxy", choices=("fs", "s3proxy"))
    store_options: dict[str, str] = setting(
        help="keyword argument of the store, repeatable (s3proxy: endpoint_url=..., bucket=..., ...)",
        factory=dict,
        flag="--store-option",
        form="K=V",
    )
    spool_dir: str | None = setting(None, "multipart part files (default DATA_DIR/multipart)")
    credentials_file: str | None = setting(
        None, "JSON credentials file (see docs/object_tier.md)", flag="--credentials"
    )
    insecure_default_credentials: bool = setting(
        False,
        "INSECURE: allow the documented default credential (or no credentials) on a non-loopback --host; "
        "only for networks private to this machine (network namespaces of a test rig)",
    )
    region: str = setting("us-east-1", "the region the server reports")
    policy: str = setting("equal", f"bandwidth policy of the pacer: {', '.join(policy_names())}")
    policy_kwargs: dict = setting(
        help='the policy\'s tunables as a JSON object, e.g. \'{"protect": "always"}\' (bandwidth_aware)',
        factory=dict,
    )
    egress_Gbps: float | None = setting(
        None, "egress capacity the gathers share, Gbps; unset: unpaced", flag="--egress-gbps"
    )
    piece_bytes: int = setting(
        DEFAULT_PIECE_BYTES,
        "smallest paced piece, KiB (a piece is ~1.5 ms of data at the stream's rate)",
        flag="--piece-kib",
        scale=KiB,
    )
    max_object_bytes: int = setting(
        5 * 1024 * MiB, "largest object (PUT, multipart total), MiB", flag="--max-object-mib", scale=MiB
    )
    max_request_body_bytes: int = setting(
        MiB, "largest body of an XML / JSON operation (gather, delete), bytes"
    )
    max_gather_keys: int = setting(DEFAULT_MAX_KEYS, "most keys in one gather")
    max_gather_response_bytes: int = setting(
        128 * 1024 * MiB,  # the largest preset's fullest gather (1024 llama-3.1-70b chunks) is 80 GiB
        "largest response of one gather (its exact Content-Length), MiB",
        flag="--max-gather-response-mib",
        scale=MiB,
    )
    max_tenant_gather_bytes: int = setting(
        1024 * 1024 * MiB,  # room for many concurrent full-prompt gathers of one shared experiment key
        "most gather response bytes one access key may have in flight (open gather streams), MiB",
        flag="--max-tenant-gather-mib",
        scale=MiB,
    )
    min_part_bytes: int = setting(
        5 * MiB, "minimum multipart part size (not the last), MiB", flag="--min-part-mib", scale=MiB
    )
    multipart_expiry_s: float = setting(
        7 * 86400.0, "abandon a multipart upload (its parts deleted) this long after it was initiated, s"
    )
    io_threads: int = setting(16, "thread pool for blocking store calls and body hashing")
    send_threads: int = setting(64, "thread pool for socket sends (a send blocks while the client reads)")
    sendfile: bool = setting(True, "gather with sendfile; --no-sendfile: through read buffers (A/B)")
    fsync: bool = setting(True, "fsync on writes; --no-fsync for benchmarks only")
    allow_pacer_control: bool = setting(
        False,
        "let admin credentials switch the pacer's policy, its tunables and the egress rate "
        "(POST /?objectcache-pacer)",
    )
    idle_timeout_s: float = setting(
        75.0,
        "close a connection with no request in flight this long after it opened or its last answer, s "
        "(request-head bytes that trickle in do not restart the clock: slowloris)",
    )
    body_timeout_s: float = setting(
        30.0,
        "longest wait for the next bytes of a request body, s; also the grace period of --min-body-kib-per-s",
    )
    min_body_bytes_per_s: int = setting(
        16 * KiB,
        "slowest average rate a request body may arrive at once --body-timeout-s has passed, KiB/s",
        flag="--min-body-kib-per-s",
        scale=KiB,
    )
    max_connections_per_client: int = setting(
        1024, "most open connections from one client IP address; more are answered 503 SlowDown and closed"
    )
    ready_file: str | None = setting(None, "write {host, port, pid, url} JSON here once listening")
    log_level: str = setting("INFO", "log level", env="OBJECTCACHE_LOG_LEVEL")


def _key_value(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"wants K=V, got {text!r}")
    return k, v


def _json_object(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError(f"wants a JSON object, got {text!r}")
    return doc


def _scaled(scale: int):
    """A size in command-line units (KiB, MiB; fractions allowed) -> whole bytes."""

    def parse(text: str) -> int:
        return int(float(text) * scale)

    parse.__name__ = "float"  # argparse names the type in its error message
    return parse


def _add_argument(parser: argparse.ArgumentParser, f: Field, annotation) -> None:
    """One flag for one field (see the module docstring for the conventions)."""
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
    base = typing.get_origin(annotation) or annotation
    default = f.default if f.default is not MISSING else f.default_factory()
    kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"]}
    if base is not bool:
        kw["metavar"] = flag[2:].upper().replace("-", "_")
    shown = default / meta["scale"] if "scale" in meta else default
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif base is dict and meta.get("form") == "K=V":
        kw.update(action="append", type=_key_value, metavar="K=V")
    elif base is dict:
        kw.update(type=_json_object, metavar="JSON")
    elif "scale" in meta:
        kw["type"] = _scaled(meta["scale"])
    else:
        kw["type"] = base
    if "choices" in meta:
        kw["choices"] = meta["choices"]
    if shown not in (None, {}, ""):
        kw["help"] += f" (default: {shown:g})" if isinstance(shown, float) else f" (default: {shown})"
    if "env" in meta:
        kw["help"] += f"; environment {meta['env']} replaces the default"
    parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m testbed.objectstore``, one flag per ``ServerConfig`` field."""
    parser = argparse.ArgumentParser(prog="objectcache-server", description=DESCRIPTION)
    hints = typing.get_type_hints(ServerConfig)
    for f in fields(ServerConfig):
        _add_argument(parser, f, hints[f.name])
    return parser


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """A ``ServerConfig`` from command-line flags (``sys.argv[1:]`` by default); no side effects.

    The policy and its tunables are checked here (``scheduler.policies.get_policy``), so a bad
    ``--policy-kwargs`` is a usage error, not a crash after start."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    for f in fields(ServerConfig):
        env = f.metadata.get("env")
        if f.name not in given and env and env in os.environ:
            given[f.name] = os.environ[env]
    if "store_options" in given:
        given["store_options"] = dict(given["store_options"])
    config = ServerConfig(**given)
    try:
        get_policy(config.policy, **config.policy_kwargs)
    except (KeyError, TypeError, ValueError) as e:
        parser.error(f"--policy {config.policy} with --policy-kwargs {config.policy_kwargs}: {e}")
    return config
