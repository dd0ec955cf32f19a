"""Airflow operators: the gate, the shard scorer, and the reuse / retrain / rebuild branches."""
