"""The gate's decision as an Airflow asset event, and the retrain side reading it.

Where the event is emitted, deliberately: Airflow emits an outlet's event only when its task succeeds, and a branch
task (the gate) succeeds whatever it decides. An event on the gate itself would therefore fire for every decision,
reuse included, and a retrain DAG scheduled on it would run after every gate. So the event that asks for a retrain
is emitted by :class:`ResqueRetrainRequestOperator`, a task placed on the gate's retrain/rebuild branch (after the
approval step, when there is one): it runs only when the gate chose to retrain or rebuild and a person (if asked)
approved. The gate may still carry outlets of its own (a "decision feed" for dashboards); it then fills their
events' extra with its decision.

The extra (:func:`resque_airflow.registry.assets.event_extra`) holds the decision, score, interval, predicted cost,
model name and version, gate run id, reason, data URI and hash: enough for the retrain DAG's
:class:`~resque_airflow.operators.challenger.ResqueChallengerOperator` to act on it without the gate DAG's XCom.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator

from resque_airflow.operators.errors import ResqueBadInputError

if TYPE_CHECKING:
    from airflow.sdk.definitions.context import Context

ASSET_HOST_ENV = "RESQUE_ASSET_HOST"  # the tracking host named in asset URIs (stable across the deployment)


def model_asset(model_name: str, host: str | None = None) -> Asset:
    """The asset of a registered model: ``mlflow://<host>/models/<model_name>``.

    ``host`` names the tracking server (default: ``$RESQUE_ASSET_HOST``, else ``mlflow``); it is part of the
    asset's identity, so producer and consumer DAGs must agree on it. Cheap: safe at DAG-parse time.
    """
    from resque_airflow.registry.assets import DEFAULT_HOST, model_asset_uri

    uri = model_asset_uri(model_name, host or os.environ.get(ASSET_HOST_ENV) or DEFAULT_HOST)
    return Asset(uri=uri, name=f"resque:{host or os.environ.get(ASSET_HOST_ENV) or DEFAULT_HOST}/{model_name}")


def fill_outlet_events(context: Context, outlets: Sequence[Any], gate_result: dict, **more: object) -> list[str]:
    """Put the gate's extra on this task's events for every outlet asset that names the gated model.

    Returns the URIs filled. Outlets naming another model are an error (the event would claim a decision about a
    model the gate did not score).
    """
    from resque_airflow.registry.assets import event_extra, model_of_asset_uri

    filled = []
    for outlet in outlets:
        if not isinstance(outlet, Asset):
            continue
        named = model_of_asset_uri(outlet.uri)
        if named is None:
            continue  # not a model asset: not ours to fill
        if named != gate_result.get("model_name"):
            raise ResqueBadInputError(
                f"outlets: asset {outlet.uri} is model {named!r} but the gate scored "
                f"{gate_result.get('model_name')!r}; "
                f"use model_asset({gate_result.get('model_name')!r})"
            )
        context["outlet_events"][outlet].extra.update(event_extra(gate_result, **more))
        filled.append(outlet.uri)
    return filled


def gate_result_from_events(context: Context, inlets: Sequence[Any]) -> dict:
    """The gate result that triggered this run: the newest triggering event of a model asset among ``inlets``.

    A run that no event triggered (manual, ``dag.test()``) takes the newest event of the first model asset inlet.
    """
    from resque_airflow.registry.assets import model_of_asset_uri

    assets = [a for a in inlets if isinstance(a, Asset) and model_of_asset_uri(a.uri)]
    if not assets:
        raise ResqueBadInputError(
            "inlets: no model asset; give inlets=[model_asset(NAME)] (or pass gate_result) so the task knows which "
            "gate decision to act on"
        )
    triggering = context.get("triggering_asset_events") or {}
    for asset in assets:
        events = list(triggering.get(asset, []) if hasattr(triggering, "get") else [])
        if events:
            return dict(events[-1].extra)
    for asset in assets:
        try:
            latest = context["inlet_events"][asset][-1]
        except (IndexError, KeyError):
            continue
        return dict(latest.extra)
    raise ResqueBadInputError(f"inlets: no event yet for {assets[0].uri}; run the gate DAG first")


class ResqueRetrainRequestOperator(BaseOperator):
    """Emit the asset event asking for a retrain or rebuild of the gated model (place it on those branches).

    Give ``outlets=[model_asset(NAME)]``; the event's extra is the gate's decision (see module docstring). Returns
    (XCom) the extra.

    :param gate_result: the gate's result, usually ``gate.output``. (templated)
    :param approved_by: who approved, when a person was asked (templated; free text for the audit trail).
    """

    template_fields: Sequence[str] = ("gate_result", "approved_by")
    ui_color = "#fbe6c2"

    def __init__(self, *, gate_result: Any, approved_by: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate_result = gate_result
        self.approved_by = approved_by

    def execute(self, context: Context) -> dict:
        from resque_airflow.registry.assets import event_extra

        if not isinstance(self.gate_result, dict) or "gate_run_id" not in self.gate_result:
            raise ResqueBadInputError(
                f"gate_result: expected the gate's result (gate.output), got {self.gate_result!r}"
            )
        filled = fill_outlet_events(context, self.outlets, self.gate_result, approved_by=self.approved_by)
        if not filled:
            raise ResqueBadInputError(
                f"outlets: none names model {self.gate_result['model_name']!r}; give "
                f"outlets=[model_asset({self.gate_result['model_name']!r})]"
            )
        self.log.info("asked for a %s of %s v%s: asset event on %s", self.gate_result["decision"],
                      self.gate_result["model_name"], self.gate_result["model_version"], ", ".join(filled))  # fmt: skip
        return event_extra(self.gate_result, approved_by=self.approved_by)
