"""``/resque/`` without a session sends a browser to the login page; the JSON API keeps its 401."""

from __future__ import annotations

from fastapi import Depends, HTTPException
from fastapi.testclient import TestClient

from resque_airflow.ui.app import create_app


def _no_session() -> None:
    raise HTTPException(status_code=401, detail="Not authenticated")


def test_pages_redirect_to_login_and_the_api_keeps_401():
    app = create_app(lambda: None, dependencies=[Depends(_no_session)], login_url=lambda nxt: f"/auth/login?next={nxt}")
    client = TestClient(app)
    page = client.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/auth/login?next=")
    assert client.get("/api/models", follow_redirects=False).status_code == 401
