"""The gate's decision policy: thresholds on the score (and, with enough history, predicted cost)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from resque_airflow.errors import ResqueInputError


class Decision(str, enum.Enum):
    """What to do with the production model."""

    REUSE = "reuse"
    RETRAIN = "retrain"
    REBUILD = "rebuild"
    DATA_ISSUE = "data_issue"  # the batch looks corrupt, not shifted (core.sanity): neither reuse nor retrain

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds: ``score <= reuse`` -> reuse; ``score > rebuild`` -> rebuild; otherwise retrain.

    Scores are RESQUE values in [0, 1]. Defaults are documented in ``docs/THRESHOLDS.md`` with the measurement
    they come from.
    """

    reuse: float
    rebuild: float

    def validate(self) -> Thresholds:
        for name in ("reuse", "rebuild"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ResqueInputError(f"{name}_threshold: expected a number in [0, 1], got {v!r}")
        if not self.reuse < self.rebuild:
            raise ResqueInputError(
                f"thresholds: reuse_threshold ({self.reuse}) must be below rebuild_threshold ({self.rebuild})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def decide(score: float, thresholds: Thresholds) -> Decision:
    """Map a score to a :class:`Decision` with ``thresholds``.

    >>> decide(0.01, Thresholds(reuse=0.02, rebuild=0.2)).value
    'reuse'
    >>> decide(0.5, Thresholds(0.02, 0.2)).value
    'rebuild'
    """
    thresholds.validate()
    if score <= thresholds.reuse:
        return Decision.REUSE
    if score > thresholds.rebuild:
        return Decision.REBUILD
    return Decision.RETRAIN


# Defaults per mode, measured by benchmarks/evidence.py; docs/THRESHOLDS.md gives the derivation. rebuild=1.0: on
# that evidence fine-tuning was cheaper than rebuilding in 154/155 shift runs and 40/40 task runs, so the score
# alone never picks rebuild (the cost-aware policy can, from the model's own history).
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "dist": Thresholds(reuse=0.0123, rebuild=1.0),
    "task": Thresholds(reuse=0.0, rebuild=1.0),
}
