"""Example, consumer side of the two-DAG pattern: retrain when the gate asks, then promote only a better challenger.

Scheduled on the model's asset (``mlflow://<host>/models/<model>``): each event emitted by ``resque_gate_assets``'s
``request_retrain`` task starts a run. ``train`` reads the triggering event's extra (decision, model version, gate
run id, data URI), fine-tunes (retrain) or trains from scratch (rebuild) until the target accuracy, measures what it
cost (steps, epochs, wall time, energy, CO2), writes that back onto the gate run beside the gate's prediction, and
registers the result as ``@challenger`` only if it reached its target. ``promote`` moves ``@champion`` to it only
after ``mlflow.validate_evaluation_results`` finds it better than the champion on the held-out split.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag

from resque_airflow.operators.assets import model_asset
from resque_airflow.operators.challenger import ResqueChallengerOperator, ResquePromoteOperator

MODEL = os.environ.get("RESQUE_EXAMPLE_MODEL", "digits-cnn")
MODEL_ASSET = model_asset(MODEL)
TRAIN_QUEUE = os.environ.get("RESQUE_TRAIN_QUEUE", "default")


@dag(
    dag_id="resque_retrain",
    schedule=[MODEL_ASSET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["resque", "example"],
    params={
        "max_epochs": Param(40, type="number", description="retraining cap, in epochs"),
        "country_iso_code": Param("USA", type="string", description="energy mix for emissions (codecarbon)"),
        "min_accuracy_gain": Param(0.0, type="number", description="how much the challenger must beat the champion"),
    },
    doc_md=__doc__,
    render_template_as_native_obj=True,
)
def resque_retrain():
    train = ResqueChallengerOperator(
        task_id="train",
        inlets=[MODEL_ASSET],
        max_epochs="{{ params.max_epochs }}",
        country_iso_code="{{ params.country_iso_code }}",
        queue=TRAIN_QUEUE,
    )
    promote = ResquePromoteOperator(
        task_id="promote", challenger=train.output, min_absolute_change="{{ params.min_accuracy_gain }}"
    )
    train >> promote


dag = resque_retrain()
