"""Example: the same gate, fed by mapped shard tasks (fan-out over a large batch, fan-in to one decision).

``data_uri`` is a folder of shards (``.npz`` files); each mapped ``score_shard`` task summarises one shard under the
registered model and writes its class sums to ``summary_uri`` (shared storage: a local folder here, ``s3://...`` on a
cluster). One unmapped gate merges the summaries and branches: a mapped branch task would skip nothing in Airflow 3.
"""

from __future__ import annotations

import os

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, TriggerRule, dag, task

from resque_airflow.operators.gate import ResqueGateOperator
from resque_airflow.operators.shard import ResqueShardOperator


@dag(
    dag_id="resque_gate_sharded",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["resque", "example"],
    params={
        "model_name": Param("digits-cnn", type="string"),
        "data_uri": Param("", type="string", description="folder (or URL) of .npz shards"),
        "summary_uri": Param(
            os.environ.get("RESQUE_SHARED_DIR", "/tmp/resque-shards"),
            type="string",
            description="storage every worker can reach, for shard summaries (a shared volume or s3://...)",
        ),
    },
    doc_md=__doc__,
)
def resque_gate_sharded():
    @task
    def list_shards(params: dict | None = None) -> list[str]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(params["data_uri"])
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        shards = sorted(f for f in fs.ls(path, detail=False) if f.endswith((".npz", ".npy", ".parquet")))
        if not shards:
            raise ValueError(f"data_uri: {params['data_uri']} holds no .npz/.npy/.parquet shards")
        return [prefix + s for s in shards]

    summaries = ResqueShardOperator.partial(
        task_id="score_shard",
        model_name="{{ params.model_name }}",
        output_uri="{{ params.summary_uri }}",
    ).expand(data=list_shards())

    gate = ResqueGateOperator(
        task_id="gate",
        model_name="{{ params.model_name }}",
        data="{{ params.data_uri }}",
        shard_summaries=summaries.output,
        reuse_task_id="reuse",
        retrain_task_id="retrain",
        rebuild_task_id="rebuild",
    )
    reuse = EmptyOperator(task_id="reuse")
    retrain = EmptyOperator(task_id="retrain")
    rebuild = EmptyOperator(task_id="rebuild")
    join = EmptyOperator(task_id="join", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    gate >> [reuse, retrain, rebuild] >> join


dag = resque_gate_sharded()
