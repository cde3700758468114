"""Argument checks shared by every public entry point: one wording, one policy.

* A value of the wrong **type** raises ``TypeError``; a value of the right type but out of range
  (or not one of the allowed choices) raises ``ValueError``.
* The message names the argument, shows what was given and says what is allowed:
  ``"stride must be an int >= 1; got 0"``, ``"sigma must be a real number; got '0.8' (a str)"``.
* ``bool`` is never accepted as a number (``True`` is an ``int`` to Python, not to a user), and a
  tensor is never accepted where a Python number is expected (reading it would sync the device).

Each check returns the value normalised (``check_real`` a ``float``, ``check_int`` an ``int``), so
callers write ``self.sigma = check_real(sigma, "sigma", greater_than=0)``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_real",
    "check_reals",
    "describe",
]

T = TypeVar("T")


def describe(value: Any) -> str:
    """``repr(value)`` (shortened) and, unless it is a plain ``int`` or ``float``, its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if type(value) in (int, float):
        return text
    return f"{text} (a {type(value).__name__})"


def _range_text(minimum: float | None, greater_than: float | None, maximum: float | None,
                less_than: float | None) -> str:
    parts = []
    if minimum is not None:
        parts.append(f">= {minimum}")
    if greater_than is not None:
        parts.append(f"> {greater_than}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    if less_than is not None:
        parts.append(f"< {less_than}")
    return " and ".join(parts)


def _check_range(number: float, name: str, kind: str, minimum: float | None,
                 greater_than: float | None, maximum: float | None, less_than: float | None,
                 original: Any) -> None:
    if ((minimum is not None and not number >= minimum)
            or (greater_than is not None and not number > greater_than)
            or (maximum is not None and not number <= maximum)
            or (less_than is not None and not number < less_than)):
        allowed = _range_text(minimum, greater_than, maximum, less_than)
        raise ValueError(f"{name} must be {kind} {allowed}; got {original!r}")


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              ) -> int:
    """``value`` as an ``int`` (any integral type but ``bool``), within ``[minimum, maximum]``.

    Raises:
        TypeError: not an integer (``bool``, ``float`` and tensors are refused).
        ValueError: out of range.

    Example::

        >>> check_int(3, "steps", minimum=1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {describe(value)}")
    number = operator.index(value)
    _check_range(number, name, "an int", minimum, None, maximum, None, value)
    return number


def check_real(value: Any, name: str, *, minimum: float | None = None,
               greater_than: float | None = None, maximum: float | None = None,
               less_than: float | None = None, finite: bool = True) -> float:
    """``value`` as a ``float`` (any real number but ``bool``), finite unless ``finite=False``,
    within the given bounds.

    Raises:
        TypeError: not a real number (``bool``, strings and tensors are refused).
        ValueError: NaN, infinite (with ``finite``) or out of range.

    Example::

        >>> check_real(1, "sigma", greater_than=0)
        1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {describe(value)}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    _check_range(number, name, "a number", minimum, greater_than, maximum, less_than, value)
    return number


def check_reals(value: Any, name: str, length: int | None = None, **bounds: float) -> tuple[float,
                                                                                           ...]:
    """A sequence of real numbers (each checked as :func:`check_real` with ``bounds``) as a tuple
    of floats, of exactly ``length`` items when given.

    Raises:
        TypeError: not a sequence (a string is not one), or an item is not a real number.
        ValueError: the wrong length, or an item out of range.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers; got {describe(value)}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must hold {length} numbers; got {value!r}")
    return tuple(check_real(item, f"{name}[{index}]", **bounds) for index, item in enumerate(value))


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool``.

    Raises:
        TypeError: anything else (``0``/``1`` and strings included).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {describe(value)}")
    return value


def check_choice(value: T, name: str, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``.

    Raises:
        TypeError: ``value`` is not of the type of the choices (e.g. an int where strings are
            allowed).
        ValueError: a value of the right type that is not allowed.
    """
    kinds = {type(choice) for choice in choices}
    try:
        allowed = value in choices
    except TypeError:  # an unhashable value against a set of choices
        allowed = False
    if allowed:
        return value
    listed = ", ".join(repr(choice) for choice in choices)
    if kinds and not isinstance(value, tuple(kinds)):
        raise TypeError(f"{name} must be one of {listed}; got {describe(value)}")
    raise ValueError(f"{name} must be one of {listed}; got {value!r}")
