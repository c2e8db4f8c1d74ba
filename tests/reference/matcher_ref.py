"""Naive, loop-based reference of the IoU matcher (Python floats), for tests only."""

from __future__ import annotations


def match_ref(
    iou: list[list[float]], num_pred: int, high: float, low: float, allow_low_quality: bool
) -> list[int]:
    """``iou[g][p]`` -> per prediction: best gt (first on ties), -1 below ``low``, -2 in between;
    with ``allow_low_quality``, every prediction attaining some gt's maximum IoU keeps its best gt."""
    if len(iou) == 0:
        return [-1] * num_pred
    best_gt, best_val = [], []
    for p in range(num_pred):
        g_best = 0
        for g in range(1, len(iou)):
            if iou[g][p] > iou[g_best][p]:
                g_best = g
        best_gt.append(g_best)
        best_val.append(iou[g_best][p])
    out = []
    for p in range(num_pred):
        if best_val[p] < low:
            out.append(-1)
        elif best_val[p] < high:
            out.append(-2)
        else:
            out.append(best_gt[p])
    if allow_low_quality:
        for row in iou:
            top = max(row)
            for p in range(num_pred):
                if row[p] == top:
                    out[p] = best_gt[p]
    return out
