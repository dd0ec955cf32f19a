"""Exceptions shared by every layer.

The CLI maps :class:`ResqueInputError` (and its subclasses) to exit code 2 with a one-line message, and
:class:`RegistryError` to exit code 3; the operator turns input errors into a task failure without retry
(``ResqueBadInputError``) and anything else into a retryable ``ResqueGateError``. Messages name the problem, the value
received and the fix.
"""

from __future__ import annotations

from collections.abc import Collection


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


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise :class:`ResqueInputError` naming ``name`` unless ``value`` is one of ``choices``.

    >>> check_choice("labels", "given", ("given", "predicted", "none"))
    >>> check_choice("labels", "gvien", ("given", "predicted", "none"))
    Traceback (most recent call last):
    ...
    resque_airflow.errors.ResqueInputError: labels: expected one of ('given', 'predicted', 'none'), got 'gvien'
    """
    if value not in choices:
        raise ResqueInputError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or of a string), at most ``limit`` characters.

    MLflow and ONNX Runtime put pages of context under the line that says what went wrong.

    >>> first_line(ValueError("bad shape\\n  at frame 1"))
    'bad shape'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(exc) if not isinstance(exc, str) else exc
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__ if isinstance(exc, BaseException) else ""
