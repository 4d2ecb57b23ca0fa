"""A small fixed scenario whose exact TTFTs are committed (``results/golden/determinism.csv``).

Four gathers of mixed contexts contend for a 25 Gbps link under bandwidth_aware, while one request of each
other path runs beside them.  ``tests/sim/test_golden.py`` re-runs it and compares to the committed table
(relative 1e-9), and runs it twice to check that the same seed gives the same table.  Regenerate after an
intended model change with ``python -m sim.golden`` and say why in the commit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from sim.config import PolicyConfig
from sim.metrics import to_frame
from sim.runner import SimRequest, simulate
from sim.setup import Setup

GOLDEN = Path(__file__).resolve().parent.parent / "results" / "golden" / "determinism.csv"
COLUMNS = [
    "request_id",
    "path",
    "cached_tokens",
    "new_tokens",
    "ttft_s",
    "first_layer_wait_s",
    "stall_s",
    "baseline_ttft_s",
]


def scenario() -> tuple[list[SimRequest], Setup]:
    reqs = [
        SimRequest("g0", 0.000, 16384, 128, "gather"),
        SimRequest("g1", 0.002, 4096, 1024, "gather"),
        SimRequest("g2", 0.004, 32768, 4096, "gather"),
        SimRequest("g3", 0.010, 8192, 128, "gather"),
        SimRequest("w0", 0.001, 4096, 128, "s3_whole"),
        SimRequest("r0", 0.003, 2048, 128, "s3_ranged"),
        SimRequest("d0", 0.000, 8192, 512, "dram"),
        SimRequest("l0", 0.000, 8192, 512, "dram_layerwise"),
        SimRequest("c0", 0.000, 2048, 256, "recompute"),
    ]
    return reqs, Setup(policy=PolicyConfig(name="bandwidth_aware"), net_Gbps=25.0)


def run_scenario() -> pd.DataFrame:
    reqs, setup = scenario()
    records, _ = simulate(reqs, setup, "golden", "golden", 0)
    return to_frame(records)[COLUMNS].sort_values("request_id").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sim.golden",
        description="Re-run the golden scenario and rewrite results/golden/determinism.csv (after an intended "
        "model change; say why in the commit).  --check compares instead of writing.",
    )
    ap.add_argument(
        "--check", action="store_true", help="compare with the committed table; exit 1 if it differs"
    )
    args = ap.parse_args(argv)
    df = run_scenario()
    if args.check:
        same = to_csv_text(df) == GOLDEN.read_text()
        print(f"{GOLDEN}: {'unchanged' if same else 'DIFFERS'}")
        raise SystemExit(0 if same else 1)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(to_csv_text(df))
    print(f"wrote {GOLDEN}")
    print(df.to_string())


def to_csv_text(df: pd.DataFrame) -> str:
    """The golden table as committed: every float with 17 significant digits (round-trip exact)."""
    return df.to_csv(index=False, float_format="%.17g")


if __name__ == "__main__":
    main()
