"""Every model family's tiny model (tests/comfy_testkit) trained in-process by the pack's train(), the
way the node runs it: denoising loss at fixed noise before and after, speed, and saved-activation
memory of one forward with gradient checkpointing off and on. Prints a markdown table.

    .venv/bin/python benchmarks/families.py [--steps 30] [--comfy-dir DIR] [--family NAME ...]

With --comfy-dir run it with that ComfyUI's own Python (e.g. the newest release's venv).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from profile_train import load_pack  # the same pack import as the profiler (this folder)

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's console bar, per family


def load(comfy_dir: pathlib.Path):
    train_mod = load_pack(comfy_dir)
    # ComfyUI's root goes after the pack's own folders: it has top-level modules of the same names
    sys.path.remove(str(comfy_dir))
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "comfy_testkit")]
    sys.path.append(str(comfy_dir))
    return train_mod


def saved_bytes(cm, patcher, samples, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward during one forward (adapters attached, as in training)."""
    import torch

    from lora.inject import AdapterSet, find_targets, frozen
    from training.autograd_safe import autograd_safe
    from training.gradient_checkpointing import gradient_checkpointing

    net = patcher.model.diffusion_model
    adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    x0 = samples[0].latent[None]
    with (
        cm.training_mode(),
        frozen(net),
        adapters.attached(net),
        gradient_checkpointing(net, checkpointing),
        autograd_safe(),
    ):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cm.make_predict_x0(patcher)(x0 * 0.5, torch.tensor([0.5]), samples[0].cond)
    return total[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--comfy-dir", type=pathlib.Path, default=ROOT / ".comfyui" / "ComfyUI")
    ap.add_argument("--family", nargs="*")
    args = ap.parse_args()
    train_mod = load(args.comfy_dir.resolve())
    import comfy.model_management
    import comfy.sd
    import families as fam
    import torch

    from training.config import TrainConfig
    from training.loop import evaluate_denoise_loss

    cm = train_mod.cm
    cpu = torch.device("cpu")
    version = fam.comfy_version()
    print(
        f"ComfyUI {version}, torch {torch.__version__}, {os.cpu_count()} CPUs, {args.steps} steps, LoRA rank 4, fp32\n"
    )
    print(
        "| family | ComfyUI class | params | loss before | after | after/before | steps/s | saved MiB ckpt off / on |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.family or list(fam.FAMILIES):
        f = fam.FAMILIES[name]
        if not fam.available(name):
            print(f"| {name} | {f.model_class} | | not in this ComfyUI | | | | |")
            continue
        patcher = fam.build_model(name)
        latents, conditioning = fam.make_data(name)
        params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())

        def loss_of(model, latents=latents, conditioning=conditioning):
            comfy.model_management.load_models_gpu(
                [model]
            )  # applies the model's LoRA patches, as DenoiseLoss does
            with cm.training_mode():
                samples = cm.build_samples(model, [latents], [conditioning], cpu)
                return evaluate_denoise_loss(
                    cm.make_predict_x0(model), cm.objective_for(model), samples, cpu, 0, 8
                ), samples

        before, samples = loss_of(patcher)
        cfg = TrainConfig(
            steps=args.steps, learning_rate=0.002, rank=4, training_dtype="fp32", lora_dtype="fp32"
        )
        t0 = time.perf_counter()
        lora, _, _ = train_mod.train(patcher, [latents], [conditioning], cfg, "[None]", None, "loralab/bench")
        speed = args.steps / (time.perf_counter() - t0)
        after, _ = loss_of(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0])
        off = saved_bytes(cm, patcher, samples, False) / 2**20
        # a model whose code writes in place into used tensors trains unchecked (see README)
        on = saved_bytes(cm, patcher, samples, True) / 2**20 if not f.in_place_writes else float("nan")
        print(f"| {name} | {f.model_class} | {params / 1e6:.2f} M | {before:.4f} | {after:.4f} | {after / before:.2f} | "
              f"{speed:.1f} | {off:.2f} / {on:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
