"""The one adapter contract, for every algorithm: a layer with its adapter attached computes what the
same layer computes with the merged weight; a fresh adapter leaves the layer exactly as it was; the
saved tensors, applied by stock ComfyUI and by LyCORIS, give that merged weight; only adapter
parameters learn. OFT (rotates the output) and DoRA (rescales the input) are the cases an additive
contract could not hold."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import ALGORITHMS, DoRAModule, OFTModule, layer_spec
from lora.inject import AdapterSet

# (id, layer factory); every layer has a bias, which OFT must leave unrotated and DoRA unscaled.
LAYERS = {
    "linear": lambda: nn.Linear(12, 16),
    "conv1d": lambda: nn.Conv1d(6, 8, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "conv2d-reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "conv3d": lambda: nn.Conv3d(4, 8, (1, 3, 3), padding=(0, 1, 1)),
}
INPUTS = {"linear": (2, 5, 12), "conv1d": (2, 6, 9), "conv2d": (2, 6, 7, 7), "conv2d-reflect": (2, 6, 6, 6),
          "conv3d": (1, 4, 2, 5, 5)}  # fmt: skip
RANKS = {"LoRA": 4, "LoHa": 4, "LoKr": 4, "OFT": 4, "DoRA": 4}


def _layer(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return LAYERS[kind]().to(dtype).requires_grad_(False)


def _adapter(algorithm: str, layer: nn.Module, alpha: float | None = 3.0, randomise: bool = True):
    shape, conv = layer_spec(layer)
    cls = ALGORITHMS[algorithm]
    adapter = cls(shape, RANKS[algorithm], 0.5 if cls is OFTModule and alpha else alpha, conv=conv,
                  generator=torch.Generator().manual_seed(1))  # fmt: skip
    if adapter.needs_base:
        adapter.init_from_base(layer.weight)
    if randomise:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                noise = torch.randn(param.shape, generator=generator) * 0.3
                param.copy_(param * (1 + noise) if name == "magnitude" else noise)
    return adapter


def _merged_forward(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's own op with ``weight`` in place of its weight (bias, stride, padding mode kept)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def _run(layer: nn.Module, adapter, x: torch.Tensor) -> torch.Tensor:
    root = nn.Sequential(layer)
    adapters = AdapterSet({"0": adapter})
    with adapters.attached(root):
        return root(x)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_bypass_equals_merged_fp32(algorithm, kind):
    layer = _layer(kind, torch.float32)
    adapter = _adapter(algorithm, layer)
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(3))
    merged = adapter.merge(layer.weight)
    assert (merged - layer.weight).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(
        _run(layer, adapter, x), _merged_forward(layer, merged, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_bypass_equals_merged_bf16(algorithm, kind):
    """A bf16 base layer (the usual training dtype) with fp32 adapter parameters."""
    layer = _layer(kind, torch.bfloat16)
    adapter = _adapter(algorithm, layer)
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = _run(layer, adapter, x)
    assert out.dtype == torch.bfloat16
    reference = _merged_forward(layer.float(), adapter.merge(layer.weight.float()), x.float())
    assert (out.float() - reference).abs().max() <= 3e-2 * reference.abs().max()


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_fresh_adapter_leaves_layer_exactly(algorithm, kind):
    layer = _layer(kind, torch.float32)
    adapter = _adapter(algorithm, layer, randomise=False)
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(3))
    assert torch.equal(_run(layer, adapter, x), layer(x))
    assert torch.equal(adapter.merge(layer.weight), layer.weight)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_only_adapter_parameters_learn(algorithm):
    layer = _layer("conv2d", torch.float32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    adapter = _adapter(algorithm, layer, randomise=False)
    root = nn.Sequential(layer)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    x = torch.randn(INPUTS["conv2d"], generator=torch.Generator().manual_seed(3))
    target = _run(layer, _adapter(algorithm, layer), x).detach()  # reachable: a randomised adapter's output
    losses = []
    with AdapterSet({"0": adapter}).attached(root):
        for _ in range(30):
            loss = F.mse_loss(root(x), target)
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in adapter.parameters())
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(p.grad is None for p in layer.parameters())


def test_unbound_dora_refuses_to_run():
    layer = _layer("linear", torch.float32)
    shape, conv = layer_spec(layer)
    adapter = DoRAModule(shape, 4)
    assert adapter.needs_base
    with pytest.raises(RuntimeError, match="init_from_base"):
        _run(layer, adapter, torch.randn(2, 12))


def test_init_from_base_only_touches_fresh_dora():
    root = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 8))
    fresh = DoRAModule((16, 12), 4)
    loaded = DoRAModule.from_adapter_state_dict(_adapter("DoRA", root[1]).adapter_state_dict(), (8, 16))
    magnitude = loaded.magnitude.detach().clone()
    adapters = AdapterSet({"0": fresh, "1": loaded})
    assert adapters.init_from_base(root) == 1
    assert torch.equal(loaded.magnitude, magnitude) and not fresh.needs_base


# ---- files: round trip, stock ComfyUI, LyCORIS ------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv3d"])
@pytest.mark.parametrize("algorithm", ["OFT", "DoRA"])
def test_file_round_trip(algorithm, kind):
    layer = _layer(kind, torch.float32)
    adapter = _adapter(algorithm, layer)
    shape, conv = layer_spec(layer)
    loaded = ALGORITHMS[algorithm].from_adapter_state_dict(adapter.adapter_state_dict(), shape, conv=conv)
    assert not loaded.needs_base and loaded.alpha == adapter.alpha and loaded.rank == adapter.rank
    assert torch.equal(loaded.merge(layer.weight), adapter.merge(layer.weight))


def test_oft_layout_and_constraint():
    assert OFTModule((320, 5), 16).blocks.shape == (20, 16, 16)
    adapter = OFTModule((12, 5), 5)
    assert adapter.blocks.shape == (4, 3, 3) and adapter.rank == 3  # 5 does not divide 12; 3 ≤ √12 does
    assert adapter.alpha == 0.0  # no constraint unless asked
    with pytest.raises(ValueError, match=r"'oft_blocks' has shape \(2, 5, 5\)"):
        OFTModule.from_adapter_state_dict({"oft_blocks": torch.zeros(2, 5, 5)}, (12, 5))
    with pytest.raises(ValueError, match=r"'oft_blocks' has shape \(2, 4, 4\), expected \(3, 4, 4\)"):
        OFTModule.from_adapter_state_dict({"oft_blocks": torch.zeros(2, 4, 4)}, (12, 5))
    # A constraint caps ‖Q‖: a large Q and a capped one rotate alike.
    big = OFTModule((8, 4), 4, 0.1)
    with torch.no_grad():
        big.blocks.copy_(torch.randn(big.blocks.shape, generator=torch.Generator().manual_seed(0)) * 10)
    q = big.blocks - big.blocks.transpose(1, 2)
    scaled = OFTModule((8, 4), 4, 0.0)
    with torch.no_grad():
        scaled.blocks.copy_(big.blocks * (0.1 / (q.norm() + 1e-8)))
    torch.testing.assert_close(big.rotation(), scaled.rotation())


def test_dora_refuses_output_axis_magnitude():
    sd = _adapter("DoRA", _layer("linear", torch.float32)).adapter_state_dict()
    sd["dora_scale"] = torch.ones(16, 1)  # one per output row: peft / LyCORIS wd_on_out
    with pytest.raises(ValueError, match="per output row"):
        DoRAModule.from_adapter_state_dict(sd, (16, 12))


def _comfy_patched(comfy_lora, sd: dict, weight: torch.Tensor, caplog) -> torch.Tensor:
    prefix = "diffusion_model.layer"
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(
            {f"{prefix}.{k}": v for k, v in sd.items()}, {prefix: f"{prefix}.weight"}
        )
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    return comfy_lora.calculate_weight(
        [(1.0, patches[f"{prefix}.weight"], 1.0, None, None)], weight.clone(), "w"
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize(("algorithm", "alpha"), [("OFT", None), ("OFT", 0.5), ("DoRA", None), ("DoRA", 3.0)])
def test_stock_comfyui_applies_the_merged_weight(comfy_lora, caplog, algorithm, alpha, kind):
    layer = _layer(kind, torch.float32)
    adapter = _adapter(algorithm, layer, alpha=alpha)
    patched = _comfy_patched(comfy_lora, adapter.adapter_state_dict(), layer.weight, caplog)
    torch.testing.assert_close(patched, adapter.merge(layer.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("algorithm", ["OFT", "DoRA"])
def test_lycoris_computes_the_merged_weight(algorithm, kind):
    """LyCORIS' diag-oft (no constraint: it scales the file's alpha by the output size, ComfyUI does
    not) and its LoCon with weight_decompose, wd_on_out=False."""
    lycoris_modules = pytest.importorskip("lycoris.modules", reason="lycoris-lora not installed")
    layer = _layer(kind, torch.float32)
    adapter = _adapter(algorithm, layer, alpha=None if algorithm == "OFT" else 3.0)
    sd = adapter.adapter_state_dict()
    with torch.no_grad():
        if algorithm == "OFT":
            theirs = lycoris_modules.DiagOFTModule.make_module_from_state_dict(
                "x", layer, sd["oft_blocks"], None, sd["alpha"]
            )
        else:
            theirs = lycoris_modules.LoConModule("x", layer, 1.0, adapter.rank, float(sd["alpha"]),
                                                 weight_decompose=True, wd_on_out=False)  # fmt: skip
            theirs.lora_down.weight.copy_(sd["lora_down.weight"])
            theirs.lora_up.weight.copy_(sd["lora_up.weight"])
            theirs.dora_scale.copy_(sd["dora_scale"])
        merged = theirs.get_merged_weight(multiplier=1)[0]
    torch.testing.assert_close(
        merged.reshape(layer.weight.shape), adapter.merge(layer.weight), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("algorithm", ["OFT", "DoRA"])
def test_loading_casts_every_tensor_to_the_asked_dtype(algorithm):
    layer = _layer("conv2d", torch.float32)
    sd = _adapter(algorithm, layer).adapter_state_dict(dtype=torch.float16)
    shape, conv = layer_spec(layer)
    loaded = ALGORITHMS[algorithm].from_adapter_state_dict(sd, shape, conv=conv, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    names = {n for n, _ in _adapter(algorithm, layer).named_parameters()}
    assert {n for n, _ in loaded.named_parameters()} == names


def test_dora_magnitude_of_the_wrong_size_is_refused_naming_the_key():
    sd = _adapter("DoRA", _layer("linear", torch.float32)).adapter_state_dict()
    sd["dora_scale"] = torch.ones(1, 11)
    with pytest.raises(ValueError, match=r"'dora_scale' has shape \(1, 11\), expected \(1, 12\)"):
        DoRAModule.from_adapter_state_dict(sd, (16, 12))
    sd["dora_scale"] = torch.ones(12)  # flat: the same numbers, taken in the input-axis layout
    assert DoRAModule.from_adapter_state_dict(sd, (16, 12)).magnitude.shape == (1, 12)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_bypass_equals_merged_on_a_layer_without_bias(algorithm):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=1, bias=False).requires_grad_(False)
    adapter = _adapter(algorithm, layer)
    x = torch.randn(INPUTS["conv2d"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        _run(layer, adapter, x), _merged_forward(layer, adapter.merge(layer.weight), x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_merge_keeps_the_weights_dtype(algorithm):
    """ComfyUI patches a bf16 weight into a bf16 weight: merge computes in fp32 and gives bf16 back."""
    layer = _layer("linear", torch.float32)
    adapter = _adapter(algorithm, layer)
    merged = adapter.merge(layer.weight.to(torch.bfloat16))
    assert merged.dtype == torch.bfloat16
    reference = adapter.merge(layer.weight)
    assert (merged.float() - reference).abs().max() <= 2e-2 * reference.abs().max()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_output_keeps_the_activations_dtype_under_a_wider_layer(algorithm):
    """An fp32 layer (weights and bias) fed bf16 activations, as a manual-cast model does: the adapted
    output stays in the activations' dtype."""
    layer = _layer("linear", torch.float32)
    adapter = _adapter(algorithm, layer)
    x = torch.randn(INPUTS["linear"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = F.linear(x, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16))
    out = adapter.adapt_output(layer, adapter.adapt_input(layer, x) if adapter.changes_input else x, y)
    assert out.dtype == torch.bfloat16


def test_oft_constraint_only_ever_shrinks_q():
    from lora.functional.oft import oft_rotation

    blocks = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    q = blocks - blocks.transpose(1, 2)
    norm = float(torch.linalg.vector_norm(q))
    free = oft_rotation(blocks, 0.0)
    torch.testing.assert_close(oft_rotation(blocks, 2 * norm), free, rtol=0, atol=1e-6)  # under the cap
    capped = oft_rotation(blocks, norm / 2)
    assert (capped - torch.eye(4)).abs().max() < (free - torch.eye(4)).abs().max()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_same_generator_seed_gives_the_same_adapter(algorithm):
    layer = _layer("conv2d", torch.float32)
    a, b = (_adapter(algorithm, layer, randomise=False) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# A file of each algorithm for a conv layer, with LoKr in both layouts and LoHa's pairs of other ranks.
def _file_cases():
    layer = _layer("conv2d", torch.float32)
    cases = {name: _adapter(name, layer).adapter_state_dict() for name in ALGORITHMS}
    lokr = ALGORITHMS["LoKr"]
    shape, conv = layer_spec(layer)
    cases["LoKr-full"] = lokr(
        shape, 10_000, conv=conv, generator=torch.Generator().manual_seed(0)
    ).adapter_state_dict()
    w1 = cases["LoKr"]["lokr_w1"]  # as other tools may store it: w1 low-rank too
    cases["LoKr-lowrank-w1"] = {k: v for k, v in cases["LoKr"].items() if k != "lokr_w1"} | {
        "lokr_w1_a": w1[:, :1].clone(), "lokr_w1_b": torch.ones(1, w1.shape[1])}  # fmt: skip
    return shape, conv, cases


def _cls(case: str):
    return ALGORITHMS[case.split("-")[0]]


@pytest.mark.parametrize("case", [*ALGORITHMS, "LoKr-full", "LoKr-lowrank-w1"])
def test_loading_honours_dtype_and_device(case):
    shape, conv, cases = _file_cases()
    sd = {k: v.to(torch.bfloat16) for k, v in cases[case].items()}
    loaded = _cls(case).from_adapter_state_dict(sd, shape, conv=conv, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    moved = _cls(case).from_adapter_state_dict(sd, shape, conv=conv, dtype=torch.float64, device="meta")
    assert all(p.dtype == torch.float64 and p.device.type == "meta" for p in moved.parameters())


@pytest.mark.parametrize("case", [*ALGORITHMS, "LoKr-full", "LoKr-lowrank-w1"])
def test_every_broken_key_is_named_in_the_error(case):
    """Each tensor of a file, with a dimension added, a size changed, or left out, is refused with an
    error naming that key (so a user sees which tensor of which layer is wrong)."""
    shape, conv, cases = _file_cases()
    sd = cases[case]
    cls = _cls(case)
    cls.from_adapter_state_dict(sd, shape, conv=conv)  # the file itself loads
    for key, tensor in sd.items():
        if key == "alpha":
            continue
        broken = {
            # DoRA reads a magnitude by its number of values (tools differ in its layout)
            "extra dim": tensor[None] if key != "dora_scale" else torch.zeros(tensor.numel() + 1),
            "other size": torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]),
            "missing": None,
        }
        for what, bad in broken.items():
            changed = {k: v for k, v in sd.items() if k != key} if bad is None else {**sd, key: bad}
            with pytest.raises(ValueError) as info:
                cls.from_adapter_state_dict(changed, shape, conv=conv)
            # a missing half of a pair may be reported as the pair ("lokr_w1 or both lokr_w1_a and ...")
            named = key in str(info.value) if what != "missing" else any(k in str(info.value) for k in sd)
            assert named, f"{case} {key} {what}: {info.value}"


def test_a_fresh_oft_keeps_its_constraint():
    layer = _layer("linear", torch.float32)
    shape, conv = layer_spec(layer)
    assert OFTModule(shape, 4, 0.5).constraint == 0.5 and OFTModule(shape, 4).constraint == 0.0
