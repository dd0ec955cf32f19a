# syntax=docker/dockerfile:1
#
# MLflow 3.17.2 tracking server and model registry with the PostgreSQL driver (the official MLflow image has none)
# and the basic-auth app's dependencies (extra `auth`: Flask-WTF), started by docker-compose.yml with
# `mlflow server --app-name basic-auth`. Artifacts are proxied by the server (--serve-artifacts), so Airflow workers
# need no direct artifact-store access.
#
#   docker build -f docker/mlflow.Dockerfile -t resque-mlflow:3.17.2 docker/
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts /mlflow-auth /etc/mlflow \
    && chown mlflow /mlartifacts /mlflow-auth

# The basic-auth app's configuration (user store in /mlflow-auth, a volume; no password in it) and the health check.
COPY mlflow-auth.ini /etc/mlflow/basic_auth.ini
COPY mlflow-healthcheck.py /usr/local/bin/mlflow-healthcheck.py
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000

# /health is open; the script also checks that a request without a login is refused and that the admin login from
# MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD is accepted. python:slim has no curl.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=5 \
    CMD ["python", "/usr/local/bin/mlflow-healthcheck.py"]
