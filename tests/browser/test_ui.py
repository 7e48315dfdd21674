"""The pack in the real ComfyUI frontend (comfyui-frontend-package 1.32.9), in headless Chromium.

Against the session's ComfyUI server: the extension script is listed and served, the pack's examples
are listed as templates, the UI opens with our extension and no errors, the train node is found in
the node search, every example workflow loads with no missing node types, and the tiny template,
opened from the templates dialog and queued with the Run button, trains while the live view on the
train node shows the loss curve and `step N / 40`; the curve stays after the run.

Screenshots: artifacts/browser/*.png.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import time
import urllib.error
import urllib.request

import pytest

from harness.server import PACK_NAME
from tests.browser.comfy_page import SLOW_S, http_json

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TEMPLATE = "loralab_tiny_sd3_lora"
TRAIN = "LoraLab_TrainLoraNode"
SCRIPT = f"/extensions/{PACK_NAME}/loralab_live.js"
TRAIN_WIDGETS = [
    "batch_size",
    "grad_accumulation_steps",
    "steps",
    "learning_rate",
    "rank",
    "optimizer",
    "loss_function",
    "seed",
    "training_dtype",
    "lora_dtype",
    "algorithm",
    "gradient_checkpointing",
    "existing_lora",
]


def fetch(url: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def poll(check, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Call ``check()`` until it returns something truthy; that value, or AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- HTTP: what the frontend is served


def test_extension_script_is_listed_and_served(comfy_server):
    extensions = http_json(comfy_server.url + "/extensions")
    assert SCRIPT in extensions, (
        f"{SCRIPT} not in GET /extensions: {[e for e in extensions if 'core' not in e]}"
    )
    status, ctype, body = fetch(comfy_server.url + SCRIPT)
    assert status == 200 and "javascript" in ctype, (status, ctype)
    text = body.decode()
    assert "registerExtension" in text and '"loralab.progress"' in text
    # The script imports these relative to /extensions/<pack>/: they must exist as ES modules that
    # export `app` and `api` (frontend 1.32.9 serves them as shims over window.comfyAPI).
    for module, name in (("/scripts/app.js", "app"), ("/scripts/api.js", "api")):
        status, ctype, body = fetch(comfy_server.url + module)
        assert status == 200 and "javascript" in ctype, (module, status, ctype)
        assert f"export const {name} =" in body.decode(), module


def test_workflow_templates_list_the_pack_examples(comfy_server):
    templates = http_json(comfy_server.url + "/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in EXAMPLES), templates
    for path in EXAMPLES:
        served = http_json(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{path.name}")
        assert served == json.loads(path.read_text()), path.name


# ---------------------------------------------------------------------- the UI


def test_ui_opens_with_the_extension_and_no_errors(ui, comfy_server):
    settings = http_json(comfy_server.url + "/settings")
    first_run = not settings.get("Comfy.TutorialCompleted")
    ui.open()
    if first_run:
        # A new user gets the templates dialog: it must show, then close.
        ui.page.locator('[data-testid="template-workflows-content"]').wait_for(timeout=60_000)
        ui.screenshot("first_run_templates.png")
    ui.close_dialogs()
    ui.dismiss_banner()
    names = ui.page.evaluate("app.extensions.map(e => e.name)")
    assert names.count("loralab.liveview") == 1
    ui.screenshot("opened.png")
    ui.assert_no_errors("after loading the UI")


def ensure_open(ui) -> None:
    if not ui.page.evaluate("!!(window.app && window.app.vueAppReady)"):
        ui.open()
    ui.close_dialogs()


def open_node_search(ui):
    """Double-click the empty canvas; the node search box opens. On a busy machine litegraph can miss
    a double-click (it times the two clicks itself), so it is tried again a few times."""
    box = ui.page.locator("#graph-canvas").bounding_box()
    search = ui.page.locator(".comfy-vue-node-search-box input")
    for attempt in range(4):
        ui.page.mouse.dblclick(
            box["x"] + box["width"] * (0.45 + 0.02 * attempt), box["y"] + box["height"] * 0.55
        )
        try:
            search.wait_for(timeout=10_000)
            return search
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try again
            continue
    raise AssertionError("double-clicking the canvas did not open the node search box")


def test_train_node_is_found_in_the_node_search(ui):
    ensure_open(ui)
    ui.command("Comfy.NewBlankWorkflow")
    ui.page.wait_for_function("app.graph.nodes.length === 0")
    search = open_node_search(ui)
    search.fill("Train LoRA (LoRA Lab)")
    first = ui.page.locator(".p-autocomplete-option").first
    first.wait_for()
    ui.page.wait_for_function(
        "() => (document.querySelector('.p-autocomplete-option')?.innerText || '').startsWith('Train LoRA (LoRA Lab)')"
    )
    ui.screenshot("node_search.png")
    search.press("Enter")
    ui.page.wait_for_function(f"app.graph.nodes.some(n => n.type === '{TRAIN}')")
    (node,) = ui.graph_nodes()
    assert node["type"] == TRAIN and node["known"]
    assert [w for w in node["widgets"] if w in TRAIN_WIDGETS] == TRAIN_WIDGETS
    assert "loralab_live" not in node["widgets"], "the live view is added only when training starts"
    ui.screenshot("node_added.png")
    ui.assert_no_errors("adding the train node")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_loads_without_missing_nodes(ui, path):
    ensure_open(ui)
    workflow = json.loads(path.read_text())
    ui.load_graph(workflow, path.stem)
    want = len(workflow["nodes"])
    ui.page.wait_for_function(f"app.graph.nodes.length === {want}")
    nodes = ui.graph_nodes()
    unknown = [n["type"] for n in nodes if not n["known"]]
    assert not unknown, f"{path.name}: node types the frontend does not know: {unknown}"
    assert sorted(n["type"] for n in nodes) == sorted(n["type"] for n in workflow["nodes"])
    # The frontend turns it into an API prompt (what the Run button sends) with every node of ours.
    prompt = ui.page.evaluate("async () => (await app.graphToPrompt()).output")
    ours = {n["id"]: n["type"] for n in nodes if n["type"].startswith("LoraLab_")}
    for node_id, node_type in ours.items():
        assert prompt[node_id]["class_type"] == node_type
    ui.command("Comfy.Canvas.FitView")
    ui.screenshot(f"example_{path.stem}.png")
    ui.assert_no_errors(f"loading {path.name}")


# Records every state the live view goes through (a MutationObserver on its data attributes) and every
# loralab.progress event, from before the Run click on.
RECORDER = """() => {
  window.__loralabDom = [];
  window.__loralabEvents = [];
  const seen = (e) => {
    const d = e.dataset;
    window.__loralabDom.push({status: d.status, step: +d.step, total: +d.total, points: +d.points});
  };
  new MutationObserver((records) => {
    for (const r of records) {
      const t = r.target;
      if (t instanceof HTMLElement && t.classList.contains('loralab-live') && r.attributeName === 'data-step') seen(t);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-step']});
  window.comfyAPI.api.api.addEventListener('loralab.progress', (e) => window.__loralabEvents.push(e.detail));
}"""

VIEW_STATE = """() => {
  const e = document.querySelector('.loralab-live');
  if (!e) return null;
  const pts = (cls) => (e.querySelector(cls).getAttribute('points') || '').trim().split(/\\s+/).filter(Boolean).length;
  // on-screen size divided by the canvas zoom: the size on the node, whatever FitView chose
  const scale = window.app?.canvas?.ds?.scale || 1;
  return {...e.dataset, text: e.innerText, raw: pts('.loralab-raw'), smooth: pts('.loralab-smooth'),
          height: e.getBoundingClientRect().height / scale, width: e.getBoundingClientRect().width / scale};
}"""


def test_template_trains_with_the_live_loss_curve(ui, comfy_server):
    ensure_open(ui)
    page = ui.page

    # The template, through the UI: sidebar "Templates" -> the pack's entry -> its card.
    page.locator(".side-bar-button", has_text="Templates").first.click()
    dialog = page.locator(".p-dialog:visible")
    page.locator('[data-testid="template-workflows-content"]').wait_for()
    dialog.get_by_text(PACK_NAME, exact=True).first.click()
    card = page.locator(f'[data-testid="template-workflow-{TEMPLATE}"]')
    card.wait_for()
    ui.screenshot("templates_dialog.png")
    card.click()
    page.wait_for_function(f"app.graph.nodes.some(n => n.type === '{TRAIN}')")
    dialog.first.wait_for(state="detached")
    ui.assert_no_errors("opening the template")

    train = page.evaluate(f"String(app.graph.nodes.find(n => n.type === '{TRAIN}').id)")
    steps = page.evaluate(f"app.graph.getNodeById({train}).widgets.find(w => w.name === 'steps').value")
    # A seed no earlier prompt on this server used, so ComfyUI's cache cannot skip the training.
    seed = random.randrange(1, 2**31)
    page.evaluate(f"app.graph.getNodeById({train}).widgets.find(w => w.name === 'seed').value = {seed}")
    saved_before = page.evaluate(
        f"app.graph.serialize().nodes.find(n => String(n.id) === '{train}').widgets_values"
    )
    page.evaluate(RECORDER)

    page.locator('[data-testid="queue-button"]').first.click()

    view = page.locator(".loralab-live")
    view.wait_for(timeout=SLOW_S * 1000)
    ui.command("Comfy.Canvas.FitView")
    page.wait_for_function(
        "() => { const e = document.querySelector('.loralab-live');"
        f" return e && (+e.dataset.step >= Math.min(10, {steps}) || e.dataset.status !== 'running'); }}",
        timeout=SLOW_S * 1000,
    )
    ui.screenshot("live_training.png")
    page.wait_for_function(
        "() => document.querySelector('.loralab-live')?.dataset.status !== 'running'", timeout=SLOW_S * 1000
    )
    state = page.evaluate(VIEW_STATE)
    assert state["status"] == "done", state
    prompt_id = state["promptId"]

    def finished():
        entry = http_json(f"{comfy_server.url}/history/{prompt_id}").get(prompt_id)
        return entry if entry and entry.get("status", {}).get("completed") is not None else None

    entry = poll(finished, SLOW_S, what=f"/history/{prompt_id}")
    assert entry["status"]["status_str"] == "success", entry["status"]
    poll(
        lambda: not any(http_json(comfy_server.url + "/queue").values()),
        SLOW_S,
        what="an empty queue",
    )
    page.wait_for_function(
        "() => !document.querySelector('.comfyui-queue-button .p-button-loading')", timeout=60_000
    )
    ui.screenshot("trained.png")

    # The curve stays after the run (execution_success / executed have been handled by now).
    state = page.evaluate(VIEW_STATE)
    assert state["status"] == "done" and state["nodeId"] == train, state
    assert int(state["step"]) == int(state["total"]) == steps, state
    assert f"step {steps} / {steps}" in state["text"], state["text"]
    assert "steps/s" in state["text"] and "loss" in state["text"]
    assert int(state["points"]) == steps and state["raw"] == steps and state["smooth"] == steps, state
    assert state["height"] >= 120 and state["width"] >= 250, state  # really drawn on the node

    # It was live: the view showed intermediate steps while training, in order.
    dom = page.evaluate("window.__loralabDom")
    seen_steps = [s["step"] for s in dom]
    assert seen_steps == sorted(seen_steps), seen_steps
    assert any(s["status"] == "running" and 0 < s["step"] < steps for s in dom), dom

    # The events carried every step's loss exactly once; the last one is the file's final loss.
    events = [e for e in page.evaluate("window.__loralabEvents") if str(e["node"]) == train]
    covered = [e["first_step"] + i for e in events for i in range(len(e["losses"]))]
    assert covered == list(range(1, steps + 1)), covered
    losses = [v for e in events for v in e["losses"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert events[-1]["loss"] == losses[-1]
    # The live smoothed value is the saved loss plot's smoothed curve (training.plotting.ema).
    from training.plotting import ema, ema_span

    shown = float(state["text"].split("smoothed ")[1].split()[0])
    expected = ema(losses, ema_span(len(losses)))[-1]
    assert shown == pytest.approx(expected, rel=1e-3), (shown, expected)
    for key in ("node", "prompt_id", "step", "total", "loss", "lr", "steps_per_s", "elapsed"):
        assert key in events[-1], key
    assert all(e["prompt_id"] == prompt_id for e in events)

    # The view is neither saved in the workflow nor sent with the prompt.
    saved_after = page.evaluate(
        f"app.graph.serialize().nodes.find(n => String(n.id) === '{train}').widgets_values"
    )
    assert saved_after == saved_before
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert "loralab_live" not in prompt[train]["inputs"]
    ui.assert_no_errors("training from the template")


def send_ws(ui, message) -> None:
    """Deliver a websocket message to the page as if the server had sent it (the frontend's own
    message handler parses and dispatches it)."""
    ui.page.evaluate(
        "text => window.comfyAPI.api.api.socket.dispatchEvent(new MessageEvent('message', {data: text}))",
        json.dumps(message),
    )


def test_progress_events_for_absent_or_other_nodes_are_harmless(ui):
    ensure_open(ui)
    workflow = json.loads((ROOT / "example_workflows" / f"{TEMPLATE}.json").read_text())
    ui.load_graph(workflow, "synthetic-events")
    ui.page.wait_for_function(f"app.graph.nodes.length === {len(workflow['nodes'])}")
    nodes = ui.graph_nodes()
    train = next(n["id"] for n in nodes if n["type"] == TRAIN)
    other = next(n["id"] for n in nodes if n["type"] != TRAIN)
    base = {
        "prompt_id": "synthetic",
        "total": 10,
        "loss": 0.5,
        "lr": 1e-3,
        "steps_per_s": 2.0,
        "elapsed": 1.0,
    }
    for node in ("9999", other, "77:5", f"{train}:4"):
        send_ws(
            ui,
            {
                "type": "loralab.progress",
                "data": {**base, "node": node, "step": 1, "first_step": 1, "losses": [0.5]},
            },
        )
    for data in ({}, {"node": train}, {"node": None, "step": 1}, {"node": train, "step": "x"}):
        send_ws(ui, {"type": "loralab.progress", "data": data})
    send_ws(ui, {"type": "loralab.progress", "data": None})
    assert ui.page.locator(".loralab-live").count() == 0, (
        "a view appeared for a node that is not a train node"
    )

    # The train node itself: older servers' messages (no `losses`) and gaps (null losses) are fine.
    send_ws(ui, {"type": "loralab.progress", "data": {**base, "node": train, "step": 1}})
    send_ws(
        ui,
        {
            "type": "loralab.progress",
            "data": {**base, "node": train, "step": 4, "first_step": 2, "losses": [0.4, None, 0.3]},
        },
    )
    ui.page.wait_for_function("document.querySelector('.loralab-live')?.dataset.step === '4'")
    state = ui.page.evaluate(VIEW_STATE)
    assert state["status"] == "running" and state["points"] == "3" and "step 4 / 10" in state["text"], state
    assert "ETA 3 s" in state["text"], state["text"]
    send_ws(
        ui,
        {
            "type": "execution_interrupted",
            "data": {"prompt_id": "synthetic", "node_id": train, "node_type": TRAIN, "executed": []},
        },
    )
    ui.page.wait_for_function("document.querySelector('.loralab-live')?.dataset.status === 'stopped'")
    other_widgets = next(n["widgets"] for n in ui.graph_nodes() if n["id"] == other)
    assert "loralab_live" not in other_widgets

    # A new prompt replaces the curve; a long run is drawn with a bounded number of points.
    long = [1.0 + math.sin(i / 50) / (1 + i / 500) for i in range(5000)]
    send_ws(
        ui,
        {
            "type": "loralab.progress",
            "data": {
                **base,
                "prompt_id": "long",
                "node": train,
                "total": 5000,
                "step": 5000,
                "first_step": 1,
                "losses": long,
            },
        },
    )
    ui.page.wait_for_function("document.querySelector('.loralab-live')?.dataset.promptId === 'long'")
    state = ui.page.evaluate(VIEW_STATE)
    assert state["status"] == "done" and state["points"] == "5000" and "step 5000 / 5000" in state["text"], (
        state
    )
    assert 100 <= state["raw"] <= 600 and 100 <= state["smooth"] <= 600, state
    ui.assert_no_errors("after synthetic progress events")


def test_previews_appear_on_the_train_node_while_it_trains(ui, comfy_server):
    """The tiny template (its Preview Settings -> Training Options -> Train LoRA, previews every 10
    steps), queued with the Run button: the previews appear in the strip of the live view while it
    trains, each with its step, and stay after the run."""
    ensure_open(ui)
    page = ui.page
    workflow = json.loads((ROOT / "example_workflows" / f"{TEMPLATE}.json").read_text())
    assert any(n["type"] == "LoraLab_PreviewSettings" for n in workflow["nodes"]), (
        "the template has no previews"
    )
    ui.load_graph(workflow, "previews")
    page.wait_for_function(f"app.graph.nodes.length === {len(workflow['nodes'])}")
    seed = random.randrange(1, 2**31)
    page.evaluate(
        """([train_type, seed]) => {
        const g = app.graph;
        const train = g.nodes.find((n) => n.type === train_type);
        const preview = g.nodes.find((n) => n.type === "LoraLab_PreviewSettings");
        const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
        set(preview, "steps", 2);
        set(preview, "filename_prefix", "browser/previews");
        set(train, "seed", seed);
        g.setDirtyCanvas(true, true);
    }""",
        [TRAIN, seed],
    )
    steps = page.evaluate(
        f"app.graph.nodes.find(n => n.type === '{TRAIN}').widgets.find(w => w.name === 'steps').value"
    )
    ui.assert_no_errors("wiring the preview nodes")

    page.locator('[data-testid="queue-button"]').first.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.loralab-live-strip img')].filter((i) => i.complete && i.naturalWidth > 0).length >= 2",
        timeout=SLOW_S * 1000,
    )
    ui.command("Comfy.Canvas.FitView")
    ui.screenshot("previews_while_training.png")
    page.wait_for_function(
        "() => document.querySelector('.loralab-live')?.dataset.status !== 'running'", timeout=SLOW_S * 1000
    )
    page.wait_for_function(
        f"() => [...document.querySelectorAll('.loralab-live-strip img')].some((i) => i.dataset.step === '{steps}' && i.naturalWidth > 0)",
        timeout=SLOW_S * 1000,
    )
    ui.screenshot("previews_after_training.png")
    shown = page.evaluate(
        "() => [...document.querySelectorAll('.loralab-live-strip img')].map((i) => [+i.dataset.step, i.naturalWidth, i.getBoundingClientRect().height])"
    )
    expected = [s for s in range(0, steps + 1) if s == 0 or s == steps or s % 10 == 0][-6:]
    assert [s for s, _, _ in shown] == expected, shown
    assert all(width == 16 and height > 40 for _, width, height in shown), (
        shown
    )  # 16x16 latent-to-RGB, drawn large
    ui.assert_no_errors("training with previews")


def test_held_out_loss_is_drawn_on_the_live_curve(ui):
    """`validation` pairs of the progress events (Validation Set) become a dashed line on the curve's
    scale and the footer's held-out value."""
    ensure_open(ui)
    workflow = json.loads((ROOT / "example_workflows" / f"{TEMPLATE}.json").read_text())
    ui.load_graph(workflow, "held-out")
    ui.page.wait_for_function(f"app.graph.nodes.length === {len(workflow['nodes'])}")
    train = next(n["id"] for n in ui.graph_nodes() if n["type"] == TRAIN)
    base = {"prompt_id": "held", "node": train, "total": 4, "lr": 1e-3, "steps_per_s": 2.0, "elapsed": 1.0}
    send_ws(
        ui,
        {
            "type": "loralab.progress",
            "data": {
                **base,
                "step": 2,
                "loss": 0.5,
                "first_step": 1,
                "losses": [0.6, 0.5],
                "validation": [[0, 0.7], [2, 0.55]],
            },
        },
    )
    send_ws(
        ui,
        {
            "type": "loralab.progress",
            "data": {
                **base,
                "step": 4,
                "loss": 0.4,
                "first_step": 3,
                "losses": [0.45, 0.4],
                "validation": [[4, 0.42]],
            },
        },
    )
    ui.page.wait_for_function("document.querySelector('.loralab-live')?.dataset.validation === '3'")
    state = ui.page.evaluate(VIEW_STATE)
    assert "held-out 0.4200" in state["text"], state["text"]
    held = ui.page.evaluate(
        "document.querySelector('.loralab-val').getAttribute('points').trim().split(/\\s+/).length"
    )
    assert held == 3
    ui.screenshot("held_out_loss.png")
    ui.assert_no_errors("held-out loss events")
