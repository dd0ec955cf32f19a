"""Templated arguments as the operators read them, and what a real scheduler's task supervisor can carry."""

from __future__ import annotations

from datetime import timedelta

import pendulum
import pytest

from resque_airflow.errors import ResqueInputError
from resque_airflow.operators.params import flag, number


@pytest.mark.parametrize(("text", "expected"), [("True", True), ("false", False), ("1", True), ("no", False)])
def test_flag_reads_a_rendered_boolean(text, expected):
    assert flag("approve_rebuilds", text) is expected


@pytest.mark.parametrize("bad", ["maybe", "None", ""])
def test_flag_names_the_argument_when_the_text_means_nothing(bad):
    with pytest.raises(ResqueInputError, match=r"^approve_rebuilds: expected true or false, got"):
        flag("approve_rebuilds", bad)


def test_number_names_the_argument():
    assert number("max_cost", " None ") is None and number("max_cost", "2e3") == 2000.0
    with pytest.raises(ResqueInputError, match=r"^max_cost: expected a number, got 'ten'"):
        number("max_cost", "ten")


def test_approval_timeout_is_a_plain_timedelta():
    """Under a real scheduler the approval task reports its timeout to the supervisor through msgpack, which refuses
    pendulum's Duration: the task failed with "Objects of type Duration are not supported" (scripts/real_scheduler.py
    found it; dag.test() runs no supervisor)."""
    from airflow.sdk.execution_time.comms import _new_encoder

    from resque_airflow.operators.approval import ResqueApprovalOperator

    encoder = _new_encoder()  # the supervisor channel's encoder
    with pytest.raises(NotImplementedError, match="Duration"):
        encoder.encode(pendulum.duration(hours=2))
    op = ResqueApprovalOperator(task_id="approve", gate_result={}, response_timeout=pendulum.duration(hours=2))
    assert type(op.response_timeout) is timedelta and op.response_timeout == timedelta(hours=2)
    encoder.encode(op.response_timeout)  # what the supervisor is sent: accepted


def test_task_log_progress_says_a_percentage_from_the_first_batch(caplog):
    """A 359-sample .npz in batches of 256: the log says 70% then 100% (it used to say "256 samples" only)."""
    import logging

    from resque_airflow.operators.gate import _LogProgress

    progress = _LogProgress()
    with caplog.at_level(logging.INFO, logger="resque_airflow.operators.gate"):
        progress(256, 359)
        progress(359, 359)
    assert [r.getMessage() for r in caplog.records] == ["scoring: 70% (256 / 359 samples)",
                                                         "scoring: 100% (359 / 359 samples)"]  # fmt: skip
