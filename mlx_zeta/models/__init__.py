"""Composite models built from mlx_zeta.structs, re-exported by name."""

from mlx_zeta.models.palme import PalmE

__all__ = ["PalmE"]
