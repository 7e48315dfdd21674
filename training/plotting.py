"""Loss charts drawn with PIL alone (no matplotlib, no ComfyUI imports).

:func:`render_loss_plot` draws the raw loss per optimizer step (light), an EMA-smoothed curve
(strong), axes with round tick values, grid, min and final markers with labels, a legend and a
one-line summary.  It copes with no data, one value, a flat loss and NaN/inf values (skipped, marked
on the x axis and counted in the summary).  The chart is drawn at twice the size and scaled down, so
lines and text come out anti-aliased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = ["render_loss_plot", "ema", "ema_span", "nice_ticks"]

_SS = 2  # supersampling factor

_BG = (255, 255, 255)
_AXIS = (70, 70, 78)
_GRID = (231, 233, 238)
_TEXT = (35, 35, 42)
_MUTED = (110, 112, 122)
_RAW = (158, 188, 230)
_EMA = (24, 82, 170)
_MIN = (26, 150, 78)
_FINAL = (228, 112, 18)
_BAD = (212, 44, 44)
_HELD_OUT = (120, 60, 170)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _scalable_fonts() -> bool:
    try:
        ImageFont.load_default(size=10)
        return True
    except (TypeError, AttributeError, OSError):
        return False


def ema_span(n: int) -> int:
    """The smoothing span for a run of ``n`` steps: n / 25, 2 to 200 steps (the live view's too)."""
    return int(max(2, min(200, round(n / 25))))


def ema(values: Sequence[float], span: float) -> list[float]:
    """Bias-corrected exponential moving average (alpha = 2 / (span + 1)); non-finite entries keep
    the previous average (NaN until the first finite value)."""
    alpha = 2.0 / (max(1.0, float(span)) + 1.0)
    beta = 1.0 - alpha
    out: list[float] = []
    acc = 0.0
    weight = 0.0
    for v in values:
        if math.isfinite(v):
            acc = beta * acc + alpha * v
            weight = beta * weight + alpha
        out.append(acc / weight if weight > 0 else math.nan)
    return out


def _nice_step(span: float, target: int, integer: bool = False) -> float:
    raw = span / max(1, target)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    mantissas = (1.0, 2.0, 5.0, 10.0) if integer and mag <= 1 else (1.0, 2.0, 2.5, 5.0, 10.0)
    for m in mantissas:
        if m * mag >= raw * (1 - 1e-9):
            step = m * mag
            break
    else:  # pragma: no cover - the loop always breaks at 10
        step = 10 * mag
    if integer:
        step = max(1.0, round(step))
    return step


def nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> tuple[list[float], float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering ``[lo, hi]``: ``(ticks, step)``."""
    step = _nice_step(hi - lo, target, integer)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    ticks = [i * step for i in range(first, last + 1)]
    return ticks, step


def _tick_formatter(step: float, max_abs: float):
    """Format tick values so that neighbouring ticks differ and no digits are wasted."""
    if 1e-4 <= step and max_abs < 1e6:
        mant = step / 10.0 ** math.floor(math.log10(step))
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if abs(mant - 2.5) < 1e-6 and step < 10:
            decimals += 1
        return lambda v: f"{0.0 if abs(v) < step * 1e-9 else v:.{decimals}f}"
    digits = min(12, max(2, math.ceil(math.log10(max(max_abs, step) / step)) + 2))
    return lambda v: "0" if abs(v) < step * 1e-9 else f"{v:.{digits}g}"


def _short(v: float) -> str:
    return f"{v:.5g}"


class _Canvas:
    def __init__(self, width: int, height: int, scale: int, font_scale: float):
        self.s = scale
        self.fs = font_scale
        self.img = Image.new("RGB", (width * scale, height * scale), _BG)
        self.draw = ImageDraw.Draw(self.img)
        self.fonts: dict[int, object] = {}

    def font(self, size: int):
        if size not in self.fonts:
            self.fonts[size] = _font(max(6, round(size * self.fs)))
        return self.fonts[size]

    def text_size(self, text: str, size: int) -> tuple[int, int]:
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=self.font(size))
        return right - left, bottom - top

    def text(self, xy, text, size, fill=_TEXT, anchor="la"):
        self.draw.text(xy, text, font=self.font(size), fill=fill, anchor=anchor)

    def vertical_text(self, center, text, size, fill=_TEXT):
        w, h = self.text_size(text, size)
        pad = 4 * self.s
        tile = Image.new("RGB", (w + 2 * pad, h + 2 * pad), _BG)
        ImageDraw.Draw(tile).text(
            (pad + w / 2, pad + h / 2), text, font=self.font(size), fill=fill, anchor="mm"
        )
        tile = tile.rotate(90, expand=True)
        self.img.paste(tile, (int(center[0] - tile.width / 2), int(center[1] - tile.height / 2)))


def _boxes_overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _leader_end(box, x: float, y: float) -> tuple[float, float]:
    """The corner of a label box nearest to its marker."""
    lx = box[0] if abs(box[0] - x) < abs(box[2] - x) else box[2]
    ly = box[1] if abs(box[1] - y) < abs(box[3] - y) else box[3]
    return lx, ly


def _segments_cross(p1, p2, q1, q2) -> bool:
    def orient(a, b, c) -> float:
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
    d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
    return (d1 > 0) != (d2 > 0) and (d3 > 0) != (d4 > 0)


def render_loss_plot(
    losses: Sequence[float],
    title: str = "Training loss",
    width: int = 900,
    height: int = 500,
    validation: Sequence[tuple[float, float]] = (),
) -> Image.Image:
    """Chart of a loss curve, one value per optimizer step (step 1 is ``losses[0]``), and optionally
    a held-out loss measured at some steps (``validation``: (step, value) pairs; step 0 = before the
    first step), drawn as a line of dots.

    Returns an RGB image of exactly ``width`` x ``height`` pixels.
    """
    held_out = [(float(st), float(v)) for st, v in validation if math.isfinite(float(v))]
    width, height = int(width), int(height)
    if width < 240 or height < 160:
        raise ValueError(f"loss plot must be at least 240x160 pixels, got {width}x{height}")
    values = [float(v) for v in losses]
    n = len(values)
    finite = [(i + 1, v) for i, v in enumerate(values) if math.isfinite(v)]
    bad_steps = [i + 1 for i, v in enumerate(values) if not math.isfinite(v)]

    scale = _SS if _scalable_fonts() else 1
    s = scale
    # text and spacing shrink a little on small charts and grow a little on big ones
    k = max(0.72, min(1.4, min(width / 900, height / 500)))
    u = s * k
    cv = _Canvas(width, height, scale, u)
    W, H = width * s, height * s

    # ---- summary line ------------------------------------------------------------------------
    if finite:
        i_min, v_min = min(finite, key=lambda p: p[1])
        i_fin, v_fin = finite[-1]
        summary_parts = [
            f"{n} step{'s' if n != 1 else ''}",
            f"final {_short(v_fin)}",
            f"min {_short(v_min)} at step {i_min}",
        ]
    else:
        summary_parts = [f"{n} step{'s' if n != 1 else ''}"]
    if bad_steps:
        summary_parts.insert(
            1, f"{len(bad_steps)} non-finite value{'s' if len(bad_steps) != 1 else ''} skipped"
        )
    if held_out:
        summary_parts.append(f"held-out {_short(held_out[-1][1])} at step {int(held_out[-1][0])}")

    # ---- scales and ticks -------------------------------------------------------------------------
    if finite:
        lo = min([v for _, v in finite] + [v for _, v in held_out])
        hi = max([v for _, v in finite] + [v for _, v in held_out])
        span = hi - lo
        nonnegative = lo >= 0
        if span <= 1e-12 * max(1.0, abs(hi)):  # flat: pad around the value
            pad = abs(hi) * 0.1 if hi != 0 else 1.0
            lo, hi = lo - pad, hi + pad
        else:
            lo, hi = lo - 0.05 * span, hi + 0.05 * span
        if nonnegative and lo < 0:  # losses >= 0: do not show a negative range
            lo = 0.0
        y_lo, y_hi = lo, hi
        y_ticks, y_step = nice_ticks(y_lo, y_hi, target=max(3, min(8, height // 70)))
        fmt_y = _tick_formatter(y_step, max(abs(y_lo), abs(y_hi)))
        y_labels = [fmt_y(t) for t in y_ticks]
    else:
        y_lo, y_hi, y_ticks, y_labels = 0.0, 1.0, [], []

    first = min([1.0] + [st for st, _ in held_out])  # a held-out value before the first step: step 0
    if n >= 2:
        x_lo, x_hi = first, float(n)
        x_ticks, _ = nice_ticks(first, float(n), target=max(3, min(10, width // 95)), integer=True)
        pad = 0.015 * (n - 1)
        x_lo, x_hi = x_lo - pad, x_hi + pad
    elif n == 1:
        x_lo, x_hi, x_ticks = 0.5, 1.5, [1.0]
    else:
        x_lo, x_hi, x_ticks = 0.0, 1.0, []
    x_labels = [str(int(round(t))) for t in x_ticks]

    # ---- layout ------------------------------------------------------------------------------
    tick_font, label_font, title_font, small_font = 12, 13, 17, 12
    y_label_w = max([cv.text_size(t, tick_font)[0] for t in y_labels] or [0])
    left = max(62 * u, y_label_w + 40 * u)
    right = W - 22 * u
    top = 64 * u
    bottom = H - 52 * u
    plot = (left, top, right, bottom)

    def px(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def py(v: float) -> float:
        return bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top)

    # ---- title and summary -------------------------------------------------------------------
    cv.text((left, 14 * u), title, title_font, fill=_TEXT)
    # the summary line keeps as many of its parts as fit
    summary = summary_parts[0]
    for part in summary_parts[1:]:
        longer = f"{summary}  ·  {part}"
        if left + cv.text_size(longer, small_font)[0] > W - 8 * u:
            break
        summary = longer
    cv.text((left, 38 * u), summary, small_font, fill=_MUTED)

    # ---- grid, axes, ticks -------------------------------------------------------------------
    d = cv.draw
    d.rectangle(plot, fill=(252, 252, 254))
    for t in y_ticks:
        y = py(t)
        d.line([(left, y), (right, y)], fill=_GRID, width=s)
    for t in x_ticks:
        x = px(t)
        d.line([(x, top), (x, bottom)], fill=_GRID, width=s)
    d.rectangle(plot, outline=(205, 207, 214), width=s)
    d.line([(left, top), (left, bottom)], fill=_AXIS, width=s)
    d.line([(left, bottom), (right, bottom)], fill=_AXIS, width=s)
    tick = 5 * u
    for t, label in zip(y_ticks, y_labels, strict=True):
        y = py(t)
        d.line([(left - tick, y), (left, y)], fill=_AXIS, width=s)
        cv.text((left - tick - 4 * u, y), label, tick_font, anchor="rm")
    for t, label in zip(x_ticks, x_labels, strict=True):
        x = px(t)
        d.line([(x, bottom), (x, bottom + tick)], fill=_AXIS, width=s)
        cv.text((x, bottom + tick + 3 * u), label, tick_font, anchor="ma")
    cv.text(((left + right) / 2, H - 8 * u), "optimizer step", label_font, fill=_MUTED, anchor="md")
    cv.vertical_text((13 * u, (top + bottom) / 2), "loss", label_font, fill=_MUTED)

    if not finite:
        msg = "no data" if n == 0 else "no finite loss values"
        cv.text(((left + right) / 2, (top + bottom) / 2), msg, 22, fill=_MUTED, anchor="mm")
        for step in bad_steps:
            x = px(step)
            d.line([(x, bottom - 7 * s), (x, bottom)], fill=_BAD, width=s)
        return cv.img.resize((width, height), Image.LANCZOS) if s > 1 else cv.img

    # ---- curves ------------------------------------------------------------------------------
    def runs(seq: Sequence[float]) -> list[list[tuple[float, float]]]:
        out: list[list[tuple[float, float]]] = []
        cur: list[tuple[float, float]] = []
        for i, v in enumerate(seq):
            if math.isfinite(v):
                cur.append((px(i + 1), py(v)))
            elif cur:
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out

    # EMA span grows with the run (2 .. 200 steps); below 3 finite values it would only repeat them.
    show_ema = len(finite) >= 3
    span_steps = ema_span(n)
    smooth = ema(values, span_steps)
    if show_ema:
        smooth_masked = [m if math.isfinite(v) else math.nan for m, v in zip(smooth, values, strict=True)]
    else:
        smooth_masked = [math.nan] * n

    raw_width = max(1, round(1.3 * s))
    for run in runs(values):
        if len(run) > 1:
            d.line(run, fill=_RAW, width=raw_width, joint="curve" if len(run) < 5000 else None)
        else:
            x, y = run[0]
            r = 2.5 * s
            d.ellipse([x - r, y - r, x + r, y + r], fill=_RAW)
    if n <= 60:  # few steps: show each one
        for run in runs(values):
            for x, y in run:
                r = 2.2 * s
                d.ellipse([x - r, y - r, x + r, y + r], fill=_RAW)
    ema_width = max(2, round(2.4 * s))
    for run in runs(smooth_masked):
        if len(run) > 1:
            d.line(run, fill=_EMA, width=ema_width, joint="curve" if len(run) < 5000 else None)
    for step in bad_steps:
        x = px(step)
        d.line([(x, bottom - 8 * s), (x, bottom - 1)], fill=_BAD, width=max(1, round(1.5 * s)))
    if held_out:
        points = [(px(st), py(v)) for st, v in held_out]
        if len(points) > 1:
            d.line(points, fill=_HELD_OUT, width=max(1, round(1.6 * s)))
        for x, y in points:
            r = 3.2 * s
            d.ellipse([x - r, y - r, x + r, y + r], fill=_HELD_OUT)

    # ---- legend (in the emptiest corner) -----------------------------------------------------
    entries = [("line", _RAW, "loss per step")]
    if show_ema:
        entries.append(("thick", _EMA, f"EMA (span {span_steps})"))
    if i_min != i_fin:
        entries.append(("dot", _MIN, "minimum"))
        entries.append(("dot", _FINAL, "final"))
    else:
        entries.append(("dot", _FINAL, "final (= minimum)"))
    if bad_steps:
        entries.append(("tick", _BAD, "non-finite (skipped)"))
    if held_out:
        entries.append(("dot", _HELD_OUT, "held-out loss"))
    line_h = 18 * u
    swatch = 24 * u
    text_w = max(cv.text_size(label, small_font)[0] for _, _, label in entries)
    box_w = 10 * u + swatch + 8 * u + text_w + 10 * u
    box_h = 8 * u + line_h * len(entries) + 4 * u
    margin = 10 * u
    corners = [
        (right - margin - box_w, top + margin),
        (left + margin, top + margin),
        (right - margin - box_w, bottom - margin - box_h),
        (left + margin, bottom - margin - box_h),
    ]

    def crowd(rect) -> int:
        """How much of the drawn curves lies under ``rect`` (dark pixels; the grid does not count)."""
        x0, y0, x1, y1 = (int(round(c)) for c in rect)
        pad = 4 * s
        box = (max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad), min(H, y1 + pad))
        if box[2] <= box[0] or box[3] <= box[1]:
            return 0
        return sum(cv.img.crop(box).convert("L").histogram()[:225])

    marks_xy = [(px(i_min), py(v_min)), (px(i_fin), py(v_fin))]

    def legend_cost(rect) -> tuple[int, int]:
        pad = 10 * s
        covers = sum(
            1
            for x, y in marks_xy
            if rect[0] - pad <= x <= rect[2] + pad and rect[1] - pad <= y <= rect[3] + pad
        )
        return covers, crowd(rect)

    rects = [(x, y, x + box_w, y + box_h) for x, y in corners]
    # no legend where it would fill much of a small chart
    fits = box_w <= 0.5 * (right - left) and box_h <= 0.6 * (bottom - top)
    legend = min(rects, key=legend_cost) if fits else None  # ties keep the earlier corner

    # ---- min / final markers and labels ------------------------------------------------------
    marks = []
    if i_min == i_fin:
        marks.append((i_fin, v_fin, _FINAL, f"final = min {_short(v_fin)} (step {i_fin})"))
    else:
        marks.append((i_min, v_min, _MIN, f"min {_short(v_min)} (step {i_min})"))
        marks.append((i_fin, v_fin, _FINAL, f"final {_short(v_fin)} (step {i_fin})"))
    marker_r = 5 * s
    taken = ([legend] if legend else []) + [
        (
            px(st) - marker_r - 2 * s,
            py(v) - marker_r - 2 * s,
            px(st) + marker_r + 2 * s,
            py(v) + marker_r + 2 * s,
        )
        for st, v, _, _ in marks
    ]
    label_boxes = []
    for step, v, color, label in marks:
        x, y = px(step), py(v)
        tw, th = cv.text_size(label, small_font)
        bw, bh = tw + 12 * u, th + 10 * u
        candidates = []
        rings = []
        for ring, gap in enumerate((9 * u, 24 * u, 48 * u, 80 * u)):
            rings += [ring] * 6
            candidates += [
                (x + gap, y - gap - bh),  # above right
                (x - gap - bw, y - gap - bh),  # above left
                (x + gap, y + gap),  # below right
                (x - gap - bw, y + gap),  # below left
                (x - bw / 2, y - gap - bh - 4 * u),  # above
                (x - bw / 2, y + gap + 4 * u),  # below
            ]
        best = None
        for order, (cx, cy) in enumerate(candidates):
            box = (cx, cy, cx + bw, cy + bh)
            if (
                box[0] < left + 2 * s
                or box[2] > right - 2 * s
                or box[1] < top + 2 * s
                or box[3] > bottom - 2 * s
            ):
                continue
            if any(_boxes_overlap(box, other) for other in taken):
                continue
            end = _leader_end(box, x, y)
            if any(
                _segments_cross((x, y), end, (ox, oy), _leader_end(ob, ox, oy))
                for ob, _, _, (ox, oy) in label_boxes
            ):
                continue
            # prefer empty places, then near ones
            score = (crowd(box) + rings[order] * 60 * s * s, order)
            if best is None or score < best[0]:
                best = (score, box)
        if best is None:  # nowhere free: clamp the nearest candidate into the plot area
            cx = min(max(candidates[0][0], left + 2 * s), right - 2 * s - bw)
            cy = min(max(candidates[0][1], top + 2 * s), bottom - 2 * s - bh)
            chosen = (cx, cy, cx + bw, cy + bh)
        else:
            chosen = best[1]
        taken.append(chosen)
        label_boxes.append((chosen, color, label, (x, y)))

    for box, color, _label, (x, y) in label_boxes:
        # thin leader from the marker to the nearest corner of its label
        d.line([(x, y), _leader_end(box, x, y)], fill=color, width=s)
    for step, v, color, _ in marks:
        x, y = px(step), py(v)
        r = marker_r
        d.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=_BG, width=max(1, round(1.5 * s)))
    for box, color, label, _ in label_boxes:
        d.rounded_rectangle(box, radius=4 * s, fill=_BG, outline=color, width=s)
        cv.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), label, small_font, fill=_TEXT, anchor="mm")

    # ---- legend drawing ------------------------------------------------------------------------
    if legend is None:
        return cv.img.resize((width, height), Image.LANCZOS) if s > 1 else cv.img
    d.rounded_rectangle(legend, radius=5 * s, fill=_BG, outline=(200, 202, 210), width=s)
    lx, ly = legend[0] + 10 * u, legend[1] + 8 * u
    for kind, color, label in entries:
        cy = ly + line_h / 2
        if kind == "line":
            d.line([(lx, cy), (lx + swatch, cy)], fill=color, width=max(2, round(1.6 * s)))
        elif kind == "thick":
            d.line([(lx, cy), (lx + swatch, cy)], fill=color, width=ema_width)
        elif kind == "dot":
            r = 5 * s
            c = lx + swatch / 2
            d.ellipse([c - r, cy - r, c + r, cy + r], fill=color, outline=_BG, width=s)
        else:
            c = lx + swatch / 2
            d.line([(c, cy - 6 * s), (c, cy + 6 * s)], fill=color, width=max(1, round(1.5 * s)))
        cv.text((lx + swatch + 8 * u, cy), label, small_font, fill=_TEXT, anchor="lm")
        ly += line_h

    return cv.img.resize((width, height), Image.LANCZOS) if s > 1 else cv.img
