"""What a preview costs, in-process (no server): seconds per preview and the peak of tensor memory
during a preview against that of the training steps.

    cd benchmarks && ../.venv/bin/python preview_cost.py

Each case trains 8 steps with a preview every 4 (so at steps 0, 4, 8: 20 sampling steps of euler,
cfg 1, 256x256 pixels = a 32x32 latent) after a warm-up run. Memory: the running sum of the CPU
allocator's allocations and frees (torch.profiler), its peak inside the previews and outside them.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

from memory_plan import memory_events  # this folder
from profile_train import ROOT, load_pack

MIB = 2**20


def main() -> None:
    train_mod = load_pack()
    import comfy.sd
    import folder_paths
    import torch
    from safetensors.torch import save_file

    folder_paths.set_output_directory(tempfile.mkdtemp(prefix="loralab-preview-bench-"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import loralab_pack.nodes.preview as preview_mod
    from make_tiny_models import mmdit_state_dict, sd15_mini_state_dict

    from training.config import TrainConfig
    from training.tinydata import make_latent_dataset

    spans: list[tuple[int, int]] = []  # (start ns, end ns) of each preview
    real_render = preview_mod.Previewer.render

    def timed(self, *a, **kw):
        start = time.perf_counter_ns()
        try:
            with torch.profiler.record_function("loralab_preview"):  # marks the span in the profile
                return real_render(self, *a, **kw)
        finally:
            spans.append((start, time.perf_counter_ns()))

    preview_mod.Previewer.render = timed
    print(
        "| case | dtype | steps/s without / with previews | seconds per preview | peak tensor memory: training / preview |"
    )
    print("|---|---|---|---|---|")
    for arch, depth in (("sd3", 4), ("sd15mini", 0)):
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "m.safetensors"
            save_file(
                sd15_mini_state_dict(0) if arch == "sd15mini" else mmdit_state_dict(depth, 64, 64, 32, 0),
                str(path),
            )
            with torch.inference_mode():
                model = comfy.sd.load_diffusion_model(str(path))
        if arch == "sd15mini":
            data = make_latent_dataset(4, 4, 32, 32, 768, 77, 1, seed=0)
            positive = [[data["context"], {}]]
        else:
            data = make_latent_dataset(4, 16, 32, 32, 64, 8, 64, seed=0)
            positive = [[data["context"], {"pooled_output": data["pooled"]}]]
        latents = [{"samples": data["latents"]}]
        settings = preview_mod.PreviewSettings(positive=[[positive[0][0][:1], {k: v[:1] for k, v in positive[0][1].items()}]],
                                               negative=None, vae=None, every_n_steps=4, seed=1, steps=20, cfg=1.0,
                                               sampler_name="euler", scheduler="simple", width=256, height=256,
                                               lora_strength=1.0, filename_prefix="bench/previews")  # fmt: skip
        name = "mini SD1.5 UNet (26 M)" if arch == "sd15mini" else f"SD3 depth {depth} (19 M)"
        for dtype in ("fp32", "bf16"):
            cfg = TrainConfig(steps=8, learning_rate=1e-3, training_dtype=dtype, lora_dtype=dtype)
            train_mod.train(model, latents, [positive], cfg.replace(steps=2), "[None]", None, "x")  # warm-up
            t0 = time.perf_counter()
            train_mod.train(model, latents, [positive], cfg, "[None]", None, "x")
            plain = 8 / (time.perf_counter() - t0)
            spans.clear()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                t0 = time.perf_counter()
                train_mod.train(model, latents, [positive], cfg, "[None]", None, "x", preview=settings)
                total = time.perf_counter() - t0
            seconds = [(end - start) / 1e9 for start, end in spans]
            live = train_peak = preview_peak = 0
            marks = [
                (e.start_ns(), e.end_ns())
                for e in prof.profiler.kineto_results.events()
                if e.name() == "loralab_preview"
            ]
            for e in memory_events(prof):
                live += e.nbytes()
                inside = any(start <= e.start_ns() <= end for start, end in marks)
                if inside:
                    preview_peak = max(preview_peak, live)
                else:
                    train_peak = max(train_peak, live)
            with_previews = 8 / (total - sum(seconds))
            print(
                f"| {name}, 32×32 latents | {dtype} | {plain:.2f} / {with_previews:.2f} | "
                f"{sum(seconds) / len(seconds):.2f} ({len(seconds)} previews) | "
                f"{train_peak / MIB:.0f} / {preview_peak / MIB:.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
