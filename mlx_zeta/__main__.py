"""``python -m mlx_zeta ...``: the ``mlx-zeta`` command line (:func:`mlx_zeta.cli.main`)."""

import sys

from mlx_zeta.cli import main

sys.exit(main())
