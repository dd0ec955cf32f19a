"""Static checks of the multi-container deployment in ``docker/`` (Docker itself is not run by the test suite).

The compose file, the images' Dockerfiles, ``.env.example`` and the README's service list must agree, and the
deployment must be safe to start as written (issue 15, item 7): every secret required with no default, nothing
published on all interfaces, MLflow behind its basic-auth app with every client sending a login, and one pinned GPU
per GPU worker. ``docker compose config`` runs too where the compose plugin is installed (not on CI).
"""

from __future__ import annotations

import base64
import configparser
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"

#: The services docker/README.md documents (its "## Services" table); keep both in sync.
SERVICES = {
    "postgres",
    "mlflow-db",
    "redis",
    "mlflow",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu0",
    "airflow-worker-gpu1",
    "flower",
}
GPU_WORKERS = {"airflow-worker-gpu0": "0", "airflow-worker-gpu1": "1"}  # service -> the one device id it holds
ONE_SHOT = {"airflow-init"}
AIRFLOW_SERVICES = {s for s in SERVICES if s.startswith("airflow-")} | {"flower"}
AIRFLOW_COMMANDS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker", "--queues", "default"],
    "airflow-worker-gpu0": ["celery", "worker", "--queues", "gpu", "--celery-hostname", "gpu0@%h"],
    "airflow-worker-gpu1": ["celery", "worker", "--queues", "gpu", "--celery-hostname", "gpu1@%h"],
    "flower": ["celery", "flower"],
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def command_words(service: dict[str, Any]) -> list[str]:
    """The service's command as words, without the leading ``airflow`` (the image's entrypoint adds it)."""
    cmd = service.get("command", [])
    words = shlex.split(cmd) if isinstance(cmd, str) else [str(w) for w in cmd]
    return words[1:] if words[:1] == ["airflow"] else words


def readme_services() -> set[str]:
    text = (DOCKER / "README.md").read_text()
    section = text.split("## Services", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE))


def test_services_match_the_readme(compose: dict[str, Any]) -> None:
    assert readme_services() == SERVICES
    assert set(compose["services"]) == SERVICES


def test_long_running_services_have_healthchecks(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            assert "healthcheck" not in service and service.get("restart") == "no"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert not check.get("disable"), name
        assert service.get("restart") == "always", name
    # Everything Airflow waits for the one-shot init and for healthy backing services.
    for name in AIRFLOW_SERVICES - ONE_SHOT:
        deps = compose["services"][name]["depends_on"]
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
        for backing in ("postgres", "redis", "mlflow"):
            assert deps[backing]["condition"] == "service_healthy", (name, backing)


def test_airflow_commands_queues_and_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, words in AIRFLOW_COMMANDS.items():
        assert command_words(services[name]) == words, name
    for name in GPU_WORKERS:
        gpu = services[name]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert gpu["build"]["args"]["RESQUE_ACCELERATOR"] == "cuda"
        assert gpu["image"] != services["airflow-worker"]["image"]
    assert services["airflow-worker"]["build"]["args"]["RESQUE_ACCELERATOR"] == "cpu"
    assert "deploy" not in services["airflow-worker"]  # CPU workers scale freely: no fixed ports or devices
    assert "ports" not in services["airflow-worker"] and "container_name" not in services["airflow-worker"]
    # The init service migrates the database and creates the admin user (through the image's entrypoint).
    init = services["airflow-init"]
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert "/entrypoint airflow version" in "\n".join(map(str, init["command"]))


def test_airflow_containers_share_image_config_and_mlflow_connection(compose: dict[str, Any]) -> None:
    services = compose["services"]
    envs = {name: services[name]["environment"] for name in AIRFLOW_SERVICES}
    for key in (
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
    ):
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    env = envs["airflow-apiserver"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    conn = json.loads(env["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    assert (conn["conn_type"], conn["host"]) == ("mlflow", "http://mlflow:5000")
    assert set(conn) == {"conn_type", "host", "login", "password"}  # test_mlflow_requires_a_login_... checks them
    for name in AIRFLOW_SERVICES:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "docker/Dockerfile"), name

    mlflow = services["mlflow"]
    words = [str(w) for w in mlflow["command"]]
    assert words[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in words
    # 0.0.0.0 inside its container (other containers call it); the host publishes it on loopback only.
    assert words[words.index("--host") + 1] == "0.0.0.0" and words[words.index("--port") + 1] == "5000"
    # The backend store through its variable (the --backend-store-uri option's), keeping the password off argv.
    assert "--backend-store-uri" not in words
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql+psycopg2://mlflow:") and store.endswith("@mlflow-db:5432/mlflow")
    destination = words[words.index("--artifacts-destination") + 1]
    assert any(str(v).endswith(":" + destination) for v in mlflow["volumes"])
    assert "mlflow" in words[words.index("--allowed-hosts") + 1]  # MLflow 3 checks the Host header
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"


def test_env_example_defines_every_variable(compose: dict[str, Any]) -> None:
    text = (DOCKER / "docker-compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used, "no variables found: the regex is wrong"
    defined = {
        line.split("=", 1)[0].strip()
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert used <= defined, f"missing in .env.example: {sorted(used - defined)}"
    assert not re.search(r"(?<!\$)\$[A-Za-z_]", text), "use ${VAR} (or $$VAR for the container's shell)"


def test_airflow_image_dockerfile() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) == 1 and re.fullmatch(r"apache/airflow:3\.3\.2(-python3\.\d+)?", froms[0]), froms
    assert re.search(r"^ARG AIRFLOW_VERSION=3\.3\.2$", text, flags=re.MULTILINE)
    assert re.search(r'pip install --no-cache-dir "apache-airflow==\$\{AIRFLOW_VERSION\}" "/opt/resque\[torch\]"', text)
    assert re.search(r"^COPY --chown=airflow:0 pyproject.toml README\* /opt/resque/$", text, flags=re.MULTILINE)
    assert re.search(r"^COPY --chown=airflow:0 resque_airflow /opt/resque/resque_airflow$", text, flags=re.MULTILINE)
    assert "onnxruntime-gpu[cuda,cudnn]" in text  # the CUDA variant's runtime libraries
    # What the image copies from the build context (the repository root) must exist there.
    for path in ("pyproject.toml", "resque_airflow", "dags"):
        assert (REPO / path).exists(), f"docker build needs {path} at the repository root"


def test_mlflow_dockerfile_and_dags_named_in_readme() -> None:
    text = (DOCKER / "mlflow.Dockerfile").read_text()
    assert "ARG MLFLOW_VERSION=3.17.2" in text and '"mlflow[auth]==${MLFLOW_VERSION}"' in text and "psycopg2" in text
    readme = (DOCKER / "README.md").read_text()
    dag_ids = set(re.findall(r"dag_id=\"([a-z0-9_]+)\"", "".join(p.read_text() for p in (REPO / "dags").glob("*.py"))))
    for dag_id in ("resque_gate", "resque_gate_sharded"):
        assert f"`{dag_id}`" in readme and dag_id in dag_ids, dag_id
    for needle in ("--scale airflow-worker=", 'queue="gpu"', "mlflow_default", "--queues gpu", "make-env.py"):
        assert needle in readme, needle


# --- Issue 15, item 7: the deployment as written must be safe to start ------------------------------------------------

#: ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}``, ... (compose interpolation; ``$${`` is an escaped ``$``).
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN|(?:^|_)KEY(?:$|_)|(?:^|_)AUTH$")
#: Every secret the deployment needs; each must be a required variable (the list guards the pattern above).
REQUIRED_SECRETS = {
    "AIRFLOW_DB_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "REDIS_PASSWORD",
    "_AIRFLOW_WWW_USER_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
}
LOOPBACK = {"127.0.0.1", "::1"}
BACKING_SERVICES = {"postgres", "redis", "mlflow-db"}


def strings(node: Any) -> Iterator[str]:
    """Every string of the parsed compose file, keys included (comments are not part of it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif node is not None:
        yield str(node)


def interpolations(compose: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for text in strings(compose):
        for match in INTERPOLATION.finditer(text):
            yield match.group(1), match.group(2) or "", match.group(3) or ""


def required_variable(value: str) -> str | None:
    """The variable of a value that is exactly one required interpolation ``${NAME:?message}``, else None."""
    match = INTERPOLATION.fullmatch(str(value))
    return match.group(1) if match and match.group(2) == ":?" and match.group(3).strip() else None


def resolve(text: str, env: dict[str, str]) -> str:
    """Interpolate like ``docker compose``: a required variable that is unset or empty is an error."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        value = env.get(name)
        if op in (":?", "?") and not (value if op == ":?" else value is not None):
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    return INTERPOLATION.sub(one, text).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def env_example() -> list[str]:
    return (DOCKER / ".env.example").read_text().splitlines()


def load_make_env() -> Any:
    spec = importlib.util.spec_from_file_location("make_env", DOCKER / "make-env.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated_env() -> dict[str, str]:
    """The .env that ``make-env.py`` writes from ``.env.example``, as a dict."""
    text = load_make_env().render((DOCKER / ".env.example").read_text())
    return {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }


def test_every_secret_is_required_with_no_default(compose: dict[str, Any]) -> None:
    """Defect: weak defaults (``airflow``/``mlflow`` passwords, ``change-me-...`` JWT and API secrets, no Fernet key,
    a broker without a password): ``docker compose up`` started a deployment anyone could log into."""
    secrets_seen = set()
    for name, op, arg in interpolations(compose):
        if SECRET_NAME.search(name):
            assert op == ":?" and arg.strip(), f"${{{name}}} must be ${{{name}:?what to set}}, not {op or 'plain'}"
            secrets_seen.add(name)
    assert secrets_seen >= REQUIRED_SECRETS, f"not required: {sorted(REQUIRED_SECRETS - secrets_seen)}"

    for name, service in compose["services"].items():
        env = environment(service)
        for key, value in env.items():
            if SECRET_NAME.search(key):  # POSTGRES_PASSWORD, AIRFLOW__CORE__FERNET_KEY, REDISCLI_AUTH, ...
                assert re.search(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*:\?", value), (name, key, "literal or optional")
            # Passwords inside URLs (database, broker): a required secret, never empty or literal.
            for password in re.findall(r"://[^/@\s]*?:([^@/\s]*)@", value):
                assert (required_variable(password) or "") in REQUIRED_SECRETS, (name, key, "URL password")
        if "AIRFLOW_CONN_MLFLOW_DEFAULT" in env:
            password = json.loads(env["AIRFLOW_CONN_MLFLOW_DEFAULT"]).get("password", "")
            assert required_variable(password) in REQUIRED_SECRETS, (name, "mlflow_default password")
        words = command_words(service)
        if "--requirepass" in words:
            assert required_variable(words[words.index("--requirepass") + 1]) in REQUIRED_SECRETS, name
    # The broker has a password, and every Airflow container sends it.
    assert "--requirepass" in command_words(compose["services"]["redis"])
    for name in AIRFLOW_SERVICES:
        broker = environment(compose["services"][name])["AIRFLOW__CELERY__BROKER_URL"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/0", broker), (name, broker)

    for path in (DOCKER / "docker-compose.yml", DOCKER / ".env.example", DOCKER / "README.md"):
        assert not re.search(r"change-?me", path.read_text(), flags=re.IGNORECASE), path.name


def test_env_example_names_every_required_variable_with_a_command(
    compose: dict[str, Any], generated_env: dict[str, str]
) -> None:
    """Each required variable is in ``.env.example``, empty, under a ``# required: <command>`` line whose command
    prints a usable value; ``make-env.py`` fills all of them (and only writes a new, private, git-ignored file)."""
    required = {name for name, op, _ in interpolations(compose) if op in (":?", "?")}
    assert required >= REQUIRED_SECRETS
    lines = env_example()
    for name in sorted(required):
        (index,) = [i for i, line in enumerate(lines) if line.split("=", 1)[0] == name]
        assert lines[index] == f"{name}=" or not SECRET_NAME.search(name), f"{name} has a value in .env.example"
        if SECRET_NAME.search(name):
            comment = lines[index - 1]
            assert comment.startswith("# required: python3 -c "), (name, comment)
            command = shlex.split(comment.removeprefix("# required: ").split("  (")[0])
            out = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, check=True)
            value = out.stdout.strip()
            assert len(value) >= 32 and re.fullmatch(r"[A-Za-z0-9_=-]+", value), (name, "command output")
    # Every secret-looking variable of .env.example is empty (no weak example value to copy).
    for line in lines:
        if "=" in line and not line.startswith("#") and SECRET_NAME.search(line.split("=", 1)[0]):
            assert line.endswith("="), line

    values = [generated_env[name] for name in REQUIRED_SECRETS]
    assert len(set(values)) == len(values), "make-env.py generated the same value twice"
    for name in REQUIRED_SECRETS - {"AIRFLOW_FERNET_KEY"}:
        assert re.fullmatch(r"[0-9a-f]{64}", generated_env[name]), name  # safe in URLs, JSON and argv
    assert len(base64.urlsafe_b64decode(generated_env["AIRFLOW_FERNET_KEY"])) == 32  # a Fernet key
    # With that .env every interpolation resolves; without one secret, compose refuses to start.
    for text in strings(compose):
        resolve(text, generated_env)
    for name in REQUIRED_SECRETS:
        with pytest.raises(KeyError, match=name):
            for text in strings(compose):
                resolve(text, {**generated_env, name: ""})

    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    make_env = load_make_env()
    assert make_env.main(["--out", str(DOCKER / ".env.example")]) == 1  # never overwrites


def test_no_port_is_published_on_all_interfaces(compose: dict[str, Any]) -> None:
    """Defect: ``"5000:5000"`` published MLflow (with no login) on every interface of the host; likewise the Airflow
    UI and Flower. Published ports bind loopback unless the operator sets the bind address; backing services
    publish nothing."""
    published = set()
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for entry in service.get("ports", []):
            if isinstance(entry, dict):
                host_ip = resolve(str(entry.get("host_ip", "")), {})
            else:
                spec = resolve(str(entry), {})  # the defaults: what an .env without the *_BIND_IP gives
                match = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+):([^:]+):([^:]+)", spec)
                assert match, f"{name}: {entry!r} has no host IP, so Docker binds it on all interfaces"
                host_ip = match.group(1).strip("[]")
            assert host_ip in LOOPBACK, f"{name}: {entry!r} binds {host_ip or 'all interfaces'}"
            published.add(name)
    assert published == {"mlflow", "airflow-apiserver", "flower"}
    for name in BACKING_SERVICES:
        assert "ports" not in compose["services"][name], name


def test_databases_and_broker_are_on_internal_networks(compose: dict[str, Any]) -> None:
    """The databases and the broker have no route out; MLflow's database is reachable from MLflow only (task code
    on a worker cannot go around MLflow's login to its store)."""
    networks = compose.get("networks") or {}
    services = compose["services"]

    def nets(name: str) -> set[str]:
        return set(services[name].get("networks") or ["default"])

    for name in BACKING_SERVICES:
        assert nets(name) and all((networks.get(n) or {}).get("internal") is True for n in nets(name)), name
    for name in services:
        if name not in ("mlflow", "mlflow-db"):
            assert not nets(name) & nets("mlflow-db"), f"{name} can reach MLflow's database"
    assert nets("mlflow") & nets("mlflow-db")
    for name in AIRFLOW_SERVICES:
        assert nets(name) >= nets("postgres") | nets("redis"), name


def test_mlflow_requires_a_login_and_every_client_sends_it(compose: dict[str, Any]) -> None:
    """Defect: the MLflow server had no authentication. Now MLflow's basic-auth app, configured for 3.17.2 (read
    with MLflow's own config reader), and the same admin login in every client: the ``mlflow_default`` connection
    (what MlflowHook reads: operators and the audit view), ``MLFLOW_TRACKING_*`` (the CLI) and the health check."""
    services = compose["services"]
    mlflow = services["mlflow"]
    words = [str(w) for w in mlflow["command"]]
    assert words[words.index("--app-name") + 1] == "basic-auth"
    from importlib.metadata import entry_points

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}  # the installed MLflow has the app
    env = environment(mlflow)
    user = required_variable(env["MLFLOW_AUTH_ADMIN_USERNAME"])
    password = required_variable(env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert user == "MLFLOW_ADMIN_USERNAME" and password == "MLFLOW_ADMIN_PASSWORD"
    assert required_variable(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == "MLFLOW_FLASK_SECRET_KEY"

    # The configuration file: baked into the image at MLFLOW_AUTH_CONFIG_PATH, the user store in a volume.
    dockerfile = (DOCKER / "mlflow.Dockerfile").read_text()
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert re.search(rf"^COPY mlflow-auth\.ini {re.escape(config_path)}$", dockerfile, flags=re.MULTILINE)
    ini = configparser.ConfigParser()
    ini.read(DOCKER / "mlflow-auth.ini")
    assert ini["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert ini["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in ini["mlflow"], "no password in a file baked into the image"
    store = ini["mlflow"]["database_uri"]
    assert store.startswith("sqlite:////"), store  # an absolute path...
    mounts = [str(v).split(":")[1] for v in mlflow["volumes"]]
    assert any(store.removeprefix("sqlite:///").startswith(m + "/") for m in mounts), "...in a volume"

    # MLflow's own reader of that file (mlflow/server/auth/config.py), loaded alone: the package mlflow.server.auth
    # imports Flask-WTF, which only the server image needs.
    (mlflow_dir,) = importlib.util.find_spec("mlflow").submodule_search_locations
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", Path(mlflow_dir) / "server/auth/config.py")
    assert spec and spec.loader
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DOCKER / "mlflow-auth.ini"))
        mp.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "resque-admin")
        mp.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x" * 40)
        read = auth_config.read_auth_config()
    assert (read.admin_username, read.admin_password, read.database_uri) == ("resque-admin", "x" * 40, store)

    for name in AIRFLOW_SERVICES:
        client_env = environment(services[name])
        conn = json.loads(client_env["AIRFLOW_CONN_MLFLOW_DEFAULT"])
        assert required_variable(conn["login"]) == user, name
        assert required_variable(conn["password"]) == password, name
        assert required_variable(client_env["MLFLOW_TRACKING_USERNAME"]) == user, name
        assert required_variable(client_env["MLFLOW_TRACKING_PASSWORD"]) == password, name

    # The health check logs in (the script below), and the image holds it where the check runs it.
    check = [str(w) for w in mlflow["healthcheck"]["test"]]
    assert check[:2] == ["CMD", "python"] and check[2] == "/usr/local/bin/mlflow-healthcheck.py"
    assert re.search(r"^COPY mlflow-healthcheck\.py /usr/local/bin/mlflow-healthcheck\.py$", dockerfile, re.M)


class _FakeMlflow(http.server.BaseHTTPRequestHandler):
    """/health open; the API answers 401 without the expected basic-auth header (``auth_on``), 200 with it."""

    auth_on = True
    expected = "Basic " + base64.b64encode(b"admin:right-password-123").decode()

    def do_GET(self) -> None:
        if self.path == "/health" or not self.auth_on:
            code = 200
        else:
            code = 200 if self.headers.get("Authorization") == self.expected else 401
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("auth_on", "password", "healthy"),
    [(True, "right-password-123", True), (False, "right-password-123", False), (True, "wrong-password-12", False)],
    ids=["auth-on-login-accepted", "auth-off", "login-refused"],
)
def test_mlflow_healthcheck_needs_auth_on_and_the_login_accepted(auth_on: bool, password: str, healthy: bool) -> None:
    handler = type("Handler", (_FakeMlflow,), {"auth_on": auth_on})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "MLFLOW_HEALTHCHECK_URL": f"http://127.0.0.1:{server.server_address[1]}",
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        }
        run = subprocess.run(
            [sys.executable, str(DOCKER / "mlflow-healthcheck.py")], env=env, capture_output=True, text=True
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (run.returncode == 0) is healthy, run.stderr
    assert password not in run.stdout + run.stderr


def test_the_compose_connection_hands_the_login_to_mlflow(
    compose: dict[str, Any], generated_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection as Airflow parses it from the environment gives MlflowHook the login MLflow reads."""
    pytest.importorskip("airflow.sdk")
    from resque_airflow.hooks import mlflow as hook_module

    conn = environment(compose["services"]["airflow-worker"])["AIRFLOW_CONN_MLFLOW_DEFAULT"]
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", resolve(conn, generated_env))
    monkeypatch.setattr(hook_module, "_SET_BY_HOOK", {})
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, "placeholder")  # restored (removed) by monkeypatch after the hook writes it
        monkeypatch.delenv(var)
    hook = hook_module.MlflowHook("mlflow_default")
    assert hook.tracking_uri == "http://mlflow:5000"
    hook.configure_credentials()
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == generated_env["MLFLOW_ADMIN_USERNAME"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == generated_env["MLFLOW_ADMIN_PASSWORD"]
    assert "MLFLOW_TRACKING_TOKEN" not in os.environ


def test_each_gpu_worker_holds_one_distinct_device(compose: dict[str, Any]) -> None:
    """Defect: one ``airflow-worker-gpu`` service with ``count: 1``, documented as "--scale ..., one GPU each": every
    replica reserved GPU 0. Now one service per GPU, each pinned to its own device id, with its own Celery node
    name (and health check on it) and profile; nothing claims that GPU workers scale."""
    services = compose["services"]
    gpu_services = {n for n in services if n.startswith("airflow-worker-gpu")}
    assert gpu_services == set(GPU_WORKERS) and len(GPU_WORKERS) >= 2
    device_ids, node_names, profiles = [], [], []
    for name, device_id in GPU_WORKERS.items():
        service = services[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        (device,) = devices
        assert "count" not in device, f"{name}: count hands out GPU 0 to every container; pin device_ids"
        assert [str(d) for d in device["device_ids"]] == [device_id], name
        assert service["deploy"].get("replicas", 1) == 1, name
        words = command_words(service)
        assert words[words.index("--queues") + 1] == "gpu", name
        node = words[words.index("--celery-hostname") + 1]
        assert node == f"gpu{device_id}@%h", name
        assert environment(service)["RESQUE_CELERY_NAME"] == node.split("@")[0], name
        check = " ".join(map(str, service["healthcheck"]["test"]))
        assert '"$${RESQUE_CELERY_NAME:-celery}@$${HOSTNAME}"' in check, name  # pings its own node name
        device_ids.append(device_id)
        node_names.append(node)
        profiles.append(tuple(service["profiles"]))
    for seen in (device_ids, node_names, profiles):
        assert len(set(seen)) == len(seen), seen
    assert "deploy" not in services["airflow-worker"] and "--celery-hostname" not in command_words(
        services["airflow-worker"]
    )
    readme = (DOCKER / "README.md").read_text()
    for text in (readme, (DOCKER / "docker-compose.yml").read_text()):
        assert not re.search(r"--scale airflow-worker-gpu", text)
        assert "one GPU each" not in text
    for name, device_id in GPU_WORKERS.items():
        assert (
            f"`{name}`" in readme
            and f'device_ids: ["{device_id}"]' in readme + (DOCKER / "docker-compose.yml").read_text()
        )
    assert "device_ids" in readme and "--profile gpu0" in readme


def test_readme_documents_setup_login_listening_and_tunnels() -> None:
    readme = (DOCKER / "README.md").read_text()
    for needle in (
        "python3 make-env.py",  # secrets generated into .env
        "MLFLOW_ADMIN_USERNAME",  # how to log into MLflow
        "127.0.0.1",  # what listens where
        "ssh -N -L",  # reaching the UIs from another machine
        "--app-name basic-auth",
        "update-password",  # the admin password in .env only seeds the first start
    ):
        assert needle in readme, needle


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_accepts_it_and_refuses_a_missing_secret(
    generated_env: dict[str, str], tmp_path: Path
) -> None:
    compose_cmd = _docker_compose()
    if compose_cmd is None:
        pytest.skip("`docker compose` is not installed here (CI has no docker): the static tests above check the file")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in generated_env.items()))
    base = [*compose_cmd, "--env-file", str(env_file), "-f", str(DOCKER / "docker-compose.yml")]
    profiles = ["--profile", "gpu0", "--profile", "gpu1", "--profile", "flower"]
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}  # no secret from the caller's shell
    run = subprocess.run([*base, *profiles, "config", "--format", "json"], capture_output=True, text=True, env=clean)
    assert run.returncode == 0, run.stderr
    config = json.loads(run.stdout)
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") in LOOPBACK, (name, port)
    for name, device_id in GPU_WORKERS.items():
        (device,) = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [device_id]

    env_file.write_text("".join(f"{k}={v}\n" for k, v in generated_env.items() if k != "MLFLOW_ADMIN_PASSWORD"))
    run = subprocess.run([*base, "config"], capture_output=True, text=True, env=clean)
    assert run.returncode != 0 and "MLFLOW_ADMIN_PASSWORD" in run.stderr
