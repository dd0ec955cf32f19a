"""Health check of the MLflow server behind its basic-auth app (docker-compose.yml, mlflow.Dockerfile).

Healthy only when the server answers /health (open), refuses a request without a login (401: authentication is
on) and accepts the same request with the admin login from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD
(the credentials every client of this deployment uses still work). Standard library only; never prints a secret.
"""

import base64
import os
import sys
import urllib.error
import urllib.request

BASE = os.environ.get("MLFLOW_HEALTHCHECK_URL", "http://localhost:5000")
API = BASE + "/api/2.0/mlflow/experiments/search?max_results=1"


def status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=4) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> int:
    if status(BASE + "/health") != 200:
        print("mlflow: /health does not answer 200", file=sys.stderr)
        return 1
    if status(API) != 401:
        print("mlflow: a request without a login was not refused: authentication is off", file=sys.stderr)
        return 1
    user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "")
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    if status(API, {"Authorization": f"Basic {token}"}) != 200:
        print(f"mlflow: the admin login of {user!r} is refused (password changed since .env?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
