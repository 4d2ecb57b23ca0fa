"""How the coordinator and the worker agents authenticate each other: a shared token and signed requests.

A request carries ``X-OC-Time`` (the sender's wall clock, s), ``X-OC-Nonce`` and ``X-OC-Signature`` = hex
HMAC-SHA256 under the shared token over method, path, time, nonce and the body (``sign``), compared in
constant time (``Verifier``).  A request more than ``MAX_SKEW_S`` from the agent's clock, or with a nonce seen
before, is refused (no replay).  Without a token the agent accepts the documented test token
``DEFAULT_AGENT_TOKEN`` on loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

DEFAULT_AGENT_TOKEN = "objectcache-agent-test-token"  # documented; accepted on loopback binds only


TOKEN_ENV = "OBJECTCACHE_AGENT_TOKEN"


MAX_SKEW_S = 300.0  # a signed request older or newer than this is refused (replay window)


def sign(token: str, method: str, path: str, time_s: str, nonce: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of a request under the shared token: method, path, sender time and nonce, then the
    body bytes (so neither the action nor the plan can be altered or replayed elsewhere)."""
    head = f"{method}\n{path}\n{time_s}\n{nonce}\n".encode()
    return hmac.new(token.encode(), head + body, hashlib.sha256).hexdigest()


def signed_headers(token: str, method: str, path: str, body: bytes, now_s: float) -> dict[str, str]:
    """The authentication headers of one request sent at ``now_s`` (the sender's wall clock, seconds)."""
    t, nonce = f"{now_s:.6f}", secrets.token_hex(16)
    return {"X-OC-Time": t, "X-OC-Nonce": nonce, "X-OC-Signature": sign(token, method, path, t, nonce, body)}


def load_token(token_file: str | None = None, env: dict | None = None) -> str | None:
    """The shared token: from ``token_file`` (stripped), else ``OBJECTCACHE_AGENT_TOKEN``; None if neither."""
    env = os.environ if env is None else env
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return env.get(TOKEN_ENV) or None


class Verifier:
    """Checks a request's signature, time and nonce; remembers nonces for the replay window."""

    def __init__(self, token: str, clock=time.time) -> None:
        self.token = token
        self.clock = clock
        self._seen: dict[str, float] = {}
        self._pruned_s = 0.0
        self._lock = threading.Lock()

    def check(self, method: str, path: str, headers, body: bytes) -> str | None:
        """None if the request is authentic, else why not (the 401 message)."""
        t, nonce, sig = (headers.get(h) for h in ("X-OC-Time", "X-OC-Nonce", "X-OC-Signature"))
        if not (t and nonce and sig):
            return "unsigned request: X-OC-Time, X-OC-Nonce and X-OC-Signature are required"
        want = sign(self.token, method, path, t, nonce, body)
        if not hmac.compare_digest(want.encode(), sig.encode()):
            return "bad signature: the coordinator's token does not match this agent's"
        try:
            skew = float(t) - self.clock()
        except ValueError:
            return "bad X-OC-Time"
        if abs(skew) > MAX_SKEW_S:
            return (
                f"request time is {skew:+.1f} s from this agent's clock (limit {MAX_SKEW_S:.0f} s): check NTP"
            )
        with self._lock:
            now = self.clock()
            if now - self._pruned_s > 1.0:  # forget expired nonces now and then, not on every request
                self._seen = {n: exp for n, exp in self._seen.items() if exp > now}
                self._pruned_s = now
            if self._seen.get(nonce, 0.0) > now:
                return "replayed request (nonce seen before)"
            self._seen[nonce] = now + 2 * MAX_SKEW_S
        return None
