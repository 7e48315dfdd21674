"""Browser fixtures: headless Debian Chromium driven by Playwright (its Python package), against the
session's real ComfyUI server (``comfy_server`` from tests/conftest.py).

Tools: ``/usr/bin/chromium`` (Debian's ``chromium`` package) and the ``playwright`` pip package, both
installed by ``scripts/setup.sh``. Playwright never downloads a browser here: it launches the system
Chromium (``executable_path``). When a tool is missing the browser tests fail and say what to do;
``LORALAB_SKIP_BROWSER=1`` turns that into a skip.

Fixtures:
  browser_context   session: a persistent Chromium context on a fresh, empty user-data dir
  ui                module: one page with ComfyUI open (``ComfyPage``); every console error, page
                    error and failed request is recorded, see ``ComfyPage.assert_no_errors``

Environment:
  LORALAB_SKIP_BROWSER=1   skip the tests that need the browser
  LORALAB_CHROMIUM=PATH    another Chromium binary (default /usr/bin/chromium)
  LORALAB_BROWSER_TIMEOUT  seconds for slow waits: page load, training (default 300)

Screenshots go to ``artifacts/browser/`` (ignored by git); a failing test leaves
``artifacts/browser/FAILED-<test>.png``.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.browser.comfy_page import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    SLOW_S,
    VIEWPORT,
    ComfyPage,
    browser_tools_missing,
)


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory):
    if os.environ.get("LORALAB_SKIP_BROWSER") == "1":
        pytest.skip("LORALAB_SKIP_BROWSER=1")
    missing = browser_tools_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS.glob("FAILED-*.png"):  # from an earlier session
        stale.unlink(missing_ok=True)
    user_data = tmp_path_factory.mktemp("chromium-profile")
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(user_data),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=VIEWPORT,
            timeout=SLOW_S * 1000,
        )
    except BaseException:
        pw.stop()
        raise
    context.set_default_timeout(60_000)
    try:
        yield context
    finally:
        try:
            context.close()
        finally:
            pw.stop()
            shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture(scope="module")
def ui(browser_context, comfy_server):
    page = browser_context.new_page()
    cp = ComfyPage(page, comfy_server.url)
    cp.attach()
    try:
        yield cp
    finally:
        page.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    cp = item.funcargs.get("ui") if hasattr(item, "funcargs") else None
    if isinstance(cp, ComfyPage):
        try:
            path = cp.screenshot(f"FAILED-{item.name}.png")
            report.sections.append(("browser", f"screenshot: {path}\nerrors: {cp.unexpected_errors()}"))
        except Exception as e:  # noqa: BLE001 - the page may be gone
            report.sections.append(("browser", f"no screenshot: {e}"))
