"""Argument checks shared by every layer: integers, positive numbers, choices, int pairs.

Each check raises ``ValueError`` in the house style and returns the value it accepted::

    [Owner] expected <name> to be an int >= 1, got 0
    [Owner] expected <name> > 0 or None, got -1.0
    [Owner] expected <name> in ('a', 'b'), got 'c'

``bool`` is never accepted where an int is expected (``True`` is an ``int`` to Python,
never a width or a count to us). Sites that have worded a check their own way since
before these helpers existed keep their words through ``says=``: the text between
``[Owner] `` and ``, got <value>``, e.g. ``says="dim must be a positive integer"``.
New code uses the default wording.

    >>> from mlx_zeta.common import check_choice, check_int
    >>> check_int("RMSNorm", "dim", 64, 1)
    64
    >>> print(check_int("sample", "top_k", None, 1, optional=True))
    None
    >>> check_choice("TernaryLinear", "kernel", "fused", ("auto", "unpack", "fused"))
    'fused'
    >>> check_int("RMSNorm", "dim", 0, 1)
    Traceback (most recent call last):
        ...
    ValueError: [RMSNorm] expected dim to be an int >= 1, got 0
"""

import math
from numbers import Real
from typing import Any, Optional, Sequence, Tuple, Union

__all__ = ["check_int", "check_sizes", "check_positive", "check_choice", "check_int_pair", "is_int"]


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(owner: str, name: str, expected: str, value: Any, says: Optional[str]) -> ValueError:
    text = says if says is not None else f"expected {name} {expected}"
    return ValueError(f"[{owner}] {text}, got {value!r}")


def _int_words(low: Optional[int], high: Optional[int]) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high}]"
    if low is not None:
        return f"an int >= {low}"
    if high is not None:
        return f"an int <= {high}"
    return "an int"


def check_int(owner: str, name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *,
              optional: bool = False, says: Optional[str] = None) -> Optional[int]:
    """Check that ``value`` is an int (not a bool) with ``low <= value <= high``.

    Args:
        owner (str): the class or function named in brackets.
        name (str): the argument's name.
        value: the argument.
        low (int, optional): smallest accepted value. Default: no bound.
        high (int, optional): largest accepted value. Default: no bound.
        optional (bool): also accept ``None``. Default: ``False``.
        says (str, optional): the site's own wording (see the module docstring).

    Returns:
        ``value``.

    Raises ``ValueError("[owner] expected name to be an int >= low, got value")``.
    """
    if optional and value is None:
        return None
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        words = ("None or " if optional else "") + _int_words(low, high)
        raise _fail(owner, name, f"to be {words}", value, says)
    return value


def check_sizes(owner: str, **sizes: Optional[int]) -> None:
    """:func:`check_int` ``>= 1`` for each keyword (a width, a count); ``None`` passes (an optional
    size that takes its default). Message: ``[owner] expected <name> to be an int >= 1, got v``."""
    for name, value in sizes.items():
        check_int(owner, name, value, 1, optional=True, says=f"expected {name} to be an int >= 1")


def check_positive(owner: str, name: str, value: Any, *, optional: bool = False,
                   says: Optional[str] = None) -> Optional[float]:
    """Check that ``value`` is a real number (not a bool, not NaN) greater than 0.

    Args:
        owner (str): the class or function named in brackets.
        name (str): the argument's name.
        value: the argument.
        optional (bool): also accept ``None``. Default: ``False``.
        says (str, optional): the site's own wording (see the module docstring).

    Returns:
        ``value``.

    Raises ``ValueError("[owner] expected name > 0, got value")`` (``> 0 or None`` when optional).
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value) or not value > 0:
        raise _fail(owner, name, "> 0 or None" if optional else "> 0", value, says)
    return value


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any], *, optional: bool = False,
                 says: Optional[str] = None) -> Any:
    """Check that ``value`` is one of ``allowed``.

    A ``bool`` is accepted only when ``allowed`` lists bools: ``True`` does not pass for ``1``.

    Args:
        owner (str): the class or function named in brackets.
        name (str): the argument's name.
        value: the argument.
        allowed (Sequence): the accepted values; printed as given (a tuple, list, ...).
        optional (bool): also accept ``None``. Default: ``False``.
        says (str, optional): the site's own wording (see the module docstring).

    Returns:
        ``value``.

    Raises ``ValueError("[owner] expected name in allowed, got value")`` (``in allowed or None`` when optional).
    """
    if optional and value is None:
        return None
    if not any(isinstance(a, bool) == isinstance(value, bool) and a == value for a in allowed):
        raise _fail(owner, name, f"in {allowed}" + (" or None" if optional else ""), value, says)
    return value


def check_int_pair(owner: str, name: str, value: Union[int, Sequence[int]], *,
                   says: Optional[str] = None) -> Tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of positive ints: an int ``n`` gives ``(n, n)``.

    Args:
        owner (str): the class or function named in brackets.
        name (str): the argument's name.
        value (int or tuple of int): a size, or a height and a width.
        says (str, optional): the site's own wording (see the module docstring).

    Returns:
        The pair as a tuple.

    Raises ``ValueError("[owner] expected name to be a positive int or a pair (h, w) of positive ints,
    got value")``.
    """
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(v) and v > 0 for v in pair):
        raise _fail(owner, name, "to be a positive int or a pair (h, w) of positive ints", value, says)
    return pair
