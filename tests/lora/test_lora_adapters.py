"""Properties every adapter must have: bypass == merged, zero start, gradients, seeding, round-trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import ALGORITHMS, AdapterModule, ConvSpec, LoKrModule
from lora.functional.loha import loha_delta_weight

# name: (weight_shape, conv, input shape)
LAYERS = {
    "linear": ((12, 20), None, (3, 5, 20)),
    "conv2d": ((8, 6, 3, 3), ConvSpec(stride=2, padding=1), (2, 6, 9, 9)),
}
EXTRA_CONVS = {
    "conv1d-same-dilated": ((10, 4, 5), ConvSpec(padding="same", dilation=2), (2, 4, 16)),
    "conv2d-reflect": ((6, 4, 3, 3), ConvSpec(padding=(1, 2), padding_mode="reflect"), (2, 4, 7, 8)),
    "conv2d-circular-same": ((6, 4, 2, 3), ConvSpec(padding="same", padding_mode="circular"), (2, 4, 7, 8)),
    "conv3d": ((4, 4, 3, 1, 3), ConvSpec(stride=(1, 2, 1), padding=(1, 0, 1)), (1, 4, 5, 6, 5)),
}
DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 3e-2)}


def _make(
    variant: tuple[str, int], shape, conv, dtype=torch.float32, seed: int = 0, alpha: float | None = 3.0
) -> AdapterModule:
    name, rank = variant
    return ALGORITHMS[name](
        shape, rank, alpha, conv=conv, generator=torch.Generator().manual_seed(seed), dtype=dtype
    )


def _reference(x: torch.Tensor, weight: torch.Tensor, conv: ConvSpec | None) -> torch.Tensor:
    """The base layer's op, through nn layers (not our helpers), so padding modes are checked independently."""
    if conv is None:
        return F.linear(x, weight)
    layer_cls = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.dim()]
    layer = layer_cls(
        weight.shape[1],
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=False,
        padding_mode=conv.padding_mode,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer(x)


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.float() - expected.float()).abs().max().item()
    ref = expected.float().abs().max().item()
    assert ref > 0, "reference is all zeros; the test would prove nothing"
    assert err <= tol * ref, f"max abs error {err:.3g} > {tol} x max |expected| {ref:.3g}"


# Every algorithm x {Linear, Conv2d} x {fp32, bf16}, plus the other conv layouts in fp32.
BYPASS_CASES = [(layer, dtype) for layer in LAYERS for dtype in DTYPES] + [
    (layer, "fp32") for layer in EXTRA_CONVS
]


@pytest.mark.parametrize(
    ("layer_name", "dtype_name"), BYPASS_CASES, ids=[f"{layer}-{dt}" for layer, dt in BYPASS_CASES]
)
def test_bypass_equals_merged(variant, layer_name, dtype_name, randomise):
    shape, conv, x_shape = {**LAYERS, **EXTRA_CONVS}[layer_name]
    dtype, tol = DTYPES[dtype_name]
    module = randomise(_make(variant, shape, conv, dtype))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        delta = module.delta_weight()
        assert delta.shape == shape and delta.dtype == dtype
        _assert_rel_close(module(x), _reference(x, delta, conv), tol)


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_bypass_casts_params_to_input_dtype(variant, layer_name, randomise):
    """fp32 params with bf16 input (what autocast/bf16 models feed) compute in bf16; grads reach the params."""
    shape, conv, x_shape = LAYERS[layer_name]
    module = randomise(_make(variant, shape, conv))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = module(x)
    assert out.dtype == torch.bfloat16
    _assert_rel_close(
        out.detach(), _reference(x, module.delta_weight().detach().to(torch.bfloat16), conv), 3e-2
    )
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_bypass_under_cpu_autocast(variant, layer_name, randomise):
    shape, conv, x_shape = LAYERS[layer_name]
    module = randomise(_make(variant, shape, conv))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    _assert_rel_close(out.detach().float(), _reference(x, module.delta_weight().detach(), conv), 3e-2)
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_fresh_adapter_is_exactly_zero(variant, layer_name, dtype_name):
    shape, conv, x_shape = LAYERS[layer_name]
    dtype, _ = DTYPES[dtype_name]
    module = _make(variant, shape, conv, dtype)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    assert torch.count_nonzero(module.delta_weight()) == 0
    assert torch.count_nonzero(module(x)) == 0
    # ... while the factors that are meant to be random are.
    assert sum(torch.count_nonzero(p).item() for p in module.parameters()) > 0


def _wrapped(variant, shape, conv):
    """A frozen base layer plus an adapter on it: y = base(x) + adapter(x)."""
    if conv is None:
        base = nn.Linear(shape[1], shape[0])
    else:
        base = nn.Conv2d(shape[1], shape[0], shape[2:], stride=conv.stride, padding=conv.padding)
    base.requires_grad_(False)
    return base, _make(variant, shape, conv)


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_only_adapter_params_get_gradients(variant, layer_name):
    shape, conv, x_shape = LAYERS[layer_name]
    torch.manual_seed(0)
    base, adapter = _wrapped(variant, shape, conv)
    x = torch.randn(x_shape)
    target = torch.randn_like(base(x))
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    zero_init = [name for name, p in adapter.named_parameters() if torch.count_nonzero(p) == 0]
    assert zero_init, "some factor should start at zero"

    for step in range(2):
        optimizer.zero_grad()
        loss = F.mse_loss(base(x) + adapter(x), target)
        loss.backward()
        assert base.weight.grad is None and base.bias.grad is None
        grads = dict(adapter.named_parameters())
        assert all(p.grad is not None for p in grads.values())
        if step == 0:
            # Only the zero factor can move on the first step; it must.
            assert all(torch.count_nonzero(grads[name].grad) > 0 for name in zero_init)
        else:
            # After one update ΔW != 0 and every factor gets signal.
            assert all(torch.count_nonzero(p.grad) > 0 for p in grads.values())
        optimizer.step()


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_seed_determinism(variant, layer_name):
    shape, conv, _ = LAYERS[layer_name]
    a, b, c = (_make(variant, shape, conv, seed=seed) for seed in (5, 5, 6))
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert pa.keys() == pb.keys() == pc.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    # Same seed, other dtype: the same draws, rounded.
    d = _make(variant, shape, conv, dtype=torch.bfloat16, seed=5)
    assert all(torch.equal(pa[k].to(torch.bfloat16), p) for k, p in d.named_parameters())


@pytest.mark.parametrize("layer_name", [*LAYERS, "conv1d-same-dilated", "conv3d"])
def test_state_dict_round_trip(variant, layer_name, randomise):
    shape, conv, x_shape = {**LAYERS, **EXTRA_CONVS}[layer_name]
    cls = ALGORITHMS[variant[0]]
    module = randomise(_make(variant, shape, conv))
    sd = module.adapter_state_dict()
    assert set(sd) <= {*cls.state_keys, "alpha"} and "alpha" in sd
    assert sd["alpha"].dim() == 0 and sd["alpha"].dtype == torch.float32
    assert all(t.is_contiguous() and not t.requires_grad for t in sd.values())

    loaded = cls.from_adapter_state_dict(sd, shape, conv=conv)
    assert (loaded.rank, loaded.alpha, loaded.scale) == (module.rank, module.alpha, module.scale)
    assert torch.equal(loaded.delta_weight(), module.delta_weight())
    x = torch.randn(x_shape)
    assert torch.equal(loaded(x), module(x))
    # A snapshot: training on does not change an already-taken state dict, nor the source dict.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    assert all(torch.equal(sd[k], v) for k, v in loaded.adapter_state_dict().items())


def test_state_dict_dtype_cast(variant, randomise):
    shape, conv, _ = LAYERS["conv2d"]
    module = randomise(_make(variant, shape, conv))
    sd = module.adapter_state_dict(dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for k, t in sd.items() if k != "alpha")
    assert sd["alpha"].dtype == torch.float32
    loaded = ALGORITHMS[variant[0]].from_adapter_state_dict(sd, shape, conv=conv, dtype=torch.bfloat16)
    assert loaded.delta_weight().dtype == torch.bfloat16
    _assert_rel_close(loaded.delta_weight().float(), module.delta_weight().detach(), 3e-2)


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_alpha_is_honoured(variant, layer_name, randomise):
    shape, conv, _ = LAYERS[layer_name]
    cls = ALGORITHMS[variant[0]]
    module = randomise(_make(variant, shape, conv, alpha=None))
    assert module.scale == 1.0 and module.alpha == module.rank
    sd = module.adapter_state_dict()
    reference = module.delta_weight().detach()
    alpha_ignored = isinstance(module, LoKrModule) and module.w2 is not None  # both LoKr factors full

    sd["alpha"] = torch.tensor(0.75)
    loaded = cls.from_adapter_state_dict(sd, shape, conv=conv)
    expected_scale = 1.0 if alpha_ignored else 0.75 / module.rank
    assert loaded.scale == pytest.approx(expected_scale)
    torch.testing.assert_close(loaded.delta_weight(), reference * expected_scale)

    del sd["alpha"]  # no alpha: scale 1, as stock ComfyUI
    loaded = cls.from_adapter_state_dict(sd, shape, conv=conv)
    assert loaded.scale == 1.0 and torch.equal(loaded.delta_weight(), reference)

    # Constructor alpha: scale = alpha / rank (LoKr-full: 1).
    module = _make(variant, shape, conv, alpha=2.0)
    assert module.scale == pytest.approx(1.0 if alpha_ignored else 2.0 / module.rank)


def test_loha_custom_backward_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    factors = [
        torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
        for shape in ((5, 3), (3, 7), (5, 2), (2, 7))
    ]
    assert torch.autograd.gradcheck(lambda *f: loha_delta_weight(*f, 0.7, (5, 7)), factors)
    plain = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * 0.7
    torch.testing.assert_close(loha_delta_weight(*factors, 0.7, (5, 7)), plain)
