"""Example, producer side of the two-DAG pattern: gate the model, ask a person before a costly retrain, emit an event.

The gate decides reuse / retrain / rebuild. Retrain and rebuild go to ``check_cost``: when the gate's predicted cost
exceeds the ``max_cost`` param (or for every rebuild, ``approve_rebuilds``), a person is asked (``approve``, Airflow's
human-in-the-loop ``ApprovalOperator``: the decision sentence, score, interval and predicted cost; Reject, or no
answer within ``approval_hours``, keeps the champion). Otherwise the request goes out directly. ``request_retrain``
emits the asset event ``mlflow://<host>/models/<model>`` whose extra carries the decision; the DAG
``resque_retrain`` is scheduled on that asset and trains the challenger.

The event is emitted by ``request_retrain``, not by the gate: a branch task succeeds whatever it decides, so an event
on the gate would fire after every gate, reuse included (docs/OPERATOR.md, "Asset events").

Workers: set ``RESQUE_GATE_QUEUE=gpu`` in the DAG processor's environment to route the gate to GPU workers (a queue
is fixed when the DAG is parsed; a run param cannot move a task to another queue).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, TriggerRule, dag

from resque_airflow.operators.approval import ResqueApprovalOperator, ResqueBudgetOperator
from resque_airflow.operators.assets import ResqueRetrainRequestOperator, model_asset
from resque_airflow.operators.challenger import ResqueReuseOperator
from resque_airflow.operators.gate import ResqueGateOperator

MODEL = os.environ.get("RESQUE_EXAMPLE_MODEL", "digits-cnn")
MODEL_ASSET = model_asset(MODEL)
GATE_QUEUE = os.environ.get("RESQUE_GATE_QUEUE", "default")
APPROVAL_HOURS = float(os.environ.get("RESQUE_APPROVAL_HOURS", "24"))


@dag(
    dag_id="resque_gate_assets",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["resque", "example"],
    params={
        "data_uri": Param("", type="string", description="path or URL of the new (labelled) data"),
        "max_cost": Param(None, type=["null", "number"], description="budget in predicted steps_to_target"),
        "approve_rebuilds": Param(True, type="boolean", description="ask a person before every rebuild"),
        "reuse_threshold": Param(None, type=["null", "number"], description="override the calibrated decision"),
        "rebuild_threshold": Param(None, type=["null", "number"], description="override the calibrated decision"),
    },
    doc_md=__doc__,
    render_template_as_native_obj=True,
)
def resque_gate_assets():
    gate = ResqueGateOperator(
        task_id="gate",
        model_name=MODEL,
        data="{{ params.data_uri }}",
        reuse_task_id="reuse",
        retrain_task_id="check_cost",
        rebuild_task_id="check_cost",
        reuse_threshold="{{ params.reuse_threshold }}",
        rebuild_threshold="{{ params.rebuild_threshold }}",
        queue=GATE_QUEUE,
    )
    reuse = ResqueReuseOperator(task_id="reuse", gate_result=gate.output)
    check = ResqueBudgetOperator(
        task_id="check_cost",
        gate_result=gate.output,
        max_cost="{{ params.max_cost }}",
        approve_rebuilds="{{ params.approve_rebuilds }}",
        approval_task_id="approve",
        proceed_task_id="within_budget",
    )
    within_budget = EmptyOperator(task_id="within_budget")
    approve = ResqueApprovalOperator(
        task_id="approve", gate_result=gate.output, response_timeout=timedelta(hours=APPROVAL_HOURS)
    )
    request = ResqueRetrainRequestOperator(
        task_id="request_retrain",
        gate_result=gate.output,
        outlets=[MODEL_ASSET],
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
    )
    gate >> [reuse, check]
    check >> [within_budget, approve] >> request


dag = resque_gate_assets()
