"""Checking a loaded state dict against the model it is meant for: names and shapes, with a
message that lists what is missing, unexpected or mis-shaped. Shared by the checkpoint loaders
of :mod:`mlx_zeta.converters` and :mod:`mlx_zeta.training`."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["check_keys"]

_MAX_LISTED = 20


def _listing(names: list[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return f"{len(names)}: {shown}{more}"


def check_keys(expected: Mapping[str, tuple], weights: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless ``weights`` has exactly the names and shapes expected.

    Args:
        expected (dict): ``{name: shape}`` the model wants.
        weights (dict): ``{name: array}`` loaded from the checkpoint.
        where (str): what is being checked (a file or model name), put first in
          the message.

    The message, one line, lists missing and unexpected keys (sorted, at most 20 of
    each shown, plus the count) and the shape mismatches (at most 20) with both shapes.
    """
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        (k, tuple(expected[k]), tuple(weights[k].shape))
        for k in sorted(expected)
        if k in weights and tuple(expected[k]) != tuple(weights[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k}: model expects {want}, checkpoint has {got}" for k, want, got in mismatched[:_MAX_LISTED]]
        more = f", ... ({len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
        parts.append(f"shape mismatches {len(mismatched)}: {', '.join(shapes)}{more}")
    raise ValueError(f"[{where}] checkpoint does not match the model: {'; '.join(parts)}")
