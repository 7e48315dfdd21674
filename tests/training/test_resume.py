"""Exact resume: 2N steps in one go == N steps, checkpoint to disk, resume for N more (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora import get_algorithm
from lora.inject import AdapterSet, find_targets, frozen, group_file_keys, target_patterns
from training.checkpoint import load_training_state, save_training_state, state_path_for
from training.config import OPTIMIZER_NAMES, TrainConfig
from training.data import Sample, collate
from training.loop import ResumeState, derive_seed, run_training
from training.objective import Objective
from training.schedule import lr_at

from .test_loop import FlowSampling, Toy, make_samples


def _run(config, adapters, net, samples, resume=None, on_checkpoint=None):
    def predict_x0(x_t, sigma, cond):
        return x_t - sigma.view(-1, 1, 1, 1) * net(x_t)

    with frozen(net), adapters.attached(net):
        return run_training(
            params=adapters.trainable_parameters(), samples=samples, predict_x0=predict_x0,
            objective=Objective(FlowSampling(), "flow", timestep_sampling="logit_normal", noise_offset=0.05),
            config=config, device=torch.device("cpu"), resume=resume, on_checkpoint=on_checkpoint,
        )  # fmt: skip


def _fresh(net, config):
    targets = find_targets(net)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "init"))
    return targets, AdapterSet.create(targets, config.algorithm, config.rank, config.alpha, gen)


# the lean optimizers of pytorch-optimizer (requirements.txt): their state resumes as exactly as AdamW's
LIBRARY_CASES = [("LoRA", "Prodigy"), ("LoRA", "Adafactor"), ("LoKr", "CAME"), ("LoHa", "Lion")]


@pytest.mark.parametrize(
    "algorithm,optimizer", [("LoRA", "AdamW"), ("LoHa", "RMSprop"), ("LoKr", "SGD"), *LIBRARY_CASES]
)
def test_resume_is_bit_identical(tmp_path, algorithm, optimizer):
    if optimizer not in OPTIMIZER_NAMES:
        pytest.skip(f"{optimizer}: its library is not installed (requirements.txt)")
    n = 6
    cfg = TrainConfig(steps=2 * n, learning_rate=1.0 if optimizer == "Prodigy" else 2e-3, rank=4, training_dtype="fp32", lora_dtype="fp32",
                      batch_size=2, grad_accumulation_steps=2, algorithm=algorithm, optimizer=optimizer,
                      lr_schedule="cosine", warmup_steps=2, weight_decay=0.01, save_every=n)  # fmt: skip
    samples = make_samples(5)

    # Run A: 2N steps, checkpoint at N written to disk.
    net = Toy()
    _, adapters = _fresh(net, cfg)
    ckpt = tmp_path / "run_6_steps.safetensors"

    saved = []

    def on_checkpoint(step, total, optimizer, loss):
        saved.append((step, loss))
        if step != n:
            return
        save_training_state(state_path_for(ckpt), adapters.state_dict_for_file(dtype=torch.float32),
                            optimizer.state_dict(), step, total, cfg.as_dict())  # fmt: skip

    initial = adapters.state_dict_for_file()
    a = _run(cfg, adapters, net, samples, on_checkpoint=on_checkpoint)
    final_a = adapters.state_dict_for_file()
    assert a.losses[-1] < a.losses[0] and any(
        not torch.equal(initial[k], final_a[k]) for k in initial
    )  # it trains
    assert [step for step, _ in saved] == [n, 2 * n]
    assert [loss for _, loss in saved] == [a.losses[n - 1], a.losses[-1]]  # the loss of that step

    # Run B: fresh process state, weights + optimizer from the checkpoint, N more steps.
    master, opt_state, info = load_training_state(state_path_for(ckpt))
    assert (info["step"], info["total_steps"]) == (n, 2 * n)
    targets, adapters_b = _fresh(Toy(), cfg)
    groups, rest = group_file_keys(master, targets)
    assert not rest
    cls = get_algorithm(algorithm)
    for path, group in groups.items():
        shape, conv = targets[path]
        adapters_b[path] = cls.from_adapter_state_dict(group, shape, conv=conv)
    b = _run(cfg.replace(steps=n), adapters_b, Toy(), samples, resume=ResumeState(n, 2 * n, opt_state))
    final_b = adapters_b.state_dict_for_file()

    assert b.losses == a.losses[n:]
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


def test_lr_schedules():
    assert lr_at(1, 10, 1.0, "constant", warmup=4) == 0.25
    assert lr_at(4, 10, 1.0, "constant", warmup=4) == 1.0
    assert lr_at(7, 10, 1.0, "constant", warmup=4) == 1.0
    assert lr_at(5, 10, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(10, 10, 1.0, "linear") == 0.0
    assert lr_at(5, 10, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 10, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, 12, 1.0, "cosine_with_restarts", cycles=3) for s in range(1, 13)]
    assert values[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert values[4] == pytest.approx(values[0])  # the second cycle restarts from the top
    assert values[-1] == 0.0
    assert values[1] < values[0] and values[2] < values[1]  # decays within a cycle
    assert values[3] == pytest.approx(1.0)  # cycle boundary: back to the top


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp, self.adaLN_modulation = Attn(), Mlp(), nn.Sequential(nn.SiLU(), nn.Linear(8, 48))
        self.norm = nn.LayerNorm(8)


def test_target_presets_pick_the_right_layers():
    m = nn.ModuleDict(
        {"blocks": nn.ModuleList([TinyBlock()]), "t_embedder": Mlp(), "x_embedder": nn.Conv2d(4, 8, 2)}
    )

    def pick(preset, **kw):
        return sorted(find_targets(m, target_patterns(preset, kw.get("include", ())), kw.get("exclude", ())))

    assert pick("all") == ["blocks.0.adaLN_modulation.1", "blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1",
                           "blocks.0.mlp.fc2", "t_embedder.fc1", "t_embedder.fc2", "x_embedder"]  # fmt: skip
    assert pick("attention") == ["blocks.0.attn.proj", "blocks.0.attn.qkv"]
    # the blocks' MLPs, not an embedder's
    assert pick("attention_mlp") == [
        "blocks.0.attn.proj",
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]
    assert pick("all", include=("*fc*",), exclude=("*fc2",)) == ["blocks.0.mlp.fc1", "t_embedder.fc1"]
    with pytest.raises(ValueError, match="targets"):
        target_patterns("everything")


def test_min_snr_weights_and_flow_shift():
    class Eps(FlowSampling):
        sigma_data = 1.0

    obj = Objective(Eps(), "eps", min_snr_gamma=5.0)
    w = obj.sample_weights(torch.tensor([0.1, 1.0, 10.0]))
    # SNR = 100, 1, 0.01 -> min(SNR, 5)/SNR = 0.05, 1, 1
    torch.testing.assert_close(w, torch.tensor([0.05, 1.0, 1.0]))
    assert Objective(Eps(), "flow", min_snr_gamma=5.0).sample_weights(torch.tensor([0.5])) is None
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = Objective(FlowSampling(), "flow").sample_sigmas(256, gen())
    shifted = Objective(FlowSampling(), "flow", flow_shift=3.0).sample_sigmas(256, gen())
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert float(shifted.mean()) > float(plain.mean())


def test_samples_can_be_loaded_from_any_shape():
    assert Sample(torch.zeros(4, 8, 8)).bucket_key() != Sample(torch.zeros(4, 8, 12)).bucket_key()


def test_conditioning_values_batch_by_shape_and_plain_value_lists_and_dicts_alike():
    def sample(seed, rate=25, ref_shape=(1, 4, 8, 8)):
        g = torch.Generator().manual_seed(seed)
        return Sample(torch.zeros(4, 8, 8), {
            "c": torch.randn(1, 3, 5, generator=g), "frame_rate": rate,
            "ref": [torch.randn(ref_shape, generator=g)], "extra": {"mask": torch.randn(1, 3, generator=g)},
        })  # fmt: skip

    a, b = sample(0), sample(1)
    assert a.bucket_key() == b.bucket_key()  # other values, same shapes: one batch
    assert sample(2, rate=24).bucket_key() != a.bucket_key()
    assert sample(3, ref_shape=(1, 4, 8, 4)).bucket_key() != a.bucket_key()
    _, cond = collate([a, b], [0, 1], torch.device("cpu"))
    assert cond["frame_rate"] == 25
    torch.testing.assert_close(cond["ref"][0], torch.cat([a.cond["ref"][0], b.cond["ref"][0]]))
    torch.testing.assert_close(
        cond["extra"]["mask"], torch.cat([a.cond["extra"]["mask"], b.cond["extra"]["mask"]])
    )
