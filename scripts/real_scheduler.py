"""The example DAGs through a real Airflow 3 scheduler, triggered over the REST API (not ``dag.test()``).

    python scripts/real_scheduler.py [--home DIR] [--keep]

Starts, under ``--home`` (a temporary folder by default), everything a small deployment runs, each as its own
process on 127.0.0.1: an ``mlflow server`` (SQLite backend, artifacts served over HTTP), and Airflow's
``api-server``, ``scheduler`` (LocalExecutor), ``dag-processor`` and ``triggerer`` against one SQLite metadata DB,
with the simple auth manager and a generated password. It then publishes the digits CNN as ``digits-cnn@champion``
and, as an operator would, over HTTP only:

1. triggers ``resque_gate`` on a clean batch and reads back the branch taken, the gate's XCom, its MLflow run and
   the task's extra links (each checked against the MLflow server);
2. triggers ``resque_gate_assets`` on a heavily shifted batch with a budget of 0, so that the gate's retrain or
   rebuild needs approval; approves it through the human-in-the-loop endpoint (the approval task is deferred to the
   triggerer meanwhile); the asset event then makes the scheduler start ``resque_retrain``, whose run is checked for
   the event's extra (the gate run id), a challenger and the measured cost written back on the gate run.

Prints one line per step and, at the end, a JSON summary (also written to ``<home>/summary.json``). Exit code 0 when
every check held, 1 when one failed (the line says which; process logs are under ``<home>/logs``), 2 on bad
arguments. Takes 3 to 6 minutes on 2 cores. ``tests/test_real_scheduler.py`` runs it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlsplit

REPO = Path(__file__).resolve().parent.parent
USER = "operator"
START_S = 240  # bound on each server's start
RUN_S = 600  # bound on each DAG run
TERMINAL = {"success", "failed"}
CHALLENGER_KEYS = ("kind", "version", "met_target", "final_accuracy")  # of the train task's XCom, in the summary
WAITING = {"awaiting_input", "deferred"}  # a human-in-the-loop task waiting for its answer


class CheckFailed(Exception):
    """A step's expectation did not hold; the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    say(f"  ok: {what}")


class Stack:
    """The processes, each in its own process group with its log under ``logs/``; :meth:`stop` ends them all."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.mlflow_url = f"http://127.0.0.1:{free_port()}"
        self.airflow_url = f"http://127.0.0.1:{free_port()}"
        self.password = secrets.token_urlsafe(16)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        airflow_home = self.home / "airflow"
        airflow_home.mkdir(exist_ok=True)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({USER: self.password}))
        passwords.chmod(0o600)
        env = dict(os.environ)
        env.update({
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",  # two cores: one task at a time would serialise the approval wait
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home}/airflow.db",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(48),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__BASE_URL": self.airflow_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "mlflow", "host": self.mlflow_url}),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # the gate needs none of MLflow's background jobs
        })  # fmt: skip
        return env

    def start(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.home, start_new_session=True
            )

    def wait_healthy(self, name: str, url: str) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise CheckFailed(f"{name} exited with {proc.returncode}: see {self.logs / name}.log")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise CheckFailed(f"{name} did not answer {url} within {START_S} s: see {self.logs / name}.log")

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise CheckFailed(f"{name} exited with {proc.returncode}: see {self.logs / name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Api:
    """Airflow's public REST API (``/api/v2``) with a JWT from the simple auth manager's ``/auth/token``."""

    def __init__(self, base: str, password: str) -> None:
        self.base = base
        self.token = self._call("POST", "/auth/token", {"username": USER, "password": password}, auth=False)[
            "access_token"
        ]

    def _call(self, method: str, path: str, body: dict | None = None, *, auth: bool = True) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise CheckFailed(f"{method} {path}: HTTP {exc.code} {exc.read()[:400]!r}") from exc

    def page(self, path: str) -> tuple[str, str]:
        """An HTML page of the API server (redirects followed, token sent): ``(final URL, text)``."""
        req = urllib.request.Request(f"{self.base}{path}", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.geturl(), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise CheckFailed(f"GET {path}: HTTP {exc.code} {exc.read()[:400]!r}") from exc

    def get(self, path: str) -> dict:
        return self._call("GET", f"/api/v2{path}")

    def patch(self, path: str, body: dict) -> dict:
        return self._call("PATCH", f"/api/v2{path}", body)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", f"/api/v2{path}", body)

    def wait_for_dag(self, dag_id: str, stack: Stack) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            stack.alive()
            try:
                self.get(f"/dags/{dag_id}")
                return
            except CheckFailed:
                time.sleep(2)
        raise CheckFailed(f"DAG {dag_id} was not parsed within {START_S} s: see {stack.logs}/dag-processor.log")

    def trigger(self, dag_id: str, conf: dict) -> str:
        self.patch(f"/dags/{dag_id}", {"is_paused": False})
        return self.post(f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, stack: Stack, until=None) -> dict:
        """Poll the run until it ends (or ``until(task_states)`` holds); returns ``{task_id: state}``."""
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            stack.alive()
            run = self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}")
            tis = self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances")["task_instances"]
            states = {ti["task_id"]: ti["state"] for ti in tis}
            if (until is not None and until(states)) or run["state"] in TERMINAL:
                return states | {"<run>": run["state"]}
            time.sleep(3)
        raise CheckFailed(f"{dag_id} run {run_id} did not finish within {RUN_S} s: see {stack.home}/airflow/logs")

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> dict:
        entry = self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/xcomEntries/return_value")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value


def check_links(api: Api, dag_id: str, run_id: str, task_id: str, mlflow_url: str) -> dict:
    """The task's extra links point at the MLflow server and name a run / version that exists there."""
    links = api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/links")["extra_links"]
    named = {k: v for k, v in links.items() if v}
    check(bool(named), f"{dag_id}.{task_id} has extra links ({', '.join(named) or 'none'})")
    for name, url in named.items():
        parts = urlsplit(url)
        check(f"{parts.scheme}://{parts.netloc}" == mlflow_url, f"link {name!r} points at the MLflow server ({url})")
        segments = parts.fragment.strip("/").split("/")
        if "runs" in segments:
            api_path = f"/api/2.0/mlflow/runs/get?run_id={segments[segments.index('runs') + 1]}"
        elif "versions" in segments:
            api_path = f"/api/2.0/mlflow/model-versions/get?name={segments[1]}&version={segments[3]}"
        else:
            api_path = "/"
        with urllib.request.urlopen(f"{mlflow_url}{api_path}", timeout=30) as r:
            check(r.status == 200, f"link {name!r} names something the server has (GET {api_path})")
    return named


def check_audit_views(api: Api, run_id: str, gate_run_id: str) -> None:
    """The plugin as the live API server serves it: its views listed, and the task-instance tab's page showing the
    gate run of this task instance (``/resque/airflow?...`` redirects to the model page with the run selected)."""
    plugins = {p["name"]: p for p in api.get("/plugins")["plugins"]}
    views = [v["name"] for v in plugins.get("resque", {}).get("external_views", [])]
    check(len(views) == 4, f"the API server lists the resque plugin's views ({views})")
    url, text = api.page(f"/resque/airflow?dag_id=resque_gate&run_id={quote(run_id)}&task_id=gate&map_index=-1")
    check("/resque/models/digits-cnn" in url and gate_run_id in text,
          f"the task instance's RESQUE tab opens its gate run ({urlsplit(url).path})")  # fmt: skip


def gate_on_clean_batch(api: Api, stack: Stack, data: Path, client) -> dict:
    say("1. resque_gate on a clean batch (REST trigger)")
    run_id = api.trigger("resque_gate", {"model_name": "digits-cnn", "data_uri": str(data / "clean.npz")})
    states = api.wait_run("resque_gate", run_id, stack)
    say(f"  task states: {states}")
    check(states["<run>"] == "success" and states["gate"] == "success", "the DAG run and the gate succeeded")
    result = api.xcom("resque_gate", run_id, "gate")
    ran = [t for t in ("reuse", "retrain", "rebuild") if states.get(t) == "success"]
    check(len(ran) == 1, f"exactly one branch ran ({ran})")
    run = client.get_run(result["gate_run_id"])
    check(run.info.status == "FINISHED" and run.data.tags.get("resque.decision") == result["decision"],
          f"the MLflow gate run {run.info.run_id} is FINISHED with decision {result['decision']!r}")  # fmt: skip
    links = check_links(api, "resque_gate", run_id, "gate", stack.mlflow_url)
    check_audit_views(api, run_id, result["gate_run_id"])
    say(f"  decision {result['decision']} (score {result['score']:.4f}), branch {ran[0]}: {result.get('reason')}")
    return {"dag_run_id": run_id, "states": states, "decision": result["decision"], "score": result["score"],
            "branch": ran[0], "gate_run_id": result["gate_run_id"], "links": links}  # fmt: skip


def paused_seen(stack: Stack, run_id: str, timeout_s: float = 30.0) -> None:
    """Wait until the scheduler's log shows the executor's event for ``approve`` in ``run_id`` (its paused attempt)."""
    log, deadline = stack.logs / "scheduler.log", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if any("Received executor event" in line and "task_id='approve'" in line and run_id in line
               for line in text.splitlines()):  # fmt: skip
            return
        time.sleep(0.5)
    say(f"  (no executor event for the paused approval in {timeout_s:.0f} s; answering anyway)")


def approved_retrain_via_asset(api: Api, stack: Stack, data: Path, client) -> dict:
    say("2. resque_gate_assets on a shifted batch with max_cost=0: approval, asset event, resque_retrain")
    before = {r["dag_run_id"] for r in api.get("/dags/resque_retrain/dagRuns")["dag_runs"]}
    api.patch("/dags/resque_retrain", {"is_paused": False})
    run_id = api.trigger("resque_gate_assets", {"data_uri": str(data / "shifted.npz"), "max_cost": 0})
    states = api.wait_run("resque_gate_assets", run_id, stack, until=lambda s: s.get("approve") in WAITING)
    result = api.xcom("resque_gate_assets", run_id, "gate")
    check(states.get("approve") in WAITING,
          f"gate said {result['decision']!r}; the approval task waits for a person")  # fmt: skip
    hitl = api.get(f"/dags/resque_gate_assets/dagRuns/{quote(run_id)}/taskInstances/approve/-1/hitlDetails")
    say(f"  asked: {hitl.get('subject')!r}; options {hitl.get('options')}")
    # Answer as a person would: not before the scheduler has taken the executor's event for the paused attempt.
    # An answer in the second before that re-queues the task, and the late event then fails it ("finished with
    # state success, but the task instance's state attribute is queued": seen once in CI, Airflow 3's scheduler).
    paused_seen(stack, run_id)
    api.patch(f"/dags/resque_gate_assets/dagRuns/{quote(run_id)}/taskInstances/approve/-1/hitlDetails",
              {"chosen_options": ["Approve"], "params_input": {}})  # fmt: skip
    states = api.wait_run("resque_gate_assets", run_id, stack)
    say(f"  task states: {states}")
    check(states["<run>"] == "success" and states.get("request_retrain") == "success",
          "approved: request_retrain emitted the asset event")  # fmt: skip
    deadline = time.monotonic() + RUN_S
    new = []
    while not new and time.monotonic() < deadline:
        stack.alive()
        new = [r for r in api.get("/dags/resque_retrain/dagRuns")["dag_runs"] if r["dag_run_id"] not in before]
        time.sleep(3)
    check(len(new) == 1 and new[0]["run_type"] == "asset_triggered",
          f"the scheduler started one asset-triggered resque_retrain run ({[r['run_type'] for r in new]})")  # fmt: skip
    retrain_id = new[0]["dag_run_id"]
    rstates = api.wait_run("resque_retrain", retrain_id, stack)
    say(f"  resque_retrain task states: {rstates}")
    check(rstates["<run>"] == "success" and rstates.get("train") == "success", "resque_retrain trained a challenger")
    events = api.get(f"/dags/resque_retrain/dagRuns/{quote(retrain_id)}/upstreamAssetEvents")["asset_events"]
    extras = [e.get("extra") or {} for e in events]
    check(any(x.get("gate_run_id") == result["gate_run_id"] for x in extras),
          "the retrain run's triggering event carries the gate run id")  # fmt: skip
    trained = api.xcom("resque_retrain", retrain_id, "train")
    gate_run = client.get_run(result["gate_run_id"])
    measured = {k: v for k, v in gate_run.data.metrics.items() if k.startswith("measured_")}
    check(bool(measured), f"the measured cost is written back on the gate run ({sorted(measured)[:3]} ...)")
    links = check_links(api, "resque_retrain", retrain_id, "train", stack.mlflow_url)
    return {"dag_run_id": run_id, "states": states, "decision": result["decision"], "score": result["score"],
            "approval_subject": hitl.get("subject"), "retrain_dag_run_id": retrain_id, "retrain_states": rstates,
            "challenger": {k: v for k, v in trained.items() if k in CHALLENGER_KEYS},
            "measured": measured, "links": links}  # fmt: skip


def write_batches(data: Path, splits) -> None:
    from resque_airflow.examples import digits

    digits.write_npz(data / "clean.npz", splits.test.x, splits.test.y)
    shifted = digits.apply_shift(splits.test.x, "salt_and_pepper", 0.3, seed=1)
    digits.write_npz(data / "shifted.npz", shifted, splits.test.y)


def run(home: Path) -> dict:
    from mlflow import MlflowClient

    from resque_airflow.demo import publish_champion

    stack = Stack(home)
    summary: dict = {"home": str(home), "mlflow": stack.mlflow_url, "airflow": stack.airflow_url}
    bin_dir = Path(sys.executable).parent
    try:
        say(f"mlflow server on {stack.mlflow_url}")
        stack.start("mlflow", str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                    stack.mlflow_url.rsplit(":", 1)[1], "--workers", "1", "--backend-store-uri",
                    f"sqlite:///{home}/mlflow.db", "--serve-artifacts", "--artifacts-destination",
                    str(home / "mlartifacts"))  # fmt: skip
        say("airflow db migrate")
        airflow = str(bin_dir / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=stack.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=(stack.logs / "db-migrate.log").open("wb"))  # fmt: skip
        port = stack.airflow_url.rsplit(":", 1)[1]
        stack.start("api-server", airflow, "api-server", "--host", "127.0.0.1", "--port", port)
        for component in ("scheduler", "dag-processor", "triggerer"):
            stack.start(component, airflow, component)
        stack.wait_healthy("mlflow", f"{stack.mlflow_url}/health")
        say("training and publishing digits-cnn@champion")
        data = home / "data"
        os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        splits, published = publish_champion(stack.mlflow_url, data, say=say)
        write_batches(data, splits)
        summary["champion_version"] = published.version
        stack.wait_healthy("api-server", f"{stack.airflow_url}/api/v2/monitor/health")
        api = Api(stack.airflow_url, stack.password)
        say(f"airflow api-server on {stack.airflow_url}: token for {USER!r}")
        for dag_id in ("resque_gate", "resque_gate_assets", "resque_retrain"):
            api.wait_for_dag(dag_id, stack)
        say("DAGs parsed by the dag-processor")
        client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
        summary["gate"] = gate_on_clean_batch(api, stack, data, client)
        summary["assets"] = approved_retrain_via_asset(api, stack, data, client)
        summary["ok"] = True
    except CheckFailed as exc:
        summary["ok"] = False
        summary["failed"] = str(exc)
        say(f"FAILED: {exc}")
    finally:
        stack.stop()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="folder for the servers' state and logs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.home and Path(args.home).exists() and any(Path(args.home).iterdir()):
        print(f"real_scheduler: --home {args.home} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    home = Path(args.home or tempfile.mkdtemp(prefix="resque-real-scheduler-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary = run(home)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    (home / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    if not args.home and not args.keep and summary.get("ok"):
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
