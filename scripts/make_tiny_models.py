"""Write tiny, deterministic, real models and datasets that stock ComfyUI loads. Nothing is downloaded.

Layout under --base-dir (a ComfyUI base directory):
  models/diffusion_models/loralab-tiny-sd3.safetensors   SD3/MMDiT, depth 2 (hidden 128), 16 latent channels
  input/loralab-tiny-dataset.safetensors                  4 latents 16x16 + SD3-style conditioning

The model's tensor names and shapes come from the installed ComfyUI's own MMDiT class, so the file
always matches what `UNETLoader` expects; values are filled from one seed.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.tinydata import make_latent_dataset  # noqa: E402

TINY_MODELS = {
    # name: (depth, context width, pooled width, max latent side / patch)
    "loralab-tiny-sd3": (2, 64, 64, 32),
}
DATASET_NAME = "loralab-tiny-dataset"


def _comfy_path() -> pathlib.Path:
    """The ComfyUI tree to import: LORALAB_COMFY_DIR, else the checkout's own."""
    return pathlib.Path(os.environ.get("LORALAB_COMFY_DIR") or ROOT / ".comfyui" / "ComfyUI")


def mmdit_meta(depth: int, context_dim: int, pooled_dim: int, pos_max: int):
    """ComfyUI's own MMDiT (SD3 layout, hidden 64 * depth) on the meta device: names and shapes only."""
    import torch

    _import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth
    with torch.device("meta"):
        return MMDiT(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            depth=depth,
            adm_in_channels=pooled_dim,
            context_embedder_config={
                "target": "torch.nn.Linear",
                "params": {"in_features": context_dim, "out_features": hidden},
            },
            pos_embed_max_size=pos_max,
            num_patches=pos_max * pos_max,
            pos_embed_scaling_factor=None,
            operations=comfy.ops.disable_weight_init,
        )


def mmdit_state_dict(depth: int, context_dim: int, pooled_dim: int, pos_max: int, seed: int) -> dict:
    net = mmdit_meta(depth, context_dim, pooled_dim, pos_max)
    return fill_state_dict(net.state_dict(), seed, ("attn.proj.weight", "mlp.fc2.weight"), depth)


# UNet architectures (ComfyUI's UNetModel arguments). transformer_depth_output is consumed from its end
# (deepest output block first). "sd15mini": one level, one res block, one transformer block (25.8 M),
# which ComfyUI's detection still reads as SD15 (model_channels 320, context 768, conv proj_in);
# "sd15" / "sdxl": the full-size architectures, for GPU benchmarks with random weights.
UNET_ARCHS = {
    "sd15mini": dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1], channel_mult=[1],
                     num_heads=8, num_head_channels=-1, transformer_depth=[1], context_dim=768,
                     use_linear_in_transformer=False, transformer_depth_middle=1, transformer_depth_output=[1, 1],
                     adm_in_channels=None),
    "sd15": dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 num_heads=8, num_head_channels=-1, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], context_dim=768,
                 use_linear_in_transformer=False, transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], adm_in_channels=None),
    "sdxl": dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 num_heads=-1, num_head_channels=64, transformer_depth=[0, 0, 2, 2, 10, 10], context_dim=2048,
                 use_linear_in_transformer=True, transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], adm_in_channels=2816, num_classes="sequential"),
}  # fmt: skip
UNET_RESIDUAL = ("out_layers.3.weight", "proj_out.weight", "to_out.0.weight", "ff.net.2.weight")


def unet_meta(arch: str):
    """ComfyUI's own UNetModel for one of UNET_ARCHS on the meta device: names and shapes only."""
    import torch

    _import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(image_size=32, dropout=0, use_spatial_transformer=True, operations=comfy.ops.disable_weight_init,
                         **UNET_ARCHS[arch])  # fmt: skip


def sd15_mini_state_dict(seed: int) -> dict:
    """The "sd15mini" UNet of UNET_ARCHS with values from `seed`."""
    return fill_state_dict(unet_meta("sd15mini").state_dict(), seed, UNET_RESIDUAL, 3)


def unet_meta_state_dict(arch: str) -> dict:
    """Names and shapes (meta tensors) of a UNet of UNET_ARCHS."""
    return unet_meta(arch).state_dict()


def unet_state_dict(arch: str, seed: int, dtype=None) -> dict:
    """A full-size SD1.5 (860 M) or SDXL (2.6 B) UNet with random weights (values as fill_state_dict),
    stored in `dtype` (default float32)."""
    sd = fill_state_dict(unet_meta_state_dict(arch), seed, UNET_RESIDUAL, 12)
    return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}


def _import_comfy() -> None:
    """ComfyUI's modules, from the tree already imported when there is one (a second tree on sys.path
    would shadow the first one's top-level modules: nodes, latent_preview, ...)."""
    if "comfy" not in sys.modules:
        sys.path.insert(0, str(_comfy_path()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def fill_state_dict(meta_sd: dict, seed: int, residual_suffixes: tuple[str, ...], depth: int) -> dict:
    """Deterministic values for every tensor of a (meta) state dict: fan-in scaled normal weights,
    small biases, unit norms; residual-branch outputs start small so deep random models stay finite."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in sorted(meta_sd.items()):
        shape = tuple(meta.shape)
        if name == "pos_embed":
            t = torch.randn(shape, generator=gen) * 0.02
        elif name.endswith(".bias"):
            t = torch.randn(shape, generator=gen) * 0.01
        elif len(shape) >= 2:
            std = 1.0 / math.sqrt(math.prod(shape[1:]))
            if name.endswith(residual_suffixes):
                std *= 0.5 / math.sqrt(depth)
            t = torch.randn(shape, generator=gen) * std
        else:
            t = torch.ones(shape)
        out[name] = t.contiguous()
    return out


def write_all(base_dir: pathlib.Path, seed: int = 0, quiet: bool = False) -> list[pathlib.Path]:
    import torch
    from safetensors.torch import save_file

    written = []
    model_dir = base_dir / "models" / "diffusion_models"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, (depth, ctx, pooled, pos_max) in TINY_MODELS.items():
        path = model_dir / f"{name}.safetensors"
        if not path.exists():
            sd = mmdit_state_dict(depth, ctx, pooled, pos_max, seed)
            tmp = path.with_suffix(".tmp")
            save_file(sd, str(tmp), metadata={"loralab": "tiny generated model", "seed": str(seed)})
            tmp.replace(path)
            written.append(path)
    input_dir = base_dir / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    path = input_dir / f"{DATASET_NAME}.safetensors"
    if not path.exists():
        depth, ctx, pooled, _ = TINY_MODELS["loralab-tiny-sd3"]
        data = make_latent_dataset(
            n=4, channels=16, height=16, width=16, context_dim=ctx, tokens=8, pooled_dim=pooled, seed=seed
        )
        tmp = path.with_suffix(".tmp")
        save_file(
            {k: v.contiguous() for k, v in data.items()},
            str(tmp),
            metadata={"loralab": "tiny generated dataset", "seed": str(seed)},
        )
        tmp.replace(path)
        written.append(path)
    if not quiet:
        for p in written:
            print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    del torch
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-dir", type=pathlib.Path, required=True, help="ComfyUI base directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    write_all(args.base_dir, args.seed, args.quiet)


if __name__ == "__main__":
    main()
