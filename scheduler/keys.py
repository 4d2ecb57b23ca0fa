"""Content-addressed chunk keys.

A prompt is cut into fixed-size chunks (256 tokens by default); only *full* chunks get keys, because a
partial chunk's KV would change when the prompt grows.  Keys are *chained*: the key of chunk ``i`` hashes the
key of chunk ``i-1`` together with chunk ``i``'s token ids, so it names the whole prefix up to and including
that chunk (KV of a token depends on every token before it).  The chain is seeded with the model fingerprint
and the tenant namespace (plus an optional per-tenant secret salt), so two models or two tenants never
address the same object, and a tenant that does not know another tenant's salt cannot even probe whether
that tenant cached a given prompt.

Hashing is SHA-256 over little-endian uint32 token ids: deterministic across processes, machines and Python
versions (Python's ``hash`` is salted per process and never used here).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.geometry import DEFAULT_CHUNK_TOKENS

KEY_VERSION = b"objectcache/chunk/v1"
_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def validate_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: 1-63 chars of [a-z0-9._-], starting with a letter or digit"
        )
    return namespace


def is_chunk_key(key: str) -> bool:
    return isinstance(key, str) and bool(_KEY_RE.match(key))


@dataclass(frozen=True)
class KeyScope:
    """What a chunk key is scoped by: the model, the tenant namespace, and an optional secret salt."""

    model_fingerprint: str
    namespace: str = "default"
    salt: bytes = b""

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    def seed(self) -> bytes:
        h = hashlib.sha256(KEY_VERSION)
        for part in (self.model_fingerprint.encode(), self.namespace.encode(), self.salt):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        return h.digest()


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray, scope: KeyScope, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> list[str]:
    """Chained keys (64 hex digits) of every full chunk of ``token_ids``, in prefix order."""
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError("token_ids must be one-dimensional")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError("token ids must fit in uint32")
    tokens = tokens.astype("<u4", copy=False)
    n_full = len(tokens) // chunk_tokens
    keys: list[str] = []
    prev = scope.seed()
    for i in range(n_full):
        h = hashlib.sha256(prev)
        h.update(tokens[i * chunk_tokens : (i + 1) * chunk_tokens].tobytes())
        prev = h.digest()
        keys.append(prev.hex())
    return keys


def object_key(scope: KeyScope, key: str) -> str:
    """Object name of a chunk in a bucket: ``<namespace>/<model fingerprint>/<chunk key>``."""
    if not is_chunk_key(key):
        raise ValueError(f"not a chunk key: {key!r}")
    return f"{scope.namespace}/{scope.model_fingerprint}/{key}"


def longest_prefix(keys: Sequence[str], contains: Callable[[str], bool]) -> int:
    """Number of leading ``keys`` present according to ``contains``.

    Stops at the first miss: a chained key past a hole would still be valid, but its KV is useless without
    the KV of the missing chunk before it.
    """
    n = 0
    for key in keys:
        if not contains(key):
            break
        n += 1
    return n
