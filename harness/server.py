"""Start and stop a real ComfyUI server (a subprocess) for tests and scripts.

    with ComfyServer(base_dir) as server:          # started and ready
        client = server.client()
        ...
    # stopped: the whole process group got SIGTERM, then SIGKILL if needed

The server runs in its own process group (session), so ``stop()`` also ends anything it spawned.
Its stdout and stderr go to one log file (``log_text()`` / ``log_tail()``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence

__all__ = [
    "COMFY_DIR",
    "DATASET_NAME",
    "MODEL_NAME",
    "PACK_NAME",
    "PEOPLE_BASE_DIR",
    "REPO_ROOT",
    "ComfyServer",
    "ServerStartError",
    "cuda_available",
    "find_free_port",
    "prepare_base_dir",
    "write_stock_dataset",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
COMFY_DIR = REPO_ROOT / ".comfyui" / "ComfyUI"
PEOPLE_BASE_DIR = REPO_ROOT / ".comfyui" / "base"
PACK_NAME = "comfyui-lora-lab"
#: The tests' own custom node (tiny models of every family), installed into test servers only.
TESTKIT_DIR = REPO_ROOT / "tests" / "comfy_testkit"
TESTKIT_NAME = "loralab-testkit"
MODEL_NAME = "loralab-tiny-sd3.safetensors"
DATASET_NAME = "loralab-tiny-dataset.safetensors"

#: Sub-folders of a ComfyUI base directory that the pack and the tests use.
BASE_SUBDIRS = (
    "custom_nodes",
    "input",
    "output",
    "temp",
    "user",
    "models/diffusion_models",
    "models/checkpoints",
    "models/loras",
    "models/vae",
    "models/text_encoders",
)

_LIVE_SERVERS: weakref.WeakSet[ComfyServer] = weakref.WeakSet()


class ServerStartError(RuntimeError):
    """ComfyUI did not come up; the message carries the tail of its log."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (bind port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_CUDA_CACHE: dict[str, bool] = {}


def cuda_available(python: str | os.PathLike = sys.executable, timeout: float = 30.0) -> bool:
    """Whether ComfyUI under ``python`` can use a GPU (decides ``--cpu``). Cheap: torch is not imported.

    True when that environment's torch is a CUDA / ROCm build *and* the machine has the device nodes
    (``/dev/nvidia0`` / ``/dev/kfd``). ``LORALAB_COMFY_CPU=1`` / ``0`` forces the answer (1 means: run
    ComfyUI with ``--cpu``).
    """
    forced = os.environ.get("LORALAB_COMFY_CPU")
    if forced is not None and forced.strip() != "":
        return forced.strip().lower() in ("0", "false", "no")
    key = str(python)
    if key not in _CUDA_CACHE:
        code = "import importlib.util; s = importlib.util.find_spec('torch'); print(s.origin if s else '')"
        gpu = False
        try:
            out = subprocess.run([key, "-c", code], capture_output=True, text=True, timeout=timeout).stdout
            origin = out.strip()
            if origin:
                text = (pathlib.Path(origin).parent / "version.py").read_text(errors="replace")
                builds = {
                    m.group(1): m.group(2).strip()
                    for m in re.finditer(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+)$", text, re.MULTILINE)
                }
                cuda_build = builds.get("cuda", "None") not in ("None", "")
                hip_build = builds.get("hip", "None") not in ("None", "")
                gpu = (cuda_build and os.path.exists("/dev/nvidia0")) or (
                    hip_build and os.path.exists("/dev/kfd")
                )
        except (OSError, subprocess.TimeoutExpired):
            gpu = False
        _CUDA_CACHE[key] = gpu
    return _CUDA_CACHE[key]


def _link(target: pathlib.Path, link: pathlib.Path) -> None:
    """Make ``link`` a symlink to ``target`` (replacing a stale link, never a real file or folder)."""
    if link.is_symlink():
        if pathlib.Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        return  # a real file / folder is there already: keep it
    link.symlink_to(target, target_is_directory=target.is_dir())


def write_stock_dataset(
    base_dir: str | os.PathLike, folder: str, latents: list, conditioning: list
) -> pathlib.Path:
    """A dataset that stock ``LoadTrainingDataset`` reads, in every layout it has used: one shard
    (``shard_0000.pkl``, torch.save of {"latents": [LATENT, ...], "conditioning": [CONDITIONING, ...]},
    loaded with weights_only=True) under ``output/<folder>`` (ComfyUI 0.3.x) and under
    ``datasets/<folder>`` beside a ``metadata.json`` (newer releases list only folders that have one)."""
    import json

    import torch  # the harness itself does not need torch; callers that write datasets have it

    base = pathlib.Path(base_dir)
    shard = {"latents": latents, "conditioning": conditioning}
    written = []
    for root in ("output", "datasets"):
        target = base / root / folder
        target.mkdir(parents=True, exist_ok=True)
        torch.save(shard, target / "shard_0000.pkl")
        written.append(target)
    (written[1] / "metadata.json").write_text(json.dumps({"loralab": "dataset written by the test harness"}))
    return written[0]


def prepare_base_dir(
    base_dir: str | os.PathLike,
    pack_root: str | os.PathLike = REPO_ROOT,
    *,
    source_base: str | os.PathLike | None = PEOPLE_BASE_DIR,
    with_models: bool = True,
    testkit: bool = False,
) -> pathlib.Path:
    """Lay out a ComfyUI base directory with this pack installed and the tiny model + dataset in place.

    Creates ``models/...``, ``input/``, ``output/``, ``temp/``, ``user/``, ``custom_nodes/`` and the
    symlink ``custom_nodes/comfyui-lora-lab -> pack_root`` (with ``testkit``, also
    ``custom_nodes/loralab-testkit -> tests/comfy_testkit``, the tests' tiny-family node). The tiny SD3 model and the dataset are
    symlinked from ``source_base`` (the set-up script's ``.comfyui/base``) when it has them, otherwise
    written by ``scripts/make_tiny_models.py`` (which imports comfy, ~5 s). Idempotent.
    """
    base = pathlib.Path(base_dir).resolve()
    pack = pathlib.Path(pack_root).resolve()
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(pack, base / "custom_nodes" / PACK_NAME)
    if testkit:
        _link(TESTKIT_DIR, base / "custom_nodes" / TESTKIT_NAME)
    if not with_models:
        return base

    wanted = {
        pathlib.Path("models/diffusion_models") / MODEL_NAME,
        pathlib.Path("input") / DATASET_NAME,
    }
    missing = []
    src = pathlib.Path(source_base).resolve() if source_base is not None else None
    for rel in sorted(wanted):
        dest = base / rel
        if dest.exists():
            continue
        if src is not None and src != base and (src / rel).is_file():
            if rel.parts[0] == "input":
                # Newer ComfyUI refuses input files whose real path leaves input/ (symlinks): copy.
                shutil.copyfile(src / rel, dest)
            else:
                _link((src / rel).resolve(), dest)
        else:
            missing.append(rel)
    if missing:
        _write_tiny_models(base, pack)
        still = [rel for rel in missing if not (base / rel).exists()]
        if still:
            raise FileNotFoundError(f"make_tiny_models did not write {', '.join(map(str, still))}")
    return base


def _write_tiny_models(base: pathlib.Path, pack: pathlib.Path) -> None:
    scripts = str(pack / "scripts")
    root = str(pack)
    added = [p for p in (root, scripts) if p not in sys.path]
    sys.path[:0] = added
    try:
        import make_tiny_models  # type: ignore[import-not-found]

        make_tiny_models.write_all(base, seed=0, quiet=True)
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the process that started it dies
    (a test run killed with SIGKILL then leaves no ComfyUI behind)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort only
        pass


class ComfyServer:
    """A ComfyUI subprocess on a loopback port, with its log in a file.

    ``extra_args`` are appended to ComfyUI's command line. ``cpu=None`` passes ``--cpu`` when torch
    sees no GPU (see :func:`cuda_available`). ``database_url=""`` puts ComfyUI's sqlite database in
    ``<base_dir>/user/``; ``None`` keeps ComfyUI's default.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        *,
        comfy_dir: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        cpu: bool | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        database_url: str | None = "",
    ):
        self.base_dir = pathlib.Path(base_dir).resolve()
        # LORALAB_COMFY_DIR / LORALAB_COMFY_PYTHON run everything against another ComfyUI (and its venv),
        # e.g. the newest release for a compatibility check.
        self.comfy_dir = pathlib.Path(comfy_dir or os.environ.get("LORALAB_COMFY_DIR") or COMFY_DIR).resolve()
        self.python = str(python or os.environ.get("LORALAB_COMFY_PYTHON") or sys.executable)
        self.host = host
        self._fixed_port = port
        self.port: int | None = port
        self.log_path = pathlib.Path(log_path) if log_path else self.base_dir / "comfyui-server.log"
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        # ComfyUI's default database lives inside its own tree (shared, and absent here): give each
        # base directory its own. None leaves ComfyUI's default.
        if database_url == "":
            database_url = f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"
        self.database_url = database_url
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ready_after: float | None = None  # seconds from start() to the first 200 of /object_info
        self._log_file = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kwargs):
        from .client import ComfyClient

        return ComfyClient(self.url, base_dir=self.base_dir, **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        main_py = self.comfy_dir / "main.py"
        cmd = [
            self.python,
            "-u",
            str(main_py),
            "--listen",
            self.host,
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
        ]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        cpu = self.cpu if self.cpu is not None else not cuda_available(self.python)
        if cpu:
            cmd.append("--cpu")
        return cmd + self.extra_args

    def start(self) -> ComfyServer:
        """Launch the process (does not wait; see :meth:`wait_ready`)."""
        if self.is_running():
            return self
        main_py = self.comfy_dir / "main.py"
        if not main_py.is_file():
            raise ServerStartError(f"no ComfyUI at {self.comfy_dir} (run: bash scripts/setup.sh)")
        if not (self.base_dir / "custom_nodes").is_dir():
            raise ServerStartError(
                f"{self.base_dir} is not a prepared base directory (no custom_nodes/); "
                "call harness.server.prepare_base_dir() first"
            )
        if self._fixed_port is None:
            self.port = find_free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        env.update(self.env)
        self.started_at = time.monotonic()
        self.ready_after = None
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.base_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: stop() kills it as a whole
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        _LIVE_SERVERS.add(self)
        return self

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> float:
        """Poll ``GET /object_info`` until it answers 200; returns the seconds since start().

        Raises :class:`ServerStartError` with the log tail when the process exits or on timeout.
        """
        if self.proc is None:
            raise RuntimeError("start() the server first")
        deadline = time.monotonic() + timeout
        last_err: str = ""
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerStartError(
                    f"ComfyUI exited with code {rc} before it was ready\n--- log tail ---\n{self.log_tail(60)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=min(30.0, timeout)) as r:
                    if r.status == 200:
                        json.loads(r.read())  # a complete answer, not a half-started server
                        self.ready_after = time.monotonic() - (self.started_at or time.monotonic())
                        return self.ready_after
                    last_err = f"HTTP {r.status}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError) as e:
                last_err = str(e)
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"ComfyUI not ready after {timeout:.0f} s at {self.url} (last error: {last_err})\n"
                    f"--- log tail ---\n{self.log_tail(60)}"
                )
            time.sleep(interval)

    def start_and_wait(self, timeout: float = 120.0, retries: int = 2) -> float:
        """start() + wait_ready(); on a lost port race ("address already in use") retry on a new port."""
        for attempt in range(retries + 1):
            self.start()
            try:
                return self.wait_ready(timeout)
            except ServerStartError:
                log = self.log_text()
                in_use = "address already in use" in log.lower() or "errno 98" in log.lower()
                self.stop()
                if not in_use or self._fixed_port is not None or attempt == retries:
                    raise
        raise AssertionError("unreachable")

    def stop(self, grace: float = 5.0) -> int | None:
        """End the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent.

        Returns the exit code (None when it was never started).
        """
        proc = self.proc
        if proc is None:
            self._close_log()
            return None
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
        # Children of the group that outlived the leader (rare) get the same treatment.
        self._signal_group(proc.pid, signal.SIGKILL)
        self._close_log()
        _LIVE_SERVERS.discard(self)
        return proc.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    # ------------------------------------------------------------------ log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 200) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> ComfyServer:
        try:
            self.start_and_wait()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        port = self.port if self.port is not None else "-"
        return f"<ComfyServer {state} pid={self.pid} port={port} base={self.base_dir}>"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop(grace=2.0)
