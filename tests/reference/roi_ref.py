"""Naive loop RoIAlign / RoIPool written from their definitions (float64 numpy, one sample at a time).

Used only by the tests, as an independent reference: no vectorisation, no sparse tricks.
"""

from __future__ import annotations

import math

import numpy as np


def _bilinear(feat: np.ndarray, y: float, x: float) -> np.ndarray:
    """Value of ``feat[C, H, W]`` at continuous ``(y, x)``: 0 more than one cell outside, border-clamped."""
    _, h, w = feat.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[0])
    y = max(y, 0.0)
    x = max(x, 0.0)
    y0 = int(math.floor(y))
    x0 = int(math.floor(x))
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
    return (
        (1 - ly) * (1 - lx) * feat[:, y0, x0]
        + (1 - ly) * lx * feat[:, y0, x1]
        + ly * (1 - lx) * feat[:, y1, x0]
        + ly * lx * feat[:, y1, x1]
    )


def roi_align_ref(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode="avg"):
    """input ``[N, C, H, W]``, rois ``[K, 5]`` -> ``[K, C, oh, ow]`` (numpy float64)."""
    input = np.asarray(input, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    oh, ow = output_size
    k = rois.shape[0]
    out = np.zeros((k, input.shape[1], oh, ow))
    offset = 0.5 if aligned else 0.0
    for r in range(k):
        feat = input[int(rois[r, 0])]
        x1, y1, x2, y2 = rois[r, 1:] * spatial_scale - offset
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / oh), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / ow), 0)
        bh, bw = rh / oh, rw / ow
        for ph in range(oh):
            for pw in range(ow):
                samples = [
                    _bilinear(feat, y1 + ph * bh + (iy + 0.5) * bh / gh, x1 + pw * bw + (ix + 0.5) * bw / gw)
                    for iy in range(gh)
                    for ix in range(gw)
                ]
                if not samples:
                    continue
                if mode == "avg":
                    out[r, :, ph, pw] = np.sum(samples, axis=0) / max(gh * gw, 1)
                else:
                    out[r, :, ph, pw] = np.max(samples, axis=0)
    return out


def _pool_bins(rois, output_size, height, width):
    """Fast R-CNN's bins, one at a time: ``(r, image, ph, pw, hs, he, ws, we)`` for RoI ``r``'s bin
    ``(ph, pw)``, the cells ``[hs, he) x [ws, we)`` (rounded RoI, end inclusive, clipped to the map)."""
    oh, ow = output_size

    def c_round(v):
        return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)

    for r in range(rois.shape[0]):
        x1, y1, x2, y2 = (c_round(v) for v in rois[r, 1:])
        rh, rw = max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)
        for ph in range(oh):
            for pw in range(ow):
                hs = min(max(math.floor(ph * rh / oh) + y1, 0), height)
                he = min(max(math.ceil((ph + 1) * rh / oh) + y1, 0), height)
                ws = min(max(math.floor(pw * rw / ow) + x1, 0), width)
                we = min(max(math.ceil((pw + 1) * rw / ow) + x1, 0), width)
                yield r, int(rois[r, 0]), ph, pw, hs, he, ws, we


def roi_pool_ref(input, rois, output_size, spatial_scale):
    """Fast R-CNN RoIPool: rounded RoI (end inclusive), integer bins, max; empty bins are 0."""
    input = np.asarray(input, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    _, c, h, w = input.shape
    out = np.zeros((rois.shape[0], c, *output_size))
    scaled = np.concatenate([rois[:, :1], rois[:, 1:] * spatial_scale], axis=1)
    for r, n, ph, pw, hs, he, ws, we in _pool_bins(scaled, output_size, h, w):
        if he > hs and we > ws:
            out[r, :, ph, pw] = input[n, :, hs:he, ws:we].reshape(c, -1).max(axis=1)
    return out


def roi_pool_grad_ref(input, rois, output_size, spatial_scale, grad_out):
    """The gradient of :func:`roi_pool_ref`'s output against ``grad_out [K, C, oh, ow]``: each bin's
    gradient goes to the first cell (row-major) of the bin holding its maximum; empty bins give none."""
    input = np.asarray(input, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    _, c, h, w = input.shape
    grad = np.zeros_like(input)
    scaled = np.concatenate([rois[:, :1], rois[:, 1:] * spatial_scale], axis=1)
    for r, n, ph, pw, hs, he, ws, we in _pool_bins(scaled, output_size, h, w):
        for ch in range(c):
            best = None
            for y in range(hs, he):
                for x in range(ws, we):
                    if best is None or input[n, ch, y, x] > input[n, ch, best[0], best[1]]:
                        best = (y, x)
            if best is not None:
                grad[n, ch, best[0], best[1]] += grad_out[r, ch, ph, pw]
    return grad
