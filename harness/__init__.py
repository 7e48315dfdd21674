"""Test and script harness for a real ComfyUI: start a server, talk to it, convert UI workflows.

    from harness import ComfyServer, prepare_base_dir, ui_to_api

    base = prepare_base_dir(tmp / "base")
    with ComfyServer(base) as server:
        client = server.client()
        prompt = ui_to_api(json.load(open("example_workflows/loralab_tiny_sd3_lora.json")),
                           client.object_info())
        result = client.run(prompt, timeout=600)

Only the standard library and ``websocket-client`` are used.
"""

from .client import ComfyClient, ComfyHTTPError, PromptRejected, RunResult, RunTimeout
from .server import ComfyServer, ServerStartError, find_free_port, prepare_base_dir
from .workflow import WorkflowMismatchWarning, ui_to_api, widget_layout

__all__ = [
    "ComfyClient",
    "ComfyHTTPError",
    "ComfyServer",
    "PromptRejected",
    "RunResult",
    "RunTimeout",
    "ServerStartError",
    "WorkflowMismatchWarning",
    "find_free_port",
    "prepare_base_dir",
    "ui_to_api",
    "widget_layout",
]
