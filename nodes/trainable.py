"""What turns ComfyUI's inference model into one that trains: grad inside ComfyUI's inference-mode
executor, weights that autograd can save, the compute dtype, and fused kernels made differentiable."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import comfy.model_management
import torch

from ..training.autograd_safe import ThreadGatedPatch

log = logging.getLogger("loralab")


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
