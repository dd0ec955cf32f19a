"""``ResqueShardOperator``: score one slice of the data and write its summary to storage, for fan-out/fan-in.

Map it over the shards (``.expand(data=[...])``), then give the list of summary URIs to one unmapped
:class:`~resque_airflow.operators.gate.ResqueGateOperator` (``shard_summaries=``): a mapped branch task would skip
nothing in Airflow 3, so the decision must be taken after the fan-in.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from resque_airflow.operators.gate import ResqueBadInputError, ResqueGateError

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
        from resque_airflow.errors import ResqueInputError
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.artifacts import fetch_model
        from resque_airflow.registry.client import ModelRef, resolve_version
        from resque_airflow.runtime.embed import Embedder
        from resque_airflow.runtime.pipeline import summarise
        from resque_airflow.runtime.shards import ShardHeader, write_shard

        ti = context["ti"]
        uri = (
            f"models:/{self.model_name}/{self.model_version}"
            if self.model_version
            else f"models:/{self.model_name}@{self.model_alias}"
        )
        out = f"{str(self.output_uri).rstrip('/')}/{ti.dag_id}/{ti.run_id}/{ti.task_id}-{ti.map_index}.npz"
        try:
            client = MlflowHook(self.mlflow_conn_id).get_client()
            version = resolve_version(client, ModelRef.parse(uri))
            with tempfile.TemporaryDirectory(prefix="resque-shard-") as tmp:
                fetched = fetch_model(client, version, tmp)
                fp = fetched.fingerprint
                embedder = Embedder(fetched.model_path.read_bytes(), layer=fp.layer, provider=self.provider)
                summary, stats = summarise(embedder, fp, str(self.data), batch_size=self.batch_size)
            header = ShardHeader(
                fp.model_sha256, fp.layer, stats.n_samples, str(self.data), stats.data_hash, bool(stats.labelled)
            )
            write_shard(out, summary, header)
        except ResqueInputError as exc:
            raise ResqueBadInputError(f"RESQUE shard {self.data}: bad input: {exc}") from exc
        except Exception as exc:
            raise ResqueGateError(f"RESQUE shard {self.data} on {uri} failed: {type(exc).__name__}: {exc}") from exc
        self.log.info("shard %s: %d samples summarised to %s", self.data, stats.n_samples, out)
        return out
