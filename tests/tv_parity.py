"""Shared by the torchvision-parity test and tests/data/make_tv_reference.py, which makes its reference.

``parity_weights(seed)`` draws a full ``tv-R-50-FPN`` state dict from a seed with a simple scheme that
needs no torchvision (He-normal convs and linears, random BatchNorm statistics, a sharpened classifier so
that detections are confident and well separated), ``to_torchvision`` renames it to torchvision's layout,
and ``mask_probe`` picks the pixels of the pasted masks that the reference stores (full masks are ~100 MB).
"""

from __future__ import annotations

import math
import re

import torch

IMAGES = ("000000000139.jpg", "000000000802.jpg")  # from ../shared/data/coco-mini/val2017
KEYPOINT_IMAGES = ("000000217285.jpg", "000000350679.jpg")  # coco-mini val images with several people
PARITY_PRESETS = {"mask": "tv-R-50-FPN", "keypoint": "tv-keypoint-R-50-FPN"}
SEED = 0
PROBES_PER_MASK = 400
CLS_SCALE = 0.5


def parity_weights(seed: int = SEED, *, preset: str = "tv-R-50-FPN") -> dict[str, torch.Tensor]:
    """Seeded weights in this package's layout of ``preset`` (``tv-R-50-FPN``: 91 classes;
    ``tv-keypoint-R-50-FPN``: background + person, 17 keypoints), float32.

    Drawn in float64 and rounded: float32 ``torch.randn`` depends on the CPU (ATen's AVX2 kernel uses
    approximate log/sin/cos, its AVX-512 and scalar builds libm's), float64 draws use libm everywhere."""
    from maskrcnn.modeling.build import build_model

    shapes = {k: v.shape for k, v in build_model(preset).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("running_mean"):
            t = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        elif key.endswith("running_var"):
            t = 1.0 + torch.rand(shape, generator=g, dtype=torch.float64) * 0.5
        elif ".bn" in key or "downsample.1" in key:  # FrozenBatchNorm weight / bias
            base = 1.0 if key.endswith("weight") else 0.0
            t = base + torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
        elif key.endswith("bias"):
            t = torch.randn(shape, generator=g, dtype=torch.float64) * 0.01
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g, dtype=torch.float64) * math.sqrt(2.0 / fan_in)
            if re.search(r"layer\d\.\d+\.conv3", key):
                t = t * 0.5  # the last conv of each residual branch: keep the stream from growing unbounded
        if key.endswith("cls_score.weight"):
            t = t * CLS_SCALE  # class scores spread enough to order detections robustly
        out[key] = t.float()
    return out


def to_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This package's names -> torchvision's ``maskrcnn_resnet50_fpn`` names."""
    from maskrcnn.weights import maskrcnn_to_torchvision

    return maskrcnn_to_torchvision(state_dict)


def mask_probe(boxes: torch.Tensor, size: tuple[int, int], seed: int = SEED) -> torch.Tensor:
    """``[N, P]`` flat pixel indices per detection: P/2 uniform in the (expanded) box, P/2 anywhere."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    n, p = boxes.shape[0], PROBES_PER_MASK
    u = torch.rand(n, p // 2, 2, generator=g)
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    bw, bh = (x2 - x1) * 1.2 + 2, (y2 - y1) * 1.2 + 2
    xs = ((x1 + x2) / 2 - bw / 2 + u[..., 0] * bw).floor().clamp(0, w - 1)
    ys = ((y1 + y2) / 2 - bh / 2 + u[..., 1] * bh).floor().clamp(0, h - 1)
    anywhere = torch.randint(0, h * w, (n, p - p // 2), generator=g)
    return torch.cat([(ys * w + xs).long(), anywhere], dim=1)


def read_image(path) -> torch.Tensor:
    """RGB float ``[3, H, W]`` in [0, 1], as torchvision's reference script reads it."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().float().div(255)
