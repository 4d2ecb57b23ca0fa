"""The GPU profiler's table: written in scheduler.compute's profile format and readable by the simulator's
compute model (run here on the CPU with the tiny model; the H100 profile is made on the device machine)."""

from __future__ import annotations

from scheduler.compute import ProfileCompute, read_profile
from testbed.engine import profile


def test_default_grid_covers_full_prefills_and_cached_points():
    grid = profile.default_grid()
    assert (0, 64 * 1024) in grid and (32 * 1024, 32 * 1024) in grid and (64 * 1024, 16) in grid
    assert all(c + n <= profile.DEFAULT_MAX_TOTAL for c, n in grid)
    assert {c for c, _ in grid} >= set(profile.DEFAULT_CACHED)
    assert len(grid) == len(set(grid))
    assert profile.parse_grid("0:64, 128:16") == [(0, 64), (128, 16)]


def test_profile_cli_writes_a_table_the_simulator_reads(tmp_path):
    out = tmp_path / "tiny_cpu.csv"
    grid = "0:32,0:128,0:256,64:16,128:64,256:32"
    assert (
        profile.main(
            ["--model", "tiny", "--device", "cpu", "--grid", grid, "--repeats", "2", "--out", str(out)]
        )
        == 0
    )
    meta, points = read_profile(out)
    assert (
        meta["model"] == "tiny" and meta["dtype"] == "float32" and "testbed.engine.profile" in meta["command"]
    )
    assert [(p.cached_tokens, p.new_tokens) for p in points] == profile.parse_grid(grid)
    for p in points:
        # The whole prefill contains all 4 layers plus embedding and head.
        assert p.layer_ms > 0 and p.prefill_ms >= 4 * p.layer_ms * 0.999
    model = ProfileCompute.from_csv(out, num_layers=4)
    assert model.layer_time_s(128, 64) > 0
