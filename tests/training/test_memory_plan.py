"""The memory plan: the probe counts what autograd keeps without keeping it, the formulas scale with
batch and checkpointing as a real run does, and a plan over budget names the changes that fit."""

from __future__ import annotations

import pytest
import torch

from lora.inject import AdapterSet, find_targets, frozen
from tests.training.test_loop import Toy
from training.gradient_checkpointing import gradient_checkpointing, repeated_blocks
from training.memory_plan import (
    ActivationProfile,
    check_fit,
    module_bytes,
    offloaded_weights,
    plan,
    profile_activations,
)


def _attached(depth: int = 4):
    net = Toy(depth=depth)
    adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
    return net, adapters


def _kept_bytes(net, adapters, x, checkpointing: bool) -> int:
    """What a real forward keeps for backward (counted while kept, storages once, weights left out)."""
    skip = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *adapters.parameters()]}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with frozen(net), adapters.attached(net), gradient_checkpointing(net, checkpointing):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        out.square().mean().backward()
    return total


def test_probe_counts_what_a_real_forward_keeps_and_keeps_none_of_it():
    net, adapters = _attached()
    x = torch.randn(1, 4, 16, 16)
    skip = [*net.parameters(), *adapters.parameters()]
    with frozen(net), adapters.attached(net):
        profile = profile_activations(lambda: net(x), repeated_blocks(net), skip=skip)
    assert all(p.grad is None for p in adapters.parameters())
    assert profile.total == _kept_bytes(net, adapters, x, checkpointing=False) > 0
    assert (
        len(profile.blocks) == 4
        and all(b > 0 for b in profile.blocks)
        and sum(profile.blocks) < profile.total
    )
    assert profile.block_inputs == [1 * 16 * 16 * 16 * 4] * 4  # each block's input: [1, 16, 16, 16] fp32


def test_checkpointed_estimate_covers_what_checkpointing_keeps_and_scales_with_batch():
    net, adapters = _attached(depth=6)
    x = torch.randn(1, 4, 16, 16)
    with frozen(net), adapters.attached(net):
        profile = profile_activations(
            lambda: net(x), repeated_blocks(net), skip=[*net.parameters(), *adapters.parameters()]
        )
    kept = _kept_bytes(net, adapters, x, checkpointing=True)
    estimate = profile.for_run(1, checkpointing=True)
    # the estimate adds the one block recomputed in backward to what checkpointing keeps
    assert kept <= estimate <= kept + max(profile.blocks)
    assert profile.for_run(1, checkpointing=True) < profile.for_run(1, checkpointing=False)
    assert profile.for_run(3, checkpointing=False) == 3 * profile.for_run(1, checkpointing=False)


def test_a_probe_of_two_samples_scales_to_larger_batches():
    """At batch 1 some reshapes are free views that copy at larger batches: a probe of 2 samples
    scaled by batch / 2 gives what batch 4 keeps."""
    net, adapters = _attached(depth=6)
    with frozen(net), adapters.attached(net):
        two = profile_activations(lambda: net(torch.randn(2, 4, 16, 16)), repeated_blocks(net),
                                  skip=[*net.parameters(), *adapters.parameters()], samples=2)  # fmt: skip
    kept4 = _kept_bytes(net, adapters, torch.randn(4, 4, 16, 16), checkpointing=False)
    assert two.for_run(4, checkpointing=False) == kept4
    assert _kept_bytes(net, adapters, torch.randn(1, 4, 16, 16), checkpointing=False) * 4 < kept4


def test_plan_adds_adapters_gradients_and_optimizer_state_per_optimizer():
    profile = ActivationProfile(total=1000, blocks=[300, 300], block_inputs=[10, 10])
    adamw = plan(
        weights=5000, trainable_values=100, optimizer="AdamW", profile=profile, batch=2, checkpointing=False
    )
    assert (adamw.trainable, adamw.gradients, adamw.optimizer, adamw.activations) == (400, 400, 800, 2 * 1000)
    assert adamw.added == 400 + 400 + 800 + 2000 and adamw.total == adamw.added + 5000
    assert plan(5000, 100, "SGD", profile, 2, False).optimizer == 400
    assert plan(5000, 100, "AdamW", profile, 2, True).activations == 2 * (400 + 20 + 300)


def test_over_budget_plan_names_the_changes_that_fit():
    """added: 1600 (adapters, gradients, AdamW) + 4 x 14_000 activations = 57_600. Checkpointing on:
    1600 + 4 x (2000 outside + 200 inputs + 6000) = 34_400; batch 3: 43_600; bf16: 29_600; an fp8 base
    frees 30_000 besides."""
    profile = ActivationProfile(total=14_000, blocks=[6000, 6000], block_inputs=[100, 100])
    args = dict(
        weights=50_000,
        trainable_values=100,
        optimizer="AdamW",
        profile=profile,
        batch=4,
        checkpointing=False,
        where="the GPU",
        fp8_savings=30_000,
        training_dtype="fp32",
    )
    fit = check_fit(available=45_000, **args)
    assert not fit.fits and fit.plan.added == 57_600
    assert [(what.split(" (")[0], p.added) for what, p in fit.alternatives] == [
        ("turn gradient_checkpointing on", 34_400),
        ("batch_size 3", 43_600),
        ("training_dtype bf16", 29_600),
        ("an fp8 base", 57_600),
    ]
    tight = check_fit(available=20_000, **args)
    assert [what.split(" (")[0] for what, _ in tight.alternatives] == ["batch_size 1"]  # 15_600
    assert check_fit(available=57_600, **args).fits


def test_offloading_is_suggested_with_the_fewest_blocks_that_fit():
    """Checkpointed: added 34_400. Offloading N blocks frees all of them but the largest (it is back on
    the device while recomputed): 3 blocks of 10_000 free 20_000, 2 free 10_000."""
    profile = ActivationProfile(total=14_000, blocks=[6000, 6000], block_inputs=[100, 100])
    args = dict(weights=50_000, trainable_values=100, optimizer="AdamW", profile=profile, batch=4, checkpointing=True,
                where="the GPU", block_weights=[10_000] * 5)  # fmt: skip
    fit = check_fit(available=16_000, **args)  # 18_400 short
    assert not fit.fits and fit.offload_needed == 3
    assert [what.split(" (")[0] for what, _ in fit.alternatives] == ["batch_size 1", "offload_blocks 3"]
    assert check_fit(available=25_000, **args).offload_needed == 2  # 9_400 short
    assert check_fit(available=34_400, **args).offload_needed == 0  # fits as it is
    assert check_fit(available=1_000, **args).offload_needed == 5  # 33_400 short; five free 40_000
    never = check_fit(available=1_000, **{**args, "block_weights": [10_000] * 3})  # three free only 20_000
    assert never.offload_needed == 0 and not never.alternatives
    unckpt = check_fit(available=16_000, **{**args, "checkpointing": False})  # saves nothing without it
    assert unckpt.offload_needed == 0
    assert offloaded_weights([4, 9, 2]) == 6 and offloaded_weights([]) == 0


def test_fit_edges_each_change_exactly_and_nothing_unasked():
    """Edges are inclusive (a change that leaves 0 bytes short fits), no change is credited memory it
    does not free, and the plan carries the caller's weights, optimizer and where. SGD keeps one value
    per parameter: added = 400 + 400 + 400 + activations (3 x 14_001 = 42_003; bf16 halves it to
    21_001, whole bytes); checkpointed: 3 x (2001 + 200 + 6000) = 24_603; batch 2: 28_002."""
    profile = ActivationProfile(total=14_001, blocks=[6000, 6000], block_inputs=[100, 100])
    args = dict(weights=50_000, trainable_values=100, optimizer="SGD", profile=profile, batch=3, checkpointing=False,
                where="the GPU", training_dtype="fp32")  # fmt: skip

    def names(fit):
        return {what.split(" (")[0]: p.added for what, p in fit.alternatives}

    fit = check_fit(available=29_202, **args)
    assert (fit.plan.weights, fit.plan.optimizer, fit.where, fit.plan.added) == (
        50_000,
        400,
        "the GPU",
        43_203,
    )
    assert names(fit) == {
        "turn gradient_checkpointing on": 25_803,
        "batch_size 2": 29_202,
        "training_dtype bf16": 22_201,
    }
    assert all(type(p.added) is int for _, p in fit.alternatives)
    just_short = check_fit(available=25_802, **args)  # 1 byte short of checkpointing, batch 2 out too
    assert names(just_short) == {"training_dtype bf16": 22_201, "batch_size 1": 15_201}
    assert names(check_fit(available=22_200, **args)) == {"batch_size 1": 15_201}
    assert names(check_fit(available=15_200, **args)) == {}
    # batch 4 where 2 fits and 3 does not: the largest batch that fits, not every other one
    assert "batch_size 2" in names(check_fit(available=29_202, **{**args, "batch": 4}))
    # optimizer state as counted on the real optimizer replaces the table's estimate
    assert check_fit(available=0, **{**args, "optimizer_values": 1000}).plan.optimizer == 4000
    # an optimizer the table does not know is counted as AdamW: two values per parameter
    assert check_fit(available=0, **{**args, "optimizer": "SomethingNew"}).plan.optimizer == 800

    # an fp8 base is offered only when the caller says what it frees, and credited exactly that
    assert "an fp8 base" not in names(check_fit(available=43_202, **args))
    fp8 = check_fit(available=43_202, **{**args, "fp8_savings": 1})
    assert names(fp8)["an fp8 base"] == 43_203
    assert "Load Diffusion Model" in next(w for w, _ in fp8.alternatives if w.startswith("an fp8"))
    assert "an fp8 base" not in names(check_fit(available=43_201, **{**args, "fp8_savings": 1}))

    # offloading: only with checkpointing, and N blocks that free exactly the shortfall are enough
    unckpt = check_fit(available=0, **{**args, "block_weights": [30_000] * 3})  # would free 60_000
    assert unckpt.offload_needed == 0 and "offload_blocks 3" not in names(unckpt)
    ckpt = {**args, "checkpointing": True, "block_weights": [10_000] * 3}  # 3 free 20_000
    assert check_fit(available=25_803 - 20_000, **ckpt).offload_needed == 3
    assert check_fit(available=25_803 - 20_001, **ckpt).offload_needed == 0


def test_module_bytes_counts_each_storage_once():
    lin = torch.nn.Linear(8, 4)
    tied = torch.nn.Sequential(lin, lin)
    assert module_bytes(tied) == (8 * 4 + 4) * 4
    assert module_bytes(torch.nn.Linear(8, 4).to(torch.bfloat16)) == (8 * 4 + 4) * 2
    shared = torch.nn.Module()  # two parameters viewing one storage (as tied embeddings loaded from a file)
    storage = torch.zeros(64)
    shared.a, shared.b = torch.nn.Parameter(storage[:32]), torch.nn.Parameter(storage[32:])
    shared.register_buffer("c", storage[:8])
    assert module_bytes(shared) == 64 * 4


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD", "RMSprop"])
def test_optimizer_factor_matches_the_state_the_optimizer_keeps(name):
    from training.factory import make_optimizer
    from training.memory_plan import OPTIMIZER_STATE

    params = [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(8, 64))]
    opt = make_optimizer(name, params, 1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = sum(
        v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1
    )
    assert state == OPTIMIZER_STATE[name] * sum(p.numel() for p in params)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Prodigy", "Adafactor", "CAME", "Lion"])
def test_optimizer_state_is_counted_per_shape_as_the_optimizer_keeps_it(name):
    """Counted on one parameter per distinct shape, it equals what the optimizer keeps for all of them
    (factored optimizers depend on the shapes: a conv LoRA factor is not a linear one)."""
    from training.config import OPTIMIZER_NAMES
    from training.factory import make_optimizer
    from training.memory_plan import optimizer_state_values

    if name not in OPTIMIZER_NAMES:
        pytest.skip(f"{name}: its library is not installed")
    shapes = [(16, 320), (320, 16), (16, 320), (8, 320, 3, 3), (320, 8, 1, 1)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = make_optimizer(name, params, 1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    kept = sum(
        v.numel() for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.numel() > 1
    )
    assert optimizer_state_values(name, shapes) == kept > 0


def test_activation_estimates_are_whole_bytes():
    """Scaled from the probe's sample count with integer division, so plans add up exactly."""
    profile = ActivationProfile(total=1001, blocks=[300, 300], block_inputs=[10, 10], samples=2)
    assert profile.for_run(3, False) == 1501 and type(profile.for_run(3, False)) is int
    assert profile.for_run(3, True) == 3 * (401 + 20 + 300) // 2 and type(profile.for_run(3, True)) is int
    assert ActivationProfile(total=1001, samples=2).for_run(3, True) == 1501  # no blocks: nothing to save


def test_a_block_run_twice_counts_both_runs_and_its_first_input():
    """Blocks reused within one forward (a shared block applied twice) keep activations of both calls;
    checkpointing keeps the input of the first."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    weights = list(block.parameters())
    x, y = torch.randn(4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)

    def alone(inp):
        return profile_activations(lambda: block(inp), [block], skip=weights)

    twice = profile_activations(lambda: (block(x), block(y)), [block], skip=weights)
    assert twice.blocks == [alone(x).blocks[0] + alone(y).blocks[0]]
    assert twice.block_inputs == [x.untyped_storage().nbytes()] == alone(x).block_inputs
