"""Fixtures shared by the operator's unit tests (builders of objects live in operator_builders.py)."""

from __future__ import annotations

import pytest

from kubetune.operator.config import OperatorConfig


@pytest.fixture
def config() -> OperatorConfig:
    return OperatorConfig(runtime_image="registry.example/kubetune/runtime:1", poll_interval=5)
