import pytest

from .chartlib import helm_binary


@pytest.fixture(scope="session")
def helm() -> str:
    h = helm_binary()
    if not h:
        pytest.skip("helm not found: build it with `python tests/cluster/build.py` (or put helm on PATH)")
    return h
