"""GPU compute model: how long one layer of a prefill takes.

``layer_time_s(cached_tokens, new_tokens)`` is the time of one decoder layer when ``new_tokens`` tokens are
prefilled on top of ``cached_tokens`` tokens of cached prefix (their queries attend to the cached KV and to
each other).  ``prefill_time_s`` is the whole prefill (all layers plus the embedding and the LM head);
``overhead_time_s`` is the part that is not per-layer work.  The simulator, the planner and the testbed's
emulated compute mode all use these models.

Two implementations:

* ``ProfileCompute``: a measured table with interpolation (the default for models with a profile).
* ``RooflineCompute``: analytic, from ``ModelSpec`` and the GPU's peak FLOP/s and HBM bandwidth (the
  fallback for models without a profile).

Profile table format (``<model>_<gpu>.csv`` in a directory the caller passes, written by the testbed's GPU
profiler)::

    # model: llama-3.1-8b
    # gpu: H100-SXM-80GB
    # dtype: bf16
    # date: 2026-11-22
    # command: python -m testbed.engine.profile ...
    # (any further '#' lines are free-form notes)
    cached_tokens,new_tokens,prefill_ms,layer_ms
    0,4096,126.0,3.9375
    ...

``cached_tokens`` and ``new_tokens`` are integers (``new_tokens >= 1``); ``prefill_ms`` is the wall time of
the whole prefill in milliseconds, ``layer_ms`` the time of one decoder layer (mean over layers).  Header
lines of the form ``# key: value`` become ``ProfileCompute.meta``.

Interpolation.  The measured points do not lie on a grid (full prefills have no cached tokens, the
cached+new points use small new-token counts), a 4-parameter cost shape ``a + b*n + e*n*(c + n/2) +
f*n*n`` (constant launch cost, GEMMs linear in new tokens, causal attention over cached and new tokens) is
fitted by non-negative least squares in relative error and used to complete the table on the grid of
distinct cached x new values (measured/fit ratio interpolated over the measured points); the completed grid
is kept monotone where the measurements are and interpolated *bilinearly in log space* (``log(ms)`` over ``(log2(1 + c), log2(n))``);
beyond the grid the fitted shape scales the nearest grid value.  The model is exact at every measured
point, monotone in both token counts wherever the measurements are, and extrapolates with the physical
shape.  Results are memoised per
``(c, n)``: a simulation asks for the same few points millions of times.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator
from scipy.optimize import nnls

from scheduler.geometry import ModelSpec

PROFILE_COLUMNS = ("cached_tokens", "new_tokens", "prefill_ms", "layer_ms")


class ComputeModel(Protocol):
    num_layers: int

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float: ...

    def prefill_time_s(self, cached_tokens: int, new_tokens: int) -> float: ...


@dataclass(frozen=True)
class ProfilePoint:
    cached_tokens: int
    new_tokens: int
    prefill_ms: float
    layer_ms: float


def read_profile(path: str | Path) -> tuple[dict[str, str], list[ProfilePoint]]:
    """Parse a profile CSV: ``(meta, points)``.  Raises ``ValueError`` on a malformed table."""
    meta: dict[str, str] = {}
    points: list[ProfilePoint] = []
    header: list[str] | None = None
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            if ":" in body and header is None:
                key, _, value = body.partition(":")
                if key.strip() and " " not in key.strip():
                    meta.setdefault(key.strip(), value.strip())
            continue
        cells = [c.strip() for c in line.split(",")]
        if header is None:
            header = cells
            missing = [c for c in PROFILE_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}:{lineno}: profile header lacks columns {missing}")
            continue
        row = dict(zip(header, cells))
        try:
            pt = ProfilePoint(
                int(row["cached_tokens"]),
                int(row["new_tokens"]),
                float(row["prefill_ms"]),
                float(row["layer_ms"]),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: bad profile row {line!r}: {exc}") from None
        if pt.cached_tokens < 0 or pt.new_tokens < 1 or not (pt.prefill_ms > 0 and pt.layer_ms > 0):
            raise ValueError(f"{path}:{lineno}: out-of-range profile row {line!r}")
        points.append(pt)
    if len(points) < 4:
        raise ValueError(f"{path}: a profile needs at least 4 points, got {len(points)}")
    return meta, points


def _shape_features(c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Columns of the cost shape: constant, linear in n, causal attention n*(c + n/2), n^2."""
    return np.stack([np.ones_like(n), n, n * (c + n / 2.0), n * n], axis=-1)


class _FitTimesCorrection:
    """One interpolated quantity (milliseconds) over scattered (cached, new) points.

    Steps: (1) fit the cost shape; (2) complete the table on the grid ``distinct cached x distinct new`` --
    measured cells keep their value, missing cells get ``fit * ratio`` (ratio = measured/fit, interpolated
    linearly over Delaunay triangles in log coordinates, nearest point outside the hull); (3) make the grid
    monotone (more tokens never take less time) by clamping completed cells between the measured cells
    that dominate them and a running maximum; (4) interpolate bilinearly in ``(log2(1 + c), log2(n))`` on
    ``log(ms)``, which keeps monotonicity and is exact at grid points; (5) outside the grid, scale the
    nearest grid point's value by the fitted shape (``fit(c, n) / fit(clamped)``).
    """

    def __init__(self, c: Sequence[float], n: Sequence[float], ms: Sequence[float]):
        c_arr, n_arr, y = (np.asarray(v, dtype=float) for v in (c, n, ms))
        feats = _shape_features(c_arr, n_arr)
        # Relative-error least squares: divide rows by the measurement.
        scale = feats.max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls((feats / scale) / y[:, None], np.ones_like(y))
        self.coef = coef / scale
        self._fit_memo: dict[tuple[float, float], float] = {}
        fit = feats @ self.coef
        if np.any(fit <= 0):
            raise ValueError("profile fit is not positive at every point; add points with larger new_tokens")
        ratio = y / fit
        xy = np.stack([np.log2(1.0 + c_arr), np.log2(n_arr)], axis=-1)
        try:
            linear = LinearNDInterpolator(xy, ratio)
        except Exception:  # degenerate (collinear) points: nearest only
            linear = None
        nearest = NearestNDInterpolator(xy, ratio)

        self.c_axis = np.unique(c_arr)
        self.n_axis = np.unique(n_arr)
        grid = np.full((len(self.c_axis), len(self.n_axis)), np.nan)
        measured = np.zeros_like(grid, dtype=bool)
        for ci, ni, yi in zip(c_arr, n_arr, y):
            i, j = np.searchsorted(self.c_axis, ci), np.searchsorted(self.n_axis, ni)
            grid[i, j] = yi if not measured[i, j] else 0.5 * (grid[i, j] + yi)
            measured[i, j] = True
        for i, ci in enumerate(self.c_axis):
            for j, nj in enumerate(self.n_axis):
                if not measured[i, j]:
                    q = (math.log2(1.0 + ci), math.log2(nj))
                    r = float(linear(*q)) if linear is not None else math.nan
                    if not math.isfinite(r):
                        r = float(nearest(*q))
                    grid[i, j] = self._fit(ci, nj) * r
        # Monotone completion: completed cells lie between the measured cells below and above them.
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if measured[i, j]:
                    continue
                below = grid[: i + 1, : j + 1][measured[: i + 1, : j + 1]]
                above = grid[i:, j:][measured[i:, j:]]
                lo = below.max() if below.size else -np.inf
                hi = above.min() if above.size else np.inf
                grid[i, j] = min(max(grid[i, j], lo), hi) if lo <= hi else 0.5 * (lo + hi)
        # Measured cells are kept as measured: a table with launch-overhead noise at a few tokens stays
        # non-monotone there (by a few ms) rather than having the noise spread over every larger cell.
        self.grid_ms = grid
        self._x = np.log2(1.0 + self.c_axis)
        self._y = np.log2(self.n_axis)
        self._logv = np.log(grid)
        # The lookup runs on Python floats and lists (``__call__`` is scalar; numpy's per-call overhead on
        # scalars was most of a trace replay's planning time).  ``tolist`` keeps every float64 bit for bit,
        # and float64 arithmetic is the same IEEE arithmetic, so the values are unchanged.
        self._xl = self._x.tolist()
        self._yl = self._y.tolist()
        self._logvl = self._logv.tolist()
        self._c_lo, self._c_hi = float(self.c_axis[0]), float(self.c_axis[-1])
        self._n_lo, self._n_hi = float(self.n_axis[0]), float(self.n_axis[-1])

    def _fit(self, c: float, n: float) -> float:
        # Memoised: outside the grid every lookup needs two of these, and numpy's dot on four floats costs
        # microseconds (its summation order is numpy's, so it is not rewritten in Python).
        key = (float(c), float(n))
        value = self._fit_memo.get(key)
        if value is None:
            value = float(_shape_features(np.array([key[0]]), np.array([key[1]]))[0] @ self.coef)
            self._fit_memo[key] = value
        return value

    @staticmethod
    def _locate(axis: list[float], v: float) -> tuple[int, float]:
        """Cell ``k`` of the sorted ``axis`` holding ``v`` (clamped to the first / last cell) and the
        fraction of the way through it: ``np.searchsorted`` (left) is ``bisect_left``."""
        last = len(axis) - 2
        if last < 0:
            return 0, 0.0
        k = bisect_left(axis, v) - 1
        k = 0 if k < 0 else (last if k > last else k)
        return k, (v - axis[k]) / (axis[k + 1] - axis[k])

    def __call__(self, c: float, n: float) -> float:
        c_lo, c_hi, n_lo, n_hi = self._c_lo, self._c_hi, self._n_lo, self._n_hi
        cc = min(max(float(c), c_lo), c_hi)
        nn = min(max(float(n), n_lo), n_hi)
        x, y, v = self._xl, self._yl, self._logvl
        i, u = self._locate(x, math.log2(1.0 + cc))
        j, w = self._locate(y, math.log2(nn))
        if len(x) == 1:
            row = v[0]
            lv = (1 - w) * row[j] + w * row[min(j + 1, len(row) - 1)]
        elif len(y) == 1:
            lv = (1 - u) * v[i][0] + u * v[i + 1][0]
        else:
            r0, r1 = v[i], v[i + 1]
            lv = (1 - u) * ((1 - w) * r0[j] + w * r0[j + 1]) + u * ((1 - w) * r1[j] + w * r1[j + 1])
        value = math.exp(lv)
        if cc != c or nn != n:
            value *= self._fit(c, n) / self._fit(cc, nn)
        return value


@dataclass
class ProfileCompute:
    """Measured per-layer and whole-prefill times, interpolated over (cached_tokens, new_tokens)."""

    points: list[ProfilePoint]
    num_layers: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = [p.cached_tokens for p in self.points]
        n = [p.new_tokens for p in self.points]
        self._prefill = _FitTimesCorrection(c, n, [p.prefill_ms for p in self.points])
        self._layer = _FitTimesCorrection(c, n, [p.layer_ms for p in self.points])
        self._layer_s = functools.lru_cache(maxsize=65536)(self._layer_s_uncached)
        self._prefill_s = functools.lru_cache(maxsize=65536)(self._prefill_s_uncached)

    @classmethod
    def from_csv(cls, path: str | Path, num_layers: int | None = None) -> ProfileCompute:
        meta, points = read_profile(path)
        if num_layers is None:
            if "num_layers" not in meta:
                raise ValueError(f"{path}: pass num_layers or add a '# num_layers: N' header line")
            num_layers = int(meta["num_layers"])
        return cls(points, int(num_layers), meta)

    def _layer_s_uncached(self, cached_tokens: int, new_tokens: int) -> float:
        return self._layer(cached_tokens, new_tokens) * 1e-3

    def _prefill_s_uncached(self, cached_tokens: int, new_tokens: int) -> float:
        return self._prefill(cached_tokens, new_tokens) * 1e-3

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        return self._layer_s(int(cached_tokens), int(new_tokens))

    def prefill_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        return self._prefill_s(int(cached_tokens), int(new_tokens))

    def overhead_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        """Prefill time that is not per-layer work (embedding, final norm, LM head, launch)."""
        return max(
            0.0,
            self.prefill_time_s(cached_tokens, new_tokens)
            - self.num_layers * self.layer_time_s(cached_tokens, new_tokens),
        )


@dataclass(frozen=True)
class RooflineCompute:
    """Analytic per-layer time: max(FLOPs / achieved FLOP/s, HBM bytes / achieved bandwidth) + launch cost.

    FLOPs of one layer for ``n`` new tokens over ``c`` cached tokens: ``2 * params_per_layer * n`` for the
    projections and MLP plus ``4 * n * (c + n/2) * num_heads * head_dim`` for causal attention (QK^T and PV).
    HBM bytes: the layer's weights, the KV it reads and writes, and the activations in and out.
    ``mfu`` and ``hbm_efficiency`` are the achieved fractions of the peaks (0.5 matches the measured
    Llama-3.1-8B full prefills on an H100 within about 15%).
    """

    model: ModelSpec
    peak_flops: float = 989e12  # H100 SXM dense bf16
    hbm_Bps: float = 3.35e12
    mfu: float = 0.5
    hbm_efficiency: float = 0.8
    layer_launch_s: float = 30e-6
    head_overhead_s: float = 1e-3

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def layer_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        m, n, c = self.model, float(new_tokens), float(cached_tokens)
        flops = 2.0 * m.params_per_layer * n + 4.0 * n * (c + n / 2.0) * m.num_heads * m.head_dim
        bytes_moved = (
            m.params_per_layer * m.dtype_bytes
            + m.kv_bytes_per_token_layer * (c + 2.0 * n)
            + 4.0 * n * m.hidden_size * m.dtype_bytes
        )
        return (
            max(flops / (self.peak_flops * self.mfu), bytes_moved / (self.hbm_Bps * self.hbm_efficiency))
            + self.layer_launch_s
        )

    def overhead_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        return self.head_overhead_s if new_tokens > 0 else 0.0

    def prefill_time_s(self, cached_tokens: int, new_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.num_layers * self.layer_time_s(cached_tokens, new_tokens) + self.overhead_time_s(
            cached_tokens, new_tokens
        )


def available_profiles(directory: str | Path) -> list[Path]:
    """The profile tables (``*.csv``) in ``directory``, sorted; none if it does not exist."""
    d = Path(directory)
    return sorted(d.glob("*.csv")) if d.is_dir() else []


def get_compute(
    model: ModelSpec,
    gpu: str = "h100",
    profile: str | Path | None = None,
    *,
    profile_dir: str | Path | None = None,
    **roofline_opts,
) -> ComputeModel:
    """The compute model of ``model`` on ``gpu``: the table ``profile`` if given, else ``<model>_<gpu>.csv``
    in ``profile_dir`` (the caller's directory of profiles) if there is one, else the roofline
    (``roofline_opts``).  The core names no directory of its own: paths come in as arguments."""
    if profile:
        return ProfileCompute.from_csv(profile, model.num_layers)
    candidates: Iterable[Path] = available_profiles(profile_dir) if profile_dir is not None else ()
    for p in candidates:
        if p.stem.lower() == f"{model.name}_{gpu}".lower():
            return ProfileCompute.from_csv(p, model.num_layers)
    return RooflineCompute(model, **roofline_opts)
