"""Naive greedy NMS written straight from the definition (Python loops, numpy scalars), for tests only."""

from __future__ import annotations

import numpy as np


def iou_ref(a, b, dtype=np.float32):
    """IoU of boxes ``a`` and ``b`` ``(x1, y1, x2, y2)``, every step rounded to ``dtype`` like torchvision's
    kernel: ``inter / (area_a + area_b - inter)``. NaN when both boxes are empty (0 / 0)."""
    f = np.dtype(dtype).type
    ax1, ay1, ax2, ay2 = (f(v) for v in a)
    bx1, by1, bx2, by2 = (f(v) for v in b)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = max(f(0), min(ax2, bx2) - max(ax1, bx1))
    h = max(f(0), min(ay2, by2) - max(ay1, by1))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return (inter / (area_a + area_b - inter)).item()


def nms_ref(boxes, scores, iou_threshold: float, dtype=np.float32) -> list[int]:
    """Indices kept by greedy NMS: visit boxes by decreasing score (ties: lower index first); keep a box
    unless a kept box has IoU strictly greater than ``iou_threshold`` with it (compared as Python floats)."""
    n = len(boxes)
    order = sorted(range(n), key=lambda i: -scores[i])  # sorted() is stable: ties keep index order
    suppressed = [False] * n
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            if not suppressed[j] and iou_ref(boxes[i], boxes[j], dtype) > iou_threshold:
                suppressed[j] = True
    return keep


def batched_nms_ref(boxes, scores, idxs, iou_threshold: float, dtype=np.float32) -> list[int]:
    """:func:`nms_ref` run separately on the boxes of each category ``idxs``; all kept indices by
    decreasing score (ties: lower index first)."""
    keep = []
    for c in sorted(set(idxs)):
        members = [i for i in range(len(boxes)) if idxs[i] == c]
        kept = nms_ref([boxes[i] for i in members], [scores[i] for i in members], iou_threshold, dtype)
        keep.extend(members[k] for k in kept)
    return sorted(keep, key=lambda i: (-scores[i], i))
