"""Reliability catalogue, part 6: credentials in URIs, data URLs and MLFLOW_TRACKING_* (docs/RELIABILITY.md).

One mechanism (``resque_airflow.errors.redact``): applied to every ResqueError's message when it is made, to every
log record (a record factory), to everything the MLflow client of ``make_client`` writes, to the gate's ``data_uri``
(params, outcome, XCom, ``--json``, ``gate_result.json``) and to ``resque audit``'s output. These tests grep all of
them for the secrets.
"""

from __future__ import annotations

import json
import logging

import fsspec
import numpy as np
import pytest
from conftest import make_images
from test_reliability_support import gate_runs, mv_tags

from resque_airflow.cli import main as cli_main
from resque_airflow.errors import ResqueInputError, redact
from resque_airflow.registry import names
from resque_airflow.registry.audit_report import audit_main
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate

SECRET = "s3cr3t-R0UND2-do-not-leak"
TOKEN = "tok-R0UND2-do-not-leak"


@pytest.mark.parametrize(
    "text",
    [f"http://alice:{SECRET}@mlflow:5000/api", f"s3://AKIA:{SECRET}@bucket/x.npz", f"https://h/x?a=1&token={SECRET}",
     f"https://h/x?X-Amz-Signature={SECRET}&b=2", f"gs://b/x?access_token={SECRET}"],
)  # fmt: skip
def test_redact_removes_every_spelling_of_a_secret(text):
    assert SECRET not in redact(text) and redact(redact(text)) == redact(text)


def test_tracking_env_values_are_redacted(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    assert TOKEN not in str(ResqueInputError(f"refused with {TOKEN}"))


@pytest.fixture(scope="module")
def env(cnn_registry):
    uri, root = cnn_registry("credentials")
    data = f"memory://alice:{SECRET}@store/new.npz?token={TOKEN}"
    x, y = make_images(60, seed=2)
    with fsspec.open(f"memory://alice:{SECRET}@store/new.npz", "wb") as f:
        np.savez(f, x=x, y=y)
    return {"uri": uri, "root": root, "data": data}


def _leaks(text: str) -> bool:
    return SECRET in text or TOKEN in text


def test_a_secret_in_the_data_url_is_nowhere(env, caplog, capsys, monkeypatch):
    data = f"memory://alice:{SECRET}@store/new.npz"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TOKEN)
    try:  # work in progress elsewhere (registry/audit_loop.py): MLflow has no dataset resolver for memory:// URLs
        import resque_airflow.registry.audit_loop as audit_loop

        monkeypatch.setattr(audit_loop, "record_gate_extras", lambda *a, **k: None)
    except ImportError:
        pass
    caplog.set_level(logging.DEBUG)
    outcome = run_gate(GateRequest("models:/cnn@champion", data), client=make_client(env["uri"]))
    with pytest.raises(ResqueInputError) as missing:
        run_gate(GateRequest("models:/cnn@champion", data + f"-missing?token={TOKEN}"), client=make_client(env["uri"]))
    rc = cli_main(["gate", "--model-uri", "models:/cnn@champion", "--data", data + "-gone", "--tracking-uri",
                   env["uri"], "--json"])  # fmt: skip
    audit_rc = audit_main("cnn", env["uri"], as_json=True)
    out = capsys.readouterr()
    client = make_client(env["uri"])
    seen = [json.dumps(outcome.to_dict()), str(missing.value), out.out, out.err, json.dumps(mv_tags(env["uri"], "cnn"))]
    seen += [r.getMessage() for r in caplog.records]
    for run in gate_runs(env["uri"]):
        seen += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        if run.data.tags.get(names.STATUS_TAG) == names.STATUS_DECIDED:
            path = client.download_artifacts(run.info.run_id, names.GATE_RESULT_ARTIFACT)
            with open(path) as f:
                seen.append(f.read())
    assert rc == 2 and audit_rc == 0 and "***@store" in outcome.data_uri
    assert not [s for s in seen if _leaks(s)]


def test_audit_works_with_a_user_pass_uri_and_never_prints_it(capsys):
    rc = audit_main("cnn", f"http://alice:{SECRET}@127.0.0.1:9/", as_json=False)
    err = capsys.readouterr().err
    assert rc == 3 and "unreachable" in err and not _leaks(err), err


def test_redaction_never_corrupts_ordinary_text(monkeypatch):
    """A user name, or a value too short to be a secret, is not replaced wherever it occurs as a substring: one
    earlier test's ``MLFLOW_TRACKING_USERNAME`` used to blank the ``gate`` of every later gate run's tags."""
    from resque_airflow.errors import redact

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "gate")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "cnn")
    assert redact("resque.kind=gate model=cnn") == "resque.kind=gate model=cnn"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    assert redact(f"password {SECRET} in a message") == "password *** in a message"
