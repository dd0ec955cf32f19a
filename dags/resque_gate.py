"""Example: gate the production model on new data, then reuse, retrain or rebuild it.

Trigger with params ``model_name`` and ``data_uri`` (an ``.npz`` with ``x`` and labels ``y``, a folder of shards,
Parquet or an image folder). The gate logs a run in the MLflow experiment ``resque-gate`` and tags the model
version; ``retrain`` fine-tunes the champion's weights and ``rebuild`` trains from fresh weights, each until a target
accuracy on a held-out split, logging what it cost (steps, epochs, gradient norm, parameter change, wall time, energy,
emissions) with the id of the gate run that triggered it, and registering the result as ``@challenger``.

The MLflow registry is the Airflow connection ``mlflow_default`` (type ``mlflow``, host = tracking URI).

GPU workers: set ``RESQUE_GATE_QUEUE=gpu`` (and ``RESQUE_TRAIN_QUEUE``) in the DAG processor's environment. A queue is
fixed when the DAG is parsed, so it is a deployment setting, not a run param. For the two-DAG pattern (asset events,
approval of costly retrains) see ``resque_gate_assets.py`` and ``resque_retrain.py``.
"""

from __future__ import annotations

import os

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, TriggerRule, dag

from resque_airflow.operators.challenger import ResqueChallengerOperator, ResqueReuseOperator
from resque_airflow.operators.gate import ResqueGateOperator

GATE_QUEUE = os.environ.get("RESQUE_GATE_QUEUE", "default")
TRAIN_QUEUE = os.environ.get("RESQUE_TRAIN_QUEUE", "default")


@dag(
    dag_id="resque_gate",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["resque", "example"],
    params={
        "model_name": Param("digits-cnn", type="string", description="registered model name"),
        "data_uri": Param("", type="string", description="path or URL of the new (labelled) data"),
        "reuse_threshold": Param(None, type=["null", "number"], description="override the measured default"),
        "rebuild_threshold": Param(None, type=["null", "number"], description="override the measured default"),
        "max_epochs": Param(40, type="number", description="retraining cap, in epochs"),
        "country_iso_code": Param("USA", type="string", description="energy mix for emissions (codecarbon)"),
    },
    doc_md=__doc__,
    render_template_as_native_obj=True,
)
def resque_gate():
    gate = ResqueGateOperator(
        task_id="gate",
        model_name="{{ params.model_name }}",
        data="{{ params.data_uri }}",
        reuse_task_id="reuse",
        retrain_task_id="retrain",
        rebuild_task_id="rebuild",
        reuse_threshold="{{ params.reuse_threshold }}",
        rebuild_threshold="{{ params.rebuild_threshold }}",
        queue=GATE_QUEUE,
    )

    # Nothing to retrain: the reuse branch records that on the gate run, so the audit trail says it was acted on.
    reuse = ResqueReuseOperator(task_id="reuse", gate_result=gate.output)
    challenger = {
        "gate_result": gate.output,
        "data": "{{ params.data_uri }}",
        "max_epochs": "{{ params.max_epochs }}",
        "country_iso_code": "{{ params.country_iso_code }}",
        "queue": TRAIN_QUEUE,
    }
    retrain = ResqueChallengerOperator(task_id="retrain", fresh=False, **challenger)  # fine-tune the champion
    rebuild = ResqueChallengerOperator(task_id="rebuild", fresh=True, **challenger)  # same architecture, fresh weights
    join = EmptyOperator(task_id="join", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    gate >> [reuse, retrain, rebuild] >> join


dag = resque_gate()
