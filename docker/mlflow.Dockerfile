# syntax=docker/dockerfile:1
#
# MLflow 3.17.2 tracking server and model registry with the PostgreSQL driver (the official MLflow image has none).
# Artifacts are proxied by the server (--serve-artifacts), so Airflow workers need no direct artifact-store access.
#
#   docker build -f docker/mlflow.Dockerfile -t resque-mlflow:3.17.2 docker/
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2

RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow /mlartifacts

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000

# The server answers GET /health with "OK" (exempt from its host-header checks). python:slim has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://localhost:5000/health', timeout=4)"
