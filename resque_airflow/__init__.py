"""airflow-provider-resque: a RESQUE gate for Apache Airflow and MLflow.

Importing this package is cheap: Airflow, MLflow, ONNX Runtime and torch are imported only by the modules that need
them, when they are used.
"""

__version__ = "0.1.0"


def get_provider_info() -> dict:
    """Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""
    return {
        "package-name": "airflow-provider-resque",
        "name": "RESQUE",
        "description": "RESQUE gate: reuse / retrain / rebuild decisions for MLflow-registered models.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": "mlflow",
                "hook-class-name": "resque_airflow.hooks.mlflow.MlflowHook",
                "hook-name": "MLflow",
                "conn-fields": {
                    "registry_uri": {
                        "label": "Registry URI",
                        "schema": {"type": ["string", "null"]},
                        "description": "Model registry URI when it differs from the tracking URI (the host).",
                    },
                    "ui_url": {
                        "label": "MLflow UI URL",
                        "schema": {"type": ["string", "null"]},
                        "description": "Address of the MLflow UI for task links (needed for SQLite stores: the "
                        "`mlflow ui` started on the same database). The default connection id is mlflow_default.",
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {
                        "host": "Tracking URI",
                        "login": "Username",
                        "password": "Password or token",
                    },
                    "placeholders": {
                        "host": "http://mlflow:5000 or sqlite:////abs/path/mlflow.db",
                        "ui_url": "http://127.0.0.1:5000",
                    },
                },
            }
        ],
        "hook-class-names": ["resque_airflow.hooks.mlflow.MlflowHook"],
        "asset-uris": [{"schemes": ["mlflow"], "handler": "resque_airflow.registry.assets.normalize_uri"}],
        "extra-links": [
            "resque_airflow.operators.links.ResqueGateRunLink",
            "resque_airflow.operators.links.ResqueModelVersionLink",
            "resque_airflow.operators.links.ResqueChallengerRunLink",
        ],
        "operators": [
            {
                "integration-name": "RESQUE",
                "python-modules": [
                    "resque_airflow.operators.gate",
                    "resque_airflow.operators.shard",
                    "resque_airflow.operators.challenger",
                    "resque_airflow.operators.approval",
                    "resque_airflow.operators.assets",
                ],
            }
        ],
    }
