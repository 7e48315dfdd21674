"""Augmented assignments in inference-style model code train: the pre-norm residual ``x += f(norm(x))``
that Flux and HunyuanVideo blocks use fails in backward without the rewrite and gives the gradients
of the out-of-place model with it, checkpointed or not; nothing else changes behaviour."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from training.autograd_safe import autograd_safe, copy_on_write, rewritten_count, writes_into_used_tensors
from training.gradient_checkpointing import InPlaceError, gradient_checkpointing


class PreNormBlock(nn.Module):
    """Flux double-block shape: two residual updates, each after a LayerNorm that saved x, in place
    (or not). The first update comes before the block's last saved tensor, so a recomputation in
    backward runs it too."""

    def __init__(self, dim: int, in_place: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj1 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj2 = nn.Linear(dim, dim)
        self.in_place = in_place

    def forward(self, x):
        if self.in_place:
            x += torch.tanh(self.proj1(self.norm1(x)))
            x += torch.tanh(self.proj2(self.norm2(x)))
            return x
        x = x + torch.tanh(self.proj1(self.norm1(x)))
        return x + torch.tanh(self.proj2(self.norm2(x)))


class Net(nn.Module):
    def __init__(self, in_place: bool, depth: int = 3, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(PreNormBlock(dim, in_place) for _ in range(depth))

    def forward(self, x):
        x = torch.tanh(self.inp(x))  # tanh's backward reads its output: the first block's input
        for b in self.blocks:
            x = b(x)
        return x


def _grads(net: Net, x: torch.Tensor, *, safe: bool, checkpointing: bool = False) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    with gradient_checkpointing(net, checkpointing):
        with autograd_safe(safe):
            loss = net(x).square().mean()
        # backward outside the forward's mode, as on CUDA (autograd's device thread): recomputation
        # of checkpointed blocks must still rewrite, or it recomputes from the updated input
        loss.backward()
    return [p.grad.clone() for p in net.parameters()]


def _pair(seed: int = 0) -> tuple[Net, Net, torch.Tensor]:
    torch.manual_seed(seed)
    ref = Net(in_place=False)
    net = Net(in_place=True)
    net.load_state_dict(ref.state_dict())
    return ref, net, torch.randn(2, 5, 8)


def test_in_place_residual_fails_in_backward_without_the_rewrite():
    _, net, x = _pair()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _grads(net, x, safe=False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_in_place_residual_trains_with_the_gradients_of_the_out_of_place_model(checkpointing):
    ref, net, x = _pair()
    expected = _grads(ref, x, safe=False)
    before = rewritten_count()
    got = _grads(net, x, safe=True, checkpointing=checkpointing)
    assert rewritten_count() > before
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_values_unchanged():
    ref, net, x = _pair(1)
    with torch.no_grad():
        plain = net(x.clone())
    with autograd_safe():
        safe = net(x.clone())
    torch.testing.assert_close(safe, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(safe.detach(), plain, rtol=0, atol=0)


def test_explicit_in_place_calls_stay_in_place_and_slice_updates_still_write_back():
    leaf = torch.randn(4, requires_grad=True)
    with autograd_safe():
        a = leaf * 2
        same = a
        a.add_(1)  # explicit call: the caller may ignore its result, so it must stay in place
        assert same is a and a._version == 1
        b = leaf * 2
        b[:2] += 1  # item assignment stores the (rewritten) sum back into b
        torch.testing.assert_close(b, torch.cat([leaf[:2] * 2 + 1, leaf[2:] * 2]))


def test_without_grad_or_outside_the_graph_plus_equals_is_in_place():
    with autograd_safe():
        plain = torch.zeros(3)
        alias = plain
        plain += 1
        assert alias is plain and plain._version == 1
        leaf = torch.randn(3, requires_grad=True)
        with torch.no_grad():
            t = leaf * 2
            alias = t
            t += 1
            assert alias is t


def test_rewrite_keeps_dtype_and_refuses_broadcasting_like_the_in_place_op():
    leaf = torch.randn(3, requires_grad=True)
    with autograd_safe():
        a = (leaf * 2).to(torch.bfloat16)
        a += torch.randn(3, requires_grad=True)  # fp32 operand: the in-place op would keep bf16
        assert a.dtype == torch.bfloat16
        b = leaf * 2
        with pytest.raises(RuntimeError, match="broadcast"):
            b += torch.randn(2, 3)


def test_other_threads_and_later_code_keep_the_native_op():
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait()
        leaf = torch.randn(3, requires_grad=True)
        t = leaf * 2
        alias = t
        t += 1
        seen["same"] = alias is t
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with autograd_safe():
        inside.set()
        done.wait(10)
    thread.join()
    assert seen == {"same": True}
    assert "__iadd__" not in torch.Tensor.__dict__  # restored: inherited from the C base again
    leaf = torch.randn(3, requires_grad=True)
    t = leaf * 2
    alias = t
    t += 1
    assert alias is t


class ExplicitInPlaceBlock(nn.Module):
    """LTX-Video's block shape (ComfyUI 0.3.75 / 0.33): ``x.addcmul_(...)`` after rms_norm used x;
    ``fresh`` writes in place only into a tensor nothing has used yet (Flux's RoPE does that)."""

    def __init__(self, dim: int, fresh: bool):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.fresh = fresh

    def forward(self, x):
        if self.fresh:
            out = torch.tanh(x) * 2
            out.add_(1)
            return x + self.proj(out)
        x = x * 1.0  # a tensor of the block's own (writing into its input is refused by a version check)
        y = self.proj(torch.nn.functional.rms_norm(x, (x.shape[-1],)))
        if not getattr(self, "in_place", True):  # the out-of-place twin (the reference)
            return torch.addcmul(x, y, torch.tanh(y))
        x.addcmul_(y, torch.tanh(y))
        return x


@pytest.mark.parametrize("fresh", [False, True])
def test_checkpointing_refuses_blocks_that_write_into_tensors_they_used(fresh):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.blocks = nn.ModuleList(ExplicitInPlaceBlock(8, fresh) for _ in range(3))

    def run(checkpointing):
        net.zero_grad(set_to_none=True)
        with gradient_checkpointing(net, checkpointing), autograd_safe():
            h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
            for b in net.blocks:
                h = b(h)
            h.square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    if fresh:  # harmless in-place writes: trains, same gradients as without checkpointing
        for a, b in zip(run(True), run(False), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:  # refused on the first pass instead of silently wrong gradients
        with pytest.raises(InPlaceError, match="ExplicitInPlaceBlock.*set gradient_checkpointing off"):
            run(True)


def _explicit_net(fresh: bool, in_place: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.blocks = nn.ModuleList(ExplicitInPlaceBlock(8, fresh) for _ in range(3))
    for b in net.blocks:
        b.in_place = in_place
    return net


def test_probe_finds_explicit_writes_into_used_tensors_only():
    x = torch.randn(2, 5, 8)

    def probe(net):
        return writes_into_used_tensors(lambda: [b(x.clone()) for b in net.blocks], [x])

    assert probe(_explicit_net(fresh=False)) == "addcmul_"
    assert probe(_explicit_net(fresh=True)) == ""  # writes into a tensor nothing used yet
    augmented = nn.Sequential()
    augmented.blocks = nn.ModuleList([PreNormBlock(8, in_place=True)])  # x += ...: rewritten while training
    assert probe(augmented) == ""


def test_copy_on_write_trains_explicit_in_place_writes_with_the_out_of_place_gradients():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))

    def grads(net, cow: bool):
        net.zero_grad(set_to_none=True)
        with autograd_safe(), copy_on_write(cow):
            h = x.clone().requires_grad_()
            for b in net.blocks:
                h = b(h)
            loss = h.square().mean()
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grads(_explicit_net(fresh=False), cow=False)
    expected = grads(_explicit_net(fresh=False, in_place=False), cow=False)
    for a, b in zip(grads(_explicit_net(fresh=False), cow=True), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_copy_on_write_keeps_the_in_place_calls_keyword_arguments():
    leaf = torch.randn(4, requires_grad=True, generator=torch.Generator().manual_seed(0))
    with copy_on_write():
        a = leaf * 1.0
        b = a.sin()  # keeps a for backward
        a.add_(torch.ones(4), alpha=2.0)  # writes into it, with a keyword argument
        loss = (b + a).sum()
    torch.testing.assert_close(a, leaf.detach() + 2.0)
    loss.backward()
    torch.testing.assert_close(leaf.grad, leaf.detach().cos() + 1.0)


def test_refused_block_is_named_by_its_class_or_as_repeated():
    from training.gradient_checkpointing import _block_name

    assert _block_name(nn.Linear(1, 1).forward) == "Linear"
    assert _block_name(lambda x: x) == "repeated"


def test_plus_equals_into_a_plain_tensor_from_a_graph_tensor_is_rewritten():
    """x += w where only w takes part in autograd (x: a buffer-like tensor a product already kept):
    rewritten too, so backward sees the x the product used."""
    w = torch.randn(4, requires_grad=True, generator=torch.Generator().manual_seed(0))
    x = torch.ones(4)
    with autograd_safe():
        a = x * w  # keeps x for w's gradient
        x += w
        loss = a.sum() + x.sum()
    loss.backward()
    torch.testing.assert_close(w.grad, torch.full((4,), 2.0))  # d/dw of sum(1 * w) + sum(1 + w)


def test_rewritten_count_starts_at_zero_per_thread_and_counts_one_per_rewrite():
    import threading

    counts = []

    def worker():
        counts.append(rewritten_count())
        leaf = torch.randn(3, requires_grad=True)
        with autograd_safe():
            h = leaf * 2
            h += 1
        counts.append(rewritten_count())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert counts == [0, 1]
