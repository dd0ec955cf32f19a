"""Templated operator arguments as the operators take them.

Without ``render_template_as_native_obj`` a templated argument renders as text: ``"0.2"``, ``"True"``, or ``"None"``
(and ``""``) for a param left unset; with it, as the param's own type. These read both, and name the argument when
the text means nothing.
"""

from __future__ import annotations

from resque_airflow.errors import ResqueInputError

_UNSET = ("", "None")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def number(name: str, value: object) -> float | None:
    """A numeric argument: a number, or None when unset; the range is checked where it is used.

    >>> number("max_cost", "12.5"), number("max_cost", "None"), number("max_cost", 3)
    (12.5, None, 3)
    """
    if not isinstance(value, str):
        return value
    if value.strip() in _UNSET:
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise ResqueInputError(f"{name}: expected a number, got {value!r}") from exc


def flag(name: str, value: object) -> bool:
    """A boolean argument: a bool, or its rendering (``"True"``/``"False"``, any case; ``1``/``0``; ``yes``/``no``).

    >>> flag("approve_rebuilds", "False"), flag("approve_rebuilds", True)
    (False, True)
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ResqueInputError(f"{name}: expected true or false, got {value!r}")
