"""Kernel sources shipped with mlx_zeta (Metal first, CUDA twins beside them).

Installed as ``mlx_zeta.metal``; read a source with :func:`read_source`.
"""

from importlib import resources
from typing import List

_SUFFIXES = (".metal", ".h", ".cu", ".cuh")


def list_sources() -> List[str]:
    """Names of the kernel source files that ship with this install."""
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(_SUFFIXES))


def read_source(name: str) -> str:
    """The text of one kernel source file, e.g. ``read_source("common.h")``."""
    if name not in list_sources():
        raise FileNotFoundError(f"[mlx_zeta.metal] no kernel source {name!r}; shipped: {list_sources()}")
    return resources.files(__name__).joinpath(name).read_text()
