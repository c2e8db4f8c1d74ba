"""The loss curve of a run as a PNG, drawn with matplotlib (its Agg renderer: no display needed).

``plot_loss_curve(read_metrics("runs/x/metrics.jsonl"), "runs/x/loss_curve.png")`` draws the total loss
(``loss``, black) and each named loss (``loss_*``) against the iteration: the logged values as thin faint
lines and, over them, the same values smoothed (``smoothing``, TensorBoard's debiased exponential moving
average). ``log_scale=True`` draws the losses on a log axis (non-positive values are left out there).
Non-finite values are left out of the lines.
"""

from __future__ import annotations

import io
import json
import math
import os

from maskrcnn.atomic import atomic_write

__all__ = ["plot_loss_curve", "read_metrics", "smooth"]

_DPI = 100


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


def smooth(values: list[float], weight: float) -> list[float]:
    """The exponential moving average of ``values`` with ``weight`` in [0, 1) (0: the values themselves),
    debiased as TensorBoard's: the first points are not pulled towards 0."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def plot_loss_curve(
    records: list[dict],
    path: str | os.PathLike,
    *,
    title: str = "training loss",
    size: tuple[int, int] = (960, 540),
    smoothing: float = 0.6,
    log_scale: bool = False,
) -> str:
    """Draw ``loss`` and every ``loss_*`` of ``records`` (dicts with an ``iteration``) into a ``size``
    (width, height) RGB PNG at ``path``, written atomically (a failure leaves an older file as it was).
    Records without losses (evaluation records) are ignored. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    path = os.fspath(path)
    rows = [r for r in records if "iteration" in r and any(k.startswith("loss") for k in r)]
    names = sorted({k for r in rows for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    series = {}
    for name in names:
        points = [
            (float(r["iteration"]), float(r[name]))
            for r in rows
            if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])
        ]
        if log_scale:
            points = [p for p in points if p[1] > 0]
        if points:
            series[name] = points

    width, height = size
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = iter(f"C{i % 10}" for i in range(len(series)))
    for name, points in series.items():
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        color = "black" if name == "loss" else next(colors)
        line_width = 2.5 if name == "loss" else 1.5
        if smoothing > 0 and len(points) > 1:
            ax.plot(xs, ys, color=color, linewidth=1, alpha=0.25)
            ys = smooth(ys, smoothing)
        ax.plot(xs, ys, color=color, linewidth=line_width, label=name, marker="o" if len(xs) == 1 else None)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    else:
        ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    ax.set_title(title + (f" (smoothed {smoothing:g}; faint: logged values)" if smoothing > 0 else ""))
    ax.grid(True, which="major", color="0.9")
    ax.set_axisbelow(True)
    fig.subplots_adjust(left=72 / width, right=1 - 170 / width, top=1 - 40 / height, bottom=56 / height)

    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    data = io.BytesIO()
    image.save(data, format="PNG")  # rendered and encoded before the file is touched
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fh.write(data.getvalue())
    return path
