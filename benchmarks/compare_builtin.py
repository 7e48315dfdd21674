"""Our LoraLab_TrainLoraNode against ComfyUI's built-in TrainLoraNode, in one real ComfyUI server.

Runs the two nodes alternately (A B A B ...) on the same generated model, data and settings and
prints, per node: steps/s (from websocket progress messages, first to last), the server's peak RSS
during the prompt (VmHWM, reset before each prompt; Linux), and the denoising loss on the training
latents after training (LoraLab_DenoiseLoss on the MODEL each node returns: fixed noise levels and
noise, identical for both). Then the ratios ours / built-in as medians.

    .venv/bin/python benchmarks/compare_builtin.py [--pairs 3] [--steps 60] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.server import MODEL_NAME, ComfyServer, prepare_base_dir  # noqa: E402


def prompt(node: str, steps: int, dtype: str, seed: int, rank: int, lr: float, model: str = MODEL_NAME) -> dict:
    train_inputs = {
        "model": ["1", 0], "latents": ["2", 0], "positive": ["2", 1],
        "batch_size": 1, "grad_accumulation_steps": 1, "steps": steps, "learning_rate": lr, "rank": rank,
        "optimizer": "AdamW", "loss_function": "MSE", "seed": seed, "training_dtype": dtype, "lora_dtype": dtype,
        "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]",
    }  # fmt: skip
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        # The built-in node crashes on a single LATENT batch (UnboundLocalError: multi_res), so both
        # nodes get the data as lists from stock LoadTrainingDataset (shards written below).
        "2": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": SHARD_FOLDER}},
        "3": {"class_type": node, "inputs": train_inputs},
        "4": {"class_type": "LoraLab_DenoiseLoss",
              "inputs": {"model": ["3", 0], "latents": ["2", 0], "positive": ["2", 1], "seed": 0, "levels": 8}},
    }  # fmt: skip


SHARD_FOLDER = "loralab_bench_dataset"


def write_model(base: pathlib.Path, depth: int) -> str:
    """An SD3/MMDiT of the given depth (hidden 64*depth), seeded like the tiny default."""
    if depth == 2:
        return MODEL_NAME
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_state_dict

    name = f"loralab-bench-sd3-d{depth}.safetensors"
    save_file(mmdit_state_dict(depth, 64, 64, 32, 0), str(base / "models" / "diffusion_models" / name))
    return name


def write_shards(base: pathlib.Path, size: int) -> None:
    """A dataset of 4 latents (size x size) as the shard file stock LoadTrainingDataset reads: one
    latent and one conditioning per list entry."""
    import torch

    from training.tinydata import make_latent_dataset

    data = make_latent_dataset(n=4, channels=16, height=size, width=size, context_dim=64, tokens=8, pooled_dim=64)
    n = data["latents"].shape[0]
    shard = {
        "latents": [{"samples": data["latents"][i : i + 1].clone()} for i in range(n)],
        "conditioning": [[[data["context"][i : i + 1].clone(), {"pooled_output": data["pooled"][i : i + 1].clone()}]]
                         for i in range(n)],
    }
    folder = base / "output" / SHARD_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(shard, folder / "shard_0000.pkl")


def peak_rss_reset(pid: int) -> None:
    try:
        pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(server: ComfyServer, client, node: str, **kw) -> dict:
    times: list[tuple[float, int]] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "progress" and str(data.get("node")) == "3":
            times.append((time.perf_counter(), int(data["value"])))

    peak_rss_reset(server.pid)
    res = client.run(prompt(node, **kw), timeout=1800, on_event=on_event)
    if res.status != "success":
        raise SystemExit(f"{node} failed: {res.error_message}")
    (t0, v0), (t1, v1) = times[0], times[-1]
    return {
        "steps_per_s": (v1 - v0) / (t1 - t0) if t1 > t0 else float("nan"),
        "peak_rss_mib": peak_rss_mib(server.pid),
        "denoise_loss": float(res.outputs["4"]["loss"][0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--depth", type=int, default=2, help="SD3/MMDiT depth (2 = the tiny default; 4, 8 ...)")
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px)")
    args = ap.parse_args()
    nodes = {"ours": "LoraLab_TrainLoraNode", "built-in": "TrainLoraNode"}
    with tempfile.TemporaryDirectory(prefix="loralab-bench-") as tmp:
        base = prepare_base_dir(pathlib.Path(tmp) / "base")
        model = write_model(base, args.depth)
        write_shards(base, args.size)
        with ComfyServer(base) as server:
            client = server.client()
            for dtype in args.dtypes:
                rows: dict[str, list[dict]] = {k: [] for k in nodes}
                # warm-up: one short run each (model load, first-call costs)
                for node in nodes.values():
                    run_one(server, client, node, steps=4, dtype=dtype, seed=999, rank=args.rank, lr=args.lr, model=model)
                for pair in range(args.pairs):
                    for name, node in nodes.items():
                        r = run_one(server, client, node, steps=args.steps, dtype=dtype, seed=pair, rank=args.rank, lr=args.lr, model=model)
                        rows[name].append(r)
                        print(f"[{dtype}] pair {pair + 1} {name:8s} {r['steps_per_s']:7.2f} steps/s  "
                              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  denoise loss {r['denoise_loss']:.4f}", flush=True)
                print(f"\n{model}, 4 latents {args.size}x{args.size}, {dtype}, rank {args.rank}, batch 1, AdamW, lr {args.lr}, "
                      f"{args.steps} steps, gradient checkpointing on, {args.pairs} pairs (medians)")
                print(f"{'':10s}{'steps/s':>10s}{'peak RSS MiB':>14s}{'denoise loss':>14s}")
                med = {n: {k: statistics.median(r[k] for r in rows[n]) for k in rows[n][0]} for n in nodes}
                for n in nodes:
                    print(f"{n:10s}{med[n]['steps_per_s']:10.2f}{med[n]['peak_rss_mib']:14.0f}{med[n]['denoise_loss']:14.4f}")
                o, b = med["ours"], med["built-in"]
                print(f"{'ratio':10s}{o['steps_per_s'] / b['steps_per_s']:9.2f}x{o['peak_rss_mib'] / b['peak_rss_mib']:13.2f}x"
                      f"{o['denoise_loss'] / b['denoise_loss']:13.2f}x\n", flush=True)


if __name__ == "__main__":
    main()
