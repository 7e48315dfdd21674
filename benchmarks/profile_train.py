"""Profile our trainer in-process (no server): where does a training step spend its time?

    .venv/bin/python benchmarks/profile_train.py [--arch sd3|sd15mini] [--depth 2] [--steps 60] [--dtype bf16]
        [--cprofile | --torch-profile] [--comfy-attention]

Builds the SD3/MMDiT model of the given depth (2 = the tiny default) or the mini SD1.5 UNet, loads
it with ComfyUI's own loader, and runs the pack's train() the way the node does, printing steps/s
and a profile (cProfile by Python function, or torch.profiler by operator).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pathlib
import pstats
import resource
import sys
import tempfile
import time

from compare_builtin import RssSampler  # the same /proc sampler as the server benchmark (this folder)

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMFY = ROOT / ".comfyui" / "ComfyUI"


def load_pack(comfy_dir: pathlib.Path = COMFY):
    """The pack's train module, imported against the ComfyUI tree at comfy_dir (CPU mode)."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location(
        "loralab_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["loralab_pack"] = pack
    spec.loader.exec_module(pack)
    import loralab_pack.nodes.train as train_mod

    return train_mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="latent side")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch-profile", action="store_true", help="operator table from torch.profiler")
    ap.add_argument("--arch", choices=["sd3", "sd15mini"], default="sd3")
    ap.add_argument("--shapes", action="store_true", help="group the torch.profiler table by input shapes")
    ap.add_argument(
        "--comfy-attention", action="store_true", help="keep ComfyUI's attention (no SDPA override)"
    )
    args = ap.parse_args()
    train_mod = load_pack()
    import comfy.sd
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_state_dict, sd15_mini_state_dict

    from training.config import TrainConfig
    from training.tinydata import make_latent_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.safetensors"
        sd = (
            sd15_mini_state_dict(0)
            if args.arch == "sd15mini"
            else mmdit_state_dict(args.depth, 64, 64, 32, 0)
        )
        save_file(sd, str(path))
        with torch.inference_mode():
            model = comfy.sd.load_diffusion_model(str(path))
    if args.comfy_attention:
        train_mod.cm.use_fast_attention = lambda patcher: None
    if args.arch == "sd15mini":
        data = make_latent_dataset(4, 4, args.size, args.size, 768, 77, 1, seed=0)
        positive = [[[data["context"], {}]]]
    else:
        data = make_latent_dataset(4, 16, args.size, args.size, 64, 8, 64, seed=0)
        positive = [[[data["context"], {"pooled_output": data["pooled"]}]]]
    latents = [{"samples": data["latents"]}]
    cfg = TrainConfig(steps=args.steps, learning_rate=1e-3, training_dtype=args.dtype, lora_dtype=args.dtype,
                      gradient_checkpointing=not args.no_checkpointing)  # fmt: skip
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    name = "mini SD1.5 UNet" if args.arch == "sd15mini" else f"SD3 depth {args.depth}"
    print(f"{name}: {n_params / 1e6:.1f} M params, latent {args.size}x{args.size}, {args.dtype}")
    train_mod.train(model, latents, positive, cfg.replace(steps=3), "[None]", None, "x")  # warm-up
    prof = cProfile.Profile() if args.cprofile else None
    activities = [torch.profiler.ProfilerActivity.CPU]
    tprof = (
        torch.profiler.profile(activities=activities, record_shapes=args.shapes)
        if args.torch_profile
        else None
    )
    rss = RssSampler(os.getpid()).__enter__()
    start_kib = rss.read_kib()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    if tprof:
        tprof.__enter__()
    train_mod.train(model, latents, positive, cfg, "[None]", None, "x")
    if tprof:
        tprof.__exit__(None, None, None)
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    rss.__exit__(None, None, None)
    print(
        f"{args.steps} steps in {dt:.2f} s: {args.steps / dt:.2f} steps/s (incl. set-up); "
        f"RSS {start_kib / 1024:.0f} MiB before, peak {rss.peak_kib / 1024:.0f} MiB (+{(rss.peak_kib - start_kib) / 1024:.0f}); "
        f"{faults / args.steps:.0f} minor page faults per step"
    )
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    if tprof:
        table = tprof.key_averages(group_by_input_shape=args.shapes)
        print(table.table(sort_by="self_cpu_time_total", row_limit=45 if args.shapes else 30))


if __name__ == "__main__":
    main()
