"""Strict JSON for everything this package writes: ``--json`` output, XCom, ``gate_result.json``, ``fingerprint.json``
and the ``resque.last_gate`` tag.

Python's :mod:`json` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader accepts (JavaScript's
``JSON.parse``, PostgreSQL's ``jsonb``, Go, jq). Here a non-finite float is a missing value (``null``), and the text is
written with ``allow_nan=False`` so that nothing slips through. A value that must never be missing, the gate's score,
is refused before it is decided on (:func:`resque_airflow.errors.check_finite`).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf, NumPy's included) replaced by ``None``, recursively through
    dicts, lists and tuples (tuples become lists); NumPy scalars become Python numbers.

    >>> finite({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")})
    {'a': None, 'b': [1.0, None], 'c': [2, 'x']}
    """
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # NumPy scalars and 0-d arrays
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return finite(item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``obj`` as strict JSON: non-finite floats as ``null`` (:func:`finite`), and ``allow_nan=False``.

    >>> dumps({"score": float("nan"), "n": 3})
    '{"score": null, "n": 3}'
    """
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
