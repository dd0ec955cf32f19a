"""Reliability catalogue, part 6: round two continued (issue 15; docs/RELIABILITY.md, section "Round two").

Non-finite numbers in JSON, a NaN score, kills during tagging and before closing, a read-only database and a link
planted in the artifact store. Each test failed before its fix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from test_reliability_support import mv_tags

import resque_airflow.registry.gate as gate_module
from resque_airflow.cli import main as cli_main
from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.client import make_client
from resque_airflow.registry.gate import GateRequest, run_gate


@pytest.fixture(scope="module")
def env(cnn_registry):
    uri, root = cnn_registry("jsonkills", names=("cnn", "linked", "killed"), new=(60, 2, 0.0))
    return {"uri": uri, "root": root, "new": str(root / "new.npz")}


def strict(text: str):
    """``json.loads`` that refuses NaN and Infinity, as every strict JSON reader does."""

    def refuse(constant: str):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def spoil(monkeypatch, **fields):
    """Make the gate's scoring pass return ``fields`` (e.g. a NaN score) in its result."""
    real = gate_module._score

    def spoiled(gate, progress):
        result = real(gate, progress)
        for k, v in fields.items():
            setattr(result, k, v)
        return result

    monkeypatch.setattr(gate_module, "_score", spoiled)


# 1. Non-finite numbers ------------------------------------------------------------------------------------------
def test_nan_score_is_refused_before_any_decision_or_tag(env, monkeypatch, capsys):
    run_gate(GateRequest("models:/cnn@champion", env["new"]), client=make_client(env["uri"]))
    before = mv_tags(env["uri"], "cnn")
    spoil(monkeypatch, score=float("nan"))
    with pytest.raises(ResqueInputError, match="expected a finite number, got nan") as err:
        run_gate(GateRequest("models:/cnn@champion", env["new"]), client=make_client(env["uri"]))
    assert gate_module.failed_at(err.value)[0] == "deciding"
    assert mv_tags(env["uri"], "cnn") == before  # nothing decided, nothing tagged
    rc = cli_main(["gate", "--model-uri", "models:/cnn@champion", "--data", env["new"], "--tracking-uri", env["uri"]])
    err_text = capsys.readouterr().err.strip()
    assert rc == 2 and len(err_text.splitlines()) == 1 and "finite" in err_text, err_text


def test_non_finite_values_never_reach_json(env, monkeypatch, capsys, tmp_path, cnn_onnx):
    """--json, XCom (the outcome's dict), gate_result.json and fingerprint.json are strict JSON."""
    from resque_airflow.core.fingerprint import Fingerprint
    from resque_airflow.jsonsafe import dumps
    from resque_airflow.runtime.pipeline import fingerprint_model

    spoil(monkeypatch, interval=[float("nan"), float("inf")], signals={"mmd": float("nan"), "ks": 0.1})
    rc = cli_main(["gate", "--model-uri", "models:/cnn@champion", "--data", env["new"], "--tracking-uri", env["uri"],
                   "--json"])  # fmt: skip
    printed = strict(capsys.readouterr().out)
    assert rc == 0 and printed["interval"] == [None, None] and printed["signals"]["mmd"] is None
    client = make_client(env["uri"])
    local = client.download_artifacts(printed["gate_run_id"], names.GATE_RESULT_ARTIFACT, str(tmp_path))
    assert strict(Path(local).read_text())["interval"] == [None, None]
    outcome = run_gate(GateRequest("models:/cnn@champion", env["new"]), client=client)
    strict(json.dumps(outcome.to_dict(per_class=False)))  # what the operator pushes to XCom
    strict(mv_tags(env["uri"], "cnn")[names.LAST_GATE_TAG])
    assert dumps({"x": float("-inf")}) == '{"x": null}'

    monkeypatch.setattr(Fingerprint, "atc_threshold", property(lambda self: float("nan")))
    fp = fingerprint_model(str(cnn_onnx[1]), str(env["root"] / "ref.npz"))
    fp.save(tmp_path / "fp")
    assert strict((tmp_path / "fp" / "fingerprint.json").read_text())["atc_threshold"] is None
    Fingerprint.load(tmp_path / "fp")


# 2. Kills -------------------------------------------------------------------------------------------------------
def _gate_killed_at(env, model: str, method: str, when: str) -> None:
    """Run one gate in a subprocess that SIGKILLs itself inside MlflowClient.``method`` once ``when`` holds."""
    script = textwrap.dedent(f"""
        import os, signal
        from mlflow import MlflowClient
        from resque_airflow.registry.client import make_client
        from resque_airflow.registry.gate import GateRequest, run_gate
        real, calls = MlflowClient.{method}, []
        def killing(self, *args, **kwargs):
            calls.append(args)
            if {when}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)
        MlflowClient.{method} = killing
        run_gate(GateRequest("models:/{model}@champion", {env["new"]!r}), client=make_client({env["uri"]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_kill_during_tagging_audit_trusts_the_json_tag(env, capsys):
    first = run_gate(GateRequest("models:/killed@champion", env["new"]), client=make_client(env["uri"]))
    client = make_client(env["uri"])
    # What a gate killed after its first two tag writes leaves (the JSON tag is written last)
    client.set_model_version_tag("killed", "1", names.MV_TAG_SCORE, "0.9")
    client.set_model_version_tag("killed", "1", names.MV_TAG_DECISION, "rebuild")
    tags = mv_tags(env["uri"], "killed")
    assert json.loads(tags[names.LAST_GATE_TAG])["run_id"] == first.gate_run_id
    capsys.readouterr()
    assert cli_main(["audit", "--model", "killed", "--tracking-uri", env["uri"]]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("version 1: last gate"))
    assert first.gate_run_id in line and f"({first.decision}," in line, line
    assert "disagree" in line and names.MV_TAG_DECISION in line and "next gate repairs" in line, line


def test_kill_between_decided_and_closing_is_shown_interrupted(env, capsys):
    _gate_killed_at(env, "linked", "set_terminated", "len(args) > 1 and args[1] == 'FINISHED'")
    capsys.readouterr()
    assert cli_main(["audit", "--model", "linked", "--tracking-uri", env["uri"], "--json"]) == 0
    records = strict(capsys.readouterr().out)
    running = [r for r in records if r["run_status"] == "RUNNING"]
    assert running and all(r["status"] == "interrupted" for r in running), records


def test_read_only_database_is_one_line_naming_the_cause(env, capfd, monkeypatch):
    import sqlite3.dbapi2

    folder = Path(tempfile.mkdtemp(prefix="resque-ro-"))
    try:
        shutil.copy(Path(env["uri"].removeprefix("sqlite:///")), folder / "mlflow.db")
        os.chmod(folder / "mlflow.db", 0o444)
        os.chmod(folder, 0o555)
        if os.geteuid() == 0:  # chmod does not bind root: open the file read-only, as SQLite does for other users
            real = sqlite3.dbapi2.connect

            def read_only(database, *args, **kwargs):
                kwargs.pop("uri", None)
                return real(f"file:{database}?mode=ro", *args, uri=True, **kwargs)

            monkeypatch.setattr(sqlite3.dbapi2, "connect", read_only)
            monkeypatch.setattr(sqlite3, "connect", read_only)
        capfd.readouterr()
        rc = cli_main(["gate", "--model-uri", "models:/cnn@champion", "--data", env["new"],
                       "--tracking-uri", f"sqlite:///{folder}/mlflow.db", "--experiment", "on-read-only"])  # fmt: skip
        err = capfd.readouterr().err.strip()
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)
    assert rc == 3 and len(err.splitlines()) == 1, err
    assert "readonly database" in err and "write access" in err, err


# 3. A link planted in the artifact store ------------------------------------------------------------------------
def test_link_planted_in_the_artifact_store_is_one_line(env, capsys):
    client = make_client(env["uri"])
    src = Path(client.get_model_version_download_uri("linked", "1").removeprefix("file://"))
    planted = src / "model.onnx"
    keep = planted.read_bytes()
    planted.unlink()
    planted.symlink_to("/etc/passwd")
    try:
        capsys.readouterr()
        rc = cli_main(["gate", "--model-uri", "models:/linked@champion", "--data", env["new"],
                       "--tracking-uri", env["uri"]])  # fmt: skip
        err = capsys.readouterr().err.strip()
    finally:
        planted.unlink()
        planted.write_bytes(keep)
    assert rc == 3 and len(err.splitlines()) == 1, err
    assert "holds a link" in err and "model/model.onnx" in err and "publish the model again" in err, err


# 7. Operations: a model published from the command line can be retrained --------------------------------------
def test_publish_records_the_torch_factory_and_training_cost(cnn_onnx, tmp_path, capsys):
    import numpy as np
    import torch
    from conftest import make_images

    from resque_airflow.registry.challenger import _load_torch_model
    from resque_airflow.registry.client import ModelRef, resolve_version

    x, y = make_images(120, seed=1)
    np.savez(tmp_path / "ref.npz", x=x, y=y)
    torch.save(cnn_onnx[0].state_dict(), tmp_path / "state_dict.pt")
    (tmp_path / "cost.json").write_text('{"steps_to_target": 1200, "energy_kwh": 0.4}')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["publish", "--model", str(cnn_onnx[1]), "--reference", str(tmp_path / "ref.npz"), "--tracking-uri", uri,
            "--weights", str(tmp_path / "state_dict.pt"), "--torch-factory", "conftest:make_cnn"]  # fmt: skip
    assert cli_main([*base, "--name", "cli-cnn", "--training-cost", "steps_to_target=1200,energy_kwh=0.4"]) == 0
    assert cli_main([*base, "--name", "cli-cnn-file", "--training-cost", str(tmp_path / "cost.json")]) == 0
    client = make_client(uri)
    for name in ("cli-cnn", "cli-cnn-file"):
        version = resolve_version(client, ModelRef.of(name, "champion"))
        metrics = client.get_run(version.run_id).data.metrics
        assert metrics["steps_to_target"] == 1200 and metrics["energy_kwh"] == pytest.approx(0.4)
        model, factory = _load_torch_model(client, version, fresh=False, seed=0)  # as the example DAG retrains
        assert factory == "conftest:make_cnn" and torch.equal(model.fc.weight, cnn_onnx[0].fc.weight)
    capsys.readouterr()
    assert cli_main([*base, "--name", "bad", "--training-cost", "steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown cost 'steps'" in err, err
