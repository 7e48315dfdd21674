"""The trainer's memory plan against the memory a training run really adds, in-process (no server).

    .venv/bin/python benchmarks/memory_plan.py                 # the CPU benchmark cases, fp32 and bf16
    .venv/bin/python benchmarks/memory_plan.py --quick         # two cases

Measured: the peak of tensor memory the run allocates on top of what was live when train() was
called, from torch.profiler's allocation records (profile_memory: every allocation and free of the
CPU allocator, in order; on CUDA, torch.cuda.max_memory_allocated is the same measure). That is what
the plan estimates: adapters, gradients, optimizer state, activations; the model is loaded before, as
in a server. Each case runs a warm-up training first (the model's inference tensors become normal ones
once), then 4 measured steps.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from profile_train import ROOT, load_pack  # the same in-process set-up as the profiler (this folder)

CASES = [  # (arch, depth, latent side, batch, gradient checkpointing)
    ("sd3", 2, 16, 1, True),
    ("sd3", 4, 32, 1, True),
    ("sd3", 8, 32, 1, True),
    ("sd15mini", 0, 32, 1, True),
    ("sd3", 4, 32, 4, True),
    ("sd3", 4, 32, 1, False),
    ("sd15mini", 0, 32, 4, False),
]
MIB = 2**20


def memory_events(prof) -> list:
    """The CPU allocator's allocation (+bytes) and free (-bytes) records of a profile, in time order;
    kineto events (start_ns(), nbytes())."""
    return sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )


def peak_allocated(prof) -> int:
    """Largest running sum of the CPU allocator's allocations minus frees, over the profiled span."""
    live = peak = 0
    for e in memory_events(prof):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    train_mod = load_pack()
    import comfy.sd
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_tiny_models import mmdit_state_dict, sd15_mini_state_dict

    from training.config import TrainConfig
    from training.tinydata import make_latent_dataset

    plans = []
    real_fit = train_mod._memory_fit

    def spy(*a, **kw):
        fit = real_fit(*a, **kw)
        plans.append(fit.plan)
        return fit

    train_mod._memory_fit = spy
    models = {}
    print(
        "| case | dtype | plan: activations / adapters+grads+optimizer / added | measured peak added | plan / measured |"
    )
    print("|---|---|---|---|---|")
    for arch, depth, size, batch, ckpt in CASES[:2] if args.quick else CASES:
        key = (arch, depth)
        if key not in models:
            with tempfile.TemporaryDirectory() as tmp:
                path = pathlib.Path(tmp) / "m.safetensors"
                sd = sd15_mini_state_dict(0) if arch == "sd15mini" else mmdit_state_dict(depth, 64, 64, 32, 0)
                save_file(sd, str(path))
                with torch.inference_mode():
                    models[key] = comfy.sd.load_diffusion_model(str(path))
        model = models[key]
        if arch == "sd15mini":
            data = make_latent_dataset(4, 4, size, size, 768, 77, 1, seed=0)
            positive = [[[data["context"], {}]]]
        else:
            data = make_latent_dataset(4, 16, size, size, 64, 8, 64, seed=0)
            positive = [[[data["context"], {"pooled_output": data["pooled"]}]]]
        latents = [{"samples": data["latents"]}]
        name = "mini SD1.5 UNet" if arch == "sd15mini" else f"SD3 depth {depth}"
        for dtype in ("fp32", "bf16"):
            cfg = TrainConfig(steps=4, learning_rate=1e-3, training_dtype=dtype, lora_dtype=dtype, batch_size=batch,
                              gradient_checkpointing=ckpt)  # fmt: skip
            train_mod.train(model, latents, positive, cfg.replace(steps=2), "[None]", None, "x")  # warm-up
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                train_mod.train(model, latents, positive, cfg, "[None]", None, "x")
            plan, measured = plans[-1], peak_allocated(prof)
            case = f"{name}, {size}×{size}, batch {batch}, checkpointing {'on' if ckpt else 'off'}"
            rest = plan.trainable + plan.gradients + plan.optimizer
            print(
                f"| {case} | {dtype} | {plan.activations / MIB:.1f} / {rest / MIB:.1f} / {plan.added / MIB:.1f} MiB | "
                f"{measured / MIB:.1f} MiB | {plan.added / measured:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
