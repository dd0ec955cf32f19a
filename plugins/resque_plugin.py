"""RESQUE audit view for deployments that load plugins from the Airflow plugins folder.

Copy (or mount) this file into ``$AIRFLOW_HOME/plugins`` when the ``airflow-provider-resque`` distribution's
``airflow.plugins`` entry point is not available (e.g. the package is on ``PYTHONPATH`` rather than pip-installed).

When the entry point *is* installed, Airflow registers the plugin from it, and exposing it here too would make
Airflow skip the second copy and report a plugin import error ("Plugin 'resque' already registered"). So this module
only exposes ``ResquePlugin`` when the entry point is missing; with both routes present it is a harmless no-op.
The class itself lives in ``resque_airflow.ui.plugin``, so importing this module any number of times, under any
module name, yields the same class.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

log = logging.getLogger(__name__)

_TARGET = "resque_airflow.ui.plugin:ResquePlugin"


def entry_point_installed() -> bool:
    """Whether an installed distribution registers ``ResquePlugin`` under the ``airflow.plugins`` entry point."""
    try:
        return any(ep.value.replace(" ", "") == _TARGET for ep in entry_points(group="airflow.plugins"))
    except Exception:  # broken metadata of some other distribution: fall back to exposing the plugin
        log.debug("cannot read airflow.plugins entry points", exc_info=True)
        return False


if entry_point_installed():
    log.debug("resque plugin: registered by the %s entry point; nothing to add from the plugins folder", _TARGET)
else:
    # Bound only in this branch: Airflow registers every AirflowPlugin subclass it finds in the module namespace.
    ResquePlugin = importlib.import_module("resque_airflow.ui.plugin").ResquePlugin
