"""The pack's websocket events (the live training view listens to them; HTTP clients may too)."""

from __future__ import annotations

import time

PROGRESS_EVENT = "loralab.progress"
_MIN_INTERVAL_S = 0.1  # at most ~10 messages a second, but always the last step
_last_sent: dict = {}


def send_progress(node_id, info) -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    now = time.monotonic()
    if info.step < info.total and now - _last_sent.get(node_id, 0.0) < _MIN_INTERVAL_S:
        return
    _last_sent[node_id] = now
    server.send_sync(
        PROGRESS_EVENT,
        {
            "node": node_id,
            "prompt_id": getattr(server, "last_prompt_id", None),
            "step": info.step,
            "total": info.total,
            "loss": info.loss,
            "lr": info.lr,
            "steps_per_s": info.steps_per_s,
            "elapsed": info.elapsed,
        },
        server.client_id,
    )
