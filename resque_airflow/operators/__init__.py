"""Airflow operators: the gate and the shard scorer."""
