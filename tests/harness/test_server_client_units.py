"""Unit tests of harness.server / harness.client that need no ComfyUI (fake servers, canned bodies)."""

from __future__ import annotations

import os
import textwrap
import time

import pytest

from harness.client import ComfyClient, ComfyHTTPError, PromptRejected, RunResult, _terminal_from_history
from harness.server import PACK_NAME, ComfyServer, ServerStartError, find_free_port, prepare_base_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


FAKE_SERVER = textwrap.dedent(
    """
    # A stand-in for ComfyUI's main.py: answers /object_info, spawns a child, writes a pid file.
    import http.server, json, subprocess, sys, pathlib
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    base = pathlib.Path(args[args.index("--base-directory") + 1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (base / "child.pid").write_text(str(child.pid))
    print("fake server on", port, "args", args, flush=True)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"FakeNode": {"input": {}, "output": []}}).encode()
            self.send_response(200 if self.path == "/object_info" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture
def fake_comfy(tmp_path):
    d = tmp_path / "FakeComfy"
    d.mkdir()
    (d / "main.py").write_text(FAKE_SERVER)
    return d


def test_find_free_port_is_bindable():
    import socket

    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_prepare_base_dir_layout_is_idempotent(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    base = prepare_base_dir(tmp_path / "base", pack, with_models=False)
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/diffusion_models", "models/loras"):
        assert (base / sub).is_dir(), sub
    link = base / "custom_nodes" / PACK_NAME
    assert link.is_symlink() and link.resolve() == pack.resolve()
    assert prepare_base_dir(tmp_path / "base", pack, with_models=False) == base


def test_prepare_base_dir_links_models_from_a_source_base(tmp_path):
    src = tmp_path / "src"
    (src / "models" / "diffusion_models").mkdir(parents=True)
    (src / "input").mkdir()
    (src / "models" / "diffusion_models" / "loralab-tiny-sd3.safetensors").write_bytes(b"m")
    (src / "input" / "loralab-tiny-dataset.safetensors").write_bytes(b"d")
    base = prepare_base_dir(tmp_path / "base", tmp_path, source_base=src)
    model = base / "models" / "diffusion_models" / "loralab-tiny-sd3.safetensors"
    assert model.is_symlink() and model.read_bytes() == b"m"
    assert (base / "input" / "loralab-tiny-dataset.safetensors").read_bytes() == b"d"


def test_start_refuses_an_unprepared_base_dir(tmp_path, fake_comfy):
    with pytest.raises(ServerStartError, match="prepare_base_dir"):
        ComfyServer(tmp_path / "nothing", comfy_dir=fake_comfy).start()
    with pytest.raises(ServerStartError, match="setup.sh"):
        ComfyServer(tmp_path, comfy_dir=tmp_path / "no-comfy").start()


def test_wait_ready_fails_fast_with_the_log_when_the_process_exits(tmp_path):
    comfy = tmp_path / "Crashing"
    comfy.mkdir()
    (comfy / "main.py").write_text("import sys\nprint('boom: no such thing')\nsys.exit(3)\n")
    base = prepare_base_dir(tmp_path / "base", tmp_path, with_models=False)
    server = ComfyServer(base, comfy_dir=comfy, cpu=True)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)code 3.*boom: no such thing"):
        server.start_and_wait(timeout=60)
    assert time.monotonic() - t0 < 30
    assert server.stop() == 3  # idempotent after a failed start


def test_fake_server_lifecycle_kills_the_whole_group(tmp_path, fake_comfy):
    base = prepare_base_dir(tmp_path / "base", tmp_path, with_models=False)
    server = ComfyServer(base, comfy_dir=fake_comfy, cpu=True, extra_args=["--extra-flag"])
    with server:
        assert server.is_running() and server.ready_after is not None
        assert ComfyClient(server.url).object_info() == {"FakeNode": {"input": {}, "output": []}}
        child = int((base / "child.pid").read_text())
        assert _alive(child)
        pid = server.pid
        cmd = server.command()
        assert "--cpu" in cmd and cmd[-1] == "--extra-flag"
        assert cmd[cmd.index("--base-directory") + 1] == str(base)
        assert any(a.startswith("sqlite:///") and a.endswith("comfyui.db") for a in cmd)
    assert not server.is_running()
    assert _wait_gone(pid) and _wait_gone(child), "server or its child survived stop()"
    assert "fake server on" in server.log_text()
    assert server.stop() is not None  # second stop: no error
    assert "fake server on" in server.log_tail(5)


def test_wait_ready_times_out_and_stops(tmp_path):
    comfy = tmp_path / "Sleepy"
    comfy.mkdir()
    (comfy / "main.py").write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    base = prepare_base_dir(tmp_path / "base", tmp_path, with_models=False)
    server = ComfyServer(base, comfy_dir=comfy, cpu=True)
    server.start()
    pid = server.pid
    with pytest.raises(ServerStartError, match="not ready after"):
        server.wait_ready(timeout=1.5)
    assert _wait_gone(pid)


def test_client_http_error_when_nothing_listens():
    client = ComfyClient(f"http://127.0.0.1:{find_free_port()}", http_timeout=5)
    with pytest.raises(ComfyHTTPError, match="no answer"):
        client.queue()


def test_prompt_rejected_message_lists_node_errors():
    body = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "4": {
                "class_type": "SaveLatent",
                "dependent_outputs": ["4"],
                "errors": [
                    {
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": "samples",
                        "extra_info": {},
                    }
                ],
            }
        },
    }
    e = PromptRejected(body)
    assert e.error["type"] == "prompt_outputs_failed_validation"
    assert "4" in e.node_errors
    assert "node 4 (SaveLatent): Required input is missing: samples" in str(e)


def test_terminal_from_history():
    entry = {
        "status": {
            "status_str": "error",
            "completed": False,
            "messages": [
                ["execution_start", {"prompt_id": "p"}],
                ["execution_error", {"prompt_id": "p", "node_id": "3", "exception_message": "bad"}],
            ],
        }
    }
    assert _terminal_from_history(entry, "p") == (
        "execution_error",
        {"prompt_id": "p", "node_id": "3", "exception_message": "bad"},
    )
    ok = {"status": {"status_str": "success", "messages": []}}
    assert _terminal_from_history(ok, "p")[0] == "execution_success"


def test_run_result_error_message():
    r = RunResult(
        "p",
        "error",
        {},
        {
            "node_id": "3",
            "node_type": "X",
            "exception_type": "ValueError",
            "exception_message": "nope\n",
            "traceback": ["  File a\n", "    b\n"],
        },
    )
    assert r.error_message.startswith("X (node 3): ValueError: nope")
    assert "File a" in r.error_message
    assert RunResult("p", "success", {}, None).error_message == ""
    assert RunResult("p", "interrupted", {}, None).error_message == "execution interrupted"
