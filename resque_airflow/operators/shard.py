"""``ResqueShardOperator``: score one slice of the data and write its summary to storage, for fan-out/fan-in.

Map it over the shards (``.expand(data=[...])``), then give the list of summary URIs to one unmapped
:class:`~resque_airflow.operators.gate.ResqueGateOperator` (``shard_summaries=``): a mapped branch task would skip
nothing in Airflow 3, so the decision must be taken after the fan-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from resque_airflow.operators.errors import reported_to_airflow
from resque_airflow.registry.client import ModelRef

if TYPE_CHECKING:
    from airflow.sdk.definitions.context import Context


class ResqueShardOperator(BaseOperator):
    """Summarise one shard of new data under the registered model; returns the summary's URI (XCom).

    :param model_name: registered model name. (templated)
    :param data: the shard: a file or folder path or fsspec URL. (templated)
    :param output_uri: folder (path or fsspec URL, shared by all workers) for shard summaries; each task writes
        ``<output_uri>/<dag_id>/<run_id>/<task_id>-<map_index>.npz``. (templated)
    :param model_alias: alias of the version; or ``model_version``. (templated)
    :param provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    template_fields: Sequence[str] = ("model_name", "model_alias", "model_version", "data", "output_uri")
    ui_color = "#f0e6fa"

    def __init__(
        self,
        *,
        model_name: str,
        data: str,
        output_uri: str,
        model_alias: str | None = "champion",
        model_version: str | int | None = None,
        provider: str = "auto",
        batch_size: int = 256,
        mlflow_conn_id: str = "mlflow_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.data = data
        self.output_uri = output_uri
        self.model_alias = model_alias
        self.model_version = model_version
        self.provider = provider
        self.batch_size = batch_size
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> str:
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.shard import summarise_shard

        ti = context["ti"]
        uri = ModelRef.spell(self.model_name, self.model_alias, self.model_version)
        out = f"{str(self.output_uri).rstrip('/')}/{ti.dag_id}/{ti.run_id}/{ti.task_id}-{ti.map_index}.npz"
        with reported_to_airflow("shard", model_uri=uri, data=str(self.data), connection=self.mlflow_conn_id):
            client = MlflowHook(self.mlflow_conn_id).get_client()
            ref = ModelRef.of(self.model_name, self.model_alias, self.model_version)
            return summarise_shard(client, ref, str(self.data), out, provider=self.provider, batch_size=self.batch_size)
