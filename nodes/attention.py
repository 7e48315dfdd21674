"""Fast attention for training: ComfyUI's slow attention implementations replaced, on the training
clone only, by PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
