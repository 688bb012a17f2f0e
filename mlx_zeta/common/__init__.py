"""The bottom layer: helpers every other layer shares and that import nothing of mlx_zeta.

``checks``: argument validation (``check_int``, ``check_positive``, ``check_choice``,
``check_int_pair``). ``files``: atomic writes (``atomic_path``, ``remove_stale``), ``read_json_object``. ``state``:
``check_keys``, a loaded state dict against a model's names and shapes.
"""

from mlx_zeta.common.checks import check_choice, check_int, check_int_pair, check_positive, check_sizes, is_int
from mlx_zeta.common.files import atomic_path, fsync_tree, read_json_object, remove_stale
from mlx_zeta.common.state import check_keys

__all__ = ["check_int", "check_sizes", "check_positive", "check_choice", "check_int_pair", "is_int",
           "atomic_path", "fsync_tree", "read_json_object", "remove_stale", "check_keys"]
