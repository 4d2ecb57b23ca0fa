"""Determinism and the golden scenario: the same inputs reproduce the same TTFTs exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.golden import COLUMNS, GOLDEN, run_scenario


def test_same_scenario_twice_gives_identical_tables():
    a, b = run_scenario(), run_scenario()
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_golden_ttfts():
    """Exact TTFTs of the committed scenario (regenerate with ``python -m sim.golden`` on purpose only)."""
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: run python -m sim.golden")
    want = pd.read_csv(GOLDEN)
    got = run_scenario()
    assert list(got.request_id) == list(want.request_id)
    for col in COLUMNS[4:]:
        np.testing.assert_allclose(
            got[col].to_numpy(), want[col].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=col
        )
    # Sanity on the scenario itself, independent of the committed numbers.
    t = got.set_index("request_id").ttft_s
    assert t["l0"] <= t["d0"]
    assert (got.ttft_s > 0).all()
