"""The branches after a gate: ``ResqueChallengerOperator`` (retrain or rebuild) and ``ResqueReuseOperator``.

Both take the gate's result (``gate.output``: the XCom the gate pushes), so that what they did joins the audit
trail of the gate run that decided it: a retrain or rebuild run names its gate run (``resque.gate_run_id``), and
a reuse is recorded on the gate run itself (``resque.action=reused``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from resque_airflow.operators.errors import ResqueBadInputError, reported_to_airflow
from resque_airflow.operators.links import (
    CHALLENGER_RUN,
    ResqueChallengerRunLink,
    ResqueModelVersionLink,
    record_links,
)
from resque_airflow.operators.params import number
from resque_airflow.registry.client import ModelRef

if TYPE_CHECKING:
    from airflow.sdk.definitions.context import Context


def _gated_uri(gate_result: dict) -> str:
    """The ``models:/NAME/VERSION`` a gate result is about (for error messages)."""
    return ModelRef.spell(gate_result.get("model_name"), version=gate_result.get("model_version"))


class ResqueChallengerOperator(BaseOperator):
    """Train a challenger on ``data`` after a gate, measure what it cost, and register it as ``@alias``.

    Links: the challenger's run and its model version in the MLflow UI.

    ``fresh=False`` (retrain) fine-tunes the gated version's weights; ``fresh=True`` (rebuild) trains the same
    architecture from freshly initialised weights. Training stops at 0.95 x the gated version's reference accuracy
    on a held-out split, or after ``max_epochs``; the measured cost (steps, epochs, gradient norms, parameter change,
    wall time, energy, emissions) is logged on the challenger's run in the experiment ``resque-retrain``, with the id
    of the gate run that triggered it. The gated version must have been published with torch weights and a torch
    factory. Returns (XCom) the kind, the new version, its run id, the gate run id, the target and the costs.

    Bad input (unlabelled data, no weights or factory on file) fails the task without retry; a registry outage
    fails it retryably (:mod:`resque_airflow.operators.errors`).

    A challenger that misses its target (censored at ``max_epochs``) is registered without the alias and tagged
    ``resque.target=missed``: it never replaces the current ``@challenger``. Its measured cost is written back onto
    the triggering gate run either way (``measured_<cost>``, beside ``predicted_<cost>``).

    :param gate_result: the gate's result, usually ``gate.output``; None in an asset-scheduled DAG: then the
        triggering event of the model asset in ``inlets`` is read (its extra). (templated)
    :param data: path or fsspec URL of the labelled new data to train on; default: the gate's data. (templated)
    :param fresh: False to retrain (fine-tune), True to rebuild (train from scratch); None: as the gate decided.
    :param max_epochs: cap on training, in epochs. (templated)
    :param country_iso_code: energy mix for the emissions estimate (codecarbon), e.g. ``"USA"``. (templated)
    :param alias: alias given to the challenger's version.
    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    template_fields: Sequence[str] = ("gate_result", "data", "max_epochs", "country_iso_code")
    ui_color = "#f5e6d6"
    operator_extra_links = (ResqueChallengerRunLink(), ResqueModelVersionLink())

    def __init__(
        self,
        *,
        gate_result: Any = None,
        data: str | None = None,
        fresh: bool | None = None,
        max_epochs: float = 40,
        country_iso_code: str = "USA",
        alias: str = "challenger",
        mlflow_conn_id: str = "mlflow_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gate_result = gate_result
        self.data = data
        self.fresh = fresh
        self.max_epochs = max_epochs
        self.country_iso_code = country_iso_code
        self.alias = alias
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict:
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.challenger import train_challenger

        gate = self.gate_result
        if gate is None:  # the retrain DAG: the gate's decision arrives as the asset event's extra
            from resque_airflow.operators.assets import gate_result_from_events

            gate = gate_result_from_events(context, self.inlets)
        fresh = self.fresh if self.fresh is not None else gate.get("decision") == "rebuild"
        data = self.data or gate.get("data_uri")
        kind = "rebuild" if fresh else "retrain"
        if not data:
            raise ResqueBadInputError("data: not given and the gate result names no data_uri; pass data=")
        with reported_to_airflow(kind, model_uri=_gated_uri(gate), data=str(data), connection=self.mlflow_conn_id):
            hook = MlflowHook(self.mlflow_conn_id)
            hook.configure_credentials()  # train_challenger builds its clients from the URIs
            result = train_challenger(
                tracking_uri=hook.tracking_uri, registry_uri=hook.registry_uri, gate_result=gate,
                data_uri=str(data), fresh=fresh, max_epochs=number("max_epochs", self.max_epochs),
                country_iso_code=self.country_iso_code, alias=self.alias,
            )  # fmt: skip
        record_links(self, hook, hook.get_client(), run_id=result["run_id"],
                     model=(result["model_name"], result["version"]), run_key=CHALLENGER_RUN)  # fmt: skip
        return result


class ResqueReuseOperator(BaseOperator):
    """The reuse branch: record on the gate run that its decision was acted on (``resque.action=reused``).

    Returns (XCom) ``{"kind": "reuse", "gate_run_id": ..., "model_version": ...}``.

    :param gate_result: the gate's result, usually ``gate.output``. (templated)
    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    template_fields: Sequence[str] = ("gate_result",)
    ui_color = "#d6f5e0"

    def __init__(self, *, gate_result: Any, mlflow_conn_id: str = "mlflow_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate_result = gate_result
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict:
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry import names
        from resque_airflow.registry.gate import record_action

        gate = self.gate_result
        with reported_to_airflow("reuse", model_uri=_gated_uri(gate), connection=self.mlflow_conn_id):
            record_action(MlflowHook(self.mlflow_conn_id).get_client(), gate["gate_run_id"], names.ACTION_REUSED)
        return {"kind": "reuse", "gate_run_id": gate["gate_run_id"], "model_version": gate["model_version"]}


class ResquePromoteOperator(BaseOperator):
    """The post-retrain gate: move ``@champion`` to ``@challenger`` only when MLflow's validation passes.

    Both versions are evaluated on the held-out part of the challenger's training data (the split it held out)
    and compared with ``mlflow.validate_evaluation_results`` (:mod:`resque_airflow.registry.promotion`). A worse
    challenger, or one that missed its target, is not promoted; the task still succeeds and returns
    ``{"promoted": false, "reason": ...}``. Without a challenger (the train task registered none) it is skipped.

    :param challenger: the challenger task's result, usually ``train.output``. (templated)
    :param min_absolute_change: how much the challenger's accuracy must exceed the champion's. (templated)
    :param min_accuracy: an absolute floor for the challenger's accuracy (optional). (templated)
    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    template_fields: Sequence[str] = ("challenger", "min_absolute_change", "min_accuracy")
    ui_color = "#d6e6f5"

    def __init__(
        self,
        *,
        challenger: Any,
        min_absolute_change: float = 0.0,
        min_accuracy: float | None = None,
        champion_alias: str = "champion",
        mlflow_conn_id: str = "mlflow_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.challenger = challenger
        self.min_absolute_change = min_absolute_change
        self.min_accuracy = min_accuracy
        self.champion_alias = champion_alias
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.promotion import promote_challenger

        ch = self.challenger
        if not isinstance(ch, dict) or "version" not in ch:
            raise ResqueBadInputError(f"challenger: expected the challenger task's result, got {ch!r}")
        if not ch.get("alias"):
            raise AirflowSkipException(f"no challenger to promote: version {ch['version']} missed its target")
        floor = number("min_accuracy", self.min_accuracy)
        with reported_to_airflow("promotion", model_uri=f"models:/{ch['model_name']}@{ch['alias']}",
                                 connection=self.mlflow_conn_id):  # fmt: skip
            return promote_challenger(
                MlflowHook(self.mlflow_conn_id).get_client(), ch["model_name"], data_uri=ch["data_uri"],
                heldout_fraction=ch.get("heldout_fraction", 0.25), seed=ch.get("seed", 0),
                champion_alias=self.champion_alias, challenger_alias=ch["alias"],
                min_absolute_change=float(number("min_absolute_change", self.min_absolute_change) or 0.0),
                min_accuracy=floor, gate_run_id=ch.get("gate_run_id"),
            )  # fmt: skip
