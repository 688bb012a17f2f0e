"""Weight converters shipped with mlx_zeta, installed as ``mlx_zeta.converters``.

Converters for PyTorch and Hugging Face checkpoints, Core ML export and Core AI export live here;
each imports its heavy optional dependency (torch, transformers, coremltools, coreai)
lazily, inside the function that needs it.
"""

__all__: list = []

from .io import CheckpointFormatError, check_finite, check_keys, load_state_dict, save_state_dict
from .fields import ConfigError

__all__ += ["CheckpointFormatError", "ConfigError", "check_finite", "check_keys", "load_state_dict", "save_state_dict"]
from .pretrained import (  # noqa: E402
    ARCHITECTURES, TASKS, BaseModelArgs, PretrainedInfo, from_pretrained, get_architecture, register_architecture,
    quantize, resolve, save_pretrained, task_of, unregister_architecture)

__all__ += ["ARCHITECTURES", "TASKS", "BaseModelArgs", "PretrainedInfo", "from_pretrained", "get_architecture",
            "register_architecture", "quantize", "resolve", "save_pretrained", "task_of", "unregister_architecture"]
