"""The loss curve of a run as a PNG, drawn with PIL (no plotting library needed).

``plot_loss_curve(read_metrics("runs/x/metrics.jsonl"), "runs/x/loss_curve.png")`` draws the total loss
(``loss``, thick black) and each named loss (``loss_*``) against the iteration, with axes, ticks, a grid and
a legend. Non-finite values are left out of the lines.
"""

from __future__ import annotations

import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from maskrcnn.atomic import atomic_write

__all__ = ["plot_loss_curve", "read_metrics"]

_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line; unreadable lines skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # e.g. a line cut by a crash
                continue
    return records


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``."""
    span = hi - lo
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(first + k * step)
        k += 1
    return ticks


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def _text(draw: ImageDraw.ImageDraw, xy, text: str, *, fill, font, anchor: str) -> None:
    """``draw.text`` with an anchor (``l/m/r`` then ``t/m/b``), computed by hand so that Pillow's bitmap
    fallback font (which has no anchor support) works too."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]] - left
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]] - top
    draw.text((x, y), text, fill=fill, font=font)


def plot_loss_curve(
    records: list[dict],
    path: str | os.PathLike,
    *,
    title: str = "training loss",
    size: tuple[int, int] = (960, 540),
) -> str:
    """Draw ``loss`` and every ``loss_*`` of ``records`` (dicts with an ``iteration``) into a PNG at
    ``path`` (written atomically). Records without losses (evaluation records) are ignored. Returns
    ``path``."""
    path = os.fspath(path)
    rows = [r for r in records if "iteration" in r and any(k.startswith("loss") for k in r)]
    names = sorted({k for r in rows for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    series = {
        name: [
            (float(r["iteration"]), float(r[name]))
            for r in rows
            if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])
        ]
        for name in names
    }
    series = {k: v for k, v in series.items() if v}

    width, height = size
    left, right, top, bottom = 72, 200, 36, 56
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area (y0 at the top)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _text(draw, ((x0 + x1) / 2, 12), title, fill="black", font=font, anchor="mt")

    points = [p for pts in series.values() for p in pts]
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        xmin, xmax = min(0.0, min(xs)), max(xs)
        ymin, ymax = min(0.0, min(ys)), max(ys)
    else:
        xmin, xmax, ymin, ymax = 0.0, 1.0, 0.0, 1.0
    if xmax <= xmin:
        xmin, xmax = xmin - 1, xmax + 1
    if ymax <= ymin:
        ymax = ymin + 1.0
    ymax += 0.05 * (ymax - ymin)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
            y1 - (y - ymin) / (ymax - ymin) * (y1 - y0),
        )

    grid, axis = (225, 225, 225), (40, 40, 40)
    for t in _nice_ticks(ymin, ymax):
        _, py = to_px(xmin, t)
        draw.line([(x0, py), (x1, py)], fill=grid)
        draw.line([(x0 - 5, py), (x0, py)], fill=axis)
        _text(draw, (x0 - 8, py), _label(t), fill=axis, font=font, anchor="rm")
    for t in _nice_ticks(xmin, xmax):
        px, _ = to_px(t, ymin)
        draw.line([(px, y0), (px, y1)], fill=grid)
        draw.line([(px, y1), (px, y1 + 5)], fill=axis)
        _text(draw, (px, y1 + 8), _label(t), fill=axis, font=font, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline=axis)
    _text(draw, ((x0 + x1) / 2, height - 12), "iteration", fill=axis, font=font, anchor="mb")

    legend_y = y0 + 4
    for i, (name, pts) in enumerate(series.items()):
        color = (0, 0, 0) if name == "loss" else _COLORS[(i - ("loss" in series)) % len(_COLORS)]
        line_width = 3 if name == "loss" else 2
        xy = [to_px(x, y) for x, y in pts]
        if len(xy) == 1:
            cx, cy = xy[0]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        else:
            draw.line(xy, fill=color, width=line_width, joint="curve")
        draw.line([(x1 + 14, legend_y + 7), (x1 + 40, legend_y + 7)], fill=color, width=line_width)
        _text(draw, (x1 + 48, legend_y + 7), name, fill=axis, font=font, anchor="lm")
        legend_y += 20
    if not series:
        _text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), "no losses logged yet", fill=axis, font=font, anchor="mm")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as fh:
        image.save(fh, format="PNG")
    return path
