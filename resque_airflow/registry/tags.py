"""The model-version tags a gate leaves: newest gate wins, under concurrent gates and cut-short writes.

A gate result on the registry side is the JSON tag :data:`~.names.LAST_GATE_TAG` (score, decision, gate run id,
time, mode) plus one ``resque.last_*`` tag per field (:data:`~.names.MV_TAG_FIELDS`). MLflow has no transaction
over several tags and no compare-and-set, so :func:`tag_model_version` writes and then verifies until the tags
agree with the newest result it can see.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import datetime

from resque_airflow.registry import names
from resque_airflow.registry.client import iso_time, search_literal

log = logging.getLogger(__name__)

_PAYLOAD_KEYS = ("score", "decision", "run_id", "time", "mode")
_TAG_ROUNDS = 8  # bound on write-and-verify rounds under contention; two suffice without a concurrent gate
# How a database reports two writers inserting the same tag at once (SQLite, MySQL, PostgreSQL), through MLflow.
_WRITE_CONFLICT = ("UNIQUE constraint failed", "IntegrityError", "Duplicate entry", "duplicate key value")


# A gate result stamped further ahead of this gate's own clock than this is not trusted to be the newest: one worker
# whose clock runs a year ahead would otherwise hide every later gate for a year.
MAX_CLOCK_SKEW_S = 600


def _order(payload: dict | None, horizon: str | None = None) -> tuple[bool, str, str]:
    """Sort key of a gate result: plausible first, then its time, then its run id (two gates in one millisecond
    agree). A time later than ``horizon`` (ISO; this gate's clock plus :data:`MAX_CLOCK_SKEW_S`) comes from a clock
    that runs ahead: such a result ranks below every plausible one, so it cannot hide later gates."""
    if not payload:
        return (False, "", "")
    stamp = str(payload.get("time", ""))
    return (horizon is None or stamp <= horizon, stamp, str(payload.get("run_id", "")))


def _horizon(ours: dict) -> str:
    """The latest time a result may carry and still count as newer: this gate's own time (or clock) plus the skew."""
    now_ms = int(time.time() * 1000)
    try:
        own_ms = int(datetime.fromisoformat(str(ours["time"])).timestamp() * 1000)
    except (KeyError, ValueError, TypeError):
        own_ms = now_ms
    return iso_time(max(now_ms, own_ms) + MAX_CLOCK_SKEW_S * 1000)


def _tag_payload(tags: dict) -> dict | None:
    """The JSON tag ``resque.last_gate`` of a model version, or None when absent or damaged."""
    try:
        payload = json.loads(tags.get(names.LAST_GATE_TAG) or "null")
    except ValueError:
        return None
    if not isinstance(payload, dict) or not set(_PAYLOAD_KEYS) <= set(payload):
        return None
    return payload


def _derived(payload: dict) -> dict[str, str]:
    """Every model-version tag a gate result sets; the individual ``resque.last_*`` tags derive from the JSON one."""
    # The score as a Python float: the same result read back from a run's metric must give the same text.
    payload = {k: payload[k] for k in _PAYLOAD_KEYS} | {"score": float(payload["score"])}
    out = {tag: str(payload[key]) for tag, key in names.MV_TAG_FIELDS}
    # Last: dicts keep insertion order, and this one is authoritative. Strict JSON (the score is checked finite).
    out[names.LAST_GATE_TAG] = json.dumps(payload, allow_nan=False)
    return out


def _newest_finished_gate(client, exp_id: str, name: str, version: str, horizon: str | None = None) -> dict | None:
    """The newest decided gate run of ``name``/``version`` in ``exp_id``, as a tag payload (None if there is none)."""
    name_literal, version_literal = search_literal(name), search_literal(version)
    if name_literal is None or version_literal is None:
        return None  # the tags alone then decide: still newest-wins, without the repair of a lost update
    runs = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{names.MODEL_NAME_TAG}` = {name_literal} and tags.`{names.MODEL_VERSION_TAG}` = "
            f"{version_literal} and tags.`{names.STATUS_TAG}` = {search_literal(names.STATUS_DECIDED)} "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=50,  # enough to break ties of equal end times by run id, and to see past a few runs from the future
    )
    best = None
    for run in runs:
        score = run.data.metrics.get(names.SCORE_METRIC)
        if run.info.end_time is None or score is None or names.DECISION_TAG not in run.data.tags:
            continue
        payload = {
            "score": score, "decision": run.data.tags[names.DECISION_TAG], "run_id": run.info.run_id,
            "time": iso_time(run.info.end_time), "mode": run.data.params.get("mode", ""),
        }  # fmt: skip
        if _order(payload, horizon) > _order(best, horizon):
            best = payload
    return best


def _set_tag_or_yield(client, name: str, version: str, tag: str, value: str) -> bool:
    """Set one model-version tag; False when a concurrent writer of the same tag won the race.

    MLflow's SQL store sets a tag as "look up, then insert or update": two gates setting a tag that neither saw
    both insert, and the second gets an integrity error (HTTP 400 from a server, which MLflow does not retry).
    Losing that race is not a failure: the caller re-reads the tags and verifies them.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.set_model_version_tag(name, version, tag, value)
        return True
    except MlflowException as exc:
        if not any(marker in str(exc) for marker in _WRITE_CONFLICT):
            raise
        log.info("model version %s/%s: tag %s written concurrently by another gate; verifying", name, version, tag)
        time.sleep(random.uniform(0.0, 0.2))  # let the other writer finish its round before reading
        return False


def tag_model_version(
    client, name: str, version: str, payload: dict, exp_id: str | None = None, *, known_tags: dict | None = None
) -> bool:
    """Leave the model-version tags naming the newest gate (by time, then run id). Returns whether it is ours.

    ``payload`` is this gate's result: ``score``, ``decision``, ``run_id``, ``time`` (ISO, as the run's end time)
    and ``mode``. A plain "read, compare, write" lets an older gate that read before a newer one wrote overwrite
    it, and lets the tags of two gates interleave. So each gate writes and then verifies, until the tags agree with
    the newest result it can see: its own, the newest decided gate run of the same model version in its experiment
    (gate runs are closed before tagging starts, so they are the durable record), or the JSON tag already there.
    Within a round the individual ``resque.last_*`` tags are written first and ``resque.last_gate`` (the
    authoritative record) last. Two gates inserting the same tag at once is a lost race, not an error
    (:func:`_set_tag_or_yield`).

    Guarantee: the gate that writes last verifies after its last write, so once every gate has returned the tags
    are all equal to the fields of ``resque.last_gate`` and name the newest decided gate. A damaged JSON tag is
    overwritten.

    ``known_tags``: the version's tags as the caller last read them (the gate resolved the version), used by the
    first round instead of reading them again. Only the tags that differ from them are written; a tag someone changed
    since is seen by the next round, which always reads afresh: a write is always followed by a read and a search,
    so the guarantee holds with a stale first reading as with a fresh one.
    """
    ours = payload
    horizon = _horizon(ours)
    for _ in range(_TAG_ROUNDS):
        if known_tags is not None:
            tags, known_tags = dict(known_tags), None
        else:
            tags = dict(client.get_model_version(name, version).tags)
        candidates = [ours, _tag_payload(tags)]
        if exp_id is not None:
            candidates.append(_newest_finished_gate(client, exp_id, name, version, horizon))
        newest = max((c for c in candidates if c), key=lambda c: _order(c, horizon))
        wanted = _derived(newest)
        if all(tags.get(k) == v for k, v in wanted.items()):
            if newest is not ours:
                log.info("model version %s/%s carries a newer gate result (%s); leaving it", name, version,
                         newest["run_id"])  # fmt: skip
            return newest is ours
        for tag, value in wanted.items():
            if tags.get(tag) != value and not _set_tag_or_yield(client, name, version, tag, value):
                break  # another gate wrote this tag at the same moment: re-read, then verify
    log.warning(
        "model version %s/%s: tags still changing after %d rounds; a concurrent gate is tagging and will verify them",
        name, version, _TAG_ROUNDS,
    )  # fmt: skip
    return False


def last_gate(tags: dict) -> tuple[dict | None, list[str]]:
    """What a model version's tags say about its newest gate, for readers: ``(resque.last_gate as a dict, the
    resque.last_* tags that disagree with it)``.

    The JSON tag is the record: a gate killed while tagging leaves some ``resque.last_*`` tags of its own beside a
    JSON tag that still names the gate before it (it is written last), until the next gate repairs them. A reader
    takes the JSON tag and treats the disagreeing tags as stale. ``(None, [])`` when the version has no valid JSON tag.
    """
    payload = _tag_payload(tags)
    if payload is None:
        return None, []
    try:
        wanted = _derived(payload)
    except (TypeError, ValueError):  # a score that is not a finite number: the JSON tag itself is damaged
        return None, []
    stale = [tag for tag, _ in names.MV_TAG_FIELDS if tag in tags and tags[tag] != wanted[tag]]
    return payload, stale


def last_gate_lines(client, model: str) -> list[str]:
    """One line per version of ``model`` naming its newest gate from ``resque.last_gate`` (``resque audit``), with a
    warning when the ``resque.last_*`` tags disagree with it. Empty when the registry cannot be searched."""
    literal = search_literal(model)
    if literal is None:
        return []
    lines = []
    versions = client.search_model_versions(f"name = {literal}")
    for mv in sorted(versions, key=lambda v: int(v.version)):
        payload, stale = last_gate(dict(mv.tags))
        if payload is None:
            continue
        line = (f"version {mv.version}: last gate {payload['run_id']} ({payload['decision']}, score "
                f"{float(payload['score']):.4g}, {payload['time']}), from {names.LAST_GATE_TAG}")  # fmt: skip
        if stale:
            line += (f"; the tags {', '.join(stale)} disagree with it (a gate was stopped while tagging): trust "
                     f"{names.LAST_GATE_TAG}, the next gate repairs them")  # fmt: skip
        lines.append(line)
    return lines
