"""The /status page of real runners and a real mediator: access, content, a real browser."""

from __future__ import annotations

import base64
import http.client
import shutil
import signal
import ssl
from pathlib import Path

import pytest

from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, skip_missing, start_mediator, wait_until

ADMIN = "admin-secret-for-the-status-test"
HEARTBEAT = "0.3"
CHROMIUM = "/usr/bin/chromium"


def get(url: str, authorization: str | None = None, path: str = "/status") -> tuple[int, dict, str]:
    """One HTTPS GET on a server's port (loopback; its self-signed certificate unchecked)."""
    parsed = ConnectionURL.parse(url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection(
        parsed.host, parsed.port, context=context, timeout=TIMEOUT
    )
    headers = {"Authorization": authorization} if authorization else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()


@pytest.fixture
def mediator(tmp_path):
    process = start_mediator(tmp_path / "mediator", "--admin-token", ADMIN)
    yield process
    assert process.stop() in (0, -signal.SIGKILL), process.log


def test_only_the_admin_token_opens_the_page(runner_factory, mediator):
    runner = runner_factory("--admin-token", ADMIN, name="solo")
    for url, others in (
        (runner.url, [ConnectionURL.parse(runner.url).token]),
        (
            mediator.url,
            [
                ConnectionURL.parse(mediator.url).token,
                ConnectionURL.parse(mediator.runner_url).token,
            ],
        ),
    ):
        status, headers, _ = get(url)
        assert status == 401 and "Basic" in headers["WWW-Authenticate"]
        for token in [*others, "wrong"]:
            assert get(url, f"Bearer {token}")[0] == 401
            assert get(url, basic(token))[0] == 401
        status, headers, body = get(url, basic(ADMIN))
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
        assert get(url, f"Bearer {ADMIN}")[0] == 200
        for token in others:  # tokens never appear on the page
            assert token not in body


def test_admin_token_must_differ_from_the_client_token(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--token",
            "same-token",
            "--admin-token",
            "same-token",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0 and "admin token must differ" in done.stderr


def test_page_shows_the_pool_jobs_and_logs_escaped(runner_factory, mediator):
    runner_factory(
        "--mediator",
        mediator.runner_url,
        "--heartbeat",
        HEARTBEAT,
        "--tags",
        "gpu,<b>bold</b>",
        name="gpu-one",
    )

    def shown() -> str | None:
        status, _, body = get(mediator.url, basic(ADMIN))
        return body if status == 200 and "runner gpu-one registered" in body else None

    body = wait_until(shown, "the runner and its registration in the mediator's page")
    assert "<b>bold</b>" not in body and "&lt;b&gt;bold&lt;/b&gt;" in body
    assert "gpu-one" in body and ">up<" in body
    assert 'http-equiv="refresh"' in body
    # the runner's own log lines travel over its link to the mediator's page
    wait_until(
        lambda: (
            "runner gpu-one" in get(mediator.url, basic(ADMIN))[2]
            and "registered with mediator" in get(mediator.url, basic(ADMIN))[2]
        ),
        "the runner's log lines on the mediator's page",
    )


def test_page_in_a_real_browser_refreshes_when_a_runner_stops(
    runner_factory, mediator, tmp_path, request
):
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        skip_missing("no chromium (Debian package chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    first = runner_factory(
        "--mediator", mediator.runner_url, "--heartbeat", HEARTBEAT, name="alpha"
    )
    runner_factory("--mediator", mediator.runner_url, "--heartbeat", HEARTBEAT, name="beta")
    parsed = ConnectionURL.parse(mediator.url)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            context = browser.new_context(
                ignore_https_errors=True,
                http_credentials={"username": "admin", "password": ADMIN},
                viewport={"width": 1200, "height": 800},
            )
            errors: list[str] = []
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"https://{parsed.host}:{parsed.port}/status")
            rows = page.locator("#runners + .scroll tr")
            rows.filter(has_text="alpha").filter(has_text="up").wait_for(timeout=TIMEOUT * 1000)
            rows.filter(has_text="beta").filter(has_text="up").wait_for(timeout=TIMEOUT * 1000)
            page.screenshot(path=str(shots / "pool-up.png"), full_page=True)
            first.stop()
            # no reload from the test: the page refreshes itself
            rows.filter(has_text="alpha").filter(has_text="down").wait_for(timeout=TIMEOUT * 1000)
            page.screenshot(path=str(shots / "runner-down.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"status page screenshots: {shots}")
    assert (shots / "runner-down.png").stat().st_size > 0
