"""Shared fixtures of the scheduler tests."""

from __future__ import annotations

import pytest

from tests.scheduler.instances import LLAMA_8B, TinyCompute


@pytest.fixture
def tiny_compute() -> TinyCompute:
    return TinyCompute()


@pytest.fixture
def llama8b():
    return LLAMA_8B
