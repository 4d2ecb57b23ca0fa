"""Chunk keys are the object names in the shared tier: they must be identical in every process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

from scheduler.geometry import get_model
from scheduler.keys import KEY_VERSION, KeyScope, chunk_keys

TOKENS = [(i * 7919) % 128256 for i in range(256 * 3 + 17)]

CHILD = """
import json, sys
from scheduler.geometry import get_model
from scheduler.keys import KeyScope, chunk_keys
tokens = json.loads(sys.stdin.read())
scope = KeyScope(get_model("llama-3.1-8b").fingerprint(), "tenant-a", b"salt")
print(json.dumps([get_model("llama-3.1-8b").fingerprint(), chunk_keys(tokens, scope)]))
"""


def _in_subprocess(hash_seed: str) -> list:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(TOKENS),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


def test_keys_are_identical_across_processes_and_hash_seeds():
    scope = KeyScope(get_model("llama-3.1-8b").fingerprint(), "tenant-a", b"salt")
    here = [get_model("llama-3.1-8b").fingerprint(), chunk_keys(TOKENS, scope)]
    assert len(here[1]) == 3  # only full chunks
    assert _in_subprocess("1") == here
    assert _in_subprocess("12345") == here


def test_keys_follow_the_documented_chain():
    """Re-derive the keys from the spec (SHA-256 chain over little-endian uint32 ids) independently."""
    fp = get_model("llama-3.1-8b").fingerprint()
    seed = hashlib.sha256(KEY_VERSION)
    for part in (fp.encode(), b"tenant-a", b"salt"):
        seed.update(len(part).to_bytes(4, "little"))
        seed.update(part)
    prev = seed.digest()
    expected = []
    for i in range(3):
        h = hashlib.sha256(prev)
        h.update(np.asarray(TOKENS[i * 256 : (i + 1) * 256], dtype="<u4").tobytes())
        prev = h.digest()
        expected.append(prev.hex())
    assert chunk_keys(TOKENS, KeyScope(fp, "tenant-a", b"salt")) == expected
    # Another tenant or salt never shares a key.
    assert not set(expected) & set(chunk_keys(TOKENS, KeyScope(fp, "tenant-b", b"salt")))
    assert not set(expected) & set(chunk_keys(TOKENS, KeyScope(fp, "tenant-a", b"other")))
