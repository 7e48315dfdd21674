"""Glue between ComfyUI objects (ModelPatcher, LATENT, CONDITIONING) and the ComfyUI-free training code."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence

import comfy.model_management
import comfy.model_sampling
import torch
import torch.nn.functional as F

from ..training.autograd_safe import ThreadGatedPatch, writes_into_used_tensors
from ..training.config import TrainConfig
from ..training.data import Sample, collate
from ..training.objective import Objective

log = logging.getLogger("loralab")


def prediction_type(model_sampling) -> str:
    """Which target the family was trained on, from the class of ComfyUI's model_sampling: eps, v and
    flow by name; any other parameterisation (EDM, Cosmos' rectified flow, x0 models, ones newer
    ComfyUI adds) trains in its network's raw output space, read off its own calculate_denoised."""
    ms = comfy.model_sampling
    # Order matters: EDM subclasses V_PREDICTION, X0 and V_PREDICTION subclass EPS.
    if isinstance(model_sampling, getattr(ms, "EDM", ())) or isinstance(
        model_sampling, getattr(ms, "X0", ())
    ):
        return "raw"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    return "raw"


def objective_for(patcher, config: TrainConfig | None = None) -> Objective:
    """The model's own sampling and target; noise-level options from config (None: plain uniform)."""
    ms = patcher.get_model_object("model_sampling")
    if config is None:
        return Objective(ms, prediction_type(ms))
    return Objective(
        ms, prediction_type(ms), timestep_sampling=config.timestep_sampling, logit_mean=config.logit_mean,
        logit_std=config.logit_std, flow_shift=config.flow_shift, min_snr_gamma=config.min_snr_gamma,
        noise_offset=config.noise_offset,
    )  # fmt: skip


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


def in_place_writes(patcher, sample: Sample, device: torch.device) -> str:
    """Whether the model's code writes in place into a tensor it already used (an explicit in-place
    op that autograd cannot train through), found by one forward pass without grad on ``sample``:
    the op's name, or "" (most models)."""
    x0, cond = collate([sample], [0], device)
    sigma = torch.tensor(
        [float(patcher.get_model_object("model_sampling").percent_to_sigma(0.5))], device=device
    )
    predict = make_predict_x0(patcher)
    floating = [t for t in (x0, *cond.values()) if torch.is_tensor(t) and t.is_floating_point()]
    return writes_into_used_tensors(lambda: predict(x0, sigma, cond), floating)


def make_predict_x0(patcher):
    """(x_t, sigma, cond) -> x0 estimate through ComfyUI's own apply_model (input scaling, timestep
    mapping, dtype casts, patches registered on the model), the path samplers use."""
    base = patcher.model
    topts = patcher.model_options.get("transformer_options", {})

    def predict_x0(x_t: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        opts = dict(topts)
        opts["sigmas"] = sigma
        return base.apply_model(x_t, sigma, transformer_options=opts, **cond)

    return predict_x0


# ComfyUI's attention choices that are slow in training: chunked Python loops (sub-quadratic, split)
# or the full score matrix (basic). ComfyUI picks sub-quadratic on CPU.
_SLOW_ATTENTION = ("attention_sub_quad", "attention_split", "attention_basic")
# Below this many query x key tokens, ComfyUI's batched-matmul attention beats PyTorch's flash kernel
# in bf16 on CPU (2 cores, avx512_bf16, fwd+bwd, 8 heads of 40: 1024x1024 12.0 vs 23.4 ms; 2048x2048
# 117 vs 97 ms); in fp32 the flash kernel wins at every size measured (1024x1024 30 vs 69 ms).
_CPU_BF16_FLASH_MIN_SCORES = 2_000_000


def use_fast_attention(patcher) -> str | None:
    """Route this clone's attention through PyTorch's scaled_dot_product_attention when ComfyUI runs
    one of its slow implementations, via the per-model `optimized_attention_override` transformer
    option (feature-detected: ComfyUI's `wrap_attn`). The caller's MODEL keeps its own attention.
    Returns the name of the implementation replaced, or None when nothing was changed."""
    try:
        from comfy.ldm.modules import attention
    except ImportError:
        return None
    current = getattr(getattr(attention, "optimized_attention", None), "__name__", "")
    if not hasattr(attention, "wrap_attn") or current not in _SLOW_ATTENTION:
        return None
    topts = patcher.model_options.setdefault("transformer_options", {})
    if "optimized_attention_override" in topts:  # someone chose an attention for this model already
        return None
    topts["optimized_attention_override"] = sdpa_attention
    return current


def sdpa_attention(
    func,
    q,
    k,
    v,
    heads,
    mask=None,
    attn_precision=None,
    skip_reshape=False,
    skip_output_reshape=False,
    **kwargs,
):
    """ComfyUI's attention contract on PyTorch SDPA: q, k, v as [B, N, H*D] (or [B, H, N, D] with
    skip_reshape), output [B, N, H*D] (or [B, H, N, D] with skip_output_reshape). Masked calls, and
    small bf16 ones on CPU (see _CPU_BF16_FLASH_MIN_SCORES), go to ComfyUI's own function `func`."""
    tokens = q.shape[-2] * k.shape[-2] if skip_reshape else q.shape[1] * k.shape[1]
    small_bf16_cpu = (
        q.dtype == torch.bfloat16 and q.device.type == "cpu" and tokens < _CPU_BF16_FLASH_MIN_SCORES
    )
    if mask is not None or small_bf16_cpu:
        return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **kwargs)  # fmt: skip
    if skip_reshape:
        b, dim_head = q.shape[0], q.shape[-1]
    else:
        b, dim_head = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.view(t.shape[0], -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if attn_precision == torch.float32 and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v).to(dtype)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def compute_dtype(training_dtype: str, device: torch.device) -> torch.dtype:
    """bf16 where the device does bf16 well; fp32 otherwise (said in the log)."""
    if training_dtype != "bf16":
        return torch.float32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("LoRA Lab: this GPU has no bf16 support; training in fp32")
        return torch.float32
    if device.type == "cpu" and not _cpu_has_bf16():
        log.info("LoRA Lab: this CPU has no native bf16 (avx512_bf16 / amx); training in fp32")
        return torch.float32
    return torch.bfloat16


def set_compute_dtype(patcher, dtype: torch.dtype) -> None:
    """Run this clone's forward in `dtype` through ComfyUI's own manual-cast machinery (inputs,
    weights per op and activations), as samplers do for a model stored in another dtype. It is an
    object patch of the clone: the caller's MODEL keeps its own setting. Compared with autocast,
    activations stay in bf16 end to end, which is what lowers peak memory."""
    if dtype != patcher.model.get_dtype():
        patcher.set_model_compute_dtype(dtype)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def materialize_inference_tensors(module: torch.nn.Module) -> int:
    """ComfyUI loads weights under torch.inference_mode, and autograd can neither save inference
    tensors for backward nor track views of them. Replace each one by a normal copy with identical
    values (one tensor at a time, so peak memory grows by the largest tensor only). Values and
    module structure are unchanged; later runs find nothing to do."""
    count = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    count += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    count += 1
    return count


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Grad on inside ComfyUI's inference_mode executor, model_management.in_training set where
    this ComfyUI has it (some models check it), and fused kernels differentiable (see below)."""
    mm = comfy.model_management
    had = hasattr(mm, "in_training")
    old = getattr(mm, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad(), differentiable_kernels():
        try:
            if had:
                mm.in_training = True
            yield
        finally:
            if had:
                mm.in_training = old


_KITCHEN: ThreadGatedPatch | None = None


def _kitchen_patch() -> ThreadGatedPatch | None:
    """comfy_kitchen's functions that have an eager twin, each routed to the twin for graph calls."""
    global _KITCHEN
    if _KITCHEN is None:
        try:
            import comfy_kitchen
            from comfy_kitchen.backends import eager
        except ImportError:
            return None

        def routes() -> dict:
            return {
                name: functools.partial(_routed, reference=getattr(eager, name))
                for name in getattr(eager, "__all__", ())
                if callable(getattr(comfy_kitchen, name, None)) and callable(getattr(eager, name, None))
            }

        _KITCHEN = ThreadGatedPatch(comfy_kitchen, routes)
    return _KITCHEN


def _routed(native, reference):
    @functools.wraps(native)
    def call(*args, **kwargs):
        graph = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())
        )
        return reference(*args, **kwargs) if graph and _KITCHEN.on() else native(*args, **kwargs)

    return call


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Newer ComfyUI calls comfy_kitchen's fused kernels (RoPE, RMSNorm + RoPE, adaLN) from model code,
    in places its own training switch does not reach (Cosmos Predict2's attention); those kernels have
    no autograd formula, so backward fails. Within the block, on this thread, a call of such a function
    with tensors that take part in autograd runs comfy_kitchen's own eager implementation of the same
    function instead (plain PyTorch: the library's reference for its kernels), which autograd can
    differentiate. Calls without grad, and every other thread, keep the fused kernel. Feature-detected:
    nothing happens where comfy_kitchen or its eager backend is absent (ComfyUI 0.3.x)."""
    patch = _kitchen_patch()
    if patch is None:
        yield
        return
    with patch.active():
        yield
