// LoRA Lab: live training view.
//
// While a "Train LoRA (LoRA Lab)" node trains, a panel below its widgets shows the loss of every
// step (raw and smoothed), `step / total`, steps per second and the time left. The data comes from
// the pack's websocket event `loralab.progress` (see nodes/events.py): each message carries the
// losses of all steps since the previous one, so the curve is complete although messages are
// throttled. The last curve stays on the node after the run.
//
// With Preview Settings connected, the pack's `loralab.preview` event (nodes/preview.py) names each
// preview image as it is saved; the panel shows the latest ones in a strip under the curve, each with
// its step, and keeps them after the run. With a Validation Set, the held-out loss the events carry
// (`validation`: [step, loss] pairs) is a dashed line on the same scale.
//
// The panel is a DOM widget that is neither saved in the workflow (widgets_values) nor sent with
// the prompt. Without this file nothing changes for the server or for HTTP API clients, and an
// event for a node that is not on the canvas is kept (so the view can show up when the node does)
// but never an error.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "loralab.liveview";
const EVENT = "loralab.progress";
const PREVIEW_EVENT = "loralab.preview";
const MAX_PREVIEWS = 6; // thumbnails in the strip (the latest)
const STRIP_HEIGHT = 84;
const TRAIN_NODE = "LoraLab_TrainLoraNode";
const WIDGET_NAME = "loralab_live";
const VIEW_KEY = "__loralabLiveView";
const MIN_HEIGHT = 170; // the widget's height on the canvas, its 10 px margins included
const MIN_WIDTH = 320;
const MAX_RUNS = 16; // runs remembered in this page (by node id), oldest dropped first
const MAX_POINTS = 600; // points drawn per curve; longer runs are averaged into buckets
const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT_W = 1000;
const PLOT_H = 1000;
const PLOT_PAD = 0.13; // the curve keeps off the top and bottom bands, where the min / max labels are

/** The latest run of each node id seen in this page: id -> run record. */
const runs = new Map();

// ------------------------------------------------------------------ run records

function finite(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function toInt(value, fallback) {
  const n = Number(value);
  return Number.isFinite(n) ? Math.trunc(n) : fallback;
}

function newRun(nodeId, promptId, firstStep) {
  return {
    nodeId,
    promptId: promptId ?? null,
    base: firstStep, // the step of losses[0]
    losses: [], // one value (or null) per step from `base` on
    step: firstStep - 1,
    total: 0,
    loss: null,
    lr: null,
    stepsPerS: null,
    elapsed: null,
    status: "running", // running | done | stopped | error
    previews: [], // [{step, url}] in arrival order
    validation: [], // [[step, held-out loss]] (Validation Set)
  };
}

/** The run of a node for a preview event: previews may come before the first step's progress. */
function runForPreview(detail) {
  const nodeId = String(detail.node);
  const promptId = detail.prompt_id ?? null;
  let run = runs.get(nodeId);
  if (!run || run.promptId !== promptId) {
    run = newRun(nodeId, promptId, 1);
    runs.set(nodeId, run);
    while (runs.size > MAX_RUNS) runs.delete(runs.keys().next().value);
  }
  const step = toInt(detail.step, 0);
  // One thumbnail per step: its first image (a positive of batch N renders N; all are in the output folder).
  const images = (Array.isArray(detail.images) ? detail.images : []).filter((i) => i && typeof i.filename === "string");
  if (images.length) {
    const query = new URLSearchParams({
      filename: images[0].filename,
      subfolder: images[0].subfolder ?? "",
      type: images[0].type ?? "output",
    });
    run.previews.push({ step, url: api.apiURL(`/view?${query}`), count: images.length });
  }
  run.previews = run.previews.slice(-MAX_PREVIEWS);
  return run;
}

/** Fold one `loralab.progress` message into the run it belongs to; returns that run. */
function updateRun(detail) {
  const nodeId = String(detail.node);
  const step = toInt(detail.step, NaN);
  if (!Number.isFinite(step)) return null;
  const hasList = Array.isArray(detail.losses) && detail.losses.length > 0;
  const losses = hasList ? detail.losses : [detail.loss];
  const firstStep = hasList ? toInt(detail.first_step, step - losses.length + 1) : step;
  const promptId = detail.prompt_id ?? null;

  let run = runs.get(nodeId);
  if (!run || run.promptId !== promptId || step <= run.step) {
    const previews = run && run.promptId === promptId ? run.previews : [];
    run = newRun(nodeId, promptId, firstStep);
    run.previews = previews; // the step-0 preview comes before the first progress message
  }
  runs.delete(nodeId); // re-insert: Map order is then oldest-updated first
  runs.set(nodeId, run);
  while (runs.size > MAX_RUNS) runs.delete(runs.keys().next().value);

  losses.forEach((value, i) => {
    const index = firstStep + i - run.base;
    if (index >= 0) run.losses[index] = finite(value) ? value : null;
  });
  run.step = step;
  run.total = Math.max(toInt(detail.total, step), step);
  run.loss = finite(detail.loss) ? detail.loss : run.loss;
  run.lr = finite(detail.lr) ? detail.lr : run.lr;
  run.stepsPerS = finite(detail.steps_per_s) ? detail.steps_per_s : run.stepsPerS;
  run.elapsed = finite(detail.elapsed) ? detail.elapsed : run.elapsed;
  run.status = step >= run.total ? "done" : "running";
  for (const pair of Array.isArray(detail.validation) ? detail.validation : []) {
    if (Array.isArray(pair) && finite(pair[1])) run.validation.push([toInt(pair[0], 0), pair[1]]);
  }
  return run;
}

// ------------------------------------------------------------------ numbers

/** The smoothed curve of the loss plot PNG (training/plotting.py: ema with span n / 25, 2 to 200
 *  steps, bias-corrected), so the live view and the saved plot draw the same line. */
function smooth(values) {
  const span = Math.max(2, Math.min(200, Math.round(values.length / 25)));
  const beta = 1 - 2 / (span + 1);
  const out = [];
  let acc = 0;
  let weight = 0;
  for (const v of values) {
    if (v == null || !Number.isFinite(v)) {
      out.push(null);
      continue;
    }
    acc = beta * acc + (1 - beta) * v;
    weight = beta * weight + (1 - beta);
    out.push(acc / weight);
  }
  return out;
}

/** At most `max` points [index, value]: the mean of equal buckets when there are more. */
function bucket(values, max) {
  const points = [];
  const size = Math.max(1, Math.ceil(values.length / max));
  for (let start = 0; start < values.length; start += size) {
    let sum = 0;
    let n = 0;
    for (let i = start; i < Math.min(start + size, values.length); i++) {
      const v = values[i];
      if (v != null) {
        sum += v;
        n += 1;
      }
    }
    if (n) points.push([start + (Math.min(size, values.length - start) - 1) / 2, sum / n]);
  }
  return points;
}

function formatLoss(v) {
  if (!finite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toPrecision(4);
}

function formatDuration(seconds) {
  if (!finite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

function formatRate(v) {
  if (!finite(v)) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

// ------------------------------------------------------------------ the view

const STYLE = `
.loralab-live { box-sizing: border-box; width: 100%; height: 100%; min-height: ${MIN_HEIGHT - 20}px;
  display: flex; flex-direction: column;
  gap: 2px; padding: 4px 6px; border-radius: 6px; overflow: hidden; pointer-events: none;
  font: 11px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); }
.loralab-live-head, .loralab-live-foot { display: flex; flex-wrap: wrap; gap: 0 10px; white-space: nowrap; }
.loralab-live-status { font-weight: bold; }
.loralab-live[data-status="running"] .loralab-live-status { color: #6fa8dc; }
.loralab-live[data-status="done"] .loralab-live-status { color: #93c47d; }
.loralab-live[data-status="stopped"] .loralab-live-status,
.loralab-live[data-status="error"] .loralab-live-status { color: #e06666; }
.loralab-live-plot { position: relative; flex: 1 1 auto; min-height: 40px;
  border: 1px solid var(--border-color, #444); border-radius: 4px; }
.loralab-live-plot svg { position: absolute; inset: 0; width: 100%; height: 100%; }
.loralab-live-plot .loralab-grid { stroke: var(--border-color, #444); stroke-width: 1; }
.loralab-live-plot .loralab-raw { fill: none; stroke: #6fa8dc; stroke-opacity: 0.6; stroke-width: 1; }
.loralab-live-plot .loralab-smooth { fill: none; stroke: #f6b26b; stroke-width: 2; }
.loralab-live-plot .loralab-val { fill: none; stroke: #b48ee0; stroke-width: 2; stroke-dasharray: 6 4; }
.loralab-live-axis { position: absolute; left: 3px; font-size: 10px; opacity: 0.75; }
.loralab-live-ymax { top: 1px; }
.loralab-live-ymin { bottom: 1px; }
.loralab-live-xmax { left: auto; right: 4px; bottom: 1px; }
.loralab-live-legend { position: absolute; right: 4px; top: 1px; font-size: 10px; }
.loralab-live-legend .raw { color: #6fa8dc; }
.loralab-live-legend .smooth { color: #f6b26b; }
.loralab-live-strip { display: none; flex: 0 0 ${STRIP_HEIGHT}px; gap: 4px; overflow: hidden; }
.loralab-live[data-previews]:not([data-previews="0"]) .loralab-live-strip { display: flex; }
.loralab-live-thumb { position: relative; height: 100%; flex: 0 0 auto; }
.loralab-live-thumb img { height: 100%; width: auto; border-radius: 3px; image-rendering: pixelated; }
.loralab-live-thumb span { position: absolute; left: 2px; bottom: 1px; font-size: 10px;
  background: rgba(0, 0, 0, 0.55); color: #fff; padding: 0 3px; border-radius: 2px; }
`;

function injectStyle() {
  if (document.getElementById("loralab-live-style")) return;
  const style = document.createElement("style");
  style.id = "loralab-live-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text != null) e.textContent = text;
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function buildElement() {
  const root = el("div", "loralab-live");
  root.dataset.status = "idle";
  const head = el("div", "loralab-live-head");
  const status = el("span", "loralab-live-status", "waiting");
  const steps = el("span", "loralab-live-steps", "");
  const rate = el("span", "loralab-live-rate", "");
  const eta = el("span", "loralab-live-eta", "");
  head.append(status, steps, rate, eta);

  const plot = el("div", "loralab-live-plot");
  const svg = svgEl("svg", { viewBox: `0 0 ${PLOT_W} ${PLOT_H}`, preserveAspectRatio: "none" });
  for (const y of [PLOT_PAD, 0.5, 1 - PLOT_PAD]) { // the max, middle and min of the curve
    svg.appendChild(
      svgEl("line", {
        class: "loralab-grid",
        x1: 0,
        x2: PLOT_W,
        y1: y * PLOT_H,
        y2: y * PLOT_H,
        "vector-effect": "non-scaling-stroke",
      }),
    );
  }
  const raw = svgEl("polyline", { class: "loralab-raw", points: "", "vector-effect": "non-scaling-stroke" });
  const smoothed = svgEl("polyline", {
    class: "loralab-smooth",
    points: "",
    "vector-effect": "non-scaling-stroke",
  });
  const held = svgEl("polyline", { class: "loralab-val", points: "", "vector-effect": "non-scaling-stroke" });
  svg.append(raw, smoothed, held);
  const ymax = el("span", "loralab-live-axis loralab-live-ymax", "");
  const ymin = el("span", "loralab-live-axis loralab-live-ymin", "");
  const xmax = el("span", "loralab-live-axis loralab-live-xmax", "");
  const legend = el("span", "loralab-live-legend");
  legend.append(el("span", "raw", "— loss "), el("span", "smooth", "— smoothed"));
  plot.append(svg, ymax, ymin, xmax, legend);

  const foot = el("div", "loralab-live-foot");
  const loss = el("span", "loralab-live-loss", "");
  const lr = el("span", "loralab-live-lr", "");
  foot.append(loss, lr);
  const strip = el("div", "loralab-live-strip");

  root.append(head, plot, foot, strip);
  return { root, status, steps, rate, eta, raw, smoothed, held, ymax, ymin, xmax, loss, lr, strip };
}

function isTrainNode(node) {
  return !!node && (node.comfyClass === TRAIN_NODE || node.type === TRAIN_NODE);
}

/** The node an execution id ("7", or "12:7" inside subgraph node 12) stands for, or null. */
function findNode(executionId) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(executionId).split(":")) {
    if (!graph || typeof graph.getNodeById !== "function") return null;
    node = graph.getNodeById(part) ?? graph.getNodeById(Number(part));
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

/** The node's view, created (and the node grown to fit it) on first use. */
function ensureView(node) {
  const existing = node[VIEW_KEY];
  if (existing && node.widgets?.includes(existing.widget)) return existing;
  if (typeof node.addDOMWidget !== "function") return null;

  injectStyle();
  const parts = buildElement();
  const widget = node.addDOMWidget(WIDGET_NAME, "loralab_live", parts.root, {
    serialize: false, // not sent with the prompt
    hideOnZoom: false,
    getMinHeight: () => MIN_HEIGHT + (node[VIEW_KEY]?.run?.previews?.length ? STRIP_HEIGHT : 0),
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false; // not stored in the workflow's widgets_values
  const view = { ...parts, widget, node, run: null, frame: 0, stripKey: "", grown: false };
  node[VIEW_KEY] = view;

  try {
    const need = node.computeSize();
    node.setSize([Math.max(node.size[0], need[0], MIN_WIDTH), Math.max(node.size[1], need[1])]);
  } catch (err) {
    console.warn(`[${EXTENSION}] could not resize node ${node.id}`, err);
  }
  node.setDirtyCanvas?.(true, true);
  return view;
}

function points(list) {
  return list.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
}

function render(view) {
  view.frame = 0;
  const run = view.run;
  if (!run) return;
  const { root } = view;
  root.dataset.status = run.status;
  root.dataset.nodeId = run.nodeId;
  root.dataset.promptId = run.promptId ?? "";
  root.dataset.step = String(run.step);
  root.dataset.total = String(run.total);
  root.dataset.points = String(run.losses.filter((v) => v != null).length);

  const label = { running: "training", done: "done", stopped: "stopped", error: "error" }[run.status];
  view.status.textContent = label ?? run.status;
  view.steps.textContent = `step ${run.step} / ${run.total}`;
  view.rate.textContent = `${formatRate(run.stepsPerS)} steps/s`;
  if (run.status === "running") {
    const left = finite(run.stepsPerS) && run.stepsPerS > 0 ? (run.total - run.step) / run.stepsPerS : NaN;
    view.eta.textContent = `ETA ${formatDuration(left)}`;
  } else {
    view.eta.textContent = `took ${formatDuration(run.elapsed)}`;
  }

  const values = run.losses;
  const sm = smooth(values);
  const rawPts = bucket(values, MAX_POINTS);
  const smPts = bucket(sm, MAX_POINTS);
  const valPts = (run.validation ?? []).map(([step, v]) => [Math.max(0, step - run.base), v]);
  const ys = rawPts.map((p) => p[1]).concat(smPts.map((p) => p[1]), valPts.map((p) => p[1]));
  let lo = Math.min(...ys);
  let hi = Math.max(...ys);
  if (!ys.length) {
    lo = 0;
    hi = 1;
  } else if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) {
    // a flat curve: centre it
    const pad = Math.abs(hi) * 0.05 || 0.5;
    lo -= pad;
    hi += pad;
  }
  const span = hi - lo;
  const lastX = Math.max(1, (run.total || values.length) - run.base);
  const toXY = ([i, v]) => [
    (i / lastX) * PLOT_W,
    PLOT_H * (1 - PLOT_PAD) - ((v - lo) / span) * PLOT_H * (1 - 2 * PLOT_PAD),
  ];
  view.raw.setAttribute("points", points(rawPts.map(toXY)));
  view.smoothed.setAttribute("points", points(smPts.map(toXY)));
  view.held.setAttribute("points", points(valPts.map(toXY)));
  root.dataset.validation = String(valPts.length);
  view.ymax.textContent = ys.length ? formatLoss(hi) : "";
  view.ymin.textContent = ys.length ? formatLoss(lo) : "";
  view.xmax.textContent = `step ${run.total}`;

  const lastSmooth = [...sm].reverse().find((v) => v != null);
  const finite_ = values.filter((v) => v != null);
  const best = finite_.length ? Math.min(...finite_) : NaN;
  const lastHeld = valPts.length ? valPts[valPts.length - 1][1] : null;
  view.loss.textContent = `loss ${formatLoss(run.loss)}  smoothed ${formatLoss(lastSmooth)}  min ${formatLoss(best)}` +
    (lastHeld == null ? "" : `  held-out ${formatLoss(lastHeld)}`);
  view.lr.textContent = finite(run.lr) ? `lr ${run.lr.toExponential(1)}` : "";
  renderStrip(view, run);
}

/** The latest previews as thumbnails with their step; images already shown are kept, not reloaded. */
function renderStrip(view, run) {
  const previews = run.previews ?? [];
  view.root.dataset.previews = String(previews.length);
  const key = previews.map((p) => p.url).join("|");
  if (view.stripKey === key) return;
  view.stripKey = key;
  const grow = previews.length && !view.grown;
  view.strip.replaceChildren(
    ...previews.map((p) => {
      const box = el("div", "loralab-live-thumb");
      const img = document.createElement("img");
      img.src = p.url;
      img.alt = `preview at step ${p.step}`;
      img.title = p.count > 1 ? `step ${p.step}: the first of ${p.count} images (all in the output folder)` : `step ${p.step}`;
      img.dataset.step = String(p.step);
      box.append(img, el("span", null, p.count > 1 ? `step ${p.step} (${p.count})` : `step ${p.step}`));
      return box;
    }),
  );
  if (grow) { // room for the strip, once
    view.grown = true;
    try {
      view.node.setSize([view.node.size[0], view.node.size[1] + STRIP_HEIGHT]);
      view.node.setDirtyCanvas?.(true, true);
    } catch (err) {
      console.warn(`[${EXTENSION}] could not resize node ${view.node.id}`, err);
    }
  }
}

function show(node, run) {
  const view = ensureView(node);
  if (!view) return;
  view.run = run;
  if (!view.frame) {
    const schedule = window.requestAnimationFrame ?? ((fn) => setTimeout(fn, 16));
    view.frame = schedule(() => render(view)) || 1;
  }
}

/** Draw `run` on its node, when that node is on the canvas and is a train node. */
function attach(run) {
  let node = null;
  try {
    node = findNode(run.nodeId);
  } catch {
    node = null;
  }
  if (isTrainNode(node)) show(node, run);
}

function markPrompt(promptId, status) {
  for (const run of runs.values()) {
    if (run.status === "running" && (promptId == null || run.promptId === promptId)) {
      run.status = status;
      attach(run);
    }
  }
}

function guarded(name, fn) {
  return (event) => {
    try {
      fn(event?.detail);
    } catch (err) {
      console.warn(`[${EXTENSION}] ${name} handler failed`, err);
    }
  };
}

app.registerExtension({
  name: EXTENSION,
  setup() {
    api.addEventListener(
      EVENT,
      guarded(EVENT, (detail) => {
        if (!detail || detail.node == null) return;
        const run = updateRun(detail);
        if (run) attach(run);
      }),
    );
    api.addEventListener(
      PREVIEW_EVENT,
      guarded(PREVIEW_EVENT, (detail) => {
        if (!detail || detail.node == null) return;
        attach(runForPreview(detail));
      }),
    );
    api.addEventListener(
      "execution_error",
      guarded("execution_error", (d) => markPrompt(d?.prompt_id, "error")),
    );
    api.addEventListener(
      "execution_interrupted",
      guarded("execution_interrupted", (d) => markPrompt(d?.prompt_id, "stopped")),
    );
  },
});
