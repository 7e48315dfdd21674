"""The pack's websocket events (the live training view listens to them; HTTP clients may too).

``loralab.progress`` is sent at most ~10 times a second per node, and always for the last step. Each
message carries the state after its step and, so that a client can draw every step although messages
are throttled, the losses and learning rates of all steps since the previous message::

    {
        "node": "3",              # the train node's id (its execution id)
        "prompt_id": "...",
        "step": 17,               # optimizer steps done (1-based)
        "total": 40,
        "loss": 0.123,            # the loss of `step`
        "lr": 0.0005,
        "steps_per_s": 41.2,      # average since the first step
        "elapsed": 0.41,          # seconds since the first step started
        "first_step": 13,         # the step of losses[0] and lrs[0]
        "losses": [0.2, 0.1, 0.15, 0.12, 0.123],   # steps first_step .. step
        "lrs": [0.0005, 0.0005, 0.0005, 0.0005, 0.0005],   # their learning rates
        "memory": {...},          # first message of a run only: the memory plan in bytes (weights,
                                  # trainable, gradients, optimizer, activations, added, available)
        "validation": [[0, 0.31], [50, 0.27]],  # with a Validation Set: [step, held-out loss] measured
                                                # since the previous message
    }

A loss that is not finite is sent as ``null`` (JSON has no NaN / Infinity).

``loralab.preview`` is sent once per preview (Preview Settings), naming its saved images as ComfyUI's
``/view`` takes them::

    {"node": "3", "prompt_id": "...", "step": 50,
     "images": [{"filename": "step_50_0.png", "subfolder": "loralab/previews", "type": "output"}]}
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

PROGRESS_EVENT = "loralab.progress"
PREVIEW_EVENT = "loralab.preview"
_MIN_INTERVAL_S = 0.1  # at most ~10 messages a second, but always the last step


@dataclass
class _Pending:
    """Steps of one node's run that were not sent yet."""

    prompt_id: object
    last_step: int = 0
    last_sent: float = 0.0
    first_step: int | None = None
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    validation: list = field(default_factory=list)


_pending: dict = {}  # node id -> _Pending (touched only by the executing thread)


def _finite_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _server():
    """ComfyUI's PromptServer, or None outside a server."""
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server
        return None
    return getattr(PromptServer, "instance", None)


def send_preview(node_id, step: int, names: list[str]) -> None:
    """A loralab.preview event for images saved in the output folder (names relative to it)."""
    server = _server()
    if server is None:
        return
    images = [
        {"filename": os.path.basename(n), "subfolder": os.path.dirname(n), "type": "output"} for n in names
    ]
    payload = {
        "node": node_id,
        "prompt_id": getattr(server, "last_prompt_id", None),
        "step": step,
        "images": images,
    }
    server.send_sync(PREVIEW_EVENT, payload, server.client_id)


def send_progress(node_id, info, memory: dict | None = None, validation: list | None = None) -> None:
    server = _server()
    if server is None:
        return
    prompt_id = getattr(server, "last_prompt_id", None)
    state = _pending.get(node_id)
    if state is None or state.prompt_id != prompt_id or info.step <= state.last_step:
        state = _pending[node_id] = _Pending(prompt_id)  # a new run of this node
    if state.first_step is None:
        state.first_step = info.step
    state.losses.append(_finite_or_none(info.loss))
    state.lrs.append(info.lr)
    state.validation.extend([int(step), _finite_or_none(value)] for step, value in validation or [])
    state.last_step = info.step

    now = time.monotonic()
    last = info.step >= info.total
    if not last and now - state.last_sent < _MIN_INTERVAL_S:
        return
    state.last_sent = now
    first_step, losses, lrs, held_out = state.first_step, state.losses, state.lrs, state.validation
    state.first_step, state.losses, state.lrs, state.validation = None, [], [], []
    if last:
        _pending.pop(node_id, None)
    payload = {
        "node": node_id,
        "prompt_id": prompt_id,
        "step": info.step,
        "total": info.total,
        "loss": _finite_or_none(info.loss),
        "lr": info.lr,
        "steps_per_s": info.steps_per_s,
        "elapsed": info.elapsed,
        "first_step": first_step,
        "losses": losses,
        "lrs": lrs,
    }
    if memory is not None:
        payload["memory"] = memory
    if held_out:
        payload["validation"] = held_out
    server.send_sync(PROGRESS_EVENT, payload, server.client_id)
