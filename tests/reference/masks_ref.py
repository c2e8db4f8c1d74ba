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


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    """RoIAlign's bilinear sample of a 2-D array (zero far outside, edge-clamped just outside)."""
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y = max(y, 0.0)
    x = max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return hy * hx * img[y0, x0] + hy * lx * img[y0, x1] + ly * hx * img[y1, x0] + ly * lx * img[y1, x1]


def roi_align_single_ref(img: np.ndarray, box, size: int, sampling_ratio: int, aligned: bool) -> np.ndarray:
    """RoIAlign (torchvision semantics, spatial_scale 1) of one 2-D map in one box -> ``[size, size]``."""
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, y1, x2, y2 = x1 - off, y1 - off, x2 - off, y2 - off
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / size)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / size)
    count = max(gh * gw, 1)
    out = np.zeros((size, size))
    for py in range(size):
        for px in range(size):
            acc = 0.0
            for iy in range(gh):
                y = y1 + py * bin_h + (iy + 0.5) * bin_h / gh
                for ix in range(gw):
                    x = x1 + px * bin_w + (ix + 0.5) * bin_w / gw
                    acc += _bilinear(img, y, x)
            out[py, px] = acc / count
    return out


def crop_and_resize_bitmasks_ref(masks, boxes, indices, size, *, aligned, sampling_ratio, threshold):
    """Per-RoI loop over :func:`roi_align_single_ref` on ``masks[indices[i]]`` -> ``[N, size, size]``."""
    res = []
    for box, idx in zip(boxes.tolist(), indices.tolist(), strict=True):
        img = masks[idx].double().numpy()
        t = roi_align_single_ref(img, box, size, sampling_ratio, aligned)
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
