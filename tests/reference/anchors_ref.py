"""Naive, loop-based reference for anchor generation, for tests only.

Cell anchors are computed with numpy float32 scalars (float32 arithmetic decides how values
close to k + 0.5 round), then rounded half to even by Python's ``round``.
"""

from __future__ import annotations

import numpy as np


def cell_anchors_ref(sizes, ratios) -> list[list[float]]:
    """Zero-centred anchors, ratio-major: [-w/2, -h/2, w/2, h/2] rounded, h = s*sqrt(r), w = s/sqrt(r)."""
    out = []
    for r in ratios:
        h_factor = np.sqrt(np.float32(r))
        w_factor = np.float32(1.0) / h_factor
        for s in sizes:
            w = np.float32(s) * w_factor
            h = np.float32(s) * h_factor
            out.append([float(round(float(v / np.float32(2)))) for v in (-w, -h, w, h)])
    return out


def grid_anchors_ref(sizes, ratios, feature_size, stride) -> list[list[float]]:
    """All anchors of one level: row-major over (y, x), the cell anchors consecutive per location."""
    fh, fw = feature_size
    sh, sw = stride
    cells = cell_anchors_ref(sizes, ratios)
    out = []
    for y in range(fh):
        for x in range(fw):
            for c in cells:
                out.append([c[0] + x * sw, c[1] + y * sh, c[2] + x * sw, c[3] + y * sh])
    return out
