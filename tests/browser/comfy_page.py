"""Helpers of the browser tests: the Chromium launch settings, the check for the tools, and
``ComfyPage`` (one page on a ComfyUI server, with every console error and failed request recorded)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM = os.environ.get("LORALAB_CHROMIUM", "/usr/bin/chromium")
SLOW_S = float(os.environ.get("LORALAB_BROWSER_TIMEOUT", "300"))
VIEWPORT = {"width": 1600, "height": 1000}

# The flags this workplace's machines need (closed network, root, no GPU), plus one that makes every
# host but loopback unresolvable: the frontend asks api.comfy.org for news and node-pack data, and
# these tests must not send anything off the machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]

# What the stock frontend (comfyui-frontend-package 1.32.9) logs on a fresh server with no network,
# with or without this pack: optional user files that do not exist yet, the template thumbnail it
# looks for next to each workflow template (a 404 and a warning), and its own settings-store fault on
# first load ("Cannot read properties of undefined (reading 'id') at onChange"). Anything else is an
# error, and so is a console warning that names the pack.
ALLOWED_HTTP_ERRORS = [
    (404, re.compile(r"^/(api/)?userdata(/|\?|$)")),
    (404, re.compile(r"^/(api/)?user\.css$")),
    (404, re.compile(r"^/favicon\.ico$")),
    (404, re.compile(r"^/(api/)?workflow_templates/[^/]+/[^/]+\.(jpg|jpeg|png|webp)$")),
]
ALLOWED_CONSOLE = [
    re.compile(r"Cannot read properties of undefined \(reading 'id'\)\s+at onChange", re.S),
    re.compile(
        r"^warning: Failed to cache media: /api/workflow_templates/[^/\s]+/[^/\s]+\.(jpg|jpeg|png|webp) .*404"
    ),
]
PACK_WORDS = re.compile(r"loralab|lora lab|comfyui-lora-lab", re.I)

ERROR_DIALOGS = ", ".join(
    [
        ".comfy-missing-nodes",  # "some nodes are missing" dialog
        ".comfy-missing-models",
        ".comfy-error-report",  # execution / extension error dialog
        ".p-toast-message-error",
    ]
)


def browser_tools_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    problems = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    else:
        try:
            subprocess.run([CHROMIUM, "--version"], capture_output=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"{CHROMIUM} --version failed: {e}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        problems.append(f"the Python package playwright is not importable ({e}; pip install playwright)")
    if not problems:
        return None
    return (
        "browser tools missing: " + "; ".join(problems) + ". Run `bash scripts/setup.sh` (its browser step "
        "installs them), or set LORALAB_SKIP_BROWSER=1 to skip the browser tests."
    )


@dataclass
class ComfyPage:
    """One browser page on a ComfyUI server, and everything that went wrong in it."""

    page: object
    url: str
    console_errors: list[str] = field(default_factory=list)
    http_errors: list[tuple[int, str]] = field(default_factory=list)
    _checked: int = 0

    # ------------------------------------------------------------------ recording

    def attach(self) -> None:
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda err: self.console_errors.append(f"uncaught: {err}"))
        self.page.on("response", self._on_response)
        self.page.on("requestfailed", self._on_failed)

    def _on_console(self, msg) -> None:
        if msg.type != "error":
            if msg.type == "warning" and PACK_WORDS.search(msg.text):
                self.console_errors.append(f"warning: {msg.text}")
            return
        text = msg.text
        if text.startswith("Failed to load resource"):
            return  # judged by the response / requestfailed handlers, which know the URL
        self.console_errors.append(text)

    def _on_response(self, response) -> None:
        if response.status >= 400:
            self.http_errors.append((response.status, response.url))

    def _on_failed(self, request) -> None:
        failure = request.failure or ""
        if request.url.startswith(self.url) and "ERR_ABORTED" not in failure:
            self.http_errors.append((0, f"{request.url} ({failure})"))

    def unexpected_errors(self) -> list[str]:
        out = []
        for text in self.console_errors:
            if not any(p.search(text) for p in ALLOWED_CONSOLE):
                out.append(f"console: {text}")
        for status, url in self.http_errors:
            parsed = urllib.parse.urlsplit(url)
            local = url.startswith(self.url)
            path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
            allowed = local and any(status == s and p.search(path) for s, p in ALLOWED_HTTP_ERRORS)
            if local and not allowed:
                out.append(f"http {status or 'failed'}: {url}")
        return out

    def error_dialogs(self) -> list[str]:
        return self.page.evaluate(
            """sel => [...document.querySelectorAll(sel)]
                .filter(e => e.offsetParent !== null || e.getClientRects().length)
                .map(e => (e.innerText || e.className).slice(0, 500))""",
            ERROR_DIALOGS,
        )

    def assert_no_errors(self, what: str = "") -> None:
        """No error dialog on screen, and no unexpected console error or failed request since the
        last call."""
        errors = self.unexpected_errors()
        new = errors[self._checked :]
        self._checked = len(errors)
        dialogs = self.error_dialogs()
        assert not new and not dialogs, f"errors in the page{' ' + what if what else ''}:\n" + "\n".join(
            new + [f"dialog: {d}" for d in dialogs]
        )

    # ------------------------------------------------------------------ actions

    def open(self) -> None:
        """Load the UI and wait until the app, our extension and the Run button are there."""
        self.page.goto(self.url + "/", wait_until="domcontentloaded", timeout=SLOW_S * 1000)
        self.page.wait_for_function(
            """() => !!(window.app && window.app.vueAppReady && window.app.graph
                     && document.querySelector('#graph-canvas')
                     && document.querySelector('[data-testid="queue-button"]')
                     && window.app.extensions.some(e => e.name === 'loralab.liveview'))""",
            timeout=SLOW_S * 1000,
            polling=250,
        )

    def close_dialogs(self) -> None:
        """Close whatever dialog is open (the first-run templates dialog, say)."""
        for _ in range(5):
            dialogs = self.page.locator(".p-dialog:visible")
            if dialogs.count() == 0:
                return
            # Its close button (a PrimeVue dialog's, or the "x" of the templates dialog's layout).
            close = dialogs.first.locator(".p-dialog-close-button, button:has(> i.pi-times)")
            if close.count():
                close.first.click()
            else:
                self.page.keyboard.press("Escape")
            try:
                dialogs.first.wait_for(state="detached", timeout=5000)
            except Exception:  # noqa: BLE001 - try again, then give up below
                pass
        assert self.page.locator(".p-dialog:visible").count() == 0, "a dialog would not close"

    def dismiss_banner(self) -> None:
        """The "Introducing Nodes 2.0" banner of frontend 1.32 (best effort: it only hides canvas)."""
        close = self.page.locator("div:has(> div > span:has-text('Introducing Nodes 2.0')) > button")
        if close.count():
            close.first.click()

    def command(self, command_id: str) -> None:
        self.page.evaluate("id => app.extensionManager.command.execute(id)", command_id)

    def screenshot(self, name: str) -> pathlib.Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path

    def load_graph(self, workflow: dict, name: str) -> None:
        self.page.evaluate("([wf, name]) => app.loadGraphData(wf, true, true, name)", [workflow, name])

    def graph_nodes(self) -> list[dict]:
        return self.page.evaluate(
            "() => app.graph.nodes.map(n => ({id: String(n.id), type: n.type, size: [...n.size],"
            " widgets: (n.widgets || []).map(w => w.name), known: n.type in LiteGraph.registered_node_types}))"
        )


def http_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())
