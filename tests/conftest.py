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
