"""Registry, detection, layer_spec, factorization, rank clamping and error messages."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from lora import (
    ALGORITHMS,
    AdapterModule,
    ConvSpec,
    DoRAModule,
    LoHaModule,
    LoKrModule,
    LoRAModule,
    OFTModule,
    detect_algorithm,
    factorization,
    get_algorithm,
    layer_spec,
)

# ---- registry -----------------------------------------------------------------------------------


def test_algorithms_registry():
    assert list(ALGORITHMS) == ["LoRA", "LoHa", "LoKr", "OFT", "DoRA"]
    assert list(ALGORITHMS.values()) == [LoRAModule, LoHaModule, LoKrModule, OFTModule, DoRAModule]
    for name, cls in ALGORITHMS.items():
        assert issubclass(cls, AdapterModule) and cls.algorithm == name
        assert get_algorithm(name) is cls
        assert get_algorithm(name.upper()) is cls


@pytest.mark.parametrize("bad", ["LoCon", "", None, 3])
def test_get_algorithm_unknown(bad):
    with pytest.raises(
        ValueError,
        match=r"algorithm must be one of \['LoRA', 'LoHa', 'LoKr', 'OFT', 'DoRA'\], got "
        + re.escape(repr(bad)),
    ):
        get_algorithm(bad)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["lora_up.weight", "lora_down.weight", "alpha"], "LoRA"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.alpha"], "LoRA"),
        (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], "LoHa"),
        (["diffusion_model.a.hada_w2_b"], "LoHa"),
        (["lokr_w1", "lokr_w2", "alpha"], "LoKr"),
        (["m.lokr_w1_a", "m.lokr_w1_b", "m.lokr_w2_a", "m.lokr_w2_b"], "LoKr"),
        (["x.lokr_w2"], "LoKr"),
        (["x.oft_blocks", "x.alpha"], "OFT"),
        (["x.lora_up.weight", "x.lora_down.weight", "x.dora_scale", "x.alpha"], "DoRA"),
        (["x.lora_up.weight", "y.dora_scale"], "DoRA"),
        (["x.lora_up.weight", "x.lora_down.weight"], "LoRA"),
        (["alpha"], None),
        ([], None),
        (["model.diffusion_model.x.weight", "x.diff", "lora_up.weightx", "xlora_up.weight"], None),
    ],
)
def test_detect_algorithm(keys, expected):
    assert detect_algorithm(keys) == expected
    assert detect_algorithm(iter(keys)) == expected  # any iterable, consumed once


def test_detect_algorithm_from_our_files():
    for name, cls in ALGORITHMS.items():
        sd = cls((16, 12), 2).adapter_state_dict()
        assert detect_algorithm(sd) == name
        assert detect_algorithm(f"diffusion_model.blocks.0.{k}" for k in sd) == name


def test_detect_algorithm_mixed():
    with pytest.raises(ValueError, match=r"mix adapter algorithms \['LoRA', 'LoKr'\]"):
        detect_algorithm(["a.lora_up.weight", "b.lokr_w1"])
    with pytest.raises(ValueError, match=r"mix adapter algorithms \['LoHa', 'DoRA'\]"):
        detect_algorithm(["a.hada_w1_a", "a.dora_scale"])


# ---- layer_spec ---------------------------------------------------------------------------------


class _OpsLinear(nn.Linear):
    """Stands in for comfy.ops' Linear subclasses."""


def test_layer_spec_linear():
    assert layer_spec(nn.Linear(7, 3)) == ((3, 7), None)
    assert layer_spec(_OpsLinear(5, 2, bias=False)) == ((2, 5), None)
    assert layer_spec(nn.Linear(4, 6, device="meta")) == ((6, 4), None)


def test_layer_spec_convs():
    shape, conv = layer_spec(nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1))
    assert shape == (8, 4, 3, 3)
    assert conv == ConvSpec(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros")
    shape, conv = layer_spec(nn.Conv1d(3, 5, 4, padding="same", dilation=2, padding_mode="reflect"))
    assert (
        shape == (5, 3, 4)
        and conv.padding == "same"
        and conv.dilation == (2,)
        and conv.padding_mode == "reflect"
    )
    shape, conv = layer_spec(nn.Conv3d(2, 4, (1, 3, 3)))
    assert shape == (4, 2, 1, 3, 3) and conv.stride == (1, 1, 1)
    shape, conv = layer_spec(nn.Conv2d(4, 8, 3, groups=2))
    assert shape == (8, 2, 3, 3) and conv.groups == 2  # reported; adapters refuse it
    with pytest.raises(ValueError, match="groups"):
        LoRAModule(shape, 2, conv=conv)


@pytest.mark.parametrize(
    "module", [nn.ReLU(), nn.ConvTranspose2d(2, 2, 3), nn.Embedding(4, 3), nn.LayerNorm(4), nn.Sequential()]
)
def test_layer_spec_other_modules(module):
    assert layer_spec(module) is None


def test_adapter_from_layer_spec_matches_layer():
    conv_layer = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
    shape, conv = layer_spec(conv_layer)
    adapter = LoRAModule(shape, 2, conv=conv, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.up.normal_()
    x = torch.randn(1, 3, 8, 8)
    assert adapter(x).shape == conv_layer(x).shape


# ---- factorization ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [
        (64, -1, (8, 8)),
        (320, -1, (16, 20)),
        (7, -1, (1, 7)),
        (1, -1, (1, 1)),
        (12, -1, (3, 4)),
        (3072, -1, (48, 64)),
        (64, 4, (4, 16)),
        (64, 32, (2, 32)),
        (250, 4, (2, 125)),
        (127, 8, (1, 127)),
        (64, 100, (8, 8)),
    ],
)
def test_factorization_examples(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_factorization_properties():
    for dim in range(1, 400):
        a, b = factorization(dim)
        assert a * b == dim and a <= b
        # no divisor lies strictly between a and sqrt(dim)
        assert not any(dim % c == 0 for c in range(a + 1, int(dim**0.5) + 1))


@pytest.mark.parametrize(("dim", "factor"), [(0, -1), (-4, -1), (8, 0), (2.0, -1)])
def test_factorization_invalid(dim, factor):
    with pytest.raises(ValueError, match="dim|factor"):
        factorization(dim, factor)


# ---- rank clamping --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule])
@pytest.mark.parametrize(("shape", "max_rank"), [((4, 100), 4), ((100, 3), 3), ((50, 2, 3, 3), 18)])
def test_rank_clamped_keeps_scale(cls, shape, max_rank):
    conv = ConvSpec() if len(shape) > 2 else None
    module = cls(shape, 32, alpha=16.0, conv=conv)
    assert module.rank == max_rank
    assert module.scale == pytest.approx(0.5)
    assert module.alpha == pytest.approx(0.5 * max_rank)
    sd = module.adapter_state_dict()
    assert sd["alpha"].item() == pytest.approx(0.5 * max_rank)
    assert cls.from_adapter_state_dict(sd, shape, conv=conv).scale == pytest.approx(0.5)


def test_rank_not_clamped_keeps_alpha_exactly():
    module = LoRAModule((64, 64), 8, alpha=0.3)
    assert (
        module.rank == 8
        and module.alpha == pytest.approx(0.3)
        and module.adapter_state_dict()["alpha"].item() == module.alpha
    )


def test_lokr_layouts_and_clamping():
    # 4 = 2·2, 80 = 8·10: w2 [2, 10]; rank 4 < max(2, 10)/2 -> low-rank, clamped to min(2, 10) = 2.
    module = LoKrModule((4, 80), 4, alpha=8.0)
    assert module.w1.shape == (2, 8) and module.w2 is None
    assert module.w2_a.shape == (2, 2) and module.w2_b.shape == (2, 10)
    assert module.rank == 2 and module.scale == pytest.approx(2.0)
    # rank >= max/2 -> w2 full, alpha ignored, scale 1, rank = min(b_out, b_in·K).
    module = LoKrModule((4, 80), 5, alpha=8.0)
    assert module.w2.shape == (2, 10) and module.w2_a is None
    assert module.rank == 2 and module.scale == 1.0 and module.alpha == 2.0
    # prime dims: w1 is 1x1, w2 the whole layer.
    module = LoKrModule((7, 13), 1)
    assert module.w1.shape == (1, 1) and module.w2_a.shape == (7, 1) and module.w2_b.shape == (1, 13)
    # conv: the kernel sits in w2.
    module = LoKrModule((8, 6, 3, 3), 8, conv=ConvSpec())
    assert module.w1.shape == (2, 2) and module.w2.shape == (4, 3, 3, 3)
    assert module.adapter_state_dict()["lokr_w2"].shape == (4, 3, 3, 3)
    # factor caps the small side
    module = LoKrModule((64, 64), 64, factor=4)
    assert module.w1.shape == (4, 4) and module.w2.shape == (16, 16)


def test_lokr_conv1d_full_w2_is_written_flat(randomise):
    module = randomise(LoKrModule((6, 4, 3), 8, conv=ConvSpec()))
    sd = module.adapter_state_dict()
    assert sd["lokr_w2"].shape == (3, 6)  # [b_out, b_in·K]
    loaded = LoKrModule.from_adapter_state_dict(sd, (6, 4, 3))
    assert torch.equal(loaded.delta_weight(), module.delta_weight())


def test_lokr_loads_low_rank_w1(randomise):
    generator = torch.Generator().manual_seed(0)
    w1_a, w1_b = torch.randn(3, 2, generator=generator), torch.randn(2, 4, generator=generator)
    w2 = torch.randn(4, 5, generator=generator)
    sd = {"lokr_w1_a": w1_a, "lokr_w1_b": w1_b, "lokr_w2": w2, "alpha": torch.tensor(1.0)}
    module = LoKrModule.from_adapter_state_dict(sd, (12, 20))
    assert module.rank == 2 and module.scale == 0.5
    torch.testing.assert_close(module.delta_weight(), torch.kron(w1_a @ w1_b, w2) * 0.5)
    assert set(module.adapter_state_dict()) == set(sd)


# ---- error messages -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(ALGORITHMS.values()))
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "big"}, "alpha"),
        ({"weight_shape": (8,)}, "weight_shape"),
        ({"weight_shape": (8, 0)}, "weight_shape"),
        ({"weight_shape": (8, 4, 1, 1, 1, 1)}, "weight_shape"),
        ({"conv": ConvSpec()}, "conv"),
        ({"weight_shape": (8, 4, 3, 3), "conv": ConvSpec(groups=2)}, "conv.groups"),
        ({"weight_shape": (8, 4, 3, 3), "conv": ConvSpec(stride=(1, 1, 1))}, "conv.stride"),
        ({"weight_shape": (8, 4, 3, 3), "conv": ConvSpec(padding="same", stride=2)}, "conv.padding"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_constructor_errors_name_the_field(cls, kwargs, field):
    args = {"weight_shape": (8, 4), "rank": 2, **kwargs}
    with pytest.raises(ValueError, match=re.escape(field)):
        cls(args.pop("weight_shape"), args.pop("rank"), **args)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"padding": "full"}, "padding"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"stride": [1, "2"]}, "stride"),
        ({"groups": 0}, "groups"),
        ({"dilation": True}, "dilation"),
    ],
)
def test_convspec_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"ConvSpec.{field}"):
        ConvSpec(**kwargs)


def test_convspec_normalises_lists():
    assert ConvSpec(stride=[2, 2], padding=[1, 0]) == ConvSpec(stride=(2, 2), padding=(1, 0))
    hash(ConvSpec(stride=[2, 2]))


@pytest.mark.parametrize(
    ("cls", "shape", "sd", "message"),
    [
        (
            LoRAModule,
            (8, 4),
            {"lora_up.weight": torch.zeros(8, 2), "lora_down.weight": torch.zeros(2, 5)},
            "key 'lora_down.weight' has shape (2, 5), expected (2, 4)",
        ),
        (
            LoRAModule,
            (8, 4),
            {"lora_up.weight": torch.zeros(7, 2), "lora_down.weight": torch.zeros(2, 4)},
            "key 'lora_up.weight' has shape (7, 2), expected (8, 2)",
        ),
        (
            LoRAModule,
            (8, 4, 3, 3),
            {"lora_up.weight": torch.zeros(8, 2, 1, 1), "lora_down.weight": torch.zeros(2, 4, 1, 1)},
            "key 'lora_down.weight' has shape (2, 4, 1, 1), expected (2, 4, 3, 3) or (2, 36)",
        ),
        (LoRAModule, (8, 4), {"lora_up.weight": torch.zeros(8, 2)}, "missing key 'lora_down.weight'"),
        (
            LoRAModule,
            (8, 4),
            {
                "lora_up.weight": torch.zeros(8, 2),
                "lora_down.weight": torch.zeros(2, 4),
                "lora_mid.weight": torch.zeros(1),
            },
            "'lora_mid.weight' (Tucker",
        ),
        (
            LoRAModule,
            (8, 4),
            {
                "lora_up.weight": torch.zeros(8, 2),
                "lora_down.weight": torch.zeros(2, 4),
                "hada_w1_a": torch.zeros(1),
            },
            "unexpected keys ['hada_w1_a']",
        ),
        (
            LoRAModule,
            (8, 4),
            {
                "lora_up.weight": torch.zeros(8, 2),
                "lora_down.weight": torch.zeros(2, 4),
                "alpha": torch.zeros(2),
            },
            "key 'alpha' must be a one-element tensor",
        ),
        (
            LoHaModule,
            (8, 4),
            {
                "hada_w1_a": torch.zeros(8, 2),
                "hada_w1_b": torch.zeros(2, 4),
                "hada_w2_a": torch.zeros(8, 2),
                "hada_w2_b": torch.zeros(3, 4),
            },
            "key 'hada_w2_b' has shape (3, 4), expected (2, 4)",
        ),
        (
            LoKrModule,
            (8, 4),
            {"lokr_w1": torch.zeros(3, 2), "lokr_w2": torch.zeros(4, 2)},
            "key 'lokr_w1' gives factor shape (3, 2), which does not divide",
        ),
        (
            LoKrModule,
            (8, 4),
            {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(4, 3)},
            "key 'lokr_w2' has shape (4, 3), expected (4, 2)",
        ),
        (LoKrModule, (8, 4), {"lokr_w1": torch.zeros(2, 2)}, "missing key 'lokr_w2'"),
        (
            LoKrModule,
            (8, 4),
            {"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(4, 1), "lokr_w2_b": torch.zeros(1, 3)},
            "key 'lokr_w2_b' has shape (1, 3), expected (1, 2)",
        ),
    ],
)
def test_load_errors(cls, shape, sd, message):
    conv = ConvSpec() if len(shape) > 2 else None
    with pytest.raises(ValueError, match=re.escape(message)):
        cls.from_adapter_state_dict(sd, shape, conv=conv)
