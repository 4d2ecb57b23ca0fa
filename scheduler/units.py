"""Units and conversions.

Every quantity in ObjectCache carries its unit in its name: ``_bytes``, ``_s``, ``_ms``, ``_Bps`` (bytes per
second), ``_Gbps`` (1e9 *bits* per second), ``_tokens``.  These helpers are the only place where bits and
bytes, seconds and milliseconds meet, so a factor of 8 or 1000 cannot slip in twice.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def gbps_to_Bps(gbps: float) -> float:
    """1e9 bits per second -> bytes per second."""
    return gbps * 1e9 / 8.0


def Bps_to_gbps(bps: float) -> float:
    """Bytes per second -> 1e9 bits per second."""
    return bps * 8.0 / 1e9


def s_to_ms(seconds: float) -> float:
    return seconds * 1e3


def ms_to_s(milliseconds: float) -> float:
    return milliseconds * 1e-3
