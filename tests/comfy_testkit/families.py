"""Tiny models of every diffusion family ComfyUI trains, built from ComfyUI's own classes.

Each family names the ``comfy.supported_models`` class ComfyUI uses for it (so model sampling, latent
format, conditioning and the LoRA key map are ComfyUI's own) and a small configuration of the family's
network (hidden sizes of a few dozen, one or two blocks of each kind, 1-6 M parameters). ComfyUI's
detection pins some sizes of real checkpoints (Flux: 24 heads of 128; Z-Image: width 3840), so the
models are built in-process from the configuration instead of through a file.

The data of a family is what ComfyUI's own nodes hand a sampler: latents of the family's channels (with
a time axis for video families) and a CONDITIONING with the text-encoder width, pooled output and the
family's extra values (Flux ``guidance``, LTX ``frame_rate``, Wan i2v ``concat_latent_image``, edit
models' ``reference_latents``).

Only test code imports this (it imports ``comfy``): the test server loads it through
``tests/comfy_testkit/__init__.py``, in-process tests import it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # comfy.supported_models.<model_class>
    config: dict[str, Any]  # the network's arguments (keys a ComfyUI release does not know are dropped)
    latent: tuple[int, ...]  # one latent without batch: [C, H, W] or [C, T, H, W]
    context: tuple[int, int]  # text tokens, width
    pooled: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # conditioning values beside the tensors
    reference_latent: bool = False  # edit models: the source latent travels in the conditioning
    concat_latent: bool = False  # Wan i2v: the start frame latent as concat_latent_image
    llama_layers: int = 0  # HiDream: Llama hidden states of this many layers as conditioning_llama3
    prediction: str = "flow"  # the target the family trains on: eps, v, flow, raw (the network's output)
    # its code writes in place into tensors it already used: the trainer finds that before training and
    # trains it with copy-on-write of what backward needs, without gradient checkpointing
    in_place_writes: bool = False


def _unet(**kw) -> dict:
    base = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                num_heads=-1, num_head_channels=16, transformer_depth=[1, 1], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1], use_linear_in_transformer=False,
                adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False)  # fmt: skip
    base.update(kw)
    return base


_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
             patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])  # fmt: skip
_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=64, ffn_dim=128, freq_dim=256,
            text_dim=32, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1), qk_norm=True,
            cross_attn_norm=True, eps=1e-6)  # fmt: skip
_QWEN = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
               n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=4.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
               axes_dims=[8, 12, 12], axes_lens=[300, 64, 64], rope_theta=10000.0)  # fmt: skip

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sd15", "SD15", _unet(context_dim=64), (4, 16, 16), (8, 64), prediction="eps"),
    # SD2 and SDXL pin 64 channels per attention head (their unet_extra_config)
    Family("sd2_v", "SD20", _unet(context_dim=64, model_channels=64, use_linear_in_transformer=True), (4, 16, 16), (8, 64),
           prediction="v"),  # SD2 768-v: the UNet with v-prediction sampling
    Family("sdxl", "SDXL", _unet(context_dim=64, model_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                                 num_classes="sequential"), (4, 16, 16), (8, 64), pooled=1280, prediction="eps"),
    Family("sd3", "SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32,
                              context_embedder_config={"target": "torch.nn.Linear",
                                                       "params": {"in_features": 32, "out_features": 128}},
                              pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None),
           (16, 8, 8), (6, 32), pooled=32),
    Family("flux_dev", "Flux", _FLUX, (16, 8, 8), (6, 32), pooled=32, extras={"guidance": 3.5}),
    Family("flux_schnell", "FluxSchnell", {**_FLUX, "guidance_embed": False}, (16, 8, 8), (6, 32), pooled=32),
    Family("flux_kontext", "Flux", _FLUX, (16, 8, 8), (6, 32), pooled=32, extras={"guidance": 2.5},
           reference_latent=True),
    Family("flux2", "Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                                  context_in_dim=32, hidden_size=64, mlp_ratio=3.0, num_heads=4, depth=1,
                                  depth_single_blocks=1, axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1,
                                  qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True,
                                  ops_bias=False, default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3]),
           (128, 4, 4), (6, 32), extras={"guidance": 4.0}),
    Family("chroma", "Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32,
                                    hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                                    axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
                                    out_dim=64, hidden_dim=64, n_layers=1, txt_ids_dims=[], vec_in_dim=None),
           (16, 8, 8), (6, 32)),
    Family("hunyuan_video", "HunyuanVideo", dict(image_model="hunyuan_video", in_channels=16, out_channels=16,
                                                 vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                                                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                                                 theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                                                 byt5=False, meanflow=False, meanflow_sum=False,
                                                 use_cond_type_embedding=False,
                                                 vision_in_dim=None),
           (16, 2, 8, 8), (6, 32), pooled=32, extras={"guidance": 6.0}),
    Family("ltxv", "LTXV", dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32,
                                num_attention_heads=2, caption_channels=32, num_layers=2),
           (128, 2, 4, 4), (6, 32), extras={"frame_rate": 25, "attention_mask": torch.ones(1, 6)},
           # its block ends with x.addcmul_(ff(rms_norm(x)), gate): an explicit in-place write into a
           # tensor rms_norm kept for backward (0.3.75 and 0.33.0): trained with copy-on-write, unchecked
           in_place_writes=True),
    Family("cosmos_predict2", "CosmosT2IPredict2", dict(image_model="cosmos_predict2", max_img_h=240, max_img_w=240,
                                                        max_frames=128, in_channels=16, out_channels=16,
                                                        patch_spatial=2, patch_temporal=1, concat_padding_mask=True,
                                                        model_channels=64, num_blocks=2, num_heads=2,
                                                        crossattn_emb_channels=32, pos_emb_cls="rope3d",
                                                        pos_emb_learnable=True, pos_emb_interpolation="crop",
                                                        min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=16),
           (16, 1, 8, 8), (6, 32), prediction="raw"),  # rectified-flow velocity on x0 + sigma * noise
    Family("wan21_t2v", "WAN21_T2V", _WAN, (16, 2, 8, 8), (6, 32)),
    Family("wan21_i2v", "WAN21_I2V", {**_WAN, "model_type": "i2v", "in_dim": 36}, (16, 2, 8, 8), (6, 32),
           concat_latent=True),
    Family("wan22_5b", "WAN22_T2V", {**_WAN, "in_dim": 48, "out_dim": 48}, (48, 2, 8, 8), (6, 32)),
    Family("qwen_image", "QwenImage", _QWEN, (16, 1, 8, 8), (6, 32)),
    Family("qwen_image_edit", "QwenImage", _QWEN, (16, 1, 8, 8), (6, 32), reference_latent=True),
    Family("lumina2", "Lumina2", _LUMINA, (16, 8, 8), (6, 32)),
    # Z-Image's modulation is 256 wide whatever the model width, so the width is 256 here
    Family("z_image", "ZImage", {**_LUMINA, "dim": 256, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
                                 "ffn_dim_multiplier": 8.0 / 3.0, "n_layers": 1, "z_image_modulation": True,
                                 "time_scale": 1000.0, "pad_tokens_multiple": 8},
           (16, 8, 8), (6, 32)),
    Family("hidream", "HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                      num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                      caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=2,
                                      num_activated_experts=1, axes_dims_rope=(8, 4, 4), max_resolution=(32, 32),
                                      llama_layers=[0, 1]),
           (16, 8, 8), (6, 32), pooled=32, llama_layers=2),
    Family("auraflow", "AuraFlow", dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2,
                                        n_double_layers=1, n_heads=2, global_conddim=64, cond_seq_dim=32, max_seq=64),
           (4, 8, 8), (6, 32)),
]}  # fmt: skip


def comfy_version() -> str:
    """The version of the ComfyUI this process imported."""
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


def available(name: str) -> bool:
    """Whether this ComfyUI has the family's model class."""
    import comfy.supported_models

    return hasattr(comfy.supported_models, FAMILIES[name].model_class)


def build_model(name: str, weight_dtype: str = "default", seed: int = 0):
    """A ModelPatcher of the family's tiny model with deterministic weights. weight_dtype "fp8_e4m3fn"
    stores the weights in fp8 and computes in fp32 through ComfyUI's manual cast (as UNETLoader's
    weight_dtype does)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    fam = FAMILIES[name]
    cls = getattr(comfy.supported_models, fam.model_class)
    config = dict(fam.config)
    dtype, manual_cast = (
        (torch.float8_e4m3fn, torch.float32) if weight_dtype == "fp8_e4m3fn" else (torch.float32, None)
    )
    while True:
        model_config = cls(dict(config))
        model_config.set_inference_dtype(dtype, manual_cast)
        try:
            if fam.prediction == "v":  # the UNet's v-prediction variant (SD20 picks it from real weights)
                model = comfy.model_base.BaseModel(
                    model_config, model_type=comfy.model_base.ModelType.V_PREDICTION
                )
            else:
                model = model_config.get_model({}, "")
            break
        except TypeError as exc:  # an argument this release's network does not take
            bad = [k for k in config if f"'{k}'" in str(exc)]
            if "unexpected keyword" not in str(exc) or not bad:
                raise
            del config[bad[0]]
    sd = fill_state_dict(model.diffusion_model.state_dict(), seed)
    model.diffusion_model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    )
    cpu = torch.device("cpu")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=cpu)


def fill_state_dict(shapes: dict, seed: int) -> dict:
    """Deterministic values: fan-in scaled normal weights, small biases, unit norm scales. Weights of
    output and modulation layers start small so the tiny random network stays in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(shapes.items()):
        shape = tuple(t.shape)
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith(".bias") or len(shape) == 0:
            out[name] = torch.randn(shape, generator=gen) * 0.01
        elif len(shape) >= 2:
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif any(s in name for s in ("norm", "scale", ".weight")) and "embed" not in name:
            out[name] = torch.ones(shape)
        else:
            out[name] = torch.randn(shape, generator=gen) * 0.02
    return out


def make_data(name: str, count: int = 2, seed: int = 0) -> tuple[dict, list]:
    """LATENT and CONDITIONING (one entry per latent) as ComfyUI's nodes would hand them over.

    The latents are smooth, structured patterns (a denoiser can learn them), each with its own text."""
    fam = FAMILIES[name]
    gen = torch.Generator().manual_seed(seed)
    c, *spatial = fam.latent
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in spatial], indexing="ij")
    latents = []
    for i in range(count):
        freq = torch.randn(c, len(spatial), generator=gen)
        phase = torch.rand(c, 1, generator=gen) * math.pi
        arg = sum(freq[:, j].view(c, *[1] * len(spatial)) * grids[j] * (1.5 + i) for j in range(len(spatial)))
        latents.append(torch.sin(arg + phase.view(c, *[1] * len(spatial))))
    samples = torch.stack(latents)
    conditioning = []
    tokens, width = fam.context
    for i in range(count):
        opts: dict[str, Any] = dict(fam.extras)
        # text encoders without a pooled output (T5, UMT5, Qwen, Gemma) still put the key there
        opts["pooled_output"] = torch.randn(1, fam.pooled, generator=gen) if fam.pooled else None
        if fam.reference_latent:
            opts["reference_latents"] = [torch.roll(samples[i : i + 1], shifts=1, dims=-1)]
        if fam.llama_layers:
            opts["conditioning_llama3"] = torch.randn(1, fam.llama_layers, tokens, width, generator=gen)
        if fam.concat_latent:
            opts["concat_latent_image"] = (
                samples[i : i + 1, :, :1].expand(-1, -1, samples.shape[2], -1, -1).clone()
            )
        conditioning.append([torch.randn(1, tokens, width, generator=gen), opts])
    return {"samples": samples}, conditioning
