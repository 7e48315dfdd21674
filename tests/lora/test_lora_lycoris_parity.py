"""Parity with LyCORIS' functional API (the reference implementation of LoHa/LoKr) for the same factors."""

from __future__ import annotations

import pytest
import torch

from lora import ALGORITHMS, ConvSpec, factorization

lycoris_functional = pytest.importorskip("lycoris.functional", reason="lycoris-lora not installed")

# (id, algorithm, weight_shape, rank, alpha)
CASES = [
    ("lora-linear", "LoRA", (12, 20), 4, 3.0),
    ("lora-conv2d", "LoRA", (8, 6, 3, 3), 4, 0.5),
    ("loha-linear", "LoHa", (12, 20), 4, 3.0),
    ("loha-conv2d", "LoHa", (8, 6, 3, 3), 2, 7.0),
    ("lokr-linear-full", "LoKr", (12, 20), 4, 3.0),
    ("lokr-linear-lowrank", "LoKr", (64, 48), 2, 3.0),
    ("lokr-linear-prime", "LoKr", (7, 13), 1, 0.5),
    ("lokr-conv2d-full", "LoKr", (8, 6, 3, 3), 4, 3.0),
    ("lokr-conv2d-lowrank", "LoKr", (32, 16, 3, 3), 1, 2.0),
    ("lokr-conv1d-full", "LoKr", (8, 6, 5), 8, None),
    ("lokr-conv3d-full", "LoKr", (4, 4, 3, 1, 3), 8, None),
]


def _lycoris_delta(module) -> torch.Tensor:
    """ΔW from LyCORIS' functional API, fed the factors of ``module`` in LyCORIS' argument order."""
    p = {name: (None if t is None else t.detach()) for name, t in module._parameters.items()}
    if module.algorithm == "LoRA":
        delta = lycoris_functional.locon.diff_weight(
            p["down"], p["up"], None, gamma=module.scale, backend="torch"
        )
    elif module.algorithm == "LoHa":
        delta = lycoris_functional.loha.diff_weight(
            p["w1_b"], p["w1_a"], p["w2_b"], p["w2_a"], None, None, gamma=module.scale, backend="torch"
        )
    else:
        # LyCORIS derives the scale itself: gamma / (inner dim of the factored side), 1 when none is.
        delta = lycoris_functional.lokr.diff_weight(
            p["w1"],
            p["w1_a"],
            p["w1_b"],
            p["w2"],
            p["w2_a"],
            p["w2_b"],
            None,
            gamma=module.alpha,
            backend="torch",
        )
    return delta.reshape(module.weight_shape)


@pytest.mark.parametrize(
    ("algorithm", "shape", "rank", "alpha"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_delta_weight_matches_lycoris(randomise, algorithm, shape, rank, alpha):
    conv = ConvSpec() if len(shape) > 2 else None
    module = randomise(ALGORITHMS[algorithm](shape, rank, alpha, conv=conv))
    ours = module.delta_weight().detach()
    assert ours.abs().max() > 1e-3
    torch.testing.assert_close(ours, _lycoris_delta(module), rtol=1e-5, atol=1e-6)


def test_factorization_matches_lycoris():
    for dim in range(1, 1100):
        for factor in (-1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == lycoris_functional.factorization(dim, factor), (dim, factor)
