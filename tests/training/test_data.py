"""Conditioning values batch together only when they can be concatenated, and batch as the model
expects: tensors along the batch, lists and dicts item by item, plain values once."""

import pytest
import torch

from training.data import Sample, collate, concat, signature

META = torch.device("meta")  # a device other than the values', on a CPU-only machine


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "a,b",
    [
        (_t(1, 77, 768), _t(1, 154, 768)),  # token count
        (_t(1, 77, 768), _t(1, 77, 1024)),  # width
        (_t(1, 77, 768), _t(1, 77, 768, dtype=torch.float16)),  # dtype: cat would promote silently
        ([_t(1, 4, 8, 8)], [_t(1, 4, 8, 16)]),  # reference latents of other sizes
        ([_t(1, 4)], [_t(1, 4), _t(1, 4)]),  # another number of them
        ({"y": _t(1, 256)}, {"y": _t(1, 512)}),  # dict items
        ({"y": _t(1, 256)}, {"z": _t(1, 256)}),  # dict keys
        (24, 25),  # plain values: a frame rate
        (_t(1, 3), [_t(1, 3)]),  # a tensor is not a list of one
        ([_t(1, 3)], {"0": _t(1, 3)}),  # nor a dict
        (None, "None"),
    ],
)
def test_values_that_cannot_share_a_batch_have_other_signatures(a, b):
    assert signature(a) != signature(b)
    assert Sample(_t(4, 8, 8), {"c": a}).bucket_key() != Sample(_t(4, 8, 8), {"c": b}).bucket_key()


def test_values_that_can_share_a_batch_have_one_signature():
    assert signature(_t(1, 77, 768)) == signature(_t(3, 77, 768))  # batch size does not matter
    assert signature({"y": [_t(1, 2)], "n": 3}) == signature({"n": 3, "y": [_t(2, 2)]})


def test_concat_batches_each_kind_and_moves_tensors():
    values = [
        {"ctx": torch.full((1, 2), float(i)), "refs": [torch.full((1, 3), float(i))], "fps": 24}
        for i in range(3)
    ]
    out = concat(values, META)
    assert out["ctx"].shape == (3, 2) and out["ctx"].device == META
    assert isinstance(out["refs"], list) and out["refs"][0].shape == (3, 3) and out["refs"][0].device == META
    assert out["fps"] == 24
    single = concat([(torch.ones(1, 2),)], META)  # a batch of one
    assert isinstance(single, tuple) and single[0].shape == (1, 2) and single[0].device == META
    cpu = concat([torch.arange(2.0)[None], torch.arange(2.0, 4.0)[None]], torch.device("cpu"))
    assert cpu.tolist() == [[0.0, 1.0], [2.0, 3.0]]  # in the order given


def test_collate_stacks_the_chosen_samples_in_order():
    samples = [Sample(torch.full((2, 2), float(i)), {"c": torch.full((1, 3), 10.0 + i)}) for i in range(4)]
    x0, cond = collate(samples, [2, 0], torch.device("cpu"))
    assert x0[:, 0, 0].tolist() == [2.0, 0.0] and cond["c"][:, 0].tolist() == [12.0, 10.0]
    assert collate(samples, [1], META)[0].device == META
