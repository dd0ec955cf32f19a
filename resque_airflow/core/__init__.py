"""numpy-only maths of RESQUE: class sums, the metrics, the fingerprint format and the decision policy.

Nothing here imports Airflow, MLflow or ONNX Runtime.
"""

from resque_airflow.core.classsums import ClassSums
from resque_airflow.core.costmodel import MIN_HISTORY, CostModel, Prediction
from resque_airflow.core.decision import DEFAULT_THRESHOLDS, Decision, Thresholds, decide
from resque_airflow.core.fingerprint import Fingerprint, ImageSpec, InputSpec
from resque_airflow.core.metrics import DistScore, TaskScore, ks_mean, mmd_linear, resque_dist, resque_task
from resque_airflow.core.summary import FeatureSummary, companion_signals, sums_for
from resque_airflow.errors import (
    FingerprintError,
    ModelError,
    RegistryError,
    ResqueError,
    ResqueInputError,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MIN_HISTORY",
    "ClassSums",
    "CostModel",
    "Decision",
    "DistScore",
    "FeatureSummary",
    "Fingerprint",
    "FingerprintError",
    "ImageSpec",
    "InputSpec",
    "ModelError",
    "Prediction",
    "RegistryError",
    "ResqueError",
    "ResqueInputError",
    "TaskScore",
    "Thresholds",
    "companion_signals",
    "decide",
    "ks_mean",
    "mmd_linear",
    "resque_dist",
    "resque_task",
    "sums_for",
]
