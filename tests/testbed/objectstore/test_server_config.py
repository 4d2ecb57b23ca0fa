"""The server's settings: one ``ServerConfig`` field each, and a command line derived from the fields."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from testbed import REPO_ROOT
from testbed.objectstore.config import MiB, ServerConfig, build_parser, parse_args


def test_no_flags_give_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("OBJECTCACHE_LOG_LEVEL", raising=False)
    assert parse_args([]) == ServerConfig()
    monkeypatch.setenv("OBJECTCACHE_LOG_LEVEL", "DEBUG")
    assert parse_args([]).log_level == "DEBUG"
    assert parse_args(["--log-level", "WARNING"]).log_level == "WARNING"


def test_every_field_has_a_flag_with_help():
    flags = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(ServerConfig)}
    assert all(a.help for a in flags.values())


def test_the_established_flag_spellings_still_work():
    c = parse_args(
        ["--egress-gbps", "2.5", "--piece-kib", "128", "--max-object-mib", "10", "--min-part-mib", "0.5",
         "--credentials", "creds.json", "--store-option", "a=b", "--store-option", "c=d=e", "--no-fsync",
         "--no-sendfile", "--allow-pacer-control", "--idle-timeout-s", "3", "--io-threads", "4"]
    )  # fmt: skip
    assert (c.egress_Gbps, c.piece_bytes, c.max_object_bytes, c.min_part_bytes) == (
        2.5,
        128 << 10,
        10 * MiB,
        MiB // 2,
    )
    assert (c.credentials_file, c.store_options) == ("creds.json", {"a": "b", "c": "d=e"})
    assert (c.fsync, c.sendfile, c.allow_pacer_control, c.idle_timeout_s, c.io_threads) == (
        False,
        False,
        True,
        3.0,
        4,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--idle-timeout-s", "x"],
        ["--store-option", "novalue"],
        ["--policy", "fastest-first"],
        ["--policy-kwargs", "[1]"],
        ["--policy-kwargs", "{bad json"],
        ["--policy", "bandwidth_aware", "--policy-kwargs", '{"protect": "sometimes"}'],
        ["--policy-kwargs", '{"protect": "never"}'],  # equal takes no tunables
    ],
)
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_policy_kwargs_flag():
    c = parse_args(["--policy", "bandwidth_aware", "--policy-kwargs", '{"protect": "never"}'])
    assert (c.policy, c.policy_kwargs) == ("bandwidth_aware", {"protect": "never"})


def test_help_lists_every_flag_and_has_no_side_effects(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "testbed.objectstore", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for flag in (
        "--egress-gbps",
        "--policy-kwargs",
        "--piece-kib",
        "--send-threads",
        "--no-fsync",
        "--log-level",
    ):
        assert flag in out.stdout
    assert list(tmp_path.iterdir()) == []  # no data directory, no ready file
