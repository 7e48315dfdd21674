"""A small synchronous client for a running ComfyUI server (HTTP + websocket).

    client = ComfyClient("http://127.0.0.1:8188")
    result = client.run(api_prompt, timeout=600, on_event=lambda t, d: print(t, d))
    assert result.status == "success", result.error_message

``run`` opens the websocket first, then queues the prompt under a prompt id chosen here, so no
message of that prompt can be missed. After the terminal message it polls ``/history/{id}`` (written
just after ``execution_success``) and returns its outputs.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ComfyClient",
    "ComfyHTTPError",
    "PromptRejected",
    "RunResult",
    "RunTimeout",
    "TERMINAL_EVENTS",
]

TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")

EventCallback = Callable[[str, dict], None]


class ComfyHTTPError(RuntimeError):
    """An HTTP request to the server failed (status other than 2xx, or no answer)."""

    def __init__(self, method: str, url: str, status: int | None, body: str):
        self.method, self.url, self.status, self.body = method, url, status, body
        super().__init__(f"{method} {url} -> {status if status is not None else 'no answer'}: {body[:2000]}")


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the prompt failed validation. Carries the server's JSON body."""

    def __init__(self, body: dict, status: int = 400):
        self.body = body if isinstance(body, dict) else {"error": body}
        self.status = status
        self.error = self.body.get("error") or {}
        self.node_errors = self.body.get("node_errors") or {}
        super().__init__(self._describe())

    def _describe(self) -> str:
        err = self.error
        if isinstance(err, dict):
            head = err.get("message") or err.get("type") or "prompt rejected"
            details = err.get("details")
            lines = [f"{head}: {details}" if details else str(head)]
        else:
            lines = [str(err)]
        for node_id, info in sorted(self.node_errors.items(), key=lambda kv: str(kv[0])):
            ctype = info.get("class_type", "?") if isinstance(info, dict) else "?"
            errs = info.get("errors", []) if isinstance(info, dict) else [info]
            for e in errs:
                if isinstance(e, dict):
                    msg = e.get("message", "")
                    det = e.get("details", "")
                    lines.append(f"  node {node_id} ({ctype}): {msg}{': ' + det if det else ''}")
                else:
                    lines.append(f"  node {node_id} ({ctype}): {e}")
        return "\n".join(lines)


class RunTimeout(TimeoutError):
    """``ComfyClient.run`` ran out of time. ``events`` holds what was seen up to then."""

    def __init__(self, message: str, prompt_id: str, events: list[tuple[str, dict]]):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.events = events


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict]  # history outputs per node id (each a node's "ui" dict)
    error: dict | None  # the execution_error data (exception_type, exception_message, traceback, ...)
    events: list[tuple[str, dict]] = field(default_factory=list)
    history: dict = field(default_factory=dict)  # the full /history entry
    elapsed: float = 0.0  # seconds from queueing to the terminal message
    base_dir: pathlib.Path | None = None  # the server's base directory, when the client knows it

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error_message(self) -> str:
        """One readable paragraph about the failure ('' on success)."""
        if self.status == "success":
            return ""
        if self.status == "interrupted":
            return "execution interrupted"
        if not self.error:
            return f"execution ended with status {self.status!r}"
        e = self.error
        head = (
            f"{e.get('node_type', '?')} (node {e.get('node_id', '?')}): "
            f"{e.get('exception_type', 'error')}: {e.get('exception_message', '').strip()}"
        )
        tb = e.get("traceback") or []
        if tb:
            head += "\n" + "".join(tb if isinstance(tb, list) else [str(tb)]).rstrip()
        return head

    def events_of(self, event_type: str) -> list[dict]:
        return [d for t, d in self.events if t == event_type]


class ComfyClient:
    """HTTP + websocket client for one ComfyUI server at ``base_url`` (``http://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        http_timeout: float = 60.0,
        client_id: str | None = None,
        base_dir: pathlib.Path | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.base_dir = (
            base_dir  # the server's base directory, when known (local servers the harness started)
        )
        self.http_timeout = http_timeout
        self.client_id = client_id or uuid.uuid4().hex

    # ------------------------------------------------------------------ HTTP plumbing

    def _request(
        self, method: str, path: str, payload: Any = None, timeout: float | None = None
    ) -> tuple[int, bytes]:
        url = self.base_url + path
        data = None
        headers = {"Accept": "application/json"}
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.http_timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ComfyHTTPError(method, url, None, str(e)) from e

    def _json(self, method: str, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        status, body = self._request(method, path, payload, timeout)
        if not 200 <= status < 300:
            raise ComfyHTTPError(method, self.base_url + path, status, body.decode("utf-8", "replace"))
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError as e:
            raise ComfyHTTPError(
                method, self.base_url + path, status, "not JSON: " + body[:500].decode("utf-8", "replace")
            ) from e

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        return self._json("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: Any, timeout: float | None = None) -> Any:
        return self._json("POST", path, payload, timeout=timeout)

    # ------------------------------------------------------------------ endpoints

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json("/object_info/" + urllib.parse.quote(node_class, safe=""))

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def queue(self) -> dict:
        """``{"queue_running": [...], "queue_pending": [...]}``."""
        return self.get_json("/queue")

    def history(self, prompt_id: str | None = None, max_items: int | None = None) -> dict:
        """``/history/{prompt_id}`` (``{}`` until written, else ``{prompt_id: entry}``) or ``/history``."""
        if prompt_id is not None:
            return self.get_json("/history/" + urllib.parse.quote(prompt_id, safe=""))
        return self.get_json("/history" + (f"?max_items={int(max_items)}" if max_items else ""))

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: the running prompt (or only ``prompt_id`` when it is the running one)."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def delete_from_queue(self, prompt_ids: list[str]) -> None:
        self.post_json("/queue", {"delete": list(prompt_ids)})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, body = self._request("GET", "/view?" + q)
        if status != 200:
            raise ComfyHTTPError(
                "GET", self.base_url + "/view?" + q, status, body[:500].decode("utf-8", "replace")
            )
        return body

    def queue_prompt(
        self,
        api_prompt: dict,
        client_id: str | None = None,
        *,
        prompt_id: str | None = None,
        extra_data: dict | None = None,
        front: bool = False,
    ) -> str:
        """POST /prompt; returns the prompt id. Raises :class:`PromptRejected` on HTTP 400."""
        payload: dict[str, Any] = {"prompt": api_prompt, "client_id": client_id or self.client_id}
        if prompt_id:
            payload["prompt_id"] = prompt_id
        if extra_data:
            payload["extra_data"] = extra_data
        if front:
            payload["front"] = True
        status, body = self._request("POST", "/prompt", payload)
        text = body.decode("utf-8", "replace")
        if status == 400:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = {"error": {"type": "unknown", "message": text}}
            raise PromptRejected(parsed, status)
        if status != 200:
            raise ComfyHTTPError("POST", self.base_url + "/prompt", status, text)
        answer = json.loads(text)
        return str(answer["prompt_id"])

    def wait_for_history(self, prompt_id: str, timeout: float = 30.0, interval: float = 0.1) -> dict:
        """Poll ``/history/{prompt_id}`` until the entry exists; returns the entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = (self.history(prompt_id) or {}).get(prompt_id)
            if entry is not None:
                return entry
            if time.monotonic() >= deadline:
                raise TimeoutError(f"/history/{prompt_id} still empty after {timeout:.0f} s")
            time.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    # ------------------------------------------------------------------ websocket

    def ws_url(self, client_id: str) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}/ws?clientId={urllib.parse.quote(client_id)}"

    def run(
        self,
        api_prompt: dict,
        timeout: float = 600.0,
        on_event: EventCallback | None = None,
        *,
        extra_data: dict | None = None,
        interrupt_on_timeout: bool = True,
    ) -> RunResult:
        """Queue ``api_prompt`` and follow it to the end.

        ``on_event(type, data)`` is called for every text message that belongs to this prompt (its
        ``prompt_id``) or carries none (``status``, broadcast custom events). Binary frames
        (previews) are skipped. Raises :class:`PromptRejected` when validation fails and
        :class:`RunTimeout` after ``timeout`` seconds (the prompt is then interrupted / dequeued
        unless ``interrupt_on_timeout`` is false).
        """
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        events: list[tuple[str, dict]] = []
        started = time.monotonic()
        deadline = started + timeout
        terminal: tuple[str, dict] | None = None

        try:
            ws = websocket.create_connection(self.ws_url(client_id), timeout=min(30.0, timeout))
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyHTTPError("GET", self.ws_url(client_id), None, f"websocket: {e}") from e
        try:
            self.queue_prompt(api_prompt, client_id, prompt_id=prompt_id, extra_data=extra_data)
            ws_open = True
            while terminal is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not ws_open:
                    # Websocket lost: fall back to the history (written when the prompt ends).
                    entry = (self.history(prompt_id) or {}).get(prompt_id)
                    if entry is not None:
                        terminal = _terminal_from_history(entry, prompt_id)
                        break
                    time.sleep(min(0.5, remaining))
                    continue
                ws.settimeout(min(1.0, remaining))
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                    ws_open = False
                    continue
                if not isinstance(frame, str):
                    continue  # binary frame: a preview image, not ours to parse
                try:
                    msg = json.loads(frame)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                etype = str(msg.get("type"))
                data = msg.get("data")
                if not isinstance(data, dict):
                    data = {"value": data}
                pid = data.get("prompt_id")
                if pid is not None and pid != prompt_id:
                    continue
                events.append((etype, data))
                if on_event is not None:
                    on_event(etype, data)
                if pid == prompt_id and etype in TERMINAL_EVENTS:
                    terminal = (etype, data)
                elif pid == prompt_id and etype == "executing" and data.get("node") is None:
                    # Older servers end a prompt with executing(node=None) only.
                    entry = self.wait_for_history(prompt_id, timeout=max(1.0, deadline - time.monotonic()))
                    terminal = _terminal_from_history(entry, prompt_id)
        finally:
            with contextlib.suppress(Exception):
                ws.close()

        elapsed = time.monotonic() - started
        if terminal is None:
            if interrupt_on_timeout:
                with contextlib.suppress(Exception):
                    self.delete_from_queue([prompt_id])
                with contextlib.suppress(Exception):
                    self.interrupt(prompt_id)
            raise RunTimeout(f"prompt {prompt_id} did not finish within {timeout:.0f} s", prompt_id, events)

        etype, data = terminal
        status = {
            "execution_success": "success",
            "execution_error": "error",
            "execution_interrupted": "interrupted",
        }.get(etype, "error")
        history_timeout = max(10.0, deadline - time.monotonic())
        entry = self.wait_for_history(prompt_id, timeout=history_timeout)
        return RunResult(
            prompt_id=prompt_id,
            status=status,
            outputs=dict(entry.get("outputs") or {}),
            error=dict(data) if etype == "execution_error" else None,
            events=events,
            history=entry,
            elapsed=elapsed,
            base_dir=self.base_dir,
        )


def _terminal_from_history(entry: dict, prompt_id: str) -> tuple[str, dict]:
    """The terminal event of a finished prompt, rebuilt from its history entry's status messages."""
    status = entry.get("status") or {}
    for msg in reversed(status.get("messages") or []):
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in TERMINAL_EVENTS:
            data = dict(msg[1]) if isinstance(msg[1], dict) else {}
            data.setdefault("prompt_id", prompt_id)
            return msg[0], data
    if status.get("status_str") == "success":
        return "execution_success", {"prompt_id": prompt_id}
    return "execution_error", {"prompt_id": prompt_id, "exception_message": "unknown error (see server log)"}
