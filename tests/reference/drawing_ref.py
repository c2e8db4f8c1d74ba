"""Naive mask blending: every pixel of every mask, over the whole image, the last mask first."""

from __future__ import annotations

import numpy as np


def blend_masks_naive(pixels: np.ndarray, binary: np.ndarray, colors, alpha: float) -> np.ndarray:
    """``pixels [H, W, 3]`` uint8, ``binary [N, H, W]`` bool -> uint8 ``[H, W, 3]``: for ``i = N-1 .. 0``,
    each pixel inside mask ``i`` becomes ``pixel * (1 - alpha) + colors[i] * alpha`` (float32); rounded."""
    out = pixels.astype(np.float32)
    for i in reversed(range(len(binary))):
        for y, x in zip(*np.nonzero(binary[i]), strict=True):
            out[y, x] = out[y, x] * (1.0 - alpha) + np.asarray(colors[i], np.float32) * alpha
    return out.round().clip(0, 255).astype(np.uint8)
