"""The GPU compute models: the shipped profile, its interpolation, the roofline fallback."""

from __future__ import annotations

import pytest

from scheduler.compute import ProfileCompute, RooflineCompute, get_compute, read_profile
from scheduler.geometry import get_model
from sim.setup import PROFILE_DIR

LLAMA = get_model("llama-3.1-8b")


@pytest.fixture(scope="module")
def profile():
    comp = get_compute(LLAMA, "h100", profile_dir=PROFILE_DIR)
    assert isinstance(comp, ProfileCompute), "the shipped Llama-3.1-8B H100 profile was not found"
    return comp


def test_profile_is_exact_at_every_measured_point(profile):
    for p in profile.points:
        assert profile.prefill_time_s(p.cached_tokens, p.new_tokens) == pytest.approx(
            p.prefill_ms / 1e3, rel=1e-9
        )
        assert profile.layer_time_s(p.cached_tokens, p.new_tokens) == pytest.approx(
            p.layer_ms / 1e3, rel=1e-9
        )


def test_profile_matches_the_issue_totals(profile):
    # A few of the measured totals (ms) from the issue, read back through the model.
    for cached, new, ms in [(0, 65536, 3731), (4096, 128, 45.6), (32768, 1024, 118), (61440, 4096, 650)]:
        assert profile.prefill_time_s(cached, new) * 1e3 == pytest.approx(ms, rel=1e-9)


def test_profile_interpolation_is_monotone_in_new_and_cached_tokens(profile):
    for cached in (4096, 8192, 24576, 49152):
        times = [profile.prefill_time_s(cached, n) for n in (128, 256, 512, 1024, 2048, 4096)]
        assert times == sorted(times)
    for new in (128, 1024, 4096):
        times = [profile.prefill_time_s(c, new) for c in (4096, 8192, 16384, 24576, 32768, 49152, 61440)]
        assert times == sorted(times)


def test_profile_interpolates_between_neighbours(profile):
    mid = profile.prefill_time_s(24576, 1024)
    assert profile.prefill_time_s(16384, 1024) < mid < profile.prefill_time_s(32768, 1024)


def test_layer_time_times_layers_is_the_prefill(profile):
    assert profile.num_layers == 32
    for c, n in [(4096, 128), (20000, 3000), (100000, 2048)]:
        assert profile.num_layers * profile.layer_time_s(c, n) <= profile.prefill_time_s(c, n) * (1 + 1e-12)


def test_roofline_is_within_a_factor_of_the_measured_full_prefills(profile):
    roof = RooflineCompute(LLAMA)
    for new in (4096, 16384, 32768):
        ratio = roof.prefill_time_s(0, new) / profile.prefill_time_s(0, new)
        assert 0.5 < ratio < 2.0, (new, ratio)
    # Compute grows with work; a model without a profile gets the roofline.
    assert roof.layer_time_s(0, 8192) > roof.layer_time_s(0, 4096) > 0
    assert isinstance(
        get_compute(get_model("llama-3.1-70b"), "h100", profile_dir=PROFILE_DIR), RooflineCompute
    )


def test_read_profile_parses_meta_and_rejects_bad_tables(tmp_path):
    good = tmp_path / "m_g.csv"
    good.write_text(
        "# model: m\n# gpu: g\n# num_layers: 2\ncached_tokens,new_tokens,prefill_ms,layer_ms\n"
        "0,1024,10,4\n0,4096,40,19\n1024,128,5,2\n4096,128,6,2.5\n"
    )
    meta, points = read_profile(good)
    assert meta["model"] == "m" and meta["num_layers"] == "2" and len(points) == 4
    comp = ProfileCompute.from_csv(good)
    assert comp.num_layers == 2 and comp.prefill_time_s(0, 1024) == pytest.approx(0.010)
    bad = tmp_path / "bad.csv"
    bad.write_text("cached_tokens,new_tokens,prefill_ms\n0,1,1\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_profile(bad)
    neg = tmp_path / "neg.csv"
    neg.write_text("cached_tokens,new_tokens,prefill_ms,layer_ms\n0,0,1,1\n0,1,1,1\n0,2,1,1\n0,3,1,1\n")
    with pytest.raises(ValueError, match="out-of-range"):
        read_profile(neg)


def test_the_profilers_measured_table_loads_and_is_exact():
    """The testbed profiler's table (extra columns, noisy small-token cells) is read and kept as measured."""
    comp = ProfileCompute.from_csv(PROFILE_DIR / "llama-3.1-8b_h100_measured.csv", LLAMA.num_layers)
    for p in comp.points:
        assert comp.prefill_time_s(p.cached_tokens, p.new_tokens) == pytest.approx(
            p.prefill_ms / 1e3, rel=1e-9
        )
    # Large prefills grow with both token counts.
    assert (
        comp.prefill_time_s(65536, 8192) > comp.prefill_time_s(32768, 8192) > comp.prefill_time_s(32768, 2048)
    )
