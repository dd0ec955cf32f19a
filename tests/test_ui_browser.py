"""The audit web view end to end: the FastAPI app over a real SQLite registry, in headless Chromium, and as an
Airflow plugin (fields, discovery by Airflow itself, the plugins-folder module).

The browser test needs ``/usr/bin/chromium`` (Debian package ``chromium``) and the Python package ``playwright``
(never ``playwright install``); without them it is skipped and the rest still runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # pytest imports test modules by file name (rootdir/tests on sys.path) unless tests/ becomes a package
    import test_ui_history as uih
except ImportError:  # pragma: no cover
    from tests import test_ui_history as uih

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "test-artifacts" / "ui_model_page.png"
SCREENSHOT_CALIBRATED = REPO / "test-artifacts" / "ui_calibrated_views.png"
XSS = uih.GATES[4]["branch"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return uih.shared_registry(tmp_path_factory)


def make_app(registry: dict[str, Any], **kwargs: Any):
    import mlflow

    from resque_airflow.ui.app import create_app

    uri = registry["uri"]
    kwargs.setdefault("mlflow_ui_base", "http://mlflow.example:5000")
    return create_app(lambda: mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The app through FastAPI's test client


def test_app_pages_and_json(registry: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    gate_ids = registry["gate_ids"]
    with TestClient(make_app(registry)) as http:
        index = http.get("/")
        assert index.status_code == 200
        assert f'href="/models/{uih.MODEL}"' in index.text and uih.OTHER_MODEL in index.text
        assert "script-src 'none'" in index.headers["content-security-policy"]
        assert http.get("/api/models").json() == {"models": sorted([uih.MODEL, uih.OTHER_MODEL])}

        page = http.get(f"/models/{uih.MODEL}")
        assert page.status_code == 200
        assert len(re.findall(r'<circle class="pt[ "]', page.text)) == len(uih.GATES)
        assert page.text.count('class="threshold threshold-') == 2
        for rid in gate_ids:
            assert f'data-run-id="{rid}"' in page.text
        assert "http://mlflow.example:5000/#/experiments/" in page.text
        assert "<img" not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text  # escaped
        assert 'id="detail"' not in page.text

        detail = http.get(f"/models/{uih.MODEL}", params={"run": gate_ids[1]})
        assert 'id="detail"' in detail.text and detail.text.count('class="bar"') == uih.N_CLASSES
        assert 'id="costs"' in detail.text and registry["retrain_id"] in detail.text

        runs = http.get(f"/api/models/{uih.MODEL}/runs").json()
        assert [r["run_id"] for r in runs] == gate_ids
        assert runs[1]["measured"][0]["metrics"]["epochs_to_target"] == 14.0
        one = http.get(f"/api/runs/{gate_ids[1]}").json()
        assert [c["angle"] for c in one["per_class"]] == list(uih.per_class_angles(1).values())

        assert http.get("/api/runs/" + "0" * 32).status_code == 404
        assert http.get(f"/api/runs/{registry['retrain_id']}").status_code == 404  # not a gate run
        assert http.get("/models/no-such-model").status_code == 404
        assert http.get("/api/models/no-such-model/runs").status_code == 404
        assert http.get(f"/models/{uih.MODEL}", params={"run": registry["other_id"]}).status_code == 404
        assert http.get("/static/resque.css").status_code == 200


def test_app_mounted_under_prefix_and_registry_down(registry: dict[str, Any]) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from resque_airflow.ui.app import create_app

    parent = FastAPI()
    parent.mount("/resque", make_app(registry))
    with TestClient(parent) as http:
        page = http.get(f"/resque/models/{uih.MODEL}")
        assert page.status_code == 200
        assert 'href="/resque/static/resque.css"' in page.text
        assert f'href="/resque/models/{uih.MODEL}?run=' in page.text
        assert http.get("/resque/api/models").status_code == 200

    def down():
        raise ConnectionError("connection refused")

    with TestClient(create_app(down)) as http:
        page = http.get("/")
        assert page.status_code == 502 and "connection refused" in page.text
        api = http.get("/api/models")
        assert api.status_code == 502 and "connection refused" in api.json()["detail"]


def _label_ys(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<text class="threshold-label[^"]*" x="[^"]+" y="([^"]+)"', svg)]


def test_app_calibrated_views(registry: dict[str, Any]) -> None:
    """The calibrated decision, the per-model cost view and the class drill-down, server-rendered."""
    from fastapi.testclient import TestClient

    gate_ids = registry["gate_ids"]
    with TestClient(make_app(registry)) as http:
        page = http.get(f"/models/{uih.MODEL}", params={"run": gate_ids[5]})
        assert page.status_code == 200
        assert "script-src 'none'" in page.headers["content-security-policy"]
        html = page.text
        assert "<script" not in html
        from markupsafe import escape

        assert f'<p class="reason" id="reason">{escape(uih.REASON)}</p>' in html
        assert "shift detected</strong> at false-alarm rate alpha = 0.01" in html
        assert "quantile 0.012 at n = 4000, p-value 0.001" in html
        assert "(90% interval 0.024 &ndash; 0.039)" in html
        assert "measured 0.87 [0.84 &ndash; 0.9]; estimated (ATC) 0.88 [0.85 &ndash; 0.91]" in html
        assert "steps_to_target 60 [40 &ndash; 90], rebuild cost 400" in html and "basis: prior, 0 runs" in html
        assert "challenger-of-5" in html and "met target" in html
        assert html.count('class="interval"') == len(uih.CAL) and html.count('class="null-mark"') == len(uih.CAL)
        assert 'id="cost-chart"' in html and html.count('class="cost-pt') == 2
        assert html.count('<tr data-run-id="', html.index('id="cost-pairs"')) >= 2
        assert 'id="class-heatmap"' in html
        n_with_angles = sum(1 for i, g in enumerate(uih.GATES) if g["score"] is not None)
        assert len(re.findall(r'<rect class="heat( moved)?"', html)) == n_with_angles * uih.N_CLASSES
        assert 'id="class-moves"' in html and html.count('class="bar moved"') == uih.N_CLASSES
        assert 'class="mark mark-null"' in html and 'class="score-band"' in html
        assert "label-null" in html
        # Labels on the right never overlap (the calibrated runs' 0.0123 / 1.0 thresholds are not drawn).
        score_svg = html[html.index('id="score-chart"') : html.index("</svg>", html.index('id="score-chart"'))]
        ys = sorted(_label_ys(score_svg))
        assert all(b - a >= 12 for a, b in itertools.pairwise(ys)), ys
        class_svg = html[html.index('id="class-chart"') : html.index("</svg>", html.index('id="class-chart"'))]
        ys = sorted(_label_ys(class_svg))
        assert len(ys) == 2 and ys[1] - ys[0] >= 12  # score and null quantile only: thresholds unused

        # Airflow's DAG-run / task-instance tabs: one gate run redirects to its details, several are listed.
        key = {"dag_id": "resque_gate", "run_id": "scheduled__2026-01-06"}
        ti = http.get("/airflow", params=key | {"task_id": "gate", "map_index": "{MAP_INDEX}"}, follow_redirects=False)
        assert ti.status_code == 303
        assert ti.headers["location"] == f"/models/{uih.MODEL}?run={gate_ids[5]}#detail"
        assert (
            http.get("/airflow", params=key, follow_redirects=False)
            .headers["location"]
            .endswith(gate_ids[5] + "#detail")
        )
        listed = http.get("/airflow", params={"dag_id": "resque_gate", "run_id": "{RUN_ID}"})
        assert listed.status_code == 200 and listed.text.count('<tr data-run-id="') == len(uih.GATES)
        missing = http.get("/airflow", params=key | {"task_id": "train"})
        assert missing.status_code == 404 and "No RESQUE gate run recorded for dag_id resque_gate" in missing.text
        assert http.get("/airflow", params=key | {"task_id": "gate", "map_index": "2"}).status_code == 404
        assert http.get("/airflow").status_code == 422  # dag_id is required


def test_score_chart_under_default_thresholds(registry: dict[str, Any]) -> None:
    """Calibrated runs only (logged thresholds 0.0123 / 1.0, unused): the axis follows the data, not 1.0."""
    import mlflow

    from resque_airflow.registry import audit
    from resque_airflow.ui.charts import score_chart

    client = mlflow.MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    records = [r for i, r in enumerate(audit.gate_history(client, uih.MODEL)) if i in uih.CAL]
    chart = score_chart(records)
    assert float(chart["y_ticks"][-1]["label"]) < 0.1  # not flattened by the rebuild threshold 1.0
    assert chart["lines"] == [] and [label["key"] for label in chart["labels"]] == ["null"]
    ys = [p["y"] for p in chart["points"]]
    assert abs(ys[0] - ys[1]) > 20  # the two scores are visibly apart
    for p in chart["points"]:
        assert p["interval"]["y1"] < p["y"] < p["interval"]["y2"] and p["null_y"] > p["y"]  # score above its null
    # With thresholds that decide, close labels are spread apart.
    threshold_runs = audit.gate_history(client, uih.MODEL)[:3]
    for r in threshold_runs:
        r.thresholds = {"reuse": 0.1, "rebuild": 0.101}
    labels = score_chart(threshold_runs)["labels"]
    assert abs(labels[0]["y"] - labels[1]["y"]) >= 14


# ---------------------------------------------------------------------------------------------------------------
# The app in a real browser


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield the base URL; stop it afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium browser context (fresh profile in ``tmp_path``), or ``pytest.skip`` with the reason."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not importable ({exc}): pip install playwright")
    with sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900},
            )
        except Exception as exc:
            pytest.skip(f"cannot launch {CHROMIUM} through playwright: {str(exc).splitlines()[0]}")
        try:
            yield context
        finally:
            context.close()


@pytest.mark.browser
def test_model_page_in_chromium(registry: dict[str, Any], tmp_path: Path) -> None:
    gate_ids = registry["gate_ids"]
    with serve(make_app(registry)) as base, chromium(tmp_path) as browser:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))

        page.goto(f"{base}/models/{uih.MODEL}")
        chart = page.locator("#score-chart")
        assert chart.is_visible()
        assert chart.locator("circle.pt").count() == len(uih.GATES)  # one point per gate run
        assert chart.locator("circle.pt:not(.pt-missing)").count() == sum(g["score"] is not None for g in uih.GATES)
        assert chart.locator("polyline.threshold-reuse").count() == 1
        assert chart.locator("polyline.threshold-rebuild").count() == 1
        fills = {
            chart.locator(f'circle[data-run-id="{rid}"]').get_attribute("fill") for rid in (gate_ids[0], gate_ids[2])
        }
        assert len(fills) == 2  # reuse and rebuild points differ in colour

        rows = page.locator("#runs tbody tr")
        assert rows.count() == len(uih.GATES)
        assert [rows.nth(i).get_attribute("data-run-id") for i in range(rows.count())] == gate_ids[::-1]
        table = page.locator("#runs").inner_text()
        for word in ("reuse", "retrain", "rebuild", "failed", "epochs_to_target 12 [8-16] / 14", XSS):
            assert word in table  # the branch tag shows as text, never as markup
        assert page.locator("#runs img").count() == 0

        # Clicking a point opens that run's per-class angles.
        chart.locator(f'circle[data-run-id="{gate_ids[1]}"]').click()
        page.wait_for_selector("#class-chart")
        assert page.locator("#detail").get_attribute("data-run-id") == gate_ids[1]
        bars = page.locator("#class-chart rect.bar")
        assert bars.count() == uih.N_CLASSES
        assert [bars.nth(i).get_attribute("data-class") for i in range(bars.count())] == [
            str(k) for k in range(uih.N_CLASSES)
        ]
        heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
        assert heights == sorted(heights) and heights[-1] > 2 * heights[0]  # angles grow with the class index
        assert "351.5" in page.locator("#costs").inner_text()  # measured wall time of the triggered retrain
        assert page.locator(f'#runs tr.selected[data-run-id="{gate_ids[1]}"]').count() == 1
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # A table row link does the same for another run.
        page.locator(f'#runs tr[data-run-id="{gate_ids[2]}"] a.run-link').click()
        page.wait_for_selector(f'#detail[data-run-id="{gate_ids[2]}"]')
        assert page.locator("#class-chart rect.bar").count() == uih.N_CLASSES

        page.goto(f"{base}/")
        page.locator(f"#models a:text-is('{uih.MODEL}')").click()
        page.wait_for_selector("#score-chart")
        assert not problems, problems  # no script errors, no CSP violations, no alert()
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.browser
def test_calibrated_views_in_chromium(registry: dict[str, Any], tmp_path: Path) -> None:
    """From a task instance's tab to its gate run; the cost view and the class drill-down in a real browser."""
    gate_ids = registry["gate_ids"]
    with serve(make_app(registry)) as base, chromium(tmp_path) as browser:
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(str(err)))

        # What Airflow's task-instance tab opens (an unmapped task: {MAP_INDEX} left as written).
        page.goto(
            f"{base}/airflow?dag_id=resque_gate&run_id=scheduled__2026-01-07&task_id=gate&map_index={{MAP_INDEX}}"
        )
        page.wait_for_selector(f'#detail[data-run-id="{gate_ids[6]}"]')
        assert "shift detected" in page.locator("#fact-shift").inner_text()
        assert "estimated (ATC) 0.89" in page.locator("#fact-accuracy").inner_text()
        assert "basis: prior+history, 1 runs of history" in page.locator("#fact-prediction").inner_text()

        # The score chart: intervals and nulls drawn, right-hand labels apart on screen.
        chart = page.locator("#score-chart")
        assert chart.locator("line.interval").count() == len(uih.CAL)
        assert chart.locator("line.null-mark").count() == len(uih.CAL)
        boxes = [chart.locator("text.threshold-label").nth(i).bounding_box()
                 for i in range(chart.locator("text.threshold-label").count())]  # fmt: skip
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a["y"] + a["height"] <= b["y"] + 0.5 or b["y"] + b["height"] <= a["y"] + 0.5, (a, b)

        # Predicted vs measured: one point per gate run with both, the one outside its interval marked.
        cost = page.locator("#cost-chart")
        assert cost.is_visible() and cost.locator("circle.cost-pt").count() == 2
        assert cost.locator("circle.cost-pt.outside").count() == 1
        assert cost.locator(f'circle.selected[data-run-id="{gate_ids[6]}"]').count() == 1
        pairs = page.locator("#cost-pairs").inner_text()
        assert "72" in pairs and "55" in pairs and "prior+history" in pairs

        # Which classes moved: the heat map, the bars above the null, the table against the previous run.
        heat = page.locator("#class-heatmap")
        assert heat.locator("rect.heat.moved").count() == len(uih.CAL) * uih.N_CLASSES
        assert page.locator("#class-chart rect.bar.moved").count() == uih.N_CLASSES
        assert page.locator("#class-moves tbody tr").first.get_attribute("data-class") == str(uih.N_CLASSES - 1)
        SCREENSHOT_CALIBRATED.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_CALIBRATED), full_page=True)

        # A heat-map cell opens its run.
        heat.locator(f'rect.heat[data-run-id="{gate_ids[5]}"][data-class="0"]').click()
        page.wait_for_selector(f'#detail[data-run-id="{gate_ids[5]}"]')
        assert "0.001" in page.locator("#fact-null").inner_text()
        assert not problems, problems
    assert SCREENSHOT_CALIBRATED.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------------------------
# The Airflow plugin


def test_plugin_fields() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from resque_airflow.ui.plugin import ResquePlugin

    plugin = ResquePlugin()
    assert plugin.name == "resque"
    nav, full_page, dag_run, task_instance = plugin.external_views
    assert nav == {
        "name": "RESQUE audit",
        "href": "resque/",
        "url_route": "resque-audit",
        "destination": "nav",
        "category": "browse",
    }
    # outside Airflow's sandboxed iframe (no url_route: a link that opens a tab), where MLflow links can open
    assert full_page["href"] == nav["href"] and "url_route" not in full_page and full_page["destination"] == "nav"
    assert dag_run["destination"] == "dag_run" and task_instance["destination"] == "task_instance"
    assert dag_run["href"] == "resque/airflow?dag_id={DAG_ID}&run_id={RUN_ID}"
    assert task_instance["href"].endswith("&task_id={TASK_ID}&map_index={MAP_INDEX}")
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse

    for view in plugin.external_views:  # the shape Airflow's /ui/plugins serves
        ExternalViewResponse.model_validate(view)
    (entry,) = plugin.fastapi_apps
    assert entry["url_prefix"] == "/resque" and entry["name"] == "RESQUE audit"
    assert isinstance(entry["app"], FastAPI)
    assert plugin.fastapi_apps[0]["app"] is entry["app"]  # built once
    paths = {getattr(r, "path", None) for r in entry["app"].routes}
    assert {"/", "/models/{name:path}", "/airflow", "/api/models", "/api/models/{name:path}/runs",
            "/api/runs/{run_id}"} <= paths  # fmt: skip
    with TestClient(entry["app"]) as http:  # Airflow's authentication guards the plugin's routes
        assert http.get("/api/models").status_code == 401


def test_plugin_discovery_stays_cheap() -> None:
    """Importing the plugin (what every Airflow process does to discover it) loads neither FastAPI nor MLflow."""
    code = (
        "import sys, resque_airflow.ui.plugin as p; "
        "print(sorted(m for m in ('fastapi', 'mlflow', 'onnxruntime', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _load_plugins_folder_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "plugins" / "resque_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugins_folder_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from resque_airflow.ui.plugin import ResquePlugin

    with_entry_point = _load_plugins_folder_module("resque_plugin_a")
    assert with_entry_point.entry_point_installed()  # the editable install registers it
    assert not hasattr(with_entry_point, "ResquePlugin")  # so the folder adds no duplicate

    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    first = _load_plugins_folder_module("resque_plugin_b")
    second = _load_plugins_folder_module("resque_plugin_c")  # loaded again, under another name
    assert first.ResquePlugin is second.ResquePlugin is ResquePlugin


@pytest.mark.airflow
def test_airflow_discovers_plugin(tmp_path: Path) -> None:
    """``airflow plugins`` (a fresh process) lists the plugin once, from the entry point, with no import error,
    even with ``plugins/resque_plugin.py`` in the plugins folder."""
    airflow_bin = shutil.which("airflow", path=str(Path(sys.executable).parent)) or shutil.which("airflow")
    if airflow_bin is None:
        pytest.skip("the airflow command is not installed")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
    }
    proc = subprocess.run(
        [airflow_bin, "plugins", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = proc.stdout.find("[")
    plugins = json.loads(proc.stdout[start:])
    ours = [p for p in plugins if p["name"] == "resque"]
    assert len(ours) == 1, plugins
    (plugin,) = ours
    assert "resque_airflow.ui.plugin:ResquePlugin" in plugin["source"]
    apps = plugin["fastapi_apps"]
    assert apps == [{"app": "fastapi.applications.FastAPI", "url_prefix": "/resque", "name": "RESQUE audit"}] or (
        "/resque" in str(apps) and "FastAPI" in str(apps)
    )
    assert "resque-audit" in str(plugin["external_views"])
    assert "already registered" not in proc.stdout + proc.stderr
