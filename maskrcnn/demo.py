"""``maskrcnn demo``: the README's main job.

Until the training pipeline lands, the demo runs a smoke path of the operators: RoIAlign on a small
feature map against values computed by hand, and prints what it checked.
"""

from __future__ import annotations

import torch

from maskrcnn.ops import roi_align


def run_demo() -> int:
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)  # value 4y + x at cell (y, x)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    out = roi_align(x, rois, (2, 2), 1.0, 2, aligned=False)[0, 0]
    expected = torch.tensor([[2.5, 3.5], [6.5, 7.5]], dtype=torch.float64)
    ok = torch.allclose(out, expected)
    print(
        f"RoIAlign smoke check on a 4x4 arange map: {out.tolist()} (expected {expected.tolist()}): "
        f"{'ok' if ok else 'FAILED'}"
    )
    print(
        "The full demo (synthetic data, training, evaluation, predictions) comes with the training pipeline."
    )
    return 0 if ok else 1
