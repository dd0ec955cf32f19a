"""One mapping of failures to Airflow for every operator, and the typed attributes its exceptions carry."""

from __future__ import annotations

import pickle

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowSkipException

from resque_airflow.errors import NotRegisteredError, RegistryError, ResqueInputError
from resque_airflow.operators.errors import ResqueBadInputError, ResqueGateError, reported_to_airflow
from resque_airflow.operators.params import number as _number
from resque_airflow.registry import gate

WHERE = {"model_uri": "models:/cnn@champion", "experiment": "resque-gate", "gate_key": "d/r/gate/-1",
         "connection": "mlflow_default"}  # fmt: skip


def raised(exc: BaseException, task: str = "gate") -> BaseException:
    with pytest.raises(BaseException) as info, reported_to_airflow(task, **WHERE):
        raise exc
    return info.value


@pytest.mark.parametrize(
    "cause",
    [
        ResqueInputError("data: x.npz contains NaN or infinite values"),
        NotRegisteredError("MLflow: no registered model named 'nope'"),
        AirflowNotFoundException("The conn_id `nope` isn't defined"),
    ],
)
def test_bad_input_and_a_missing_connection_fail_without_retry(cause):
    err = raised(cause)
    assert isinstance(err, ResqueBadInputError) and isinstance(err, AirflowFailException)
    assert str(err).startswith(f"RESQUE gate on models:/cnn@champion: bad input: {cause}")
    assert (err.model_uri, err.experiment, err.gate_key, err.connection) == tuple(WHERE.values())


def test_a_registry_outage_is_retried_and_names_the_failed_gate_run():
    cause = RegistryError("MLflow: logging the gate's result failed: connection refused")
    setattr(cause, gate._STAGE_ATTR, "writing the result")  # as run_gate leaves them (tested in test_registry_gate)
    setattr(cause, gate._RUN_ATTR, "abc123")
    err = raised(cause)
    assert isinstance(err, ResqueGateError) and not isinstance(err, ResqueBadInputError)
    assert "failed: RegistryError: MLflow: logging" in str(err)
    assert err.stage == "writing the result" and err.gate_run_id == "abc123"
    assert "(while writing the result). Gate run abc123 in MLflow experiment 'resque-gate'" in str(err)
    assert str(err).endswith("is not decided")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.gate_run_id == "abc123"


def test_airflow_signals_pass_through_unchanged():
    skip = AirflowSkipException("nothing to do")
    assert raised(skip) is skip


def test_a_shard_names_its_data():
    expected = r"^RESQUE shard s3://b/part-0.npz on models:/cnn@champion: bad input: data: holds no samples$"
    with (
        pytest.raises(ResqueBadInputError, match=expected),
        reported_to_airflow("shard", model_uri="models:/cnn@champion", data="s3://b/part-0.npz"),
    ):
        raise ResqueInputError("data: holds no samples")


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0.2, 0.2), ("0.25", 0.25), ("None", None), ("", None)])
def test_rendered_thresholds_become_numbers_or_none(value, expected):
    assert _number("reuse_threshold", value) == expected


def test_a_rendered_threshold_that_is_not_a_number_is_bad_input():
    with pytest.raises(ResqueInputError, match=r"reuse_threshold: expected a number, got 'low'"):
        _number("reuse_threshold", "low")
