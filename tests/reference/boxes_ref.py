"""Naive, loop-based reference implementations of box ops (Python floats), for tests only."""

from __future__ import annotations

import math


def iou_ref(boxes1: list[list[float]], boxes2: list[list[float]]) -> list[list[float]]:
    """Pairwise IoU by a double loop; 0 where the union is 0."""
    out = []
    for a in boxes1:
        row = []
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        for b in boxes2:
            area_b = (b[2] - b[0]) * (b[3] - b[1])
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = area_a + area_b - inter
            row.append(inter / union if union > 0 else 0.0)
        out.append(row)
    return out


def encode_ref(target: list[float], proposal: list[float], weights: tuple[float, ...]) -> list[float]:
    """(dx, dy, dw, dh) of one target box relative to one proposal box."""
    wx, wy, ww, wh = weights
    pw, ph = proposal[2] - proposal[0], proposal[3] - proposal[1]
    pcx, pcy = proposal[0] + 0.5 * pw, proposal[1] + 0.5 * ph
    tw, th = target[2] - target[0], target[3] - target[1]
    tcx, tcy = target[0] + 0.5 * tw, target[1] + 0.5 * th
    return [wx * (tcx - pcx) / pw, wy * (tcy - pcy) / ph, ww * math.log(tw / pw), wh * math.log(th / ph)]


def decode_ref(delta: list[float], box: list[float], weights: tuple[float, ...], clip: float) -> list[float]:
    """One box from one (dx, dy, dw, dh), with dw/dh clamped at ``clip`` after dividing by weights."""
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + 0.5 * w, box[1] + 0.5 * h
    dx, dy = delta[0] / wx, delta[1] / wy
    dw, dh = min(delta[2] / ww, clip), min(delta[3] / wh, clip)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    return [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
