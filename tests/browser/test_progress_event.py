"""The server half of the live view: ``nodes/events.py`` builds the ``loralab.progress`` payload.

No ComfyUI and no browser: a stand-in ``server.PromptServer`` records what would go to the websocket.
Messages are throttled (~10/s), yet together they carry every step's loss and learning rate exactly once.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import types
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
OLD_KEYS = ("node", "prompt_id", "step", "total", "loss", "lr", "steps_per_s", "elapsed")


@dataclass
class Info:  # the fields of training.loop.StepInfo that send_progress reads
    step: int
    total: int
    loss: float
    lr: float = 1e-3
    elapsed: float = 1.0

    @property
    def steps_per_s(self) -> float:
        return self.step / self.elapsed


class FakeServer:
    def __init__(self):
        self.sent: list[tuple[str, dict, object]] = []
        self.last_prompt_id = "p1"
        self.client_id = "client-1"

    def send_sync(self, event, data, sid=None):
        json.dumps(data, allow_nan=False)  # what reaches the browser must be strict JSON
        self.sent.append((event, data, sid))


def load_events(monkeypatch, name="loralab_events_under_test"):
    # nodes/__init__.py imports comfy_api: load events.py on its own.
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "events.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def events(monkeypatch):
    fake = FakeServer()
    server_module = types.ModuleType("server")
    server_module.PromptServer = types.SimpleNamespace(instance=fake)
    monkeypatch.setitem(sys.modules, "server", server_module)
    module = load_events(monkeypatch)
    clock = {"t": 1000.0}
    monkeypatch.setattr(module.time, "monotonic", lambda: clock["t"])
    module.fake_server = fake
    module.clock = clock
    return module


def run(events, node, losses, *, dt, first=1, total=None, lrs=None):
    total = total if total is not None else first + len(losses) - 1
    for i, loss in enumerate(losses):
        events.clock["t"] += dt
        lr = lrs[i] if lrs is not None else 1e-3
        events.send_progress(node, Info(step=first + i, total=total, loss=loss, lr=lr))


def test_throttled_messages_carry_every_loss_and_lr_once(events):
    losses = [1.0 / (i + 1) for i in range(40)]
    lrs = [1e-3 * (i + 1) / 40 for i in range(40)]  # a warm-up: every step's lr differs
    run(events, "3", losses, dt=0.03, lrs=lrs)  # ~33 steps/s: about one message in four steps
    sent = [d for e, d, _ in events.fake_server.sent]
    assert all(e == events.PROGRESS_EVENT for e, _, _ in events.fake_server.sent)
    assert all(sid == "client-1" for _, _, sid in events.fake_server.sent)
    assert 5 <= len(sent) <= 15, len(sent)
    assert sent[0]["step"] == 1 and sent[-1]["step"] == 40  # the first and the last step always go out
    steps = [d["first_step"] + i for d in sent for i in range(len(d["losses"]))]
    assert steps == list(range(1, 41))
    assert [v for d in sent for v in d["losses"]] == losses
    assert [v for d in sent for v in d["lrs"]] == lrs
    for d in sent:
        assert set(OLD_KEYS) <= set(d), d
        assert d["first_step"] + len(d["losses"]) - 1 == d["step"] and len(d["lrs"]) == len(d["losses"])
        assert d["loss"] == d["losses"][-1] and d["lr"] == d["lrs"][-1]
        assert d["prompt_id"] == "p1" and d["node"] == "3"
    assert "3" not in events._pending  # a finished run leaves nothing behind


def test_slow_training_sends_every_step(events):
    run(events, "3", [0.5, 0.4, 0.3], dt=1.0)
    sent = [d for _, d, _ in events.fake_server.sent]
    assert [(d["first_step"], d["losses"]) for d in sent] == [(1, [0.5]), (2, [0.4]), (3, [0.3])]


def test_new_run_and_other_nodes_are_kept_apart(events):
    run(events, "3", [0.9, 0.8, 0.7], dt=0.01, total=10)  # interrupted after 3 of 10 steps
    run(events, "5", [0.6, 0.5], dt=0.01, total=2)
    events.fake_server.last_prompt_id = "p2"
    run(events, "3", [0.4, 0.3], dt=0.01, total=2)  # a new prompt: node 3 starts again
    sent = [d for _, d, _ in events.fake_server.sent]
    by_node_prompt: dict = {}
    for d in sent:
        by_node_prompt.setdefault((d["node"], d["prompt_id"]), []).extend(d["losses"])
    assert by_node_prompt[("3", "p1")] == [0.9]  # the rest was throttled and never finished
    assert by_node_prompt[("5", "p1")] == [0.6, 0.5]
    assert by_node_prompt[("3", "p2")] == [0.4, 0.3]
    assert [(d["first_step"], d["step"]) for d in sent if d["prompt_id"] == "p2"] == [(1, 1), (2, 2)]


def test_resumed_run_starts_at_its_own_step(events):
    run(events, "3", [0.3, 0.2], dt=1.0, first=101, total=102)
    sent = [d for _, d, _ in events.fake_server.sent]
    assert [(d["first_step"], d["step"]) for d in sent] == [(101, 101), (102, 102)]


def test_non_finite_losses_are_sent_as_null(events):
    run(events, "3", [float("nan"), float("inf"), 0.5], dt=1.0)
    sent = [d for _, d, _ in events.fake_server.sent]
    assert [d["losses"] for d in sent] == [[None], [None], [0.5]]
    assert [d["loss"] for d in sent] == [None, None, 0.5]


def test_outside_a_server_nothing_happens(monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)  # `from server import ...` raises ImportError
    module = load_events(monkeypatch, "loralab_events_no_server")
    module.send_progress("3", Info(step=1, total=2, loss=0.1))  # no error
    assert module._pending == {}
