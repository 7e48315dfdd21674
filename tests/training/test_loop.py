"""A few seeded steps on a toy conv denoiser: the loop lowers the loss, leaves the base untouched,
is bit-reproducible, stops on divergence naming learning_rate, and checkpointing saves memory
without changing gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora.inject import AdapterSet, find_targets, frozen
from training.config import TrainConfig
from training.data import Sample
from training.gradient_checkpointing import gradient_checkpointing, repeated_blocks
from training.loop import TrainingDiverged, derive_seed, evaluate_denoise_loss, run_training
from training.objective import Objective


class FlowSampling:
    """Rectified flow like SD3's, without the shift."""

    sigma_data = 1.0

    def percent_to_sigma(self, p: float) -> float:
        return 1.0 - p

    def noise_scaling(self, sigma, noise, latent):
        s = sigma.reshape(-1, *([1] * (noise.ndim - 1)))
        return s * noise + (1 - s) * latent


class Block(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return x + self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Toy(nn.Module):
    def __init__(self, ch: int = 4, depth: int = 3):
        super().__init__()
        torch.manual_seed(123)
        self.inp = nn.Conv2d(ch, 16, 1)
        self.blocks = nn.ModuleList(Block(16) for _ in range(depth))
        self.out = nn.Conv2d(16, ch, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def make_samples(n=4, ch=4, size=8):
    gen = torch.Generator().manual_seed(7)
    return [Sample(torch.randn(ch, size, size, generator=gen)) for _ in range(n)]


def train_toy(config: TrainConfig, net: Toy | None = None, samples=None):
    net = net or Toy()
    samples = make_samples() if samples is None else samples
    targets = find_targets(net)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    adapters = AdapterSet.create(targets, config.algorithm, config.rank, config.alpha, gen)

    def predict_x0(x_t, sigma, cond):
        return x_t - sigma.view(-1, 1, 1, 1) * net(x_t)

    objective, cpu = Objective(FlowSampling(), "flow"), torch.device("cpu")
    with frozen(net), adapters.attached(net), gradient_checkpointing(net, config.gradient_checkpointing):
        before = evaluate_denoise_loss(predict_x0, objective, samples, cpu)
        result = run_training(
            params=adapters.trainable_parameters(),
            samples=samples,
            predict_x0=predict_x0,
            objective=objective,
            config=config,
            device=cpu,
        )
        result.eval_before, result.eval_after = (
            before,
            evaluate_denoise_loss(predict_x0, objective, samples, cpu),
        )
    return net, adapters, result


BASE = dict(steps=60, learning_rate=3e-3, rank=4, training_dtype="fp32", lora_dtype="fp32", batch_size=2)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr"])
def test_loss_drops_and_base_is_untouched(algorithm):
    net = Toy()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y_before = net(x)
    _, adapters, result = train_toy(TrainConfig(**BASE, algorithm=algorithm), net)
    assert len(result.losses) == BASE["steps"]
    assert result.eval_after < 0.92 * result.eval_before, (result.eval_before, result.eval_after)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in net.parameters())  # flags restored
    with torch.no_grad():
        assert torch.equal(net(x), y_before)  # hooks and checkpoint wrappers gone
    assert any(float(a.delta_weight().detach().abs().max()) > 0 for _, a in adapters.items())


def test_same_seed_bit_identical_other_seed_differs():
    cfg = TrainConfig(**{**BASE, "steps": 8})
    _, a1, r1 = train_toy(cfg)
    _, a2, r2 = train_toy(cfg)
    _, a3, _ = train_toy(cfg.replace(seed=1))
    s1, s2, s3 = a1.state_dict_for_file(), a2.state_dict_for_file(), a3.state_dict_for_file()
    assert r1.losses == r2.losses
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_grad_accumulation_counts_optimizer_steps():
    _, _, r = train_toy(TrainConfig(**{**BASE, "steps": 5, "grad_accumulation_steps": 3}))
    assert len(r.losses) == 5


def test_divergence_names_learning_rate_and_keeps_weights_finite():
    cfg = TrainConfig(
        **{**BASE, "steps": 200, "learning_rate": 1.0, "optimizer": "SGD", "max_grad_norm": 0.0}
    )
    net = Toy()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(30)
    with pytest.raises(TrainingDiverged, match="learning_rate"):
        train_toy(cfg, net)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="latents"):
        train_toy(TrainConfig(**BASE), samples=[])


def test_mixed_sizes_train():
    samples = make_samples(2, size=8) + make_samples(2, size=12)
    _, _, r = train_toy(TrainConfig(**{**BASE, "steps": 6, "batch_size": 4}), samples=samples)
    assert len(r.losses) == 6


def _saved_bytes(checkpointing: bool) -> int:
    """Bytes autograd keeps for backward during one forward of the toy (activation memory)."""
    net = Toy(depth=6)
    targets = find_targets(net)
    adapters = AdapterSet.create(targets, "LoRA", 4, None, torch.Generator().manual_seed(0))
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.randn(2, 4, 32, 32)
    with frozen(net), adapters.attached(net), gradient_checkpointing(net, checkpointing):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        out.square().mean().backward()
    return total


def test_gradient_checkpointing_lowers_activation_memory():
    assert len(repeated_blocks(Toy(depth=6))) == 6
    plain, ckpt = _saved_bytes(False), _saved_bytes(True)
    assert ckpt < 0.5 * plain, (plain, ckpt)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        net = Toy()
        adapters = AdapterSet.create(find_targets(net), "LoHa", 4, None, torch.Generator().manual_seed(0))
        for p in adapters.parameters():  # make every factor non-zero so all grads are non-trivial
            with torch.no_grad():
                p.add_(0.01)
        with frozen(net), adapters.attached(net), gradient_checkpointing(net, on):
            for _ in range(2):  # the first pass checkpoints every block, later ones all but the last
                net(torch.ones(1, 4, 8, 8)).sum().backward()
                grads.append([p.grad.clone() for p in adapters.parameters()])
    for a, b in zip(grads[:2], grads[2:], strict=True):
        for ga, gb in zip(a, b, strict=True):
            torch.testing.assert_close(ga, gb)


class Reversed(Toy):
    """Runs its blocks in the reverse of their registration order: blocks[0] runs last."""

    def forward(self, x):
        h = self.inp(x)
        for b in reversed(self.blocks):
            h = b(h)
        return self.out(h)


class Twice(Toy):
    """Calls blocks[1] twice per forward pass."""

    def forward(self, x):
        h = self.inp(x)
        for b in (self.blocks[0], self.blocks[1], self.blocks[1], self.blocks[2]):
            h = b(h)
        return self.out(h)


_REAL_CHECKPOINT = torch.utils.checkpoint.checkpoint


def _checkpointed_per_pass(net: Toy, monkeypatch, passes: int = 3) -> list[list[int]]:
    """Indices into net.blocks of the blocks that ran under torch.utils.checkpoint, per pass."""
    calls: list[int] = []

    def recording(fn, *args, **kwargs):
        calls.append(next(i for i, b in enumerate(net.blocks) if b is args[0].__self__))  # fn(forward, ...)
        return _REAL_CHECKPOINT(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", recording)
    adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
    per_pass = []
    with frozen(net), adapters.attached(net), gradient_checkpointing(net):
        for _ in range(passes):
            calls.clear()
            net(torch.randn(1, 4, 8, 8)).sum().backward()
            per_pass.append(sorted(calls))
        with torch.no_grad():
            calls.clear()
            net(torch.randn(1, 4, 8, 8))
            assert calls == []  # no grad, nothing to checkpoint
    return per_pass


def test_the_block_that_runs_last_is_not_recomputed(monkeypatch):
    assert _checkpointed_per_pass(Toy(), monkeypatch) == [[0, 1, 2], [0, 1], [0, 1]]
    # learnt from the order blocks run in, not from the order they are registered in
    assert _checkpointed_per_pass(Reversed(), monkeypatch) == [[0, 1, 2], [1, 2], [1, 2]]


def test_a_block_called_twice_per_pass_leaves_every_block_checkpointed(monkeypatch):
    assert _checkpointed_per_pass(Twice(), monkeypatch) == [[0, 1, 1, 2]] * 3


class IteratedSeq(nn.Module):
    """Like ComfyUI's UNet: blocks are Sequentials whose layers the parent runs one by one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.input_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), Block(16), Block(16)) for _ in range(3)
        )

    def forward(self, x):
        for seq in self.input_blocks:
            for layer in seq:  # the Sequential's own forward is never called
                x = layer(x) if x.shape[1] == 16 or isinstance(layer, nn.Conv2d) else x
            x = x[:, :4]
        return x


def test_checkpointing_reaches_layers_of_iterated_sequentials():
    net = IteratedSeq()
    blocks = repeated_blocks(net)
    assert len(blocks) == 9 and not any(isinstance(b, nn.Sequential) for b in blocks)
    saved = []
    for on in (False, True):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
        with frozen(net), adapters.attached(net), gradient_checkpointing(net, on):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = net(torch.randn(2, 4, 32, 32))
            out.square().mean().backward()
        saved.append(total)
    assert saved[1] < 0.5 * saved[0], saved


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        ),
        MemoryError(),
    ],
    ids=["cuda", "cpu-allocator", "python"],
)
def test_out_of_memory_stops_at_its_step_with_the_last_completed_steps_weights(error):
    """The allocator's refusal at step 3 (of 5) becomes TrainingOutOfMemory naming step 3; the adapter
    weights are those after step 2 exactly (bit-identical to a 2-step run) and hold no gradients."""
    from training.loop import TrainingOutOfMemory

    config = TrainConfig(
        steps=5, rank=2, learning_rate=0.01, training_dtype="fp32", gradient_checkpointing=False
    )
    net, samples = Toy(), make_samples()
    adapters = AdapterSet.create(find_targets(net), config.algorithm, config.rank, config.alpha,
                                 torch.Generator().manual_seed(derive_seed(config.seed, "init")))  # fmt: skip
    calls = []

    def predict_x0(x_t, sigma, cond):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return x_t - sigma.view(-1, 1, 1, 1) * net(x_t)

    objective, cpu = Objective(FlowSampling(), "flow"), torch.device("cpu")
    params = adapters.trainable_parameters()
    with frozen(net), adapters.attached(net), pytest.raises(TrainingOutOfMemory) as info:
        run_training(
            params=params,
            samples=samples,
            predict_x0=predict_x0,
            objective=objective,
            config=config,
            device=cpu,
        )
    assert (info.value.step, info.value.total) == (3, 5) and isinstance(info.value, torch.OutOfMemoryError)
    assert "out of memory at step 3 of 5" in str(info.value) and all(p.grad is None for p in params)

    two = AdapterSet.create(find_targets(Toy()), config.algorithm, config.rank, config.alpha,
                            torch.Generator().manual_seed(derive_seed(config.seed, "init")))  # fmt: skip
    net2 = Toy()
    with frozen(net2), two.attached(net2):
        run_training(
            params=two.trainable_parameters(),
            samples=samples,
            objective=objective,
            device=cpu,
            predict_x0=lambda x_t, s, c: x_t - s.view(-1, 1, 1, 1) * net2(x_t),
            config=config.replace(steps=2),
        )
    for a, b in zip(params, two.trainable_parameters(), strict=True):
        assert torch.equal(a, b)


def test_other_runtime_errors_pass_through_unchanged():
    from training.loop import TrainingOutOfMemory

    def predict_x0(x_t, sigma, cond):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    config = TrainConfig(steps=2, rank=2, training_dtype="fp32", gradient_checkpointing=False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        run_training(params=[nn.Parameter(torch.zeros(1))], samples=make_samples(), predict_x0=predict_x0,
                     objective=Objective(FlowSampling(), "flow"), config=config, device=torch.device("cpu"))  # fmt: skip
    assert not isinstance(info.value, TrainingOutOfMemory)


# ---------------------------------------------------------------------------------- the loop's contract


def _one_sgd_step(config: TrainConfig, samples) -> tuple[list, list, Toy, AdapterSet, list[float]]:
    """Adapter parameters before and after one optimizer step of the loop (SGD: its first step moves
    each parameter by exactly -lr x gradient), and the losses the loop reported."""
    net = Toy()
    adapters = AdapterSet.create(find_targets(net), config.algorithm, config.rank, config.alpha,
                                 torch.Generator().manual_seed(derive_seed(config.seed, "init")))  # fmt: skip
    params = adapters.trainable_parameters()
    with torch.no_grad():  # B starts at zero: give it values, so every factor gets a gradient
        for p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    before = [p.detach().clone() for p in params]
    objective, cpu = Objective(FlowSampling(), "flow"), torch.device("cpu")
    with frozen(net), adapters.attached(net):
        result = run_training(params=params, samples=samples, objective=objective, config=config, device=cpu,
                              predict_x0=lambda x_t, s, c: x_t - s.view(-1, 1, 1, 1) * net(x_t))  # fmt: skip
    return before, [p.detach().clone() for p in params], net, adapters, result.losses


def test_accumulated_micro_batches_give_the_mean_gradient_of_their_batches():
    """k micro-batches of size b: one step moves the parameters by -lr x the mean of the k batch
    gradients, each batch the one BatchOrder gives for its global micro-batch number, with the noise
    level and noise the seed gives for that number (recomputed here from the stated contract)."""
    from training.data import BatchOrder, collate, mix_seed
    from training.factory import make_loss
    from training.objective import denoise_loss

    k, b, lr = 3, 2, 0.1
    config = TrainConfig(steps=1, rank=2, optimizer="SGD", learning_rate=lr, batch_size=b, grad_accumulation_steps=k,
                         max_grad_norm=0.0, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)  # fmt: skip
    samples = make_samples(5)
    before, after, net, adapters, reported = _one_sgd_step(config, samples)

    params = adapters.trainable_parameters()
    with torch.no_grad():
        for p, value in zip(params, before, strict=True):
            p.copy_(value)
    objective, cpu = Objective(FlowSampling(), "flow"), torch.device("cpu")
    order = BatchOrder(samples, b, derive_seed(config.seed, "order"))
    noise_seed = derive_seed(config.seed, "noise")
    grads = [torch.zeros_like(p) for p in params]
    losses = []
    seen = set()
    with frozen(net), adapters.attached(net):
        for micro in range(k):
            gen = torch.Generator().manual_seed(mix_seed(noise_seed, micro))
            indices = order(micro)
            seen.update(indices)
            x0, _ = collate(samples, indices, cpu)
            sigma = objective.sample_sigmas(len(indices), gen)
            noise = objective.sample_noise(x0.shape, gen)
            loss = denoise_loss(
                lambda xt, s: xt - s.view(-1, 1, 1, 1) * net(xt),
                objective,
                make_loss("MSE"),
                x0,
                noise,
                sigma,
            )
            for g, d in zip(grads, torch.autograd.grad(loss, params), strict=True):
                g += d / k
            losses.append(loss.item())
    assert reported == pytest.approx([sum(losses) / k], rel=1e-5)  # the step's loss: the mean of its batches'
    assert len(seen) == 5  # the three batches cover the dataset: not one batch three times
    for p0, p1, g in zip(before, after, grads, strict=True):
        torch.testing.assert_close(p1, p0 - lr * g, rtol=1e-5, atol=1e-7)


def test_batch_order_visits_every_sample_once_per_epoch_in_batches_of_one_shape():
    from training.data import BatchOrder

    samples = make_samples(5, size=8) + make_samples(3, size=12) + make_samples(1, size=4)
    order = BatchOrder(samples, batch_size=2, seed=11)
    assert order.per_epoch == 3 + 2 + 1
    epochs = []
    for epoch in range(4):
        batches = [order(epoch * order.per_epoch + j) for j in range(order.per_epoch)]
        assert sorted(i for batch in batches for i in batch) == list(range(len(samples)))
        for batch in batches:
            assert 1 <= len(batch) <= 2 and len({tuple(samples[i].latent.shape) for i in batch}) == 1
        epochs.append(batches)
    assert any(epochs[0] != e for e in epochs[1:])  # a new shuffle each epoch
    # addressed by the global micro-batch number: any call order gives the same batches (exact resume)
    fresh = BatchOrder(samples, batch_size=2, seed=11)
    micros = list(range(4 * order.per_epoch))
    for micro in reversed(micros):
        assert fresh(micro) == epochs[micro // order.per_epoch][micro % order.per_epoch]
    assert BatchOrder(samples, batch_size=2, seed=12)(0) != order(0) or BatchOrder(samples, 2, 12)(
        1
    ) != order(1)


def test_out_of_memory_is_told_from_other_errors():
    from training.loop import is_out_of_memory

    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not the allocator's error type


def _recording_optimizer(monkeypatch):
    """Records, at every optimizer step, the lr and weight decay the optimizer really uses and the norm
    of the gradients it is given."""
    import training.loop as loop

    seen: list[tuple[float, float, float]] = []
    real = loop.make_optimizer

    def make(name, params, lr, weight_decay=0.0):
        opt = real(name, params, lr, weight_decay)
        step = opt.step

        def recording_step(*a, **k):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            group = opt.param_groups[0]
            seen.append((group["lr"], group["weight_decay"], norm))
            return step(*a, **k)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(loop, "make_optimizer", make)
    return seen


def test_each_step_uses_the_schedules_lr_the_weight_decay_and_the_clip(monkeypatch):
    from training.schedule import lr_at

    seen = _recording_optimizer(monkeypatch)
    config = TrainConfig(**{**BASE, "steps": 9, "learning_rate": 1e-2, "lr_schedule": "cosine_with_restarts",
                            "warmup_steps": 2, "lr_cycles": 2, "weight_decay": 0.05, "max_grad_norm": 1e-3})  # fmt: skip
    train_toy(config)
    expected = [lr_at(s, 9, 1e-2, "cosine_with_restarts", 2, 2) for s in range(1, 10)]
    assert [lr for lr, _, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert all(wd == 0.05 for _, wd, _ in seen)
    assert all(norm <= 1e-3 * (1 + 1e-4) for _, _, norm in seen)  # clipped before the step
    seen.clear()
    train_toy(TrainConfig(**{**BASE, "steps": 2, "max_grad_norm": 0.0}))  # 0: no clipping
    assert all(norm > 1e-3 for _, _, norm in seen)


def test_interrupt_is_checked_before_every_micro_batch():
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    config = TrainConfig(**{**BASE, "steps": 4, "grad_accumulation_steps": 3})
    net = Toy()
    samples = make_samples()
    adapters = AdapterSet.create(find_targets(net), "LoRA", 4, None, torch.Generator().manual_seed(0))
    objective, cpu = Objective(FlowSampling(), "flow"), torch.device("cpu")
    with frozen(net), adapters.attached(net), pytest.raises(KeyboardInterrupt):
        run_training(params=adapters.trainable_parameters(), samples=samples, objective=objective, config=config,
                     device=cpu, predict_x0=lambda x, s, c: x - s.view(-1, 1, 1, 1) * net(x), check_interrupt=check)  # fmt: skip
    assert len(calls) == 5  # stopped inside step 2's micro-batches, not at its end


class _KwBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(
        self, x, steps, *, scale=1.0
    ):  # a plain int positional and a keyword, as ComfyUI's blocks take
        for _ in range(steps):
            x = torch.tanh(self.lin(x)) * scale
        return x


def test_checkpointing_passes_keyword_and_plain_arguments():
    from training.gradient_checkpointing import gradient_checkpointing

    def grads(checkpointing):
        torch.manual_seed(0)
        net = nn.Sequential()
        net.blocks = nn.ModuleList(_KwBlock() for _ in range(2))
        x = torch.randn(3, 4, requires_grad=True)
        with gradient_checkpointing(net, checkpointing):
            h = x
            for b in net.blocks:
                h = b(h, 2, scale=0.5)
            h.square().sum().backward()
        return [h.detach(), *(p.grad for p in net.parameters())]

    for a, b in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
