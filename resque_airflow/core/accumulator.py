"""The one protocol of a pass's accumulators: :class:`ClassSums`, :class:`Reservoir` and :class:`FeatureSummary`.

Like River's ``stats.Mean``, an accumulator is built batch by batch and merges with another built the same way:

- ``acc.update(batch...)`` adds one batch and returns ``acc``, so calls chain;
- ``a += b`` merges ``b`` into ``a``; ``a + b`` returns a new accumulator and leaves both unchanged;
- ``sum([a, b, c])`` merges a list (``0 + a`` is a copy of ``a``), in any order for the exact ones;
- before merging, the two are checked to be compatible: another type raises ``TypeError``, another shape
  (classes, width, sample size) raises :class:`~resque_airflow.errors.ResqueInputError` naming what differs.

A subclass says what must agree (:meth:`Mergeable._signature`) and how to merge in place (:meth:`Mergeable._merge`).

    >>> import numpy as np
    >>> from resque_airflow.core.classsums import ClassSums
    >>> parts = [ClassSums(2, 1).update(np.ones((n, 1)), np.zeros(n, int)) for n in (1, 2, 3)]
    >>> sum(parts).counts.tolist(), parts[0].counts.tolist()
    ([6, 0], [1, 0])
    >>> parts[0] + ClassSums(3, 1)
    Traceback (most recent call last):
    ...
    resque_airflow.errors.ResqueInputError: ClassSums: cannot merge one with num_classes=3 into one with num_classes=2
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from resque_airflow.errors import ResqueInputError

M = TypeVar("M", bound="Mergeable")


class Mergeable:
    """Mixin giving ``+``, ``+=`` and ``sum()`` to an accumulator from :meth:`_signature` and :meth:`_merge`."""

    def _signature(self) -> dict[str, Any]:
        """The attributes two accumulators must share to merge, by name (e.g. ``{"num_classes": 10, "dim": 512}``)."""
        raise NotImplementedError

    def _merge(self, other: Any) -> None:
        """Add ``other`` (checked compatible) into ``self``, in place."""
        raise NotImplementedError

    def check_mergeable(self, other: object) -> None:
        """Raise unless ``other`` can be merged into ``self``: ``TypeError`` for another type, and
        :class:`ResqueInputError` naming every attribute of :meth:`_signature` that differs."""
        name = type(self).__name__
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {name} with {type(other).__name__}")
        ours, theirs = self._signature(), other._signature()
        differ = [k for k in ours if ours[k] != theirs[k]]
        if differ:
            raise ResqueInputError(
                f"{name}: cannot merge one with {', '.join(f'{k}={theirs[k]!r}' for k in differ)} into one with "
                f"{', '.join(f'{k}={ours[k]!r}' for k in differ)}"
            )

    def __iadd__(self: M, other: M) -> M:
        self.check_mergeable(other)
        self._merge(other)
        return self

    def __add__(self: M, other: M) -> M:
        self.check_mergeable(other)
        out = copy.deepcopy(self)  # a random accumulator's generator too: a + b equals a += b on a copy
        out._merge(other)
        return out

    def __radd__(self: M, other: object) -> M:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return copy.deepcopy(self)  # sum() starts from 0
        return NotImplemented
