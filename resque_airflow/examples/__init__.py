"""Example workloads shared by the demo, the example DAGs and the benchmarks.

Importing this package is cheap: the digits workload (torch, scipy) lives in :mod:`resque_airflow.examples.digits`
and is imported only by the tasks and benchmarks that use it.
"""
