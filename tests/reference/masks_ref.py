"""Naive, loop-based references for ``maskrcnn.ops.masks`` (tests only; slow by design).

Each function re-implements the procedure from its textual definition, one detection / one
sample at a time, so that the vectorised code can be checked against something obviously right.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

from tests.reference.roi_ref import roi_align_ref


def paste_masks_ref(masks: torch.Tensor, boxes: torch.Tensor, image_size, padding: int = 1) -> torch.Tensor:
    """Legacy Mask R-CNN pasting, one detection at a time -> ``[N, 1, h, w]``.

    1. pad the ``M x M`` mask with ``padding`` zeros on every side;
    2. grow the box around its centre by ``(M + 2 padding) / M`` and truncate to int64;
    3. bilinearly resize the padded mask (``align_corners=False``) to ``(y2 - y1 + 1, x2 - x1 + 1)``
       (each at least 1);
    4. write the resized mask at ``(x1, y1)`` into a zero image, clipped to the image borders.
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    im_h, im_w = image_size
    m = masks.shape[-1]
    scale = float(m + 2 * padding) / m
    out = masks.new_zeros((masks.shape[0], 1, im_h, im_w))
    for i in range(masks.shape[0]):
        padded = F.pad(masks[i : i + 1], (padding,) * 4)
        bx = boxes[i]
        # same float operations (and order) as the legacy code, so truncation agrees exactly
        half_w = ((bx[2] - bx[0]) * 0.5) * scale
        half_h = ((bx[3] - bx[1]) * 0.5) * scale
        cx = (bx[2] + bx[0]) * 0.5
        cy = (bx[3] + bx[1]) * 0.5
        x1, y1, x2, y2 = (
            int(v) for v in torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h]).long()
        )
        w = max(x2 - x1 + 1, 1)
        h = max(y2 - y1 + 1, 1)
        resized = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        ya, yb = max(y1, 0), min(y2 + 1, im_h)
        xa, xb = max(x1, 0), min(x2 + 1, im_w)
        if yb > ya and xb > xa:
            out[i, 0, ya:yb, xa:xb] = resized[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return out


def crop_and_resize_bitmasks_ref(masks, boxes, indices, size, *, aligned, sampling_ratio, threshold):
    """Per-RoI loop of the naive RoIAlign (tests/reference/roi_ref.py) on ``masks[indices[i]]``
    -> ``[N, size, size]``."""
    res = []
    for box, idx in zip(boxes.tolist(), indices.tolist(), strict=True):
        img = masks[idx].double().numpy()[None, None]  # one image, one channel
        roi = np.array([[0.0, *box]])
        t = roi_align_ref(img, roi, (size, size), 1.0, sampling_ratio, aligned)[0, 0]
        if threshold is not None:
            t = (t >= threshold).astype(np.float64)
        res.append(t)
    return torch.tensor(np.array(res).reshape(-1, size, size))


def rasterize_ref(polygons, h: int, w: int) -> np.ndarray:
    """Full-image pycocotools rasterisation of one instance's polygon parts -> ``bool [h, w]``."""
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], h, w)
    with warnings.catch_warnings():  # pycocotools + NumPy 2: harmless copy=False DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)


def softmax_mask_loss_ref(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> float:
    """The multinomial mask loss of the paper's Table 2b, pixel by pixel: each pixel of RoI ``r`` belongs to
    class ``labels[r]`` where ``targets[r] >= 0.5`` and to the background (class 0) elsewhere; the loss is
    the cross-entropy of the softmax over all classes, averaged over every pixel of every RoI."""
    total, count = 0.0, 0
    for r in range(logits.shape[0]):
        for y in range(logits.shape[2]):
            for x in range(logits.shape[3]):
                z = [float(v) for v in logits[r, :, y, x]]
                cls = int(labels[r]) if float(targets[r, y, x]) >= 0.5 else 0
                top = max(z)
                log_sum = top + math.log(sum(math.exp(v - top) for v in z))
                total += log_sum - z[cls]
                count += 1
    return total / count
