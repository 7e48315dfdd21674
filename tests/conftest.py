"""Shared pytest set-up: the repo on sys.path, and one real ComfyUI server per test session.

Fixtures:
  comfy_server       session: a ComfyUI with this pack installed, in a fresh base directory
                     (``.client``, ``.base_dir``, ``.url``, ``.log_text()``, ``.log_tail(n)``, ``.object_info``)
  comfy              session: ``comfy_server.client`` (a harness.ComfyClient)
  comfy_server_factory  function: start extra, isolated servers (each costs a few seconds)

Any test that uses a server is marked ``server`` (``-m "not server"`` skips them); when it fails, the
last 200 lines of that server's log are attached to its report.

Environment:
  LORALAB_SERVER_TIMEOUT   seconds to wait for ComfyUI to come up (default 180)
  LORALAB_COMFY_CPU        1 / 0: force / forbid ComfyUI's --cpu (default: --cpu when torch sees no GPU)
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import sys
from dataclasses import dataclass, field

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.client import ComfyClient  # noqa: E402
from harness.server import COMFY_DIR, ComfyServer, prepare_base_dir  # noqa: E402

LOG_LINES = 200
SERVER_FIXTURES = ("comfy_server", "comfy", "comfy_server_factory")
_SERVERS_KEY = pytest.StashKey[list]()  # servers a test item used (for its failure report)
_SESSION_SERVER_KEY = pytest.StashKey[ComfyServer]()


def _start_timeout() -> float:
    return float(os.environ.get("LORALAB_SERVER_TIMEOUT", "180"))


@dataclass
class RunningComfy:
    """A started server with its client, as the fixtures hand it out."""

    server: ComfyServer
    client: ComfyClient
    base_dir: pathlib.Path
    url: str
    _object_info: dict | None = field(default=None, repr=False)

    def log_text(self) -> str:
        return self.server.log_text()

    def log_tail(self, lines: int = LOG_LINES) -> str:
        return self.server.log_tail(lines)

    @property
    def object_info(self) -> dict:
        """``/object_info``, fetched once (node definitions do not change while the server runs)."""
        if self._object_info is None:
            self._object_info = self.client.object_info()
        return self._object_info

    @functools.cached_property
    def output_dir(self) -> pathlib.Path:
        return self.base_dir / "output"


def _new_server(base_dir: pathlib.Path, log_path: pathlib.Path, **server_kwargs) -> ComfyServer:
    if not (COMFY_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI tree at {COMFY_DIR}: run `bash scripts/setup.sh` first", pytrace=False)
    return ComfyServer(prepare_base_dir(base_dir, testkit=True), log_path=log_path, **server_kwargs)


def _running(server: ComfyServer) -> RunningComfy:
    try:
        server.start_and_wait(timeout=_start_timeout())
    except BaseException:
        server.stop()
        raise
    return RunningComfy(server, server.client(), server.base_dir, server.url)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, request):
    """One ComfyUI for the whole session, with this pack installed, in a fresh base directory."""
    root = tmp_path_factory.mktemp("comfy")
    server = _new_server(root / "base", root / "comfyui-server.log")
    request.config.stash[_SESSION_SERVER_KEY] = server  # before start: a failed start still shows its log
    try:
        yield _running(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy(comfy_server) -> ComfyClient:
    """The session server's client."""
    return comfy_server.client


@pytest.fixture
def comfy_server_factory(tmp_path, request):
    """Start extra servers for tests that need isolation: ``running = comfy_server_factory()``."""
    started: list[ComfyServer] = []
    request.node.stash.setdefault(_SERVERS_KEY, [])

    def make(**server_kwargs) -> RunningComfy:
        idx = len(started)
        server = _new_server(tmp_path / f"base{idx}", tmp_path / f"comfyui-server-{idx}.log", **server_kwargs)
        started.append(server)
        request.node.stash[_SERVERS_KEY].append(server)
        return _running(server)

    yield make
    for server in started:
        server.stop()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SERVER_FIXTURES):
            item.add_marker(pytest.mark.server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    names = getattr(item, "fixturenames", ())
    servers: list[ComfyServer] = []
    if "comfy_server" in names or "comfy" in names:
        session_server = item.config.stash.get(_SESSION_SERVER_KEY, None)
        if session_server is not None:
            servers.append(session_server)
    servers += item.stash.get(_SERVERS_KEY, [])
    for server in servers:
        with contextlib.suppress(Exception):
            tail = server.log_tail(LOG_LINES)
            report.sections.append(
                (f"ComfyUI server log, last {LOG_LINES} lines ({server.log_path})", tail or "(empty)")
            )
