"""The audit-trail view: what the gate decided, when, on which model version, and what retraining then cost.

- :mod:`resque_airflow.ui.app` is the FastAPI app (HTML pages and JSON endpoints) over
  :mod:`resque_airflow.registry.audit`, which reads gate runs from MLflow (read-only).
- :mod:`resque_airflow.ui.charts` computes the geometry of the pages' SVG charts.
- :mod:`resque_airflow.ui.plugin` mounts that app in the Airflow API server under ``/resque`` and builds its MLflow
  client from an Airflow connection.

Importing this package is cheap: MLflow, FastAPI and Airflow are imported by the submodules that need them.
"""
