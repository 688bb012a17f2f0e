"""mlx_zeta: modular neural-network building blocks on MLX.

Importing this package first routes MLX's Linux CPU matmuls to an optimized
BLAS (see :mod:`mlx_zeta._blas`); it must therefore run before ``mlx.core`` is
imported anywhere else in the process.
"""

from mlx_zeta._blas import blas_info, route_blas

route_blas()

from mlx_zeta import nn  # noqa: E402  (must follow route_blas)

from mlx_zeta.converters.pretrained import from_pretrained, save_pretrained  # noqa: E402
from mlx_zeta.lm import generate, load, stream_generate  # noqa: E402
from mlx_zeta._version import __version__  # noqa: E402
__all__ = ["nn", "blas_info", "route_blas", "from_pretrained", "save_pretrained", "load", "generate",
           "stream_generate", "__version__"]
