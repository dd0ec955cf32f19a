"""The audit trail as text: the table and JSON that ``resque audit`` prints, and the command itself.

The records come from :mod:`resque_airflow.registry.audit`; the web view renders the same records as HTML.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from resque_airflow.errors import RegistryError, ResqueInputError, first_line, redact, split_userinfo
from resque_airflow.registry.audit import GateRecord, gate_history
from resque_airflow.registry.client import make_client
from resque_airflow.registry.tags import last_gate_lines

log = logging.getLogger(__name__)


def to_json(records: Iterable[GateRecord], *, indent: int | None = 2) -> str:
    """The records as a JSON array (strict JSON: no NaN)."""
    return json.dumps([r.to_dict() for r in records], indent=indent, allow_nan=False)


def _fmt(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits, ``-`` when missing.

    >>> _fmt(0.031234), _fmt(12.0), _fmt(None)
    ('0.03123', '12', '-')
    """
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _primary_cost(record: GateRecord) -> dict[str, Any] | None:
    """The cost row to show in one cell: the first with both sides, else the first row, else ``None``."""
    rows = record.cost_comparison()
    both = [r for r in rows if r["predicted"] is not None and r["measured"] is not None]
    return (both or rows or [None])[0]


def cost_cell(record: GateRecord) -> str:
    """Predicted vs measured cost in one short string, e.g. ``epochs_to_target 12 [8-16] / 14``; ``-`` if none."""
    row = _primary_cost(record)
    if row is None:
        return "-"
    pred = _fmt(row["predicted"], 3)
    if row["low"] is not None and row["high"] is not None:
        pred += f" [{_fmt(row['low'], 3)}-{_fmt(row['high'], 3)}]"
    return f"{row['metric']} {pred} / {_fmt(row['measured'], 3)}"


def format_table(records: Sequence[GateRecord], *, width: int = 200, title: str | None = None) -> str:
    """The records as a plain-text table (rich), oldest first, for the ``resque audit`` command."""
    from rich.console import Console
    from rich.table import Table

    model = next((r.model_name for r in records if r.model_name), None)
    table = Table(title=title or (f"RESQUE gate runs of {model}" if model else "RESQUE gate runs"))
    for col, kw in (
        ("time (UTC)", {"no_wrap": True}),
        ("version", {}),
        ("score", {"justify": "right"}),
        ("decision", {}),
        ("branch", {}),
        ("status", {}),
        ("mode", {}),
        ("labels", {}),
        ("provider", {}),
        ("n", {"justify": "right"}),
        ("cost: predicted / measured", {"no_wrap": True}),
        ("run id", {"no_wrap": True}),
    ):
        table.add_column(col, **kw)
    for r in records:
        table.add_row(
            (r.start_time or "-").replace("+00:00", "Z"),
            r.model_version or "-",
            _fmt(r.score),
            r.decision or "-",
            r.branch or "-",
            r.status or "-",
            r.mode or "-",
            r.label_source or "-",
            (r.provider or "-").replace("ExecutionProvider", ""),
            "-" if r.n_samples is None else str(r.n_samples),
            cost_cell(r),
            r.run_id,
        )
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    return buf.getvalue()


def check_reachable(tracking_uri: str, *, timeout: float = 5.0) -> str | None:
    """Why ``tracking_uri`` cannot be read, or ``None`` when it looks reachable. Never creates anything.

    ``sqlite:`` URIs must name an existing file (MLflow would otherwise create an empty database); ``http(s)`` URIs
    must answer at all (any HTTP status counts: it proves a server is there) within ``timeout`` seconds.
    """
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else parsed.path
        path = path.split("?", 1)[0]
        if not path or path == ":memory:" or not os.path.isfile(path):
            return f"no MLflow database at {path or tracking_uri!r}"
        return None
    if parsed.scheme in ("http", "https"):
        # /health needs no login; urllib cannot open a user:pass@ URL (MLflow's requests sends them itself)
        url = split_userinfo(tracking_uri)[0].rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # http(s) only: checked above
                return None
        except urllib.error.HTTPError:
            return None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"MLflow tracking server {redact(tracking_uri)} is unreachable ({reason})"
    if parsed.scheme in ("", "file"):
        path = parsed.path or tracking_uri
        if not os.path.exists(path):
            return f"no MLflow store at {path!r}"
    return None


def audit_main(model: str, tracking_uri: str, as_json: bool, registry_uri: str | None = None) -> int:
    """``resque audit``: print the gate history of ``model`` as a table (or JSON) and return the exit code.

    Returns 0 on success; 3 (the CLI's code for registry errors, as the README says), with a one-line message on
    stderr, when the registry cannot be read or the model has no gate runs. Messages are redacted.
    """
    problem = check_reachable(tracking_uri)
    if problem is None and registry_uri and registry_uri != tracking_uri:
        problem = check_reachable(registry_uri)
    if problem:
        print(redact(f"resque audit: {problem}"), file=sys.stderr)
        return 3
    try:
        client = make_client(tracking_uri, registry_uri)
        records = gate_history(client, model)
        # Each version's newest gate as its authoritative tag says (stale resque.last_* tags flagged): text only.
        footer = [] if as_json else last_gate_lines(client, model)
    except Exception as exc:
        # first_line of the text, not of the exception: an empty message stays empty rather than repeating the type.
        message = f"resque audit: cannot read {tracking_uri}: {type(exc).__name__}: {first_line(str(exc), 500)}"
        print(redact(message)[:500], file=sys.stderr)
        log.debug("resque audit failed", exc_info=True)
        return 2 if isinstance(exc, ResqueInputError) and not isinstance(exc, RegistryError) else 3
    if not records:
        print(redact(f"resque audit: model {model!r} has no gate runs at {tracking_uri}"), file=sys.stderr)
        return 3
    print(redact(to_json(records) if as_json else format_table(records)), end="" if not as_json else "\n")
    for line in footer:
        print(redact(line))
    return 0
