"""Exceptions shared by every layer.

The CLI maps :class:`ResqueInputError` (and its subclasses) to exit code 2 with a one-line message; the operator
wraps any of them in :class:`~resque_airflow.operators.gate.ResqueGateError`. Messages name the problem, the value
received and the fix.
"""

from __future__ import annotations


class ResqueError(Exception):
    """Base class of every error raised on purpose by this package."""


class ResqueInputError(ResqueError, ValueError):
    """The data, model, fingerprint or parameters given by the user cannot be scored as they are."""


class FingerprintError(ResqueInputError):
    """A fingerprint is damaged, from a newer format, or does not belong to the model it is used with."""


class ModelError(ResqueInputError):
    """An ONNX model cannot be loaded, or has no tensor of the requested name."""


class RegistryError(ResqueError):
    """The MLflow registry is unreachable or does not hold what was asked for."""
