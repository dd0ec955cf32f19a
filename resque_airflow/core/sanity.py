"""Data sanity before shift: a corrupt batch must not be read as the largest possible shift.

Constant images, all-zero rows or values orders of magnitude outside what the reference held all move the
representation a long way, so RESQUE would send them to the most expensive branch. :class:`InputStats` counts, in
the same pass, what the model was fed; :func:`sanity_problems` compares a batch with the reference's statistics
kept in the fingerprint and names each check that fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resque_airflow.core.accumulator import Mergeable
from resque_airflow.errors import ResqueInputError

# A batch fails a check when more than this fraction of its rows are constant (or all zero) while the reference
# had almost none; and when its values leave the reference's range by more than RANGE_FACTOR times that range.
MAX_DEGENERATE_FRACTION = 0.5
REFERENCE_DEGENERATE_FRACTION = 0.05
RANGE_FACTOR = 100.0
MIN_ROWS_FOR_SINGLE_CLASS = 10


class InputStats(Mergeable):
    """Counts over the rows fed to the model: value range, constant rows, all-zero rows; mergeable.

    Example:
        >>> import numpy as np
        >>> s = InputStats().update(np.zeros((3, 2, 2))) + InputStats().update(np.arange(8.0).reshape(2, 4))
        >>> s.n, s.constant, s.zero, s.minimum, s.maximum
        (5, 3, 3, 0.0, 7.0)
    """

    def __init__(self) -> None:
        self.n = 0
        self.constant = 0
        self.zero = 0
        self.minimum = np.inf
        self.maximum = -np.inf

    def update(self, x: np.ndarray) -> InputStats:
        """Add a batch of ``(N, ...)`` numeric model input (any dtype that converts to float)."""
        a = np.asarray(x)
        if a.ndim == 0 or a.shape[0] == 0:
            return self
        rows = a.reshape(a.shape[0], -1).astype(np.float64, copy=False)
        if rows.shape[1] == 0:
            return self
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        self.n += rows.shape[0]
        self.constant += int((lo == hi).sum())
        self.zero += int(((lo == 0) & (hi == 0)).sum())
        self.minimum = float(min(self.minimum, lo.min()))
        self.maximum = float(max(self.maximum, hi.max()))
        return self

    def _signature(self) -> dict[str, int]:
        return {}

    def _merge(self, other: InputStats) -> None:
        self.n += other.n
        self.constant += other.constant
        self.zero += other.zero
        self.minimum = float(min(self.minimum, other.minimum))
        self.maximum = float(max(self.maximum, other.maximum))

    def to_dict(self) -> dict:
        finite = self.n > 0
        return {
            "n": self.n, "constant": self.constant, "zero": self.zero,
            "minimum": self.minimum if finite else None, "maximum": self.maximum if finite else None,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> InputStats:
        out = cls()
        try:
            out.n, out.constant, out.zero = int(d["n"]), int(d["constant"]), int(d["zero"])
            out.minimum = np.inf if d["minimum"] is None else float(d["minimum"])
            out.maximum = -np.inf if d["maximum"] is None else float(d["maximum"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ResqueInputError(f"input statistics: damaged ({exc}); recompute the fingerprint") from exc
        return out


@dataclass(frozen=True)
class SanityProblem:
    """One failed check: ``check`` is a stable name (``constant_inputs``, ``zero_inputs``, ``out_of_range``,
    ``single_class``), ``message`` a sentence for a person."""

    check: str
    message: str


def sanity_problems(
    reference: InputStats,
    new: InputStats,
    *,
    reference_classes: np.ndarray | None = None,
    new_classes: np.ndarray | None = None,
) -> list[SanityProblem]:
    """Every check the new batch fails against the reference (empty when it looks like data).

    ``reference_classes`` / ``new_classes`` are ``(K,)`` given-label counts, when both sides have labels.

    >>> import numpy as np
    >>> ref = InputStats().update(np.random.default_rng(0).uniform(0, 1, (100, 8)))
    >>> [p.check for p in sanity_problems(ref, InputStats().update(np.full((50, 8), 0.5)))]
    ['constant_inputs']
    >>> [p.check for p in sanity_problems(ref, InputStats().update(np.full((50, 8), 1e6) * np.arange(8)))]
    ['out_of_range']
    """
    out = []
    if new.n == 0 or reference.n == 0:
        return out
    for check, attr, what in (("zero_inputs", "zero", "all zeros"), ("constant_inputs", "constant", "constant")):
        frac, ref_frac = getattr(new, attr) / new.n, getattr(reference, attr) / reference.n
        if frac > MAX_DEGENERATE_FRACTION and ref_frac < REFERENCE_DEGENERATE_FRACTION:
            out.append(SanityProblem(check, f"{frac:.0%} of the batch's rows are {what} (reference: {ref_frac:.1%})"))
            break  # all-zero rows are constant too: one problem, named once
    span = max(reference.maximum - reference.minimum, 1e-12)
    if new.maximum > reference.maximum + RANGE_FACTOR * span or new.minimum < reference.minimum - RANGE_FACTOR * span:
        out.append(SanityProblem(
            "out_of_range",
            f"values span [{new.minimum:.3g}, {new.maximum:.3g}], more than {RANGE_FACTOR:g}x the reference range "
            f"[{reference.minimum:.3g}, {reference.maximum:.3g}] away (wrong scaling or units?)",
        ))  # fmt: skip
    if reference_classes is not None and new_classes is not None:
        ref_k, new_k = int((reference_classes > 0).sum()), int((new_classes > 0).sum())
        if ref_k >= 2 and new_k == 1 and new_classes.sum() >= MIN_ROWS_FOR_SINGLE_CLASS:
            k = int(np.flatnonzero(new_classes)[0])
            out.append(SanityProblem(
                "single_class", f"every one of the batch's {int(new_classes.sum())} labels is class {k} "
                f"(the reference has {ref_k} classes): a labelling or export error?",
            ))  # fmt: skip
    return out
