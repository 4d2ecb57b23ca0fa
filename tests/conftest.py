"""Shared pytest configuration: markers that need hardware say why they skip."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests explore new random cases on a developer's machine but replay a fixed set in CI, so a CI
# failure is reproducible and a green run cannot turn red by luck.  `HYPOTHESIS_PROFILE=ci` forces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# Fixture modules shared across test folders (real server processes).
pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.rgw"]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch is an optional extra
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run on the device machine (`pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
