"""Shared fixtures. ``import mlx_zeta`` comes first so BLAS routing precedes mlx.core."""

import mlx_zeta  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    mx.random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """``tiny_lm(name)`` -> the folder of the tiny ``name`` checkpoint ("llama", "qwen3", "gpt2",
    "t5"; see lm_tiny.py), built on first use and shared by the whole session."""
    from lm_tiny import MAKERS

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = MAKERS[name](tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get
