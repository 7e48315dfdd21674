"""Our LoraLab_TrainLoraNode against ComfyUI's built-in TrainLoraNode, in one real ComfyUI server.

Runs the two nodes alternately (A B A B ...) on the same generated model, data and settings and
prints, per node: steps/s (from websocket progress messages, first to last), the server's peak RSS
over a fresh server's life (VmRSS sampled every 10 ms; Linux; each run gets its own server), and the denoising loss on the training
latents after training (LoraLab_DenoiseLoss on the MODEL each node returns: fixed noise levels and
noise, identical for both). Then the ratios ours / built-in as medians.

    .venv/bin/python benchmarks/compare_builtin.py [--pairs 3] [--steps 60] [--dtypes fp32 bf16]
        [--arch sd3|sd15mini|sd15|sdxl] [--depth N] [--size S] [--batch B] [--algorithm LoRA|LoHa|LoKr|OFT]

On a CUDA machine (ComfyUI then runs without --cpu) memory is the server process's GPU memory as
nvidia-smi reports it (sampled every 50 ms), and the model FLOP utilisation is printed: MFU =
3 x forward FLOPs of the base model per step (counted by torch's FlopCounterMode on meta tensors) x
steps/s / the card's peak dense bf16 FLOP/s (--peak-tflops, else looked up from the GPU's name).
`--arch sd15` / `sdxl` write full-size SD1.5 (860 M) / SDXL (2.6 B) UNets with random weights in bf16.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.server import MODEL_NAME, ComfyServer, prepare_base_dir, write_stock_dataset  # noqa: E402
from harness.workflow import fill_required_defaults  # noqa: E402


def prompt(node: str, infos: dict, steps: int, dtype: str, seed: int, rank: int, lr: float, model: str = MODEL_NAME,
           evaluate: bool = True, batch: int = 1, algorithm: str = "LoRA") -> dict:  # fmt: skip
    """The training graph for `node` (`infos`: /object_info of it and of LoraModelLoader). Inputs a newer ComfyUI added to
    its built-in node (offloading, bucket_mode, ...) get that node's own defaults; where the built-in
    returns no MODEL (newer releases), stock LoraModelLoader applies its LORA_MODEL for evaluation."""
    train_inputs = {
        "model": ["1", 0], "latents": ["2", 0], "positive": ["2", 1],
        "batch_size": batch, "grad_accumulation_steps": 1, "steps": steps, "learning_rate": lr, "rank": rank,
        "optimizer": "AdamW", "loss_function": "MSE", "seed": seed, "training_dtype": dtype, "lora_dtype": dtype,
        "algorithm": algorithm, "gradient_checkpointing": True, "existing_lora": "[None]",
    }  # fmt: skip
    outputs = list(infos[node]["output"])
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        # The built-in node crashes on a single LATENT batch (UnboundLocalError: multi_res), so both
        # nodes get the data as lists from stock LoadTrainingDataset (shards written below).
        "2": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": SHARD_FOLDER}},
        "3": {"class_type": node, "inputs": train_inputs},
    }
    trained = ["3", outputs.index("MODEL")] if "MODEL" in outputs else ["5", 0]
    if "MODEL" not in outputs:
        lora = {"model": ["1", 0], "lora": ["3", outputs.index("LORA_MODEL")], "strength_model": 1.0}
        graph["5"] = {"class_type": "LoraModelLoader", "inputs": lora}
    # Evaluating needs the returned MODEL in memory as ComfyUI applies it for sampling; the warm-up
    # run only plots its loss, so the memory of that application is not counted as training's.
    graph["4"] = (
        {"class_type": "LoraLab_DenoiseLoss",
         "inputs": {"model": trained, "latents": ["2", 0], "positive": ["2", 1], "seed": 0, "levels": 8}}
        if evaluate else
        {"class_type": "LoraLab_PlotLoss", "inputs": {"loss": ["3", outputs.index("LOSS_MAP")], "filename_prefix": "bench/warmup"}}
    )  # fmt: skip
    return fill_required_defaults(graph, infos)


SHARD_FOLDER = "loralab_bench_dataset"


# arch -> (latent channels, context width, context tokens, pooled width; 0 = none)
DATA_SHAPES = {
    "sd3": (16, 64, 8, 64),
    "sd15mini": (4, 768, 77, 0),
    "sd15": (4, 768, 77, 0),
    "sdxl": (4, 2048, 77, 1280),
}


def write_model(base: pathlib.Path, arch: str, depth: int) -> str:
    """An SD3/MMDiT of the given depth (hidden 64*depth), the mini SD1.5 UNet or a full-size SD1.5 /
    SDXL UNet (bf16), seeded like the tiny default."""
    if arch == "sd3" and depth == 2:
        return MODEL_NAME
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_state_dict, sd15_mini_state_dict, unet_state_dict

    if arch in ("sd15", "sdxl"):
        import torch

        name, sd = f"loralab-bench-{arch}-random.safetensors", unet_state_dict(arch, 0, torch.bfloat16)
    elif arch == "sd15mini":
        name, sd = "loralab-bench-sd15-mini.safetensors", sd15_mini_state_dict(0)
    else:
        name, sd = f"loralab-bench-sd3-d{depth}.safetensors", mmdit_state_dict(depth, 64, 64, 32, 0)
    save_file(sd, str(base / "models" / "diffusion_models" / name))
    return name


def write_shards(base: pathlib.Path, arch: str, size: int, n: int = 4) -> None:
    """A dataset of n latents (size x size) as the shard file stock LoadTrainingDataset reads: one
    latent and one conditioning per list entry."""

    from training.tinydata import make_latent_dataset

    channels, ctx, tokens, pooled = DATA_SHAPES[arch]
    data = make_latent_dataset(n=n, channels=channels, height=size, width=size, context_dim=ctx, tokens=tokens,
                               pooled_dim=max(pooled, 1))  # fmt: skip
    n = data["latents"].shape[0]
    opts = [{"pooled_output": data["pooled"][i : i + 1].clone()} if pooled else {} for i in range(n)]
    write_stock_dataset(
        base,
        SHARD_FOLDER,
        [{"samples": data["latents"][i : i + 1].clone()} for i in range(n)],
        [[[data["context"][i : i + 1].clone(), opts[i]]] for i in range(n)],
    )


class RssSampler:
    """Peak resident memory of a process during a block, sampled from /proc every 10 ms (the kernel's
    own high-water mark cannot be reset on every machine), overall and per phase: `phase` is set
    from the websocket's "executing" messages, so the training node's own peak is kept apart from
    model loading and from the evaluation node that runs after it."""

    def __init__(self, pid: int):
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self.phase, self.phase_peak_kib = "", {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    interval = 0.01

    def read_kib(self) -> int | None:
        """The process's resident memory now (KiB)."""
        with open(f"/proc/{self.pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = self.read_kib()
            if kib is not None:
                self.peak_kib = max(self.peak_kib, kib)
                self.phase_peak_kib[self.phase] = max(self.phase_peak_kib.get(self.phase, 0), kib)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class GpuMemorySampler(RssSampler):
    """The same, for the process's GPU memory as nvidia-smi reports it (CUDA context included), every
        50 ms; fields keep the RSS names (KiB). Inside a container nvidia-smi often lists processes by
        the host's PIDs (or not at all); then the memory used on the whole GPU is taken instead, which
        is the server's as long as nothing else runs on the card during the benchmark (said once; from then
    on only the card is asked, one nvidia-smi call per sample)."""

    interval = 0.05

    def __init__(self, pid: int):
        super().__init__(pid)
        self.whole_gpu = False

    def read_kib(self) -> int | None:
        apps = "" if self.whole_gpu else _nvidia_smi("--query-compute-apps=pid,used_memory")
        for line in apps.splitlines():
            pid, _, mib = line.partition(",")
            if pid.strip() == str(self.pid) and mib.strip().isdigit():
                return int(mib) * 1024
        used = _nvidia_smi("--query-gpu=memory.used").splitlines()
        if not used or not used[0].strip().isdigit():
            return None
        if not self.whole_gpu:
            self.whole_gpu = True
            print(
                f"nvidia-smi does not list pid {self.pid}: GPU memory is the whole card's (keep it free of other work)"
            )
        return int(used[0]) * 1024


def _nvidia_smi(query: str) -> str:
    """nvidia-smi's CSV answer without header or units ("" when it cannot run)."""
    try:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, check=False, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""


# Dense bf16 peak FLOP/s by GPU name (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0}  # fmt: skip


def gpu_name() -> str | None:
    out = _nvidia_smi("--query-gpu=name")
    return out.splitlines()[0].strip() if out.strip() else None


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # first match: "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def forward_flops(arch: str, depth: int, size: int, batch: int) -> float:
    """FLOPs of one forward of the base model at this batch and latent size, counted by torch's
    FlopCounterMode on meta tensors (matmuls, convolutions, attention; elementwise ops are not
    counted), with ComfyUI's own model class."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_meta, unet_meta

    channels, ctx, tokens, pooled = DATA_SHAPES[arch]
    net = mmdit_meta(depth, ctx, pooled, 32) if arch == "sd3" else unet_meta(arch)
    import comfy.model_management  # on the path now: make_tiny_models put ComfyUI there

    with torch.device("meta"):
        x = torch.empty(batch, channels, size, size)
        kwargs = {"context": torch.empty(batch, tokens, ctx)}
        if pooled:
            kwargs["y"] = torch.empty(batch, 2816 if arch == "sdxl" else pooled)
        # ComfyUI's CPU attention asks how much memory is free, which meta tensors cannot answer.
        free = comfy.model_management.get_free_memory

        def plenty(dev=None, torch_free_too=False):
            return (1 << 40, 1 << 40) if torch_free_too else 1 << 40

        comfy.model_management.get_free_memory = plenty
        try:
            with FlopCounterMode(display=False) as counter:
                net(x, torch.empty(batch), **kwargs)
        finally:
            comfy.model_management.get_free_memory = free
    return float(counter.get_total_flops())


def run_one(client, node: str, infos: dict, rss: RssSampler | None = None, **kw) -> dict:
    times: list[tuple[float, int]] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "executing" and rss is not None:
            rss.phase = str(data.get("node"))
        if kind == "progress" and str(data.get("node")) == "3":
            times.append((time.perf_counter(), int(data["value"])))

    res = client.run(prompt(node, infos, **kw), timeout=1800, on_event=on_event)
    if res.status != "success":
        raise SystemExit(f"{node} failed: {res.error_message}")
    (t0, v0), (t1, v1) = times[0], times[-1]
    return {
        "steps_per_s": (v1 - v0) / (t1 - t0) if t1 > t0 else float("nan"),
        "denoise_loss": float(res.outputs["4"]["loss"][0])
        if "loss" in res.outputs.get("4", {})
        else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument(
        "--arch",
        choices=sorted(DATA_SHAPES),
        default="sd3",
        help="sd3 (MMDiT of --depth), sd15mini (mini SD1.5 UNet), sd15 / sdxl (full-size, random weights)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=1,
        help="batch_size of both nodes (the dataset has max(4, batch) latents)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--depth", type=int, default=2, help="SD3/MMDiT depth (2 = the tiny default; 4, 8 ...)")
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--algorithm", default="LoRA", help="LoRA, LoHa, LoKr or OFT (what both nodes offer)")
    args = ap.parse_args()
    nodes = {"ours": "LoraLab_TrainLoraNode", "built-in": "TrainLoraNode"}
    gpu = gpu_name()
    sampler = GpuMemorySampler if gpu else RssSampler
    memory = "peak GPU MiB" if gpu else "peak RSS MiB"
    peak = args.peak_tflops or (peak_tflops(gpu) if gpu else None)
    step_flops = 3 * forward_flops(args.arch, args.depth, args.size, args.batch)
    print(
        f"{gpu or 'CPU'}; model training FLOPs per step (3 x forward): {step_flops / 1e12:.3f} TFLOP",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="loralab-bench-") as tmp:
        base = prepare_base_dir(pathlib.Path(tmp) / "base")
        model = write_model(base, args.arch, args.depth)
        write_shards(base, args.arch, args.size, max(4, args.batch))
        for dtype in args.dtypes:
            rows: dict[str, list[dict]] = {k: [] for k in nodes}
            for pair in range(args.pairs):
                for name, node in nodes.items():
                    # A fresh server per run: its peak RSS then belongs to this node alone (allocators
                    # keep freed memory, so a shared server would report the larger of the two).
                    with ComfyServer(base) as server, sampler(server.pid) as rss:
                        client = server.client()
                        infos = {n: client.object_info(n)[n] for n in (node, "LoraModelLoader")}
                        kw = dict(dtype=dtype, rank=args.rank, lr=args.lr, model=model, batch=args.batch,
                                  algorithm=args.algorithm)  # fmt: skip
                        run_one(
                            client, node, infos, rss, steps=4, seed=999, evaluate=False, **kw
                        )  # warm-up: model load, first calls
                        r = run_one(client, node, infos, rss, steps=args.steps, seed=pair, **kw)
                    r["peak_rss_mib"] = rss.peak_kib / 1024
                    r["train_rss_mib"] = rss.phase_peak_kib.get("3", 0) / 1024
                    rows[name].append(r)
                    print(
                        f"[{dtype}] pair {pair + 1} {name:8s} {r['steps_per_s']:7.2f} steps/s  "
                        f"{memory} {r['peak_rss_mib']:7.0f} (training node {r['train_rss_mib']:5.0f})  "
                        f"denoise loss {r['denoise_loss']:.4f}",
                        flush=True,
                    )
            print(f"\n{model}, {max(4, args.batch)} latents {args.size}x{args.size}, {dtype}, {args.algorithm} rank {args.rank}, "
                  f"batch {args.batch}, AdamW, lr {args.lr}, {args.steps} steps, gradient checkpointing on, "
                  f"{args.pairs} pairs (medians)")  # fmt: skip
            print(f"{'':10s}{'steps/s':>10s}{memory:>14s}{'in training':>13s}{'denoise loss':>14s}{'TFLOP/s':>9s}"
                  + (f"{'MFU':>8s}" if peak else ""))  # fmt: skip
            med = {n: {k: statistics.median(r[k] for r in rows[n]) for k in rows[n][0]} for n in nodes}
            for n in nodes:
                m = med[n]
                achieved = step_flops * m["steps_per_s"]  # model FLOP/s (MFU's numerator)
                mfu = f"{100 * achieved / (peak * 1e12):7.1f}%" if peak else ""
                print(f"{n:10s}{m['steps_per_s']:10.2f}{m['peak_rss_mib']:14.0f}{m['train_rss_mib']:13.0f}"
                      f"{m['denoise_loss']:14.4f}{achieved / 1e12:9.3f}{mfu}")  # fmt: skip
            o, b = med["ours"], med["built-in"]
            print(
                f"{'ratio':10s}{o['steps_per_s'] / b['steps_per_s']:9.2f}x{o['peak_rss_mib'] / b['peak_rss_mib']:13.2f}x"
                f"{o['train_rss_mib'] / b['train_rss_mib']:12.2f}x{o['denoise_loss'] / b['denoise_loss']:13.2f}x\n",
                flush=True,
            )


if __name__ == "__main__":
    main()
