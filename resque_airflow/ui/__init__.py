"""The audit-trail view: what the gate decided, when, on which model version, and what retraining then cost.

- :mod:`resque_airflow.ui.history` reads gate runs from MLflow (read-only) for the web view and ``resque audit``.
- :mod:`resque_airflow.ui.app` is the FastAPI app (HTML pages and JSON endpoints).
- :mod:`resque_airflow.ui.plugin` mounts that app in the Airflow API server under ``/resque``.

Importing this package is cheap: MLflow, FastAPI and Airflow are imported by the submodules that need them.
"""
