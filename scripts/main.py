"""The main job: train a LoRA on the tiny SD3 model through a real ComfyUI, end to end.

Starts ComfyUI (base directory .comfyui/base) on a free loopback port, converts the example workflow
(UI format, as the frontend saves it) to a prompt against the live /object_info, runs it while printing
progress, then prints where the LoRA file and the loss plot went, and stops the server.

    bash scripts/main.sh                      # set-up + this script
    .venv/bin/python scripts/main.py --steps 100 --keep-server

Exit codes: 0 success, 1 execution error, 2 prompt rejected / bad workflow, 3 server did not start,
4 timeout, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.client import ComfyClient, ComfyHTTPError, PromptRejected, RunResult, RunTimeout  # noqa: E402
from harness.server import PEOPLE_BASE_DIR, ComfyServer, ServerStartError, prepare_base_dir  # noqa: E402
from harness.workflow import ui_to_api  # noqa: E402

DEFAULT_WORKFLOW = ROOT / "example_workflows" / "loralab_tiny_sd3_lora.json"
TRAINER_CLASSES = ("LoraLab_TrainLoraNode",)
PROGRESS_EVENT = "loralab.progress"

EXIT_OK, EXIT_EXEC_ERROR, EXIT_BAD_PROMPT, EXIT_NO_SERVER, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def say(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workflow",
        type=pathlib.Path,
        default=DEFAULT_WORKFLOW,
        help="UI-format workflow JSON (default: %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=None, help="override the trainer's steps")
    ap.add_argument(
        "--keep-server",
        action="store_true",
        help="leave ComfyUI running after the job (until Ctrl-C) to look at the result in a browser",
    )
    ap.add_argument(
        "--base-dir",
        type=pathlib.Path,
        default=PEOPLE_BASE_DIR,
        help="ComfyUI base directory (default: %(default)s)",
    )
    ap.add_argument("--port", type=int, default=None, help="port for ComfyUI (default: a free one)")
    ap.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds allowed for the run (default: 3600)"
    )
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds allowed for ComfyUI to start")
    ap.add_argument("--quiet-progress", action="store_true", help="print every 10th progress line only")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


# ------------------------------------------------------------------------------------------ progress


class ProgressPrinter:
    """Turns websocket events into console lines and keeps the training speed."""

    def __init__(self, prompt: dict, quiet: bool = False):
        self.prompt = prompt
        self.quiet = quiet
        self.custom_nodes: set[str] = (
            set()
        )  # nodes that send loralab.progress (their plain progress is muted)
        self.last_custom: dict | None = None
        self.first_step_at: tuple[float, int] | None = None
        self.last_step_at: tuple[float, int] | None = None
        self.current: str | None = None

    def _label(self, node_id) -> str:
        entry = self.prompt.get(str(node_id)) or {}
        title = (entry.get("_meta") or {}).get("title")
        ctype = entry.get("class_type", "?")
        return f"node {node_id} ({title})" if title and title != ctype else f"node {node_id} ({ctype})"

    def _show(self, step: int, total: int) -> bool:
        if not self.quiet:
            return True
        return step in (1, total) or step % 10 == 0

    def __call__(self, etype: str, data: dict) -> None:
        now = time.monotonic()
        if etype == "execution_start":
            say("execution started")
        elif etype == "execution_cached":
            nodes = data.get("nodes") or []
            if nodes:
                say(f"cached: {', '.join(self._label(n) for n in nodes)}")
        elif etype == "executing":
            node = data.get("node")
            if node is not None and node != self.current:
                self.current = node
                say(f"running {self._label(node)}")
        elif etype == "progress":
            node = str(data.get("node"))
            if node in self.custom_nodes:
                return
            value, maximum = int(data.get("value", 0)), int(data.get("max", 0))
            if self._show(value, maximum):
                say(f"  {self._label(node)}: {value}/{maximum}")
        elif etype == PROGRESS_EVENT:
            node = str(data.get("node"))
            self.custom_nodes.add(node)
            self.last_custom = data
            step, total = int(data.get("step", 0)), int(data.get("total", 0))
            if self.first_step_at is None:
                self.first_step_at = (now, step)
            self.last_step_at = (now, step)
            if self._show(step, total):
                say("  " + format_step(data))
        elif etype == "executed":
            node = data.get("node")
            if node is not None:
                say(f"done {self._label(node)}")
        elif etype == "execution_interrupted":
            say("execution interrupted")

    def steps_per_s(self) -> float | None:
        if self.last_custom and isinstance(self.last_custom.get("steps_per_s"), (int, float)):
            return float(self.last_custom["steps_per_s"])
        if self.first_step_at and self.last_step_at and self.last_step_at[1] > self.first_step_at[1]:
            dt = self.last_step_at[0] - self.first_step_at[0]
            if dt > 0:
                return (self.last_step_at[1] - self.first_step_at[1]) / dt
        return None


def format_step(data: dict) -> str:
    """``step 3/40 loss 0.8123 lr 1.0e-03 12.3 it/s`` from a loralab.progress event."""
    parts = [f"step {int(data.get('step', 0))}/{int(data.get('total', 0))}"]
    loss = data.get("loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.4f}")
    lr = data.get("lr")
    if isinstance(lr, (int, float)):
        parts.append(f"lr {lr:.1e}")
    sps = data.get("steps_per_s")
    if isinstance(sps, (int, float)):
        parts.append(f"{sps:.1f} it/s")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ job


def load_prompt(client: ComfyClient, workflow: pathlib.Path, steps: int | None) -> dict:
    try:
        ui = json.loads(workflow.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read workflow {workflow}: {e}") from e
    prompt = ui_to_api(ui, client.object_info())
    if steps is not None:
        trainers = [k for k, v in prompt.items() if v["class_type"] in TRAINER_CLASSES]
        if not trainers:
            raise ValueError(f"--steps given, but {workflow.name} has no {' / '.join(TRAINER_CLASSES)} node")
        for k in trainers:
            if isinstance(prompt[k]["inputs"].get("steps"), list):
                raise ValueError(f"--steps given, but the steps of node {k} come from a link")
            prompt[k]["inputs"]["steps"] = int(steps)
    return prompt


def output_paths(result: RunResult, base_dir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """(LoRA files, images) named by the history outputs, as absolute paths."""
    folders = {"output": base_dir / "output", "temp": base_dir / "temp", "input": base_dir / "input"}
    loras, images = [], []
    for _node_id, ui in sorted(result.outputs.items()):
        for item in ui.get("loras") or []:
            p = item.get("path")
            if p and pathlib.Path(p).is_absolute():
                loras.append(pathlib.Path(p))
            else:
                root = base_dir / "models" / "loras"
                loras.append((root / (item.get("subfolder") or "") / item["filename"]).absolute())
        for item in ui.get("images") or []:
            root = folders.get(item.get("type", "output"), folders["output"])
            images.append((root / (item.get("subfolder") or "") / item["filename"]).absolute())
    return loras, images


# What the main job calls the images of each node class ("image" for others).
IMAGE_LABELS = {"LoraLab_PlotLoss": "loss plot", "SaveImage": "previews"}


def report(
    result: RunResult, printer: ProgressPrinter, base_dir: pathlib.Path, prompt: dict | None = None
) -> None:
    loras, _ = output_paths(result, base_dir)
    say("")
    for p in loras:
        say(f"LoRA file:  {p}" + ("" if p.exists() else "  (missing!)"))
    if not loras:
        say("LoRA file:  (no Save LoRA output in the history)")
    shown = 0
    for node_id, ui in sorted(result.outputs.items()):
        _, images = output_paths(RunResult(result.prompt_id, result.status, {node_id: ui}, None), base_dir)
        label = IMAGE_LABELS.get(((prompt or {}).get(node_id) or {}).get("class_type", ""), "image")
        for p in images:
            say(f"{label + ':':<11} {p}" + ("" if p.exists() else "  (missing!)"))
            shown += 1
    if not shown:
        say("loss plot:  (no image output in the history)")
    sps = printer.steps_per_s()
    last = printer.last_custom or {}
    if sps is not None:
        extra = f", final loss {last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else ""
        say(f"speed:      {sps:.1f} steps/s ({last.get('total', '?')} steps{extra})")
    say(f"run time:   {result.elapsed:.1f} s")


def _prune_logs(log_dir: pathlib.Path, keep: int) -> None:
    """Keep only the newest ``keep`` main-job logs."""
    logs = sorted(log_dir.glob("main-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[: max(0, len(logs) - keep)]:
        with contextlib.suppress(OSError):
            old.unlink()


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_dir = args.base_dir.resolve()
    workflow = args.workflow.resolve()
    if not workflow.is_file():
        say(f"error: no workflow at {workflow}")
        return EXIT_BAD_PROMPT
    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)

    prepare_base_dir(base_dir)
    log_dir = base_dir.parent / "logs"
    _prune_logs(log_dir, keep=20)
    log_path = log_dir / f"main-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    server = ComfyServer(base_dir, port=args.port, log_path=log_path)
    client: ComfyClient | None = None
    running_prompt = False
    finished_rc: int | None = None  # the job's exit code once the run is over (--keep-server waits after)
    try:
        say(f"starting ComfyUI (base {base_dir}, log {log_path})")
        ready = server.start_and_wait(timeout=args.start_timeout)
        say(f"ComfyUI ready at {server.url} after {ready:.1f} s")
        client = server.client()

        prompt = load_prompt(client, workflow, args.steps)
        trainers = [k for k, v in prompt.items() if v["class_type"] in TRAINER_CLASSES]
        say(
            f"workflow {workflow.name}: {len(prompt)} nodes"
            + (
                f", trainer node {', '.join(trainers)} with {prompt[trainers[0]]['inputs'].get('steps')} steps"
                if trainers
                else ""
            )
        )
        printer = ProgressPrinter(prompt, quiet=args.quiet_progress)
        running_prompt = True
        result = client.run(prompt, timeout=args.timeout, on_event=printer)
        running_prompt = False

        if result.status == "success":
            report(result, printer, base_dir, prompt)
            finished_rc = EXIT_OK
        else:
            say("")
            say(f"FAILED ({result.status}): {result.error_message}")
            say(f"server log: {log_path}")
            finished_rc = EXIT_EXEC_ERROR
        if args.keep_server:
            say("")
            say(f"ComfyUI keeps running at {server.url}/  (Ctrl-C to stop)")
            while server.is_running():
                time.sleep(0.5)
            say("ComfyUI exited")
        return finished_rc
    except ServerStartError as e:
        say(f"error: ComfyUI did not start: {e}")
        return EXIT_NO_SERVER
    except PromptRejected as e:
        say(f"error: the server rejected the prompt:\n{e}")
        return EXIT_BAD_PROMPT
    except ValueError as e:
        say(f"error: {e}")
        return EXIT_BAD_PROMPT
    except RunTimeout as e:
        say(f"error: {e}")
        return EXIT_TIMEOUT
    except ComfyHTTPError as e:
        say(f"error: lost the server: {e}")
        say("--- server log tail ---\n" + server.log_tail(40))
        return EXIT_EXEC_ERROR
    except (KeyboardInterrupt, _Terminated):
        say("\nstopping ComfyUI" if finished_rc is not None else "\ninterrupted; stopping")
        if running_prompt and client is not None:
            with contextlib.suppress(Exception):
                client.interrupt()
        return finished_rc if finished_rc is not None else EXIT_INTERRUPTED
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave ComfyUI behind.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
