"""Extra links on the task page: the gate's MLflow run and model version, the challenger's run.

Airflow 3 calls ``get_link`` on the worker when the task ends, with the operator that ran, and stores the result in
XCom for the UI; so each link returns what the task recorded in ``operator.resque_links`` (empty when the task
recorded nothing, e.g. it failed before deciding, or the registry is a local store without a ``ui_url``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

GATE_RUN = "gate_run"
MODEL_VERSION = "model_version"
CHALLENGER_RUN = "challenger_run"


class _RecordedLink(BaseOperatorLink):
    key: ClassVar[str] = ""

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return (getattr(operator, "resque_links", None) or {}).get(self.key) or ""


class ResqueGateRunLink(_RecordedLink):
    """The gate run in the MLflow UI."""

    name = "MLflow gate run"
    key = GATE_RUN


class ResqueModelVersionLink(_RecordedLink):
    """The gated model version in the MLflow UI."""

    name = "MLflow model version"
    key = MODEL_VERSION


class ResqueChallengerRunLink(_RecordedLink):
    """The challenger's training run in the MLflow UI."""

    name = "MLflow challenger run"
    key = CHALLENGER_RUN


def record_links(operator: Any, hook: Any, client: Any, *, run_id: str | None, model: tuple[str, str] | None,
                 run_key: str) -> dict[str, str]:  # fmt: skip
    """Build the task's links from what it recorded, keep them on ``operator.resque_links`` and log them.

    Best effort: a link is worth a log line, never a failed task after the gate has decided.
    """
    from resque_airflow.registry import links

    out: dict[str, str] = {}
    try:
        base = links.ui_base(hook.tracking_uri, hook.ui_url)
        if base and run_id:
            out[run_key] = links.run_url(base, client.get_run(run_id).info.experiment_id, run_id)
        if base and model:
            out[MODEL_VERSION] = links.model_version_url(base, *model)
    except Exception as exc:  # the registry may be gone by now; the task's work is done
        log.warning("could not build the MLflow links: %s", str(exc).splitlines()[0][:300] if str(exc) else exc)
    for key, url in out.items():
        log.info("%s: %s", key.replace("_", " "), url)
    operator.resque_links = out
    return out
