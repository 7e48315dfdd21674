"""The graph's LATENT and CONDITIONING inputs turned into training samples: one latent and one set of
model kwargs per image, in the model's own space, copied once before the loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..training.data import Sample


def split_latents(latents: Sequence[dict]) -> list[torch.Tensor]:
    """LATENT inputs (each {"samples": [B, C, ...]}) -> one tensor [C, ...] per image."""
    images = []
    for i, lat in enumerate(latents):
        if not isinstance(lat, dict) or "samples" not in lat:
            raise ValueError(f"latents: input {i + 1} is not a LATENT (a dict with 'samples')")
        samples = lat["samples"]
        if samples.ndim < 3:
            raise ValueError(
                f"latents: input {i + 1} has shape {tuple(samples.shape)}; expected [batch, channels, ...]"
            )
        images.extend(samples[j].clone() for j in range(samples.shape[0]))
    return images


def split_conditioning(positive: Sequence[list]) -> list[tuple[torch.Tensor, dict]]:
    """CONDITIONING inputs -> one (context [1, T, D], options) pair per image. A conditioning entry
    whose tensor has batch B counts as B entries (batch-sliced pooled outputs go with them)."""
    out = []
    for cond in positive:
        for entry in cond:
            ctx, opts = entry[0], dict(entry[1])
            n = ctx.shape[0]
            for j in range(n):
                o = {}
                for k, v in opts.items():
                    o[k] = (
                        v[j : j + 1].clone()
                        if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n and n > 1
                        else v
                    )
                out.append((ctx[j : j + 1].clone(), o))
    return out


def pair_up(
    images: list[torch.Tensor], conds: list[tuple[torch.Tensor, dict]]
) -> list[tuple[torch.Tensor, dict]]:
    if not images:
        raise ValueError("latents: the latent batch is empty; give at least one latent image")
    if len(conds) == 1:
        return conds * len(images)
    if len(conds) != len(images):
        raise ValueError(
            f"positive: got {len(conds)} conditioning entries for {len(images)} latent images; "
            f"give exactly one positive (used for every image) or one per image"
        )
    return conds


def build_samples(
    patcher, latents: Sequence[dict], positive: Sequence[list], device: torch.device
) -> list[Sample]:
    """Latents into the model's space and conditioning into model kwargs, once, before the loop."""
    base = patcher.model
    images = split_latents(latents)
    conds = pair_up(images, split_conditioning(positive))
    samples = []
    for i, (img, (ctx, opts)) in enumerate(zip(images, conds, strict=True)):
        if not torch.isfinite(img).all():
            raise ValueError(f"latents: image {i + 1} contains NaN or inf values")
        bad = [
            k
            for k, v in [("context", ctx), *opts.items()]
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise ValueError(f"positive: conditioning {i + 1} has NaN or inf values in {', '.join(bad)}")
        x0 = base.process_latent_in(img[None].float()).to(device)
        params = {k: v for k, v in opts.items()}
        params.update(cross_attn=ctx.to(device), device=device, noise=x0, latent_image=x0)
        model_conds = base.extra_conds(**params)
        cond = {
            key: _owned(c.process_cond(batch_size=1, device=device, area=None).cond)
            for key, c in model_conds.items()
        }
        samples.append(Sample(x0[0].detach().clone(), cond))
    return samples


def _owned(value):
    """A conditioning value as the sampler would pass it, detached from the caller's tensors: tensors
    copied, lists / tuples / dicts of them item by item, plain values (ints, floats, None, strings) as
    they are. ComfyUI's conditioning classes decide the value (CONDConstant: the value itself,
    CONDList: a list of tensors); nothing here depends on the family."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(v) for v in value)
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    return value


def pixel_resolution(patcher, samples: Sequence[Sample]) -> str | None:
    """The largest training image size in pixels as "<width>x<height>" (ModelSpec's resolution), from
    the latents and the latent format's downscale ratio (feature-detected; 8 for 4- and 16-channel
    image latents where this ComfyUI does not state it). None where it cannot be told."""
    ratio = getattr(patcher.model.latent_format, "spacial_downscale_ratio", None)
    sizes = [tuple(s.latent.shape[-2:]) for s in samples]
    if ratio is None:
        image_latent = all(s.latent.ndim == 3 and s.latent.shape[0] in (4, 16) for s in samples)
        ratio = 8 if image_latent else None
    if ratio is None or not sizes:
        return None
    h, w = max(sizes, key=lambda hw: hw[0] * hw[1])
    return f"{w * ratio}x{h * ratio}"
