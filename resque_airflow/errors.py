"""Exceptions shared by every layer.

The CLI maps :class:`ResqueInputError` (and its subclasses) to exit code 2 with a one-line message, and
:class:`RegistryError` to exit code 3; the operator turns input errors into a task failure without retry
(``ResqueBadInputError``) and anything else into a retryable ``ResqueGateError``. Messages name the problem, the value
received and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection


class ResqueError(Exception):
    """Base class of every error raised on purpose by this package. Its message is redacted (:func:`redact`) when
    the error is made, so no credential in a URI reaches a CLI line, a task error, a log or a ``resque.error`` tag."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


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


# Redaction: the one place that knows what a secret looks like in text -------------------------------------------

REDACTED = "***"
# Environment variables whose values are credentials: their values are removed from any text that is redacted.
# Values of these variables are secrets wherever they appear. A user name or a file path is not, and replacing one
# wherever it occurs as a substring corrupts ordinary text (a user "gate" would blank every gate tag): left out.
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING",
)  # fmt: skip
MIN_SECRET_LENGTH = 8  # a shorter value is replaced only where a URL or query parameter marks it as a credential
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"<>]+)@")
# The same user:pass@ once a library has stripped the scheme (fsspec logs "/alice:pw@bucket/key").
_BARE_USERINFO = re.compile(r"(?P<pre>(?:^|[\s/'\"(=,]))[^\s/:@'\"<>*]+:[^\s/@'\"<>]+@")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&;](?:[a-z0-9_.\-]*(?:token|password|passwd|pwd|secret|signature|sig|credential|api[_-]?key"
    r"|access[_-]?key|sas|auth))=)(?P<value>[^&#\s'\"<>]+)"
)


def redact(text: object) -> str:
    """``text`` with credentials replaced by ``***``: ``user:pass@`` in URLs, secret query parameters (tokens,
    signatures, keys) and the values of :data:`SECRET_ENV_VARS`. Idempotent; everything else is kept.

    >>> redact("cannot reach http://alice:pw@mlflow:5000/api?x=1&token=abc")
    'cannot reach http://***@mlflow:5000/api?x=1&token=***'
    >>> redact("info: /alice:pw@bucket/new.npz")
    'info: /***@bucket/new.npz'
    >>> redact("s3://bucket/data.npz")
    's3://bucket/data.npz'
    """
    text = str(text)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _BARE_USERINFO.sub(lambda m: f"{m['pre']}{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", text)
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= MIN_SECRET_LENGTH and value in text:
            text = text.replace(value, REDACTED)
    return text


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user:pass@, user, password)``; the user and password are None when the URI has none.

    >>> split_userinfo("https://bob:pw@host:5000/x")
    ('https://host:5000/x', 'bob', 'pw')
    """
    m = _USERINFO.match(uri or "")
    if not m:
        return uri, None, None
    user, _, password = m["userinfo"].partition(":")
    from urllib.parse import unquote

    return m["scheme"] + uri[m.end() :], unquote(user), unquote(password) if password else None


class _RedactingRecordFactory:
    """A log-record factory that redacts every record's message once, whatever logger or handler it goes to."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs):
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler's own error report
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record


def install_log_redaction() -> None:
    """Redact credentials from every log record of this process (idempotent): Airflow's masker knows only the
    connection's password, not a ``user:pass@`` inside a data URL or a tracking URI."""
    import logging

    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(current))


def check_finite(name: str, value: object, fix: str) -> float:
    """``value`` as a float; :class:`ResqueInputError` naming ``name``, the value and ``fix`` when it is not a finite
    number (NaN or infinite). A NaN score compares false with every threshold: decided on, it would be "retrain".

    >>> check_finite("score", 0.25, "check the data")
    0.25
    >>> check_finite("score", float("nan"), "check the data")
    Traceback (most recent call last):
    ...
    resque_airflow.errors.ResqueInputError: score: expected a finite number, got nan; check the data
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if number != number or number in (float("inf"), float("-inf")):
        raise ResqueInputError(f"{name}: expected a finite number, got {value!r}; {fix}")
    return number
