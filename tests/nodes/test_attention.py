"""The training clone's attention override: same numbers as ComfyUI's own attention, installed only
on the clone, and really reached by ComfyUI's UNet and MMDiT blocks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def attention(fast_attention):
    from comfy.ldm.modules import attention

    return attention


def _basic(attention):
    """ComfyUI's plain attention, unwrapped (the reference: the full score matrix in fp32)."""
    return attention.attention_basic.__wrapped__


def _qkv(b, heads, n, nk, dim_head, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * dim_head, generator=gen).to(dtype)
    k = torch.randn(b, nk, heads * dim_head, generator=gen).to(dtype)
    v = torch.randn(b, nk, heads * dim_head, generator=gen).to(dtype)
    return q, k, v


def _never(*args, **kwargs):
    raise AssertionError("the SDPA path should not call ComfyUI's function here")


@pytest.mark.parametrize("n,nk", [(64, 64), (64, 7)])
def test_sdpa_matches_comfy_attention_forward_and_backward(fast_attention, attention, n, nk):
    q, k, v = _qkv(2, 4, n, nk, 8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ours = fast_attention.sdpa_attention(_never, *leaves, 4)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = _basic(attention)(*ref_leaves, 4)
    assert ours.shape == ref.shape == (2, n, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip_reshape,skip_output_reshape", [(True, True), (True, False), (False, True)])
def test_sdpa_layouts_match_comfy(fast_attention, attention, skip_reshape, skip_output_reshape):
    q, k, v = _qkv(2, 4, 16, 16, 8, seed=3)
    if skip_reshape:  # [B, H, N, D], as Flux passes them
        q, k, v = (t.view(2, -1, 4, 8).transpose(1, 2) for t in (q, k, v))
    kw = dict(skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    ours = fast_attention.sdpa_attention(_never, q, k, v, 4, **kw)
    ref = _basic(attention)(q, k, v, 4, **kw)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_masked_and_small_bf16_cpu_calls_go_to_comfys_function(fast_attention):
    calls = []

    def comfy_fn(q, k, v, heads, **kwargs):
        calls.append(kwargs)
        return "comfy"

    q, k, v = _qkv(1, 2, 8, 8, 4)
    mask = torch.zeros(8, 8)
    assert fast_attention.sdpa_attention(comfy_fn, q, k, v, 2, mask=mask, transformer_options={}) == "comfy"
    assert calls[-1]["mask"] is mask and "transformer_options" in calls[-1]
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert fast_attention.sdpa_attention(comfy_fn, qb, kb, vb, 2) == "comfy"
    assert len(calls) == 2
    # Past the size where PyTorch's flash kernel wins in bf16 on CPU, SDPA runs.
    side = int(fast_attention._CPU_BF16_FLASH_MIN_SCORES**0.5) + 1
    big = _qkv(1, 1, side, side, 4, dtype=torch.bfloat16)
    out = fast_attention.sdpa_attention(comfy_fn, *big, 1)
    assert torch.is_tensor(out) and out.dtype == torch.bfloat16 and len(calls) == 2


def test_attn_precision_fp32_upcasts_and_returns_input_dtype(fast_attention):
    q, k, v = (t.half() for t in _qkv(1, 2, 8, 8, 4))  # fp16 always takes the SDPA path
    out = fast_attention.sdpa_attention(_never, q, k, v, 2, attn_precision=torch.float32)
    ref = fast_attention.sdpa_attention(_never, q.float(), k.float(), v.float(), 2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def _patcher(module):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        module, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def test_override_is_set_on_the_clone_only(fast_attention, attention, monkeypatch):
    original = _patcher(torch.nn.Linear(2, 2))
    clone = original.clone()
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_sub_quad)
    assert fast_attention.use_fast_attention(clone) == "attention_sub_quad"
    assert (
        clone.model_options["transformer_options"]["optimized_attention_override"]
        is fast_attention.sdpa_attention
    )
    assert "optimized_attention_override" not in original.model_options["transformer_options"]
    # An override chosen by someone else is kept; a fast ComfyUI attention is left alone.
    other = original.clone()
    other.model_options["transformer_options"]["optimized_attention_override"] = _never
    assert fast_attention.use_fast_attention(other) is None
    assert other.model_options["transformer_options"]["optimized_attention_override"] is _never
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    assert fast_attention.use_fast_attention(original.clone()) is None


def _count_calls(fast_attention):
    calls = []

    def counting(func, *args, **kwargs):
        calls.append(func.__name__)
        return fast_attention.sdpa_attention(func, *args, **kwargs)

    return counting, calls


def _unet():
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    return UNetModel(
        image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1], dropout=0,
        channel_mult=[1], num_heads=2, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1],
        context_dim=16, use_linear_in_transformer=True, transformer_depth_middle=1, transformer_depth_output=[1, 1],
        adm_in_channels=None, operations=comfy.ops.disable_weight_init,
    )  # fmt: skip


def _init(module):
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def test_unet_attention_reaches_the_override_with_same_output(fast_attention):
    net = _init(_unet()).eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(3))
    counting, calls = _count_calls(fast_attention)
    with torch.no_grad():
        ref = net(x, t, context=ctx, transformer_options={})
        ours = net(x, t, context=ctx, transformer_options={"optimized_attention_override": counting})
    assert len(calls) == 8, calls  # 4 transformer blocks x (self, cross)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_mmdit_joint_attention_reaches_the_override_with_same_output(fast_attention):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    torch.manual_seed(0)
    net = _init(MMDiT(input_size=None, patch_size=2, in_channels=4, depth=2, adm_in_channels=8, context_embedder_config={
        "target": "torch.nn.Linear", "params": {"in_features": 12, "out_features": 128}}, pos_embed_max_size=8,
        operations=comfy.ops.disable_weight_init)).eval()  # fmt: skip
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.5])
    ctx = torch.randn(1, 3, 12, generator=torch.Generator().manual_seed(3))
    y = torch.randn(1, 8, generator=torch.Generator().manual_seed(4))
    counting, calls = _count_calls(fast_attention)
    with torch.no_grad():
        ref = net(x, t, y=y, context=ctx, transformer_options={})
        ours = net(x, t, y=y, context=ctx, transformer_options={"optimized_attention_override": counting})
    assert len(calls) == 2, calls  # one joint attention per block
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
