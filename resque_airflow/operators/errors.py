"""How every RESQUE operator reports a failure to Airflow: one set of rules for the gate, shard and challenger.

- bad data, model, fingerprint or parameters (``ResqueInputError``), a model, alias or version that is not
  registered (``NotRegisteredError``), an Airflow connection that does not exist: :class:`ResqueBadInputError`,
  an ``AirflowFailException``, so the task fails at once without retry;
- the registry unreachable or failing (``RegistryError``), or anything unexpected: :class:`ResqueGateError`,
  which Airflow retries;
- Airflow's own signals (skip, timeout, termination) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException

from resque_airflow.errors import ResqueInputError, redact


class ResqueGateError(AirflowException):
    """A RESQUE task could not finish; Airflow may retry it. The message says what failed and where to look.

    Attributes (None when not known): ``task`` (``"gate"``, ``"shard"``, ...), ``model_uri``, ``data``,
    ``experiment`` (of the gate runs), ``gate_key`` (the task instance's ``resque.gate_key``), ``stage`` (what the
    gate was doing), ``gate_run_id`` (the gate run the failure left undecided: marked failed, registry permitting) and
    ``connection``.
    """

    retryable = True
    task: str = "gate"
    model_uri: str | None = None
    data: str | None = None
    experiment: str | None = None
    gate_key: str | None = None
    stage: str | None = None
    gate_run_id: str | None = None
    connection: str | None = None

    @classmethod
    def from_error(
        cls,
        exc: BaseException,
        *,
        task: str,
        model_uri: str,
        data: str | None = None,
        experiment: str | None = None,
        gate_key: str | None = None,
        connection: str | None = None,
    ) -> ResqueGateError:
        """The error for ``exc``, with the attributes above and a message built from them."""
        from resque_airflow.registry.gate import failed_at  # here: importing the gate loads ONNX, DAG parsing need not

        stage, run_id = failed_at(exc)
        attrs = {
            "task": task, "model_uri": model_uri, "data": data, "experiment": experiment, "gate_key": gate_key,
            "stage": stage, "gate_run_id": run_id, "connection": connection,
        }  # fmt: skip
        # Built as cls(message) with the attributes set after: pickling (args = the message) round-trips.
        err = cls(redact(cls._message(exc, **attrs)))  # the data URL and any URI in exc: no credentials
        err.__dict__.update(attrs)
        return err

    @classmethod
    def _head(cls, subject: str, exc: BaseException) -> str:
        return f"RESQUE {subject} failed: {type(exc).__name__}: {exc}"

    @classmethod
    def _message(cls, exc: BaseException, **a: str | None) -> str:
        subject = f"{a['task']} {a['data']} on {a['model_uri']}" if a["data"] else f"{a['task']} on {a['model_uri']}"
        text = cls._head(subject, exc) + (f" (while {a['stage']})" if a["stage"] else "")
        via = f" (connection {a['connection']!r})" if a["connection"] else ""
        if a["gate_run_id"]:
            return f"{text}. Gate run {a['gate_run_id']} in MLflow experiment {a['experiment']!r}{via} is not decided"
        if a["experiment"] and cls.retryable:
            return f"{text}. Look at the task log and the gate runs in MLflow experiment {a['experiment']!r}{via}"
        return text


class ResqueBadInputError(ResqueGateError, AirflowFailException):
    """The task's input is wrong (data, model, fingerprint, parameters, connection): retrying cannot help, so it
    fails at once."""

    retryable = False

    @classmethod
    def _head(cls, subject: str, exc: BaseException) -> str:
        return f"RESQUE {subject}: bad input: {exc}"


@contextmanager
def reported_to_airflow(
    task: str,
    *,
    model_uri: str,
    data: str | None = None,
    experiment: str | None = None,
    gate_key: str | None = None,
    connection: str | None = None,
) -> Iterator[None]:
    """Turn what the body raises into the Airflow exception the table in the module docstring gives."""
    where = {"task": task, "model_uri": model_uri, "data": data, "experiment": experiment, "gate_key": gate_key,
             "connection": connection}  # fmt: skip
    try:
        yield
    except AirflowNotFoundException as exc:  # a connection that does not exist: configuration, not an outage
        raise ResqueBadInputError.from_error(exc, **where) from exc
    except AirflowException:
        raise  # ours (already mapped) and Airflow's own signals keep their meaning
    except ResqueInputError as exc:  # NotRegisteredError included: asking again cannot make the model appear
        raise ResqueBadInputError.from_error(exc, **where) from exc
    except Exception as exc:
        raise ResqueGateError.from_error(exc, **where) from exc
