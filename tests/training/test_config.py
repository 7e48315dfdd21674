from __future__ import annotations

import pytest

from training.config import ALGORITHM_NAMES, OPTIMIZER_NAMES, TrainConfig
from training.factory import make_loss, make_optimizer


def test_defaults_match_the_contract():
    c = TrainConfig()
    assert (c.batch_size, c.grad_accumulation_steps, c.steps, c.learning_rate, c.rank) == (
        1,
        1,
        16,
        0.0005,
        8,
    )
    assert (c.optimizer, c.loss_function, c.seed, c.training_dtype, c.lora_dtype, c.algorithm) == (
        "AdamW",
        "MSE",
        0,
        "bf16",
        "bf16",
        "LoRA",
    )
    assert c.gradient_checkpointing is True


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("steps", 100_001),
        ("batch_size", 0),
        ("grad_accumulation_steps", 1025),
        ("rank", 129),
        ("rank", 0),
        ("learning_rate", 0.0),
        ("learning_rate", 2.0),
        ("seed", -1),
        ("seed", 2**64),
        ("optimizer", "Lion2"),
        ("loss_function", "L2"),
        ("training_dtype", "fp16"),
        ("lora_dtype", "int8"),
        ("algorithm", "GLoRA"),
        ("alpha", 0.0),
        ("steps", 1.5),
        ("steps", True),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_factories_reject_unknown_names():
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("Lion2", [], 1e-3)
    with pytest.raises(ValueError, match="loss_function"):
        make_loss("L2")


FLOAT_FIELDS = ["learning_rate", "alpha", "weight_decay", "max_grad_norm", "logit_mean", "logit_std", "flow_shift",
                "min_snr_gamma", "noise_offset"]  # fmt: skip


def test_float_fields_are_all_listed():
    import dataclasses

    floats = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]
    assert sorted(floats) == sorted(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_floats_are_refused_naming_the_option(field, value):
    """NaN passes every range comparison (and ComfyUI's min / max checks): it must still be refused."""
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("value", [-1, 100_001, 1.5])
def test_keep_checkpoints_range(value):
    with pytest.raises(ValueError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=value)
    assert TrainConfig().keep_checkpoints == 3 and TrainConfig(keep_checkpoints=0).keep_checkpoints == 0


def test_algorithm_names_are_the_registry():
    """The node's algorithm options are lora.ALGORITHMS, in its order (training/ does not import lora)."""
    from lora import ALGORITHMS

    assert ALGORITHM_NAMES == tuple(ALGORITHMS)


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n != "AdamW8bit"])  # AdamW8bit: CUDA only
def test_every_optimizer_gets_the_runs_learning_rate_and_weight_decay(name):
    import torch

    param = torch.nn.Parameter(torch.zeros(4, 4))
    group = make_optimizer(name, [param], 0.0123, 0.045).param_groups[0]
    assert group["params"] == [param]
    assert group["lr"] == 0.0123 and group["weight_decay"] == 0.045, group
    if name in ("AdamW", "Adam", "SGD", "RMSprop"):  # one kernel launch per group, not per tensor
        assert group["foreach"] is True
    if name == "SGD":
        assert group["momentum"] == 0.9


def test_every_number_option_takes_its_range_ends_and_refuses_past_them():
    from training.config import OPTIONS, TrainConfig

    for option in OPTIONS:
        if option.kind not in ("int", "float") or not option.config:
            continue
        for end in (option.lo, option.hi):
            if end == option.lo and option.above:
                with pytest.raises(ValueError, match=f"{option.name} must be above"):
                    option.check(end)
                continue
            option.check(end)
        step = 1 if option.kind == "int" else 1e-6 * max(1.0, abs(option.hi))
        with pytest.raises(ValueError, match=f"^{option.name} must be"):
            option.check(option.hi + step)
        with pytest.raises(ValueError, match=f"^{option.name} must be"):
            option.check(True)  # a bool is not a number here
        TrainConfig(**{option.name: option.hi})


def test_bool_and_pattern_options_take_their_own_types_only():
    from training.config import OPTION, TrainConfig

    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        OPTION["gradient_checkpointing"].check(1)
    OPTION["gradient_checkpointing"].check(False)
    assert TrainConfig(include=("*attn*",)).include == ("*attn*",)
    for bad in (["*attn*"], ("*attn*", 3), "*attn*"):
        with pytest.raises(ValueError, match="include must be a tuple of glob patterns"):
            TrainConfig(include=bad)
