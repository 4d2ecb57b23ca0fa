"""The testbed's commands answer ``--help`` without side effects (see ``tests/sim/test_entry_points.py``)."""

from __future__ import annotations

import pytest

from tests.sim.test_entry_points import assert_help_is_harmless

MODULES = [
    "testbed",
    "testbed.validation",
    "testbed.validation.calibrate",
    "testbed.validation.ttft",
    "testbed.harness.agent",
    "testbed.harness.worker",
    "testbed.harness.rgw",
]


@pytest.mark.parametrize("module", MODULES)
def test_testbed_entry_points_answer_help_without_side_effects(module, tmp_path):
    assert_help_is_harmless(module, tmp_path)
