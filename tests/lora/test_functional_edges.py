"""The functional math at its edges: the initial distributions each algorithm starts from (they set the
early training dynamics, and match LyCORIS'), LoHa's hand-written backward when only some factors
learn, and the argument checks of the LoKr helpers."""

from __future__ import annotations

import math

import pytest
import torch

from lora.functional.loha import loha_delta_weight, loha_init
from lora.functional.lokr import factorization, lokr_full_w1, lokr_full_w2, lokr_init, lokr_layout


def test_loha_starts_from_lycoris_distributions():
    w1_a, w1_b, w2_a, w2_b = loha_init((512, 256), 64, torch.Generator().manual_seed(0))
    assert abs(float(w1_a.std()) - 0.1) < 0.005
    assert abs(float(w1_b.std()) - 1.0) < 0.05 and abs(float(w2_b.std()) - 1.0) < 0.05
    assert torch.count_nonzero(w2_a) == 0  # ΔW starts at exactly 0


@pytest.mark.parametrize("low_rank", [False, True])
def test_lokr_starts_from_the_default_layer_bounds(low_rank):
    layout = lokr_layout((512, 256), 8 if low_rank else 10_000)
    assert layout.low_rank is low_rank
    w1, w2, w2_a, w2_b = lokr_init(layout, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(layout.in_a)
    assert float(w1.abs().max()) <= bound and float(w1.abs().max()) > 0.9 * bound
    if low_rank:
        bound = 1 / math.sqrt(layout.rank)
        assert float(w2_a.abs().max()) <= bound and float(w2_a.abs().max()) > 0.9 * bound
        assert torch.count_nonzero(w2_b) == 0
    else:
        assert torch.count_nonzero(w2) == 0


@pytest.mark.parametrize("learns", [(0,), (1,), (2,), (3,), (0, 3), (1, 2)])
def test_loha_backward_gives_each_learning_factor_autograds_gradient(learns):
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(6, 3), (3, 5), (6, 2), (2, 5)]]
    ours = [f.clone().requires_grad_(i in learns) for i, f in enumerate(factors)]
    plain = [f.clone().requires_grad_(i in learns) for i, f in enumerate(factors)]
    upstream = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    (loha_delta_weight(*ours, 0.7, (6, 5)) * upstream).sum().backward()
    ((plain[0] @ plain[1]) * (plain[2] @ plain[3]) * 0.7 * upstream).sum().backward()
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
        if i in learns:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
        else:
            assert a.grad is None


def test_lokr_helpers_refuse_half_a_pair_and_boolean_factors():
    half = torch.zeros(2, 2)
    for args in [(None, half, None), (None, None, half)]:
        with pytest.raises(ValueError, match="lokr_w1 or both"):
            lokr_full_w1(*args)
    with pytest.raises(ValueError, match="lokr_w2 or both"):
        lokr_full_w2(None, half, None, (4, 4))
    with pytest.raises(ValueError, match="factor must be"):
        factorization(8, True)
