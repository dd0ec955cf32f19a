"""Static checks of the multi-container deployment in ``docker/`` (Docker itself is not run by the test suite).

The compose file, the images' Dockerfiles, ``.env.example`` and the README's service list must agree.
"""

from __future__ import annotations

import json
import re
import shlex
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
    "airflow-worker-gpu",
    "flower",
}
ONE_SHOT = {"airflow-init"}
AIRFLOW_SERVICES = {s for s in SERVICES if s.startswith("airflow-")} | {"flower"}
AIRFLOW_COMMANDS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker", "--queues", "default"],
    "airflow-worker-gpu": ["celery", "worker", "--queues", "gpu"],
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
    gpu = services["airflow-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["RESQUE_ACCELERATOR"] == "cuda"
    assert services["airflow-worker"]["build"]["args"]["RESQUE_ACCELERATOR"] == "cpu"
    assert gpu["image"] != services["airflow-worker"]["image"]
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
    assert conn == {"conn_type": "mlflow", "host": "http://mlflow:5000"}
    for name in AIRFLOW_SERVICES:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "docker/Dockerfile"), name

    mlflow = services["mlflow"]
    words = [str(w) for w in mlflow["command"]]
    assert words[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in words
    assert words[words.index("--host") + 1] == "0.0.0.0" and words[words.index("--port") + 1] == "5000"
    assert words[words.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://mlflow:")
    assert "@mlflow-db:5432/mlflow" in words[words.index("--backend-store-uri") + 1]
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
    assert "ARG MLFLOW_VERSION=3.17.2" in text and '"mlflow==${MLFLOW_VERSION}"' in text and "psycopg2" in text
    readme = (DOCKER / "README.md").read_text()
    dag_ids = set(re.findall(r"dag_id=\"([a-z0-9_]+)\"", "".join(p.read_text() for p in (REPO / "dags").glob("*.py"))))
    for dag_id in ("resque_gate", "resque_gate_sharded"):
        assert f"`{dag_id}`" in readme and dag_id in dag_ids, dag_id
    for needle in ("--scale airflow-worker=", 'queue="gpu"', "mlflow_default", "--queues gpu"):
        assert needle in readme, needle
