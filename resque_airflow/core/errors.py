"""Exceptions shared by every layer.

The CLI maps :class:`ResqueInputError` (and its subclasses) to exit code 2 with a one-line message, and
:class:`RegistryError` to exit code 3; the operator turns input errors into a task failure without retry
(``ResqueBadInputError``) and anything else into a retryable ``ResqueGateError``. Messages name the problem, the value
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


class NotRegisteredError(RegistryError, ResqueInputError):
    """The registry answered, and does not hold the model, alias or version asked for.

    A :class:`RegistryError` (the CLI's exit code 3, as for any registry error) that is also bad input: the
    operator fails without retry, since asking again cannot make it appear.
    """
