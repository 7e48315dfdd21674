"""Convert a UI-format ComfyUI workflow (what the frontend saves) into the API format (what POST /prompt takes).

The UI format stores, per node, the *widget values* as a positional list (``widgets_values``) and the
*connections* as link ids on the node's ``inputs``. The API format wants, per node, one dict entry per
backend input: a literal for widgets, ``[source_node_id, output_slot]`` for connections.

To map positions to input names we need the node definitions from ``GET /object_info``. The rules
below follow what comfyui-frontend-package 1.32.9 does when it builds widgets (checked against its
bundle, and against the stock workflow templates in tests):

* an input is a widget when its type is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO or a list of
  options, and a few frontend-only widget types) and it does not carry ``forceInput``; the option
  ``widgetType`` overrides the type;
* widgets are created in the definition's input order (``input_order`` when present, otherwise the
  order of ``required`` then ``optional``); ``hidden`` inputs are never widgets;
* an INT widget gets one extra *control* widget ("control after generate": fixed / increment / ...)
  when its option ``control_after_generate`` is truthy, or, when that option is absent, when the
  input is named ``seed`` or ``noise_seed``. An explicit ``control_after_generate: false`` turns it
  off even for ``seed``;
* a COMBO widget with ``control_after_generate`` gets two extra widgets (control mode and a filter
  list);
* a COMBO with ``image_upload`` / ``video_upload`` / ``animated_image_upload`` gets an upload button
  widget whose value is stored too.

Extra (control / upload) values are stored in ``widgets_values`` but never sent to the server.

Frontend-only nodes are resolved here, as the frontend does when it queues a prompt:
``Note`` / ``MarkdownNote`` are dropped, ``Reroute`` is followed to its source, a ``PrimitiveNode``
feeds its value into the widget it is connected to. Muted nodes (mode 2) are dropped together with
every input that comes from them; bypassed nodes (mode 4) are dropped and a consumer of one of their
outputs is wired to the bypassed node's input of the same type (same slot first, then the first one).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FRONTEND_ONLY_NODES",
    "MODE_ALWAYS",
    "MODE_BYPASS",
    "MODE_MUTED",
    "WIDGET_TYPES",
    "WidgetSlot",
    "WorkflowMismatchWarning",
    "fill_required_defaults",
    "ui_to_api",
    "widget_layout",
]

MODE_ALWAYS = 0
MODE_MUTED = 2  # "never"
MODE_BYPASS = 4

#: Input types the frontend draws as widgets (the keys of its widget registry).
WIDGET_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "STRING",
        "BOOLEAN",
        "COMBO",
        "MARKDOWN",
        "IMAGEUPLOAD",
        "COLOR",
        "IMAGECOMPARE",
        "CHART",
        "GALLERIA",
        "TEXTAREA",
    }
)

#: Nodes that exist only in the frontend; they never reach the server.
FRONTEND_ONLY_NODES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})

_DEFAULT_CONTROL_NAMES = ("seed", "noise_seed")
_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


class WorkflowMismatchWarning(UserWarning):
    """A node's ``widgets_values`` does not have the length its definition implies."""


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of ``widgets_values``: the value of ``input_name``, or an extra frontend-only widget."""

    input_name: str
    kind: str = "value"  # "value" | "control" | "filter" | "upload"

    @property
    def is_value(self) -> bool:
        return self.kind == "value"


@dataclass
class _Input:
    name: str
    type: str
    options: dict
    optional: bool


@dataclass
class _Link:
    id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


@dataclass
class _Graph:
    nodes: dict[str, dict]
    links: dict[int, _Link] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# node definitions


def _spec_type_and_options(spec: Any) -> tuple[str, dict]:
    """(type, options) of one object_info input spec such as ``["INT", {...}]`` or ``[["a", "b"]]``."""
    if isinstance(spec, str):  # hidden inputs are written as a bare type name
        return spec, {}
    if not isinstance(spec, (list, tuple)) or not spec:
        return "*", {}
    raw = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(raw, (list, tuple)):
        return "COMBO", options
    return str(raw), options


def _class_inputs(class_info: dict) -> list[_Input]:
    """The class's required and optional inputs, in the order the frontend creates them."""
    spec = class_info.get("input") or {}
    order = class_info.get("input_order") or {}
    out: list[_Input] = []
    for section in ("required", "optional"):
        entries = spec.get(section) or {}
        names = [n for n in (order.get(section) or []) if n in entries]
        names += [n for n in entries if n not in names]
        for name in names:
            typ, options = _spec_type_and_options(entries[name])
            out.append(_Input(name, typ, options, section == "optional"))
    return out


def _is_widget(inp: _Input, widget_types: frozenset[str]) -> bool:
    if inp.options.get("forceInput"):
        return False
    if inp.optional and inp.options.get("defaultInput"):  # deprecated spelling of forceInput
        return False
    typ = inp.options.get("widgetType") or inp.type
    return typ in widget_types


def widget_layout(class_info: dict, widget_types: frozenset[str] = WIDGET_TYPES) -> list[WidgetSlot]:
    """What each position of a node's ``widgets_values`` holds, for one object_info class entry."""
    layout: list[WidgetSlot] = []
    for inp in _class_inputs(class_info):
        if not _is_widget(inp, widget_types):
            continue
        typ = inp.options.get("widgetType") or inp.type
        layout.append(WidgetSlot(inp.name))
        control = inp.options.get("control_after_generate")
        if typ == "INT":
            if control is None:
                control = inp.name in _DEFAULT_CONTROL_NAMES
            if control:
                layout.append(WidgetSlot(inp.name, "control"))
        elif typ == "COMBO":
            if any(inp.options.get(k) for k in _UPLOAD_OPTIONS):
                layout.append(WidgetSlot(inp.name, "upload"))
            if control:
                layout.append(WidgetSlot(inp.name, "control"))
                layout.append(WidgetSlot(inp.name, "filter"))
    return layout


def _default_value(inp: _Input) -> Any:
    if "default" in inp.options:
        return inp.options["default"]
    if inp.type == "COMBO":
        opts = inp.options.get("options")
        return opts[0] if opts else None
    return None


def fill_required_defaults(api_prompt: dict, object_info: dict) -> dict:
    """Give every required input that a node of an API prompt leaves out its definition's default (in
    place; returns the prompt). Stock nodes gain required inputs between ComfyUI releases; a prompt
    written for an older one then still validates, with the values a person gets by default.
    Inputs without a default stay missing, and the server reports them."""
    for node in api_prompt.values():
        info = object_info.get(node.get("class_type"))
        if not info:
            continue
        for inp in _class_inputs(info):
            if not inp.optional and inp.name not in node["inputs"]:
                default = _default_value(inp)
                if default is not None:
                    node["inputs"][inp.name] = default
    return api_prompt


# --------------------------------------------------------------------------------------------------
# graph


def _parse_links(raw_links: Any) -> dict[int, _Link]:
    links: dict[int, _Link] = {}
    for raw in raw_links or []:
        if isinstance(raw, dict):  # schema version 1 spells links as objects
            link = _Link(
                int(raw["id"]),
                str(raw["origin_id"]),
                int(raw["origin_slot"]),
                str(raw["target_id"]),
                int(raw["target_slot"]),
                raw.get("type"),
            )
        elif isinstance(raw, (list, tuple)) and len(raw) >= 5:
            link = _Link(
                int(raw[0]),
                str(raw[1]),
                int(raw[2]),
                str(raw[3]),
                int(raw[4]),
                raw[5] if len(raw) > 5 else None,
            )
        else:
            raise ValueError(f"malformed link entry: {raw!r}")
        links[link.id] = link
    return links


def _node_mode(node: dict) -> int:
    try:
        return int(node.get("mode") or MODE_ALWAYS)
    except (TypeError, ValueError):
        return MODE_ALWAYS


def _types_match(a: Any, b: Any) -> bool:
    if a is None or b is None or a == "*" or b == "*":
        return True
    sa = {t.strip() for t in str(a).split(",")}
    sb = {t.strip() for t in str(b).split(",")}
    return bool(sa & sb)


_DROP = object()  # marker: the input is left out of the API prompt


class _Resolver:
    """Follows a link back to the node that will really produce its value on the server."""

    def __init__(self, graph: _Graph):
        self.graph = graph

    def resolve(self, link_id: Any, want_type: Any, depth: int = 0) -> Any:
        """``[node_id, slot]``, ``("value", v)`` for a PrimitiveNode, or _DROP."""
        if depth > 256:
            raise ValueError("link cycle through Reroute / bypassed nodes")
        if link_id is None:
            return _DROP
        link = self.graph.links.get(int(link_id))
        if link is None:
            return _DROP  # dangling link id: the frontend ignores it as well
        node = self.graph.nodes.get(link.origin_id)
        if node is None:
            return _DROP
        ntype = node.get("type")
        mode = _node_mode(node)
        if ntype == "Reroute":
            inputs = node.get("inputs") or []
            return self.resolve(inputs[0].get("link") if inputs else None, want_type, depth + 1)
        if ntype == "PrimitiveNode":
            values = node.get("widgets_values") or []
            if mode == MODE_MUTED or not values:
                return _DROP
            return ("value", values[0])
        if mode == MODE_MUTED:
            return _DROP
        if mode == MODE_BYPASS:
            return self._through_bypassed(node, link, want_type, depth)
        return [link.origin_id, link.origin_slot]

    def _through_bypassed(self, node: dict, link: _Link, want_type: Any, depth: int) -> Any:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[link.origin_slot].get("type") if link.origin_slot < len(outputs) else None
        wanted = want_type if want_type not in (None, "*") else (out_type or link.type)
        order = [link.origin_slot] + [i for i in range(len(inputs)) if i != link.origin_slot]
        for idx in order:
            if idx >= len(inputs):
                continue
            inp = inputs[idx]
            if inp.get("link") is None:
                continue
            if _types_match(inp.get("type"), wanted):
                return self.resolve(inp["link"], wanted, depth + 1)
        return _DROP


def _display_title(node: dict, class_info: dict | None) -> str:
    if node.get("title"):
        return str(node["title"])
    if class_info and class_info.get("display_name"):
        return str(class_info["display_name"])
    return str(node.get("type"))


def _widget_values_by_name(
    node: dict, class_info: dict, widget_types: frozenset[str], strict: bool
) -> dict[str, Any]:
    """Map each widget input name of ``node`` to its stored value."""
    inputs = _class_inputs(class_info)
    by_name = {i.name: i for i in inputs}
    values = node.get("widgets_values")
    result: dict[str, Any] = {}
    if isinstance(values, dict):  # some custom frontends store widgets by name
        for inp in inputs:
            if _is_widget(inp, widget_types) and inp.name in values:
                result[inp.name] = values[inp.name]
        return result

    values = list(values or [])
    layout = widget_layout(class_info, widget_types)
    if len(values) != len(layout):
        msg = (
            f"node {node.get('id')} ({node.get('type')}): widgets_values has {len(values)} entries, "
            f"its definition implies {len(layout)} "
            f"({', '.join(s.input_name if s.is_value else f'{s.input_name}:{s.kind}' for s in layout)})"
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, WorkflowMismatchWarning, stacklevel=3)
    for pos, slot in enumerate(layout):
        if not slot.is_value:
            continue
        if pos < len(values):
            result[slot.input_name] = values[pos]
        else:
            default = _default_value(by_name[slot.input_name])
            if default is not None:
                result[slot.input_name] = default
    return result


def ui_to_api(
    ui_workflow: dict,
    object_info: dict,
    *,
    strict: bool = False,
    widget_types: frozenset[str] | set[str] = WIDGET_TYPES,
    include_meta: bool = True,
) -> dict[str, dict]:
    """Convert a UI-format workflow to the API prompt format ``{node_id: {"class_type", "inputs"}}``.

    ``object_info`` is the JSON of ``GET /object_info`` of the server that will run the prompt.
    With ``strict`` a node whose ``widgets_values`` length does not match its definition raises
    ``ValueError``; otherwise a :class:`WorkflowMismatchWarning` is issued and missing trailing values
    fall back to the definition's defaults. A node type that is neither frontend-only nor in
    ``object_info`` raises ``ValueError`` naming it.
    """
    if not isinstance(ui_workflow, dict) or "nodes" not in ui_workflow:
        if (
            isinstance(ui_workflow, dict)
            and ui_workflow
            and all(isinstance(v, dict) and "class_type" in v for v in ui_workflow.values())
        ):
            raise ValueError("this workflow is already in the API format")
        raise ValueError("not a UI-format workflow: no 'nodes' list")
    widget_types = frozenset(widget_types)
    subgraph_ids = {
        str(sg.get("id"))
        for sg in ((ui_workflow.get("definitions") or {}).get("subgraphs") or [])
        if isinstance(sg, dict)
    }
    nodes: dict[str, dict] = {}
    for node in ui_workflow["nodes"]:
        nid = str(node["id"])
        if nid in nodes:
            raise ValueError(f"duplicate node id {nid}")
        nodes[nid] = node
    graph = _Graph(nodes, _parse_links(ui_workflow.get("links")))
    resolver = _Resolver(graph)

    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        ntype = node.get("type")
        if ntype in FRONTEND_ONLY_NODES:
            continue
        if _node_mode(node) in (MODE_MUTED, MODE_BYPASS):
            continue
        class_info = object_info.get(ntype)
        if class_info is None:
            if str(ntype) in subgraph_ids:
                raise ValueError(
                    f"node {nid} is a subgraph ({ntype}); subgraphs are not supported, "
                    "unpack it in the frontend first"
                )
            raise ValueError(f"node {nid}: unknown class_type {ntype!r} (not in /object_info)")

        inputs: dict[str, Any] = _widget_values_by_name(node, class_info, widget_types, strict)
        class_inputs = {i.name: i for i in _class_inputs(class_info)}
        for ui_input in node.get("inputs") or []:
            name = ui_input.get("name")
            if name is None:
                continue
            link_id = ui_input.get("link")
            if link_id is None:
                continue
            want = ui_input.get("type")
            if name in class_inputs and want in (None, "*"):
                want = class_inputs[name].type
            source = resolver.resolve(link_id, want)
            if source is _DROP:
                # Nothing reaches this input on the server: a widget keeps its own stored value,
                # a plain input is left out (as the frontend does).
                continue
            if isinstance(source, tuple):
                inputs[name] = source[1]
            else:
                inputs[name] = source
        entry: dict[str, Any] = {"class_type": ntype, "inputs": inputs}
        if include_meta:
            entry["_meta"] = {"title": _display_title(node, class_info)}
        prompt[nid] = entry
    return prompt
