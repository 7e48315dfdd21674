"""training/plotting.py: the PIL loss chart (pure, no ComfyUI)."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.plotting import ema, nice_ticks, render_loss_plot

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _realistic(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = 0.08 + 0.85 * math.exp(-i / (n / 5.5))
        out.append(max(0.005, base + rng.gauss(0, 0.05) * (0.35 + math.exp(-i / (n / 2.5)))))
    return out


def _plot_area(img: Image.Image) -> np.ndarray:
    w, h = img.size
    # inside the axes for the default layout: right of the y labels, below the title, above the x labels
    return np.asarray(img.convert("RGB"))[int(h * 0.14) : int(h * 0.88), int(w * 0.09) : int(w * 0.97)]


def _curve_pixels(img: Image.Image) -> int:
    """Blue-ish pixels (the raw and EMA curves)."""
    a = _plot_area(img).astype(int)
    return int(((a[..., 2] - a[..., 0] > 40) & (a[..., 2] > 120)).sum())


def _dark_pixels(img: Image.Image) -> int:
    a = _plot_area(img).astype(int)
    return int((a.sum(axis=-1) < 600).sum())


CASES = {
    "empty": [],
    "one": [0.42],
    "two": [0.5, 0.4],
    "flat": [0.25] * 50,
    "flat_zero": [0.0] * 30,
    "nan_inf": [1.0, 0.8, float("nan"), 0.5, float("inf"), 0.45, float("-inf"), 0.4],
    "all_nan": [float("nan")] * 5,
    "many": _realistic(500),
    "huge": [1e12 * (1 + 0.1 * math.sin(i)) for i in range(40)],
    "tiny": [1e-9 * (1 + 0.01 * math.cos(i)) for i in range(40)],
    "negative": [math.sin(i / 5) for i in range(100)],
    "spike": [50.0] + [0.1 + 0.001 * (i % 7) for i in range(200)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_plot_cases_render(name):
    img = render_loss_plot(CASES[name])
    assert isinstance(img, Image.Image)
    assert img.size == (900, 500)
    assert img.mode == "RGB"
    assert _dark_pixels(img) > 50, "the plot area should hold text, markers or curves"
    if name not in ("empty", "all_nan"):
        assert _curve_pixels(img) > 20, "a curve or a point should be drawn"


@pytest.mark.parametrize("size", [(900, 500), (640, 360), (1600, 900), (300, 200), (240, 160)])
def test_plot_sizes(size):
    img = render_loss_plot(_realistic(120), width=size[0], height=size[1])
    assert img.size == size
    assert _curve_pixels(img) > 20


def test_plot_too_small_refused():
    with pytest.raises(ValueError, match="at least"):
        render_loss_plot([1.0], width=100, height=100)


def test_plot_accepts_numpy_and_tensors():
    import torch

    assert render_loss_plot(np.linspace(1, 0.1, 20)).size == (900, 500)
    assert render_loss_plot(torch.linspace(1, 0.1, 20)).size == (900, 500)


def test_plot_is_deterministic():
    a = render_loss_plot(_realistic(300))
    b = render_loss_plot(_realistic(300))
    assert a.tobytes() == b.tobytes()


def test_plot_differs_with_data():
    assert render_loss_plot(_realistic(300, 1)).tobytes() != render_loss_plot(_realistic(300, 2)).tobytes()


def test_non_finite_steps_are_marked_in_red():
    img = render_loss_plot([1.0, 0.9, float("nan"), 0.7, 0.6, 0.5])
    a = np.asarray(img).astype(int)
    red = (a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] < 90)
    assert red.sum() > 5


def test_plot_long_run_is_fast_enough():
    import time

    t0 = time.perf_counter()
    img = render_loss_plot(_realistic(50_000))
    assert img.size == (900, 500)
    assert time.perf_counter() - t0 < 10


def test_nice_ticks_are_round():
    ticks, step = nice_ticks(0.0123, 0.987)
    assert step in (0.1, 0.2, 0.25, 0.5)
    assert all(abs(t / step - round(t / step)) < 1e-9 for t in ticks)
    assert ticks[0] >= 0.0123 - 1e-12 and ticks[-1] <= 0.987 + 1e-12
    ticks, step = nice_ticks(1, 500, integer=True)
    assert step == 100 and ticks == [100, 200, 300, 400, 500]
    ticks, step = nice_ticks(1, 3, integer=True)
    assert step == 1 and ticks == [1, 2, 3]


def test_ema_smooths_and_skips_non_finite():
    values = [1.0, float("nan"), 1.0, 1.0]
    out = ema(values, 5)
    assert out == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert math.isnan(ema([float("nan"), 2.0], 3)[0])
    noisy = [(-1) ** i for i in range(100)]
    smooth = ema(noisy, 20)
    assert max(abs(v) for v in smooth[50:]) < 0.2


def test_save_sample_png():
    """Writes artifacts/loss_plot_sample.png (look at it) and checks it reads back."""
    values = _realistic(500)
    values[123] = float("nan")
    values[300] = float("inf")
    img = render_loss_plot(values, title="Training loss (sample: 500 steps, 2 non-finite)")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "loss_plot_sample.png"
    img.save(path)
    back = Image.open(io.BytesIO(path.read_bytes()))
    assert back.size == (900, 500)
    for name in ("empty", "one", "flat", "nan_inf"):
        render_loss_plot(CASES[name], title=f"Training loss ({name})").save(
            ARTIFACTS / f"loss_plot_{name}.png"
        )


def test_held_out_loss_is_drawn_in_its_own_colour_from_step_0():
    import numpy as np

    from training.plotting import _HELD_OUT, render_loss_plot

    losses = [1.0 - 0.01 * i for i in range(40)]
    held_out = [(0, 1.2), (20, 0.9), (40, 0.8)]

    def colour_pixels(img) -> np.ndarray:
        a = np.asarray(img.convert("RGB")).astype(int)
        return np.argwhere(np.abs(a - np.array(_HELD_OUT)).sum(axis=2) < 30)

    plain = colour_pixels(render_loss_plot(losses))
    drawn = colour_pixels(render_loss_plot(losses, validation=held_out))
    assert len(plain) == 0 and len(drawn) > 100
    # the step-0 point lies left of the loss curve's first point (step 1), inside the plot
    from training.plotting import _RAW

    a = np.asarray(render_loss_plot(losses, validation=held_out).convert("RGB")).astype(int)
    raw = np.argwhere(np.abs(a - np.array(_RAW)).sum(axis=2) < 30)
    assert drawn[:, 1].min() + 10 < raw[:, 1].min()


def test_ema_values_and_span():
    """alpha = 2 / (span + 1), bias-corrected: [1, 3] at span 3 (alpha 1/2) gives 1 then 1.75 / 0.75;
    a span below 1 means no smoothing; the span grows with the run as n / 25, within 2..200."""
    from training.plotting import ema_span

    assert ema([1.0, 3.0], 3) == pytest.approx([1.0, 1.75 / 0.75], rel=1e-12)
    assert ema([1.0, 3.0, 2.0], 1) == [1.0, 3.0, 2.0]
    assert ema([1.0, 3.0, 2.0], 0.2) == [1.0, 3.0, 2.0]
    assert [ema_span(n) for n in (0, 10, 100, 1000, 4990, 5025, 10**6)] == [2, 2, 4, 40, 200, 200, 200]


@pytest.mark.parametrize(
    "span,target,integer,step",
    [(10, 5, False, 2.0), (1, 4, False, 0.25), (0.7, 7, False, 0.1), (30, 6, False, 5.0), (8, 1, False, 10.0),
     (0, 5, False, 1.0), (math.inf, 5, False, 1.0), (3, 6, True, 1.0), (12, 5, True, 5.0), (250, 2, True, 200.0),
     (1e-7, 4, False, 2.5e-8), (25, 10, True, 5.0)],
)  # fmt: skip
def test_nice_step_picks_the_smallest_round_step_that_covers_the_span(span, target, integer, step):
    from training.plotting import _nice_step

    assert _nice_step(span, target, integer) == pytest.approx(step, rel=1e-12)


@pytest.mark.parametrize(
    "step,max_abs,values,texts",
    [(0.25, 1.0, [0.0, 0.25, 1.0], ["0.00", "0.25", "1.00"]),  # 2.5 mantissa: one more decimal
     (2.5, 10.0, [2.5, 5.0], ["2.5", "5.0"]),
     (25.0, 100.0, [25.0, 50.0], ["25", "50"]),
     (0.1, 1.0, [1e-12, 0.3], ["0.0", "0.3"]),  # rounding noise near 0 is shown as 0
     (1e-5, 1e-4, [0.0, 2e-5], ["0", "2e-05"]),  # below 1e-4: significant digits
     (1e5, 5e6, [0.0, 3e6], ["0", "3e+06"]),
     (1.0, 1234567.0, [1234567.0], ["1234567"])],
)  # fmt: skip
def test_tick_labels_differ_by_their_step_and_waste_no_digits(step, max_abs, values, texts):
    from training.plotting import _tick_formatter

    assert [_tick_formatter(step, max_abs)(v) for v in values] == texts


def test_label_geometry_helpers():
    from training.plotting import _boxes_overlap, _leader_end, _segments_cross

    box = (10, 10, 20, 20)
    assert _boxes_overlap(box, (15, 15, 25, 25)) and _boxes_overlap(box, (12, 12, 18, 18))
    for other in [
        (20, 10, 30, 20),
        (0, 10, 10, 20),
        (10, 20, 20, 30),
        (10, 0, 20, 10),
    ]:  # touching edges only
        assert not _boxes_overlap(box, other) and not _boxes_overlap(other, box)
    assert _leader_end(box, 0, 0) == (10, 10) and _leader_end(box, 30, 30) == (20, 20)
    assert _leader_end(box, 30, 0) == (20, 10) and _leader_end(box, 0, 30) == (10, 20)
    assert _segments_cross((0, 0), (2, 2), (0, 2), (2, 0))
    assert not _segments_cross((0, 0), (1, 1), (0, 2), (2, 4))  # apart
    assert not _segments_cross((0, 0), (2, 0), (0, 1), (2, 1))  # parallel
    assert not _segments_cross((0, 0), (1, 0), (2, 1), (2, -1))  # the line would cross, the segment does not
