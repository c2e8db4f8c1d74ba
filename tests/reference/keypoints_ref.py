"""Naive, loop-based references for ``maskrcnn.ops.keypoints`` and ``keypoint_loss`` (tests only).

One RoI and one keypoint at a time, from the textual definitions. The target encoding rounds its scale
and product in the input's precision (numpy scalars of the input dtype), as torchvision's tensors do, so
that cells agree exactly even at cell borders; everything else is float64 Python arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def keypoints_to_heatmap_targets_ref(keypoints: torch.Tensor, rois: torch.Tensor, heatmap_size: int = 56):
    """``(indices int64 [R, K], valid bool [R, K])``: cell ``y * S + x`` with
    ``x = floor((px - x1) * (S / w))`` (scale evaluated as ``(1 / w) * S``), ``S - 1`` on the right edge
    ``px == x2`` (likewise y); valid when ``v > 0`` and both cells lie in ``[0, S)``."""
    s = heatmap_size
    real = np.float64 if torch.float64 in (keypoints.dtype, rois.dtype) else np.float32
    r, k = keypoints.shape[:2]
    indices = torch.zeros((r, k), dtype=torch.int64)
    valid = torch.zeros((r, k), dtype=torch.bool)
    for i in range(r):
        x1, y1, x2, y2 = (real(c) for c in rois[i].tolist())
        for j in range(k):
            px, py, v = (real(c) for c in keypoints[i, j].tolist())
            cx, cy = _cell(px, x1, x2, s), _cell(py, y1, y2, s)
            if v > 0 and 0 <= cx < s and 0 <= cy < s:
                indices[i, j] = cy * s + cx
                valid[i, j] = True
    return indices, valid


def _cell(p, lo, hi, s: int) -> int:
    """Cell of coordinate ``p`` in ``[lo, hi]`` split into ``s``; -1 (outside) when not finite."""
    if p == hi:
        return s - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = (p - lo) * ((type(p)(1) / (hi - lo)) * type(p)(s))
    return math.floor(t) if np.isfinite(t) else -1


def heatmaps_to_keypoints_ref(logits: torch.Tensor, boxes: torch.Tensor):
    """``(keypoints [N, K, 3], scores [N, K])`` in float64, one detection and one keypoint at a time.

    Each detection's maps are resized bicubically (``align_corners=False``, in ``logits``' dtype) to
    ``(ceil(h), ceil(w))``, ``w = max(x2 - x1, 1)``; for each keypoint the first maximal cell
    ``(iy, ix)`` gives ``x = (ix + 0.5) * w / ceil(w) + x1`` and the score is the resized logit there.
    """
    n, k = logits.shape[:2]
    keypoints = torch.zeros((n, k, 3), dtype=torch.float64)
    scores = torch.zeros((n, k), dtype=torch.float64)
    for i in range(n):
        x1, y1, x2, y2 = boxes[i].double().tolist()
        w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        big_w, big_h = math.ceil(w), math.ceil(h)
        up = F.interpolate(logits[i][:, None], size=(big_h, big_w), mode="bicubic", align_corners=False)
        for j in range(k):
            flat = up[j, 0].reshape(-1)
            best = int((flat == flat.max()).nonzero()[0, 0])  # the first maximum
            iy, ix = divmod(best, big_w)
            x = (ix + 0.5) * w / big_w + x1
            y = (iy + 0.5) * h / big_h + y1
            keypoints[i, j] = torch.tensor([x, y, 1.0], dtype=torch.float64)
            scores[i, j] = float(up[j, 0, iy, ix])
    return keypoints, scores


def keypoint_loss_ref(logits: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean over valid keypoints of ``-log softmax(logits[r, k].flatten())[indices[r, k]]``, in float64
    (``math.fsum`` sums); ``0.0`` when none is valid."""
    total, count = [], 0
    r, k = logits.shape[:2]
    for i in range(r):
        for j in range(k):
            if not bool(valid[i, j]):
                continue
            z = logits[i, j].double().reshape(-1).tolist()
            m = max(z)
            log_sum_exp = m + math.log(math.fsum(math.exp(v - m) for v in z))
            total.append(log_sum_exp - z[int(indices[i, j])])
            count += 1
    return math.fsum(total) / count if count else 0.0
