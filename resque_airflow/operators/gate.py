"""``ResqueGateOperator``: score new data against the production model in MLflow and branch on the decision.

``ResqueGateError`` and ``ResqueBadInputError`` are importable from here (they live in
:mod:`resque_airflow.operators.errors`, shared by every operator).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseBranchOperator

from resque_airflow.operators.errors import ResqueBadInputError, ResqueGateError, reported_to_airflow
from resque_airflow.operators.links import GATE_RUN, ResqueGateRunLink, ResqueModelVersionLink, record_links
from resque_airflow.operators.params import number
from resque_airflow.registry.client import ModelRef

if TYPE_CHECKING:
    from airflow.sdk.definitions.context import Context

    from resque_airflow.registry.gate import GateRequest, Origin

log = logging.getLogger(__name__)


class ResqueGateOperator(BaseBranchOperator):
    """Gate a production model on new data with RESQUE and follow the reuse, retrain or rebuild branch.

    One forward pass of ``data`` through the model at ``models:/<model_name>@<model_alias>`` (ONNX Runtime; CUDA
    when present) gives RESQUE_dist against the model's fingerprint (``mode="dist"``) or RESQUE_task of a labelled
    new task (``mode="task"``). The score, companion signals and decision are logged as a gate run in the MLflow
    experiment ``experiment_name``, the model version is tagged, and the DAG branches to ``reuse_task_id`` (or
    ``retrain_task_id`` when no reuse branch is given), ``retrain_task_id`` or ``rebuild_task_id``.

    By default (``mode="dist"``) the decision is calibrated to the model and the batch (docs/THRESHOLDS.md):

    - **reuse** when no shift is detected at false-alarm rate ``alpha`` (RESQUE within its null at this batch
      size), or when the accuracy (measured with labels, else estimated label-free) meets the retrain target;
    - **rebuild** when the predicted fine-tuning cost exceeds the model's recorded training cost;
    - otherwise **retrain**; with ``price_per_kwh`` and ``value_per_accuracy_point``, **reuse** when retraining
      would cost more than the accuracy it recovers is worth.

    Giving ``reuse_threshold`` or ``rebuild_threshold`` decides on those fixed thresholds instead. A batch that
    looks corrupt rather than shifted (constant or all-zero inputs, values far outside the reference range, one
    class only) goes to ``data_issue_task_id``, or fails the task naming the check when none is given.

    The full result (score, interval, null quantile, decision and its reason, model version, gate run id,
    provider, counts, signals) is returned, so it is pushed to XCom as ``return_value``; it is JSON-serialisable.
    Branch ids may be task ids or task-group ids.

    On bad input the task fails without retry (:class:`ResqueBadInputError`), and so it does when the registry has
    no such model, alias or version; when the registry is unreachable it fails with :class:`ResqueGateError`
    (retryable). Either way no model-version tag is written and the gate run, if one was opened, is marked failed.
    A retry of the same task instance leaves exactly one gate run. docs/RELIABILITY.md lists what is tested.

    :param model_name: registered model name. (templated)
    :param model_alias: alias of the version to gate (``champion``); or use ``model_version``. (templated)
    :param model_version: a version number, instead of the alias. (templated)
    :param data: path or fsspec URL of the new data: ``.npz``/``.npy`` (folder of shards), Parquet, image
        folder. (templated)
    :param mode: ``"dist"`` (distribution shift) or ``"task"`` (new task).
    :param labels: label source for ``dist``: ``"given"``, ``"predicted"`` or ``"none"``.
    :param layer: representation tensor for ``task`` mode (``dist`` uses the fingerprint's).
    :param provider: ``"auto"``, ``"cuda"`` or ``"cpu"``.
    :param reuse_threshold: score at or below which the model is reused (default: measured, docs/THRESHOLDS.md).
        (templated; with ``render_template_as_native_obj=True`` a ``{{ params.x }}`` renders as a number or None)
    :param rebuild_threshold: score above which the model is rebuilt (default: measured). (templated)
    :param retrain_task_id: branch for retraining (required).
    :param rebuild_task_id: branch for rebuilding (required).
    :param reuse_task_id: branch for reuse (optional).
    :param data_issue_task_id: branch for batches that fail the data-sanity checks (optional).
    :param alpha: false-alarm rate of the calibrated shift test, in (0, 1). (templated)
    :param price_per_kwh: money per kWh of retraining energy (optional; with ``value_per_accuracy_point``).
    :param value_per_accuracy_point: money one accuracy point is worth over the period the model serves.
    :param shard_summaries: fan-in: URIs written by mapped
        :class:`~resque_airflow.operators.shard.ResqueShardOperator` tasks; scored instead of ``data``. (templated)
    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    :param experiment_name: MLflow experiment holding the gate runs.
    """

    template_fields: Sequence[str] = (
        "model_name", "model_alias", "model_version", "data", "experiment_name", "shard_summaries",
        "reuse_threshold", "rebuild_threshold", "alpha", "price_per_kwh", "value_per_accuracy_point",
    )  # fmt: skip
    ui_color = "#e8d6f5"
    operator_extra_links = (ResqueGateRunLink(), ResqueModelVersionLink())

    def __init__(
        self,
        *,
        model_name: str,
        data: str,
        retrain_task_id: str | Iterable[str],
        rebuild_task_id: str | Iterable[str],
        reuse_task_id: str | Iterable[str] | None = None,
        model_alias: str | None = "champion",
        model_version: str | int | None = None,
        mode: str = "dist",
        labels: str = "given",
        layer: str = "auto",
        provider: str = "auto",
        reuse_threshold: float | None = None,
        rebuild_threshold: float | None = None,
        mlflow_conn_id: str = "mlflow_default",
        experiment_name: str = "resque-gate",
        batch_size: int = 256,
        shard_summaries: list[str] | None = None,
        data_issue_task_id: str | Iterable[str] | None = None,
        alpha: float = 0.01,
        price_per_kwh: float | None = None,
        value_per_accuracy_point: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_issue_task_id = data_issue_task_id
        self.alpha = alpha
        self.price_per_kwh = price_per_kwh
        self.value_per_accuracy_point = value_per_accuracy_point
        self.shard_summaries = shard_summaries
        self.model_name = model_name
        self.model_alias = model_alias
        self.model_version = model_version
        self.data = data
        self.mode = mode
        self.labels = labels
        self.layer = layer
        self.provider = provider
        self.reuse_threshold = reuse_threshold
        self.rebuild_threshold = rebuild_threshold
        self.reuse_task_id = reuse_task_id
        self.retrain_task_id = retrain_task_id
        self.rebuild_task_id = rebuild_task_id
        self.mlflow_conn_id = mlflow_conn_id
        self.experiment_name = experiment_name
        self.batch_size = batch_size
        self.outcome: dict | None = None

    @property
    def model_uri(self) -> str:
        """The ``models:/`` URI of the version to gate (as spelled; checked when the gate runs)."""
        return ModelRef.spell(self.model_name, self.model_alias, self.model_version)

    def routes(self) -> dict[str, list[str]]:
        """Task (or task-group) ids to follow for each decision: reuse falls back to retrain without a reuse branch."""
        routes = {
            "reuse": _ids(self.reuse_task_id or self.retrain_task_id),
            "retrain": _ids(self.retrain_task_id),
            "rebuild": _ids(self.rebuild_task_id),
        }
        if self.data_issue_task_id:
            routes["data_issue"] = _ids(self.data_issue_task_id)
        return routes

    def choose_branch(self, context: Context) -> list[str]:
        """Run the gate and return the branch for its decision; the full result is kept in ``self.outcome``."""
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.gate import run_gate

        origin = _origin(context["ti"])
        with reported_to_airflow(
            "gate", model_uri=self.model_uri, experiment=self.experiment_name, gate_key=origin.key,
            connection=self.mlflow_conn_id,
        ):  # fmt: skip
            request = self.request()
            hook = MlflowHook(self.mlflow_conn_id)
            client = hook.get_client()
            outcome = run_gate(request, client=client, routes=self.routes(), origin=origin, progress=_LogProgress())
        self.outcome = outcome.to_dict(per_class=False)
        log.info("gate run %s: %s", outcome.gate_run_id, outcome.reason)
        record_links(self, hook, client, run_id=outcome.gate_run_id, model=(outcome.model_name, outcome.model_version),
                     run_key=GATE_RUN)  # fmt: skip
        return outcome.branch

    def request(self) -> GateRequest:
        """The gate request of the rendered arguments (thresholds rendered as text become numbers or None)."""
        from resque_airflow.registry.gate import GateRequest

        return GateRequest(
            model_uri=self.model_uri, data=str(self.data), mode=self.mode, label_source=self.labels, layer=self.layer,
            provider=self.provider, reuse_threshold=number("reuse_threshold", self.reuse_threshold),
            rebuild_threshold=number("rebuild_threshold", self.rebuild_threshold),
            experiment_name=self.experiment_name, batch_size=self.batch_size,
            shard_summaries=None if self.shard_summaries is None else [str(u) for u in self.shard_summaries],
            alpha=number("alpha", self.alpha), price_per_kwh=number("price_per_kwh", self.price_per_kwh),
            value_per_accuracy_point=number("value_per_accuracy_point", self.value_per_accuracy_point),
        )  # fmt: skip

    def execute(self, context: Context) -> dict:
        branch = self.choose_branch(context)
        # Pushed before branching: skipping the other branches ends execute() with DownstreamTasksSkipped, and
        # Airflow 3 then never pushes a returned value.
        context["ti"].xcom_push(key="return_value", value=self.outcome)
        if self.outlets:  # a decision feed: the gate's own outlets get every decision (operators/assets.py)
            from resque_airflow.operators.assets import fill_outlet_events

            fill_outlet_events(context, self.outlets, self.outcome)
        self.do_branch(context, branch)
        return self.outcome


def _ids(target: str | Iterable[str]) -> list[str]:
    return [target] if isinstance(target, str) else list(target)


def _origin(ti) -> Origin:
    """The gate's origin: this task instance (a retry of it replaces its earlier try's gate run)."""
    from resque_airflow.registry.gate import Origin

    map_index = getattr(ti, "map_index", None)
    return Origin(
        dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=int(ti.try_number or 1),
        map_index=-1 if map_index is None else int(map_index),  # 0 is a map index, not "unmapped"
    )  # fmt: skip


class _LogProgress:
    """Percentage lines in the task log: every 10% (the first batch included, so a small batch says something),
    or, when the size is unknown, the first batch and every 10th."""

    def __init__(self) -> None:
        self.last = -1
        self.calls = 0

    def __call__(self, done: int, total: int | None) -> None:
        self.calls += 1
        if total:
            pct = int(100 * done / total) // 10 * 10
            if pct > self.last:
                self.last = pct
                log.info("scoring: %d%% (%d / %d samples)", pct, done, total)
        elif self.calls == 1 or self.calls % 10 == 0:
            log.info("scoring: %d samples", done)


__all__ = ["ResqueBadInputError", "ResqueGateError", "ResqueGateOperator"]
