"""The main job on an embedded default: ``python -m resque_airflow.demo`` (``make demo``).

Under ``.demo/`` (or ``--home``): a SQLite MLflow registry, a migrated Airflow home with the example DAGs, no servers.
Trains a small CNN on scikit-learn's bundled handwritten digits, publishes it as ``champion`` with its fingerprint,
weights and training cost, then runs the ``resque_gate`` DAG on incoming batches (clean, mildly and heavily
shifted) and prints what the gate decided and what retraining really cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "digits-cnn"

# (name, shift, severity): the incoming batches, from the evidence benchmark's grid (docs/EVIDENCE.md).
BATCHES = [
    ("clean", None, 0.0),
    ("blur 0.6", "gaussian_blur", 0.6),
    ("contrast 0.5", "contrast", 0.5),
    ("salt & pepper 5%", "salt_and_pepper", 0.05),
]
# The production model is trained as in benchmarks/evidence.py, whose runs the default thresholds come from.
TRAIN = {"epochs": 40, "lr": 0.1, "batch_size": 32, "seed": 0}


def configure(home: Path) -> dict[str, str]:
    """Environment for an embedded Airflow + MLflow under ``home`` (absolute paths: tasks do not share our cwd)."""
    home = home.resolve()
    tracking = f"sqlite:///{home}/mlflow.db"
    env = {
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow/airflow.db",
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "mlflow", "host": tracking}),
        "RESQUE_DEMO_TRACKING_URI": tracking,
    }
    os.environ.update(env)
    (home / "airflow").mkdir(parents=True, exist_ok=True)
    return env


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=str(REPO / ".demo"), help="folder for the registry and Airflow home")
    parser.add_argument("--max-epochs", type=float, default=20, help="retraining cap, in epochs")
    args = parser.parse_args(argv)
    home = Path(args.home)
    env = configure(home)
    t0 = time.perf_counter()

    step(f"Airflow metadata DB in {env['AIRFLOW_HOME']} (airflow db migrate)")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)

    from resque_airflow.examples import digits

    step("Training the production CNN on scikit-learn's handwritten digits")
    data = home / "data"
    splits, published = publish_champion(env["RESQUE_DEMO_TRACKING_URI"], data, say=step)
    print(f"    version {published.version}, reference accuracy {published.reference_accuracy:.3f}")

    from resque_airflow.registry.client import make_client

    client = make_client(env["RESQUE_DEMO_TRACKING_URI"])
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    rows = []
    for name, shift, severity in BATCHES:
        x = splits.test.x if shift is None else digits.apply_shift(splits.test.x, shift, severity, seed=1)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        path = digits.write_npz(data / f"incoming-{slug}.npz", x, splits.test.y)
        step(f"airflow dags test resque_gate on '{name}' ({path.name}); task logs in {logs}/{slug}.log")
        conf = {"model_name": MODEL_NAME, "data_uri": str(path), "max_epochs": args.max_epochs}
        with open(logs / f"{slug}.log", "w") as log_file:
            proc = subprocess.run(
                [sys.executable, "-m", "airflow", "dags", "test", "resque_gate", "-c", json.dumps(conf)],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        row = _row(client, name, proc.returncode)
        print(f"    RESQUE_dist={row['score']:.4f} -> {row['decision']} (branch: {row['branch']})")
        rows.append(row)

    _print_table(rows)
    print(f"\nFinished in {time.perf_counter() - t0:.0f} s. Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {env['RESQUE_DEMO_TRACKING_URI']}")
    print("and the gate history with:")
    print(f"    resque audit --model {MODEL_NAME} --tracking-uri {env['RESQUE_DEMO_TRACKING_URI']}")
    return 0


def publish_champion(tracking_uri: str, data: Path, say=print):
    """Train the digits CNN as the evidence benchmark does and publish it as ``digits-cnn@champion``.

    Writes ``champion.onnx``, ``champion.pt`` and ``reference.npz`` under ``data``; the version carries its
    fingerprint, weights, torch factory and training cost, so the example DAGs can gate and retrain it.
    Returns ``(splits, published)``: the digits splits and :class:`~resque_airflow.registry.publish.Published`.
    """
    import torch

    from resque_airflow.examples import digits
    from resque_airflow.registry.publish import publish_model
    from resque_airflow.runtime.export import export_torch

    splits = digits.load_digits_splits(seed=0)
    model = digits.make_model(seed=TRAIN["seed"])
    model, cost = digits.train_model(
        model, splits.train.x, splits.train.y, **TRAIN, heldout_x=splits.heldout.x, heldout_y=splits.heldout.y
    )
    print(f"    held-out accuracy {cost.final_accuracy:.3f}, {cost.wall_s:.1f} s, {cost.energy_kwh:.2e} kWh")
    onnx_path = export_torch(model, torch.from_numpy(splits.train.x[:2]), data / "champion.onnx",
                             layer=digits.REPRESENTATION_LAYER).path  # fmt: skip
    torch.save(model.state_dict(), data / "champion.pt")
    ref = digits.write_npz(data / "reference.npz", splits.reference.x, splits.reference.y)
    say(f"Publishing {MODEL_NAME}@champion with its fingerprint to {tracking_uri}")
    published = publish_model(
        tracking_uri=tracking_uri, name=MODEL_NAME, model_path=onnx_path, reference=str(ref),
        weights_path=data / "champion.pt", torch_factory="resque_airflow.examples.digits:make_model",
        training_cost=cost.to_metrics(),
    )  # fmt: skip
    return splits, published


def _row(client, name: str, returncode: int) -> dict:
    """What the last DAG run did, read back from the audit trail in MLflow: the gate run and its challenger."""
    from resque_airflow.registry import names
    from resque_airflow.registry.client import search_literal

    gate_exp = client.get_experiment_by_name(names.DEFAULT_EXPERIMENT)
    run = client.search_runs([gate_exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    branch = json.loads(run.data.tags.get(names.BRANCH_TAG, "null")) or []
    row = {
        "batch": name, "score": run.data.metrics.get(names.SCORE_METRIC),
        "decision": run.data.tags.get(names.DECISION_TAG), "acc_drop": run.data.metrics.get("acc_drop"),
        "branch": ",".join(branch) or "-", "dag_state": "success" if returncode == 0 else f"failed ({returncode})",
        "gate_run_id": run.info.run_id, "null_q": run.data.metrics.get("null_quantile"),
        "low": run.data.metrics.get("resque_score_low"), "high": run.data.metrics.get("resque_score_high"),
        "predicted": run.data.metrics.get("predicted_steps_to_target"), "reason": run.data.tags.get(names.REASON_TAG),
    }  # fmt: skip
    retrain_exp = client.get_experiment_by_name(names.RETRAIN_EXPERIMENT)
    if retrain_exp is not None:
        by_gate = f"tags.`{names.GATE_RUN_TAG}` = {search_literal(run.info.run_id)}"
        found = client.search_runs([retrain_exp.experiment_id], filter_string=by_gate)
        if found:
            versions = client.search_model_versions(f"run_id = {search_literal(found[0].info.run_id)}")
            row["cost"] = dict(found[0].data.metrics) | {"version": versions[0].version if versions else "?"}
    return row


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"resque_gate on {MODEL_NAME}@champion")
    columns = ("batch", "RESQUE", "90% interval", "null p99", "acc drop", "decision", "predicted steps", "steps", "kWh")
    for col in (*columns, "challenger"):
        table.add_column(col, justify="left" if col in ("batch", "decision") else "right")
    for r in rows:
        c = r.get("cost") or {}
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        censored = " (censored)" if c.get("censored") else ""
        failed = "" if r["dag_state"] == "success" else f" [DAG {r['dag_state']}]"
        table.add_row(
            r["batch"], fmt(r["score"], ".4f"),
            "-" if r["low"] is None else f"{r['low']:.3f}-{r['high']:.3f}", fmt(r["null_q"], ".4f"),
            fmt(r["acc_drop"], "+.3f"), (r["decision"] or "-") + failed, fmt(r["predicted"], ".0f"),
            fmt(c.get("steps_to_target"), ".0f") + censored, fmt(c.get("energy_kwh"), ".2e"),
            f"v{c['version']}" if c else "-",
        )  # fmt: skip
    console = Console(width=120)
    console.print(table)
    for r in rows:
        console.print(f"  {r['batch']}: {r['reason'] or '-'}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
