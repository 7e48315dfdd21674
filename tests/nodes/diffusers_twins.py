"""diffusers twins of the testkit's tiny UNets and Flux: the same network as diffusers'
UNet2DConditionModel / FluxTransformer2DModel, with the ComfyUI model's weights copied through ComfyUI's
own UNet- / Flux-to-diffusers tables, so a LoRA file applied by diffusers, peft or LyCORIS can be
compared with the same file applied by ComfyUI.

Not a test module; imported by the interop tests (needs diffusers, ComfyUI on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Inputs:
    """One forward pass's inputs, for both implementations."""

    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL: pooled text embedding; Flux: CLIP's
    time_ids: torch.Tensor | None = None  # SDXL: original size, crop, target size
    guidance: torch.Tensor | None = None  # Flux dev: the distilled guidance

    def comfy_kwargs(self) -> dict:
        if self.guidance is not None:
            return {"y": self.pooled, "guidance": self.guidance}
        if self.pooled is None:
            return {}
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        size_emb = timestep_embedding(self.time_ids.flatten(), 256).reshape(self.x.shape[0], -1)
        return {"y": torch.cat([self.pooled, size_emb], dim=1)}

    def diffusers_kwargs(self) -> dict:
        if self.pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


def make_inputs(family: str, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    if family == "flux_dev":  # timestep in [0, 1], as ComfyUI's Flux takes it
        x, ctx = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 6, 32, generator=gen)
        return Inputs(
            x, torch.tensor([0.6]), ctx, torch.randn(1, 32, generator=gen), guidance=torch.tensor([3.5])
        )
    x = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = torch.randn(1, 8, 64, generator=gen)
    if family == "sdxl":
        pooled = torch.randn(1, 1280, generator=gen)
        return Inputs(
            x, torch.tensor([400.0]), ctx, pooled, torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        )
    return Inputs(x, torch.tensor([400.0]), ctx)


def diffusers_unet(patcher, family: str):
    """UNet2DConditionModel with the ComfyUI model's architecture and weights (fp32, eval)."""
    import comfy.model_management
    import comfy.utils
    from diffusers import UNet2DConditionModel

    comfy.model_management.unload_all_models()  # the base weights, without any clone's patches
    cfg = patcher.model.model_config.unet_config
    channels = tuple(cfg["model_channels"] * m for m in cfg["channel_mult"])
    if cfg.get("num_head_channels", -1) > 0:  # diffusers' legacy attention_head_dim: heads per block
        heads = tuple(c // cfg["num_head_channels"] for c in channels)
    else:
        heads = cfg["num_heads"]
    extra = {}
    if family == "sdxl":
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=cfg["adm_in_channels"])  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], block_out_channels=channels,
        layers_per_block=cfg["num_res_blocks"][0], down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels), attention_head_dim=heads,
        cross_attention_dim=cfg["context_dim"], norm_num_groups=32,
        use_linear_projection=bool(cfg["use_linear_in_transformer"]), **extra,
    )  # fmt: skip
    table = comfy.utils.unet_to_diffusers(cfg)  # diffusers key -> ComfyUI key
    ours = patcher.model.diffusion_model.state_dict()
    unet.load_state_dict({k: ours[table[k]].float() for k in unet.state_dict()})
    return unet.eval()


def diffusers_flux(patcher):
    """FluxTransformer2DModel with the ComfyUI Flux model's architecture and weights (fp32, eval): fused
    projections split, the final modulation's halves swapped, as ComfyUI's table says."""
    import comfy.model_management
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    comfy.model_management.unload_all_models()
    cfg = patcher.model.model_config.unet_config
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg["in_channels"] * cfg["patch_size"] ** 2, num_layers=cfg["depth"],
        num_single_layers=cfg["depth_single_blocks"], attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        num_attention_heads=cfg["num_heads"], joint_attention_dim=cfg["context_in_dim"],
        pooled_projection_dim=cfg["vec_in_dim"], guidance_embeds=cfg["guidance_embed"], axes_dims_rope=tuple(cfg["axes_dim"]),
    )  # fmt: skip
    table = comfy.utils.flux_to_diffusers(cfg, output_prefix="")
    ours = patcher.model.diffusion_model.state_dict()
    weights = {}
    for key in model.state_dict():
        source = table[key]
        if isinstance(source, str):
            weights[key] = ours[source]
        elif len(source) == 2:  # (key, (dim, offset, size)): a part of a fused weight
            name, (dim, offset, size) = source
            weights[key] = ours[name].narrow(dim, offset, size)
        else:  # (key, None, function)
            weights[key] = source[2](ours[source[0]])
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.eval()


def diffusers_flux_forward(model, inputs: Inputs) -> torch.Tensor:
    """diffusers' Flux on ComfyUI's input: 2x2 patches packed into tokens, position ids (0, row, column)."""
    b, c, h, w = inputs.x.shape
    packed = inputs.x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    with torch.no_grad():
        out = model(hidden_states=packed, encoder_hidden_states=inputs.context, pooled_projections=inputs.pooled,
                    timestep=inputs.t, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(inputs.context.shape[1], 3),
                    guidance=inputs.guidance).sample  # fmt: skip
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).float()


def comfy_forward(patcher, inputs: Inputs) -> torch.Tensor:
    """The ComfyUI model's output with whatever patches (LoRAs) the patcher holds applied, loaded the way
    ComfyUI loads a model for sampling; every model is unloaded (its patches taken off) before and after,
    the trainer's clone among them."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.diffusion_model(
                inputs.x, inputs.t, inputs.context, **inputs.comfy_kwargs()
            ).float()
    finally:
        mm.unload_all_models()


def diffusers_forward(unet, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs.x, inputs.t, inputs.context, **inputs.diffusers_kwargs()).sample.float()
