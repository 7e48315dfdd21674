"""Profile our trainer in-process (no server): where does a training step spend its time?

    .venv/bin/python benchmarks/profile_train.py [--depth 2] [--steps 60] [--dtype bf16] [--cprofile]

Builds the SD3/MMDiT model of the given depth (2 = the tiny default), loads it with ComfyUI's own
loader, and runs the pack's train() the way the node does, printing steps/s and a profile.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pathlib
import pstats
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMFY = ROOT / ".comfyui" / "ComfyUI"


def load_pack():
    sys.path.insert(0, str(COMFY))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    spec = importlib.util.spec_from_file_location("loralab_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
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
    args = ap.parse_args()
    train_mod = load_pack()
    import comfy.sd
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_state_dict

    from training.config import TrainConfig
    from training.tinydata import make_latent_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "m.safetensors"
        save_file(mmdit_state_dict(args.depth, 64, 64, 32, 0), str(path))
        with torch.inference_mode():
            model = comfy.sd.load_diffusion_model(str(path))
    data = make_latent_dataset(4, 16, args.size, args.size, 64, 8, 64, seed=0)
    latents = [{"samples": data["latents"]}]
    positive = [[[data["context"], {"pooled_output": data["pooled"]}]]]
    cfg = TrainConfig(steps=args.steps, learning_rate=1e-3, training_dtype=args.dtype, lora_dtype=args.dtype,
                      gradient_checkpointing=not args.no_checkpointing)  # fmt: skip
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"SD3 depth {args.depth}: {n_params / 1e6:.1f} M params, latent {args.size}x{args.size}, {args.dtype}")
    train_mod.train(model, latents, positive, cfg.replace(steps=3), "[None]", None, "x")  # warm-up
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    train_mod.train(model, latents, positive, cfg, "[None]", None, "x")
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    print(f"{args.steps} steps in {dt:.2f} s: {args.steps / dt:.2f} steps/s (incl. set-up)")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    main()
