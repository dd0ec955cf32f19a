"""Human approval of costly branches: ask a person before a retrain or rebuild the gate predicts to be expensive.

Wiring (one branch per path, so a rejection can skip the request without a direct edge from the branch operator)::

    gate >> check_cost >> [proceed, approve] >> request        # request: none_failed_min_one_success

- :class:`ResqueBudgetOperator` (``check_cost``) follows ``approve`` when the gate's predicted cost exceeds
  ``max_cost`` (or there is no forecast to compare), or the decision is a rebuild and ``approve_rebuilds`` is set;
  otherwise ``proceed`` (any no-op task).
- :class:`ResqueApprovalOperator` (``approve``) is Airflow's ``ApprovalOperator`` (standard provider, Airflow
  3.1+) showing the decision sentence, score, interval and predicted cost. On "Reject", and on timeout (its
  default option is "Reject"), it skips ``request``: the champion is kept and no challenger is trained. What the
  person chose is recorded on the gate run (``resque.action``: ``approved``, ``rejected`` or ``timed_out``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseBranchOperator

from resque_airflow.operators.errors import ResqueBadInputError, reported_to_airflow
from resque_airflow.operators.params import flag, number

if TYPE_CHECKING:
    from airflow.sdk.definitions.context import Context

ACTION_APPROVED = "approved"
ACTION_REJECTED = "rejected"
ACTION_TIMED_OUT = "timed_out"


def _check_result(gate_result: Any) -> dict:
    if not isinstance(gate_result, dict) or "decision" not in gate_result:
        raise ResqueBadInputError(f"gate_result: expected the gate's result (gate.output), got {gate_result!r}")
    return gate_result


def needs_approval(gate_result: dict, max_cost: float | None, approve_rebuilds: bool) -> tuple[bool, str]:
    """Whether a person must approve the branch the gate chose, and why (one sentence)."""
    if gate_result.get("decision") == "rebuild" and approve_rebuilds:
        return True, "every rebuild is approved by a person (approve_rebuilds=True)"
    if max_cost is None:
        return False, "no budget set (max_cost=None)"
    prediction = gate_result.get("prediction") or {}
    predicted = prediction.get("predicted")
    if predicted is None:
        return True, f"no cost forecast to compare with the budget {max_cost:g}"
    metric = prediction.get("cost_metric", "cost")
    if predicted > max_cost:
        return True, f"predicted {metric} {predicted:.4g} exceeds the budget {max_cost:g}"
    return False, f"predicted {metric} {predicted:.4g} is within the budget {max_cost:g}"


class ResqueBudgetOperator(BaseBranchOperator):
    """Follow ``approval_task_id`` when the gate's chosen branch is costly, else ``proceed_task_id``.

    :param gate_result: the gate's result, usually ``gate.output``. (templated)
    :param approval_task_id: the approval task (a :class:`ResqueApprovalOperator`).
    :param proceed_task_id: the task followed without approval (e.g. an ``EmptyOperator``).
    :param max_cost: budget in the forecast's unit (``steps_to_target``); None: no budget. (templated)
    :param approve_rebuilds: ask a person for every rebuild, whatever its forecast. (templated)
    """

    template_fields: Sequence[str] = ("gate_result", "max_cost", "approve_rebuilds")
    ui_color = "#f0e0c0"

    def __init__(
        self,
        *,
        gate_result: Any,
        approval_task_id: str,
        proceed_task_id: str,
        max_cost: float | str | None = None,
        approve_rebuilds: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gate_result = gate_result
        self.approval_task_id = approval_task_id
        self.proceed_task_id = proceed_task_id
        self.max_cost = max_cost
        self.approve_rebuilds = approve_rebuilds

    def choose_branch(self, context: Context) -> str:
        result = _check_result(self.gate_result)
        budget, every_rebuild = number("max_cost", self.max_cost), flag("approve_rebuilds", self.approve_rebuilds)
        ask, why = needs_approval(result, budget, every_rebuild)
        self.log.info("%s of %s: %s -> %s", result["decision"], result.get("model_name"), why,
                      "ask for approval" if ask else "proceed")  # fmt: skip
        return self.approval_task_id if ask else self.proceed_task_id


def approval_body(gate_result: dict) -> str:
    """The text shown to the approver (Markdown): decision sentence, score, interval, predicted cost, run."""
    interval = gate_result.get("interval")
    p = gate_result.get("prediction") or {}
    cost = (
        f"{p['predicted']:.4g} {p.get('cost_metric', '')} (interval {p.get('low', float('nan')):.4g} .. "
        f"{p.get('high', float('nan')):.4g}; rebuild {p.get('rebuild_cost', float('nan')):.4g})"
        if p.get("predicted") is not None
        else "no forecast"
    )
    lines = [
        f"**{gate_result.get('decision')}** of `{gate_result.get('model_name')}` v{gate_result.get('model_version')}",
        "",
        gate_result.get("reason") or "",
        "",
        f"- RESQUE score: {gate_result.get('score', float('nan')):.4f}"
        + (f" (interval {interval[0]:.4f} .. {interval[1]:.4f})" if interval else ""),
        f"- predicted cost: {cost}",
        f"- gate run: {gate_result.get('gate_run_id')}",
        "",
        "Approve to train the challenger; Reject (or no answer before the timeout) keeps the champion.",
    ]
    return "\n".join(lines)


class ResqueApprovalOperator(ApprovalOperator):
    """Ask a person to approve the gate's retrain or rebuild; on Reject or timeout the champion is kept.

    :param gate_result: the gate's result, usually ``gate.output``. (templated)
    :param response_timeout: how long to wait for an answer (then "Reject" is taken). Default 24 hours. Any
        ``timedelta`` (pendulum's ``Duration`` included) is stored as a plain ``timedelta``.
    :param mlflow_conn_id: connection used to record the answer on the gate run.

    Other ``ApprovalOperator`` arguments (``assigned_users``, ``notifiers``, ...) pass through; ``subject``
    defaults to "Approve <decision> of <model>?".
    """

    template_fields: Sequence[str] = ("subject", "body", "gate_result")

    def __init__(
        self,
        *,
        gate_result: Any,
        response_timeout: timedelta | None = timedelta(hours=24),
        mlflow_conn_id: str = "mlflow_default",
        subject: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("defaults", ApprovalOperator.REJECT)
        if response_timeout is not None:
            # A plain timedelta: under a real scheduler the task reports it to its supervisor through msgpack, which
            # refuses subclasses such as pendulum's Duration (the task then fails; dag.test() does not show it).
            response_timeout = timedelta(seconds=response_timeout.total_seconds())
        super().__init__(subject=subject or "Approve the RESQUE gate's retraining?",
                         response_timeout=response_timeout, **kwargs)  # fmt: skip
        self.gate_result = gate_result
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context):
        result = _check_result(self.gate_result)
        self.subject = f"Approve {result['decision']} of {result.get('model_name')} v{result.get('model_version')}?"
        self.body = approval_body(result)
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        chosen = list(event.get("chosen_options") or [])
        if event.get("timedout") or (chosen == [self.REJECT] and event.get("responded_by_user") is None):
            action = ACTION_TIMED_OUT
        else:
            action = ACTION_APPROVED if chosen == [self.APPROVE] else ACTION_REJECTED
        self._record(action)
        return super().execute_complete(context, event)

    def _record(self, action: str) -> None:
        from resque_airflow.hooks.mlflow import MlflowHook
        from resque_airflow.registry.gate import record_action

        result = _check_result(self.gate_result)
        with reported_to_airflow("approval", model_uri=str(result.get("model_name")), connection=self.mlflow_conn_id):
            record_action(MlflowHook(self.mlflow_conn_id).get_client(), result["gate_run_id"], action)
        self.log.info("%s: %s of %s v%s", action, result["decision"], result.get("model_name"),
                      result.get("model_version"))  # fmt: skip
