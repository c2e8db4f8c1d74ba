"""Keypoint operations of Keypoint R-CNN, as torchvision computes them.

Conventions: boxes and RoIs are ``xyxy`` float in absolute pixels; keypoints are ``[..., K, 3]`` rows
``(x, y, v)`` in the same pixels, ``v > 0`` meaning labelled (COCO: 1 occluded, 2 visible). A heatmap is
``S x S`` (56) over its RoI; cell ``(i, j)`` covers ``[x1 + j w/S, x1 + (j + 1) w/S)`` horizontally
(likewise vertically) and its flat index is ``i * S + j``. Decoding maps a cell back to its centre
(Heckbert's ``c = d + 0.5``).

* :func:`keypoints_to_heatmap_targets` -- training: the flat target cell of each keypoint in its RoI
  (torchvision's ``keypoints_to_heatmap``); the loss is :func:`maskrcnn.modeling.losses.keypoint_loss`.
* :func:`heatmaps_to_keypoints` -- inference: logits to image keypoints and scores (torchvision's
  ``heatmaps_to_keypoints``).
* :func:`keypoint_flip_map` -- the left/right permutation for horizontal flips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["heatmaps_to_keypoints", "keypoint_flip_map", "keypoints_to_heatmap_targets"]

# Most elements one bicubic upsampling call may produce (256 MiB of float32): bounds the memory of
# decoding many detections of the same size at once.
_MAX_UPSAMPLED_ELEMENTS = 1 << 26


def keypoints_to_heatmap_targets(
    keypoints: Tensor, rois: Tensor, *, heatmap_size: int = 56
) -> tuple[Tensor, Tensor]:
    """The target cell of each keypoint in its RoI's ``S x S`` heatmap (``S = heatmap_size``).

    Args:
        keypoints: ``[R, K, 3]`` ``(x, y, v)`` ground-truth keypoints matched to each RoI.
        rois: ``[R, 4]`` xyxy RoIs.

    Returns:
        ``(indices, valid)``: ``int64 [R, K]`` flat cells ``y * S + x`` (0 where invalid) and
        ``bool [R, K]``. With ``w = x2 - x1``: ``x = floor((px - x1) * (S / w))``, the scale rounded as
        torchvision's ``S / w`` (``(1 / w) * S``); a point exactly on the right edge (``px == x2``) is
        put in column ``S - 1`` (likewise the bottom edge, row ``S - 1``), so the RoI is closed on the
        right and bottom. A keypoint is valid when ``v > 0`` and both cells fall in ``[0, S)``.
    """
    s = heatmap_size
    x1, y1, x2, y2 = (c[:, None] for c in rois.unbind(1))
    px, py, v = keypoints.unbind(-1)
    # Floors stay in floating point: they equal torchvision's ``.floor().long()`` wherever that is
    # defined, and NaN / infinite values (degenerate RoIs) fail the range test instead of overflowing.
    x = ((px - x1) * ((x2 - x1).reciprocal() * s)).floor()
    y = ((py - y1) * ((y2 - y1).reciprocal() * s)).floor()
    x = torch.where(px == x2, torch.full_like(x, s - 1), x)
    y = torch.where(py == y2, torch.full_like(y, s - 1), y)
    valid = (x >= 0) & (y >= 0) & (x < s) & (y < s) & (v > 0)
    indices = torch.where(valid, y * s + x, torch.zeros_like(x)).long()
    return indices, valid


def heatmaps_to_keypoints(logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Image keypoints of detections from their heatmap logits.

    Each detection's maps are upsampled bicubically (``align_corners=False``) to its box,
    ``(ceil(h), ceil(w))`` cells with ``w = max(x2 - x1, 1)`` (likewise ``h``); the argmax cell
    ``(iy, ix)`` (first one on ties) gives ``x = (ix + 0.5) * (w / ceil(w)) + x1`` (likewise ``y``), and
    its upsampled logit is the score.

    Args:
        logits: ``[N, K, S, S]`` keypoint logits.
        boxes: ``[N, 4]`` xyxy detection boxes.

    Returns:
        ``(keypoints, scores)``: ``[N, K, 3]`` rows ``(x, y, 1)`` and ``[N, K]``, float32 (float64 when
        ``logits`` or ``boxes`` is float64). Equal to torchvision's bit for bit in float32: detections
        of the same upsampled size share one ``interpolate`` call, which computes each map exactly as
        a call per detection would.
    """
    n, k, s_h, s_w = logits.shape
    dtype = torch.float64 if torch.float64 in (logits.dtype, boxes.dtype) else torch.float32
    boxes = boxes.to(dtype)
    maps = logits.to(dtype)
    if n == 0:
        return maps.new_zeros((0, k, 3)), maps.new_zeros((0, k))
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    if boxes.is_cuda:
        # torchvision divides by a Python int, which CUDA evaluates as a product with its reciprocal
        corr_x, corr_y = widths * widths_ceil.reciprocal(), heights * heights_ceil.reciprocal()
    else:
        corr_x, corr_y = widths / widths_ceil, heights / heights_ceil

    sizes, group, counts = torch.unique(
        torch.stack([heights_ceil, widths_ceil], 1).long(), dim=0, return_inverse=True, return_counts=True
    )
    members = torch.argsort(group, stable=True).split(counts.tolist())
    pos = torch.zeros((n, k), dtype=torch.int64, device=maps.device)
    widths_int = torch.zeros(n, dtype=torch.int64, device=maps.device)
    scores = maps.new_zeros((n, k))
    for (h, w), idx in zip(sizes.tolist(), members, strict=True):
        chunk = max(1, _MAX_UPSAMPLED_ELEMENTS // (k * h * w))
        for sub in idx.split(chunk):
            up = F.interpolate(
                maps[sub].reshape(-1, 1, s_h, s_w), size=(h, w), mode="bicubic", align_corners=False
            ).reshape(len(sub), k, h * w)
            best = up.argmax(dim=2)
            pos[sub] = best
            scores[sub] = up.gather(2, best[:, :, None])[:, :, 0]
            widths_int[sub] = w
    x_int = pos % widths_int[:, None]
    y_int = torch.div(pos - x_int, widths_int[:, None], rounding_mode="floor")
    x = (x_int.to(dtype) + 0.5) * corr_x[:, None] + boxes[:, 0:1]
    y = (y_int.to(dtype) + 0.5) * corr_y[:, None] + boxes[:, 1:2]
    return torch.stack([x, y, torch.ones_like(x)], dim=2), scores


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """The keypoint permutation of a horizontal flip: ``left_*`` <-> ``right_*`` (COCO's names).

    ``flipped[..., j, :] = keypoints[..., perm[j], :]`` (after mirroring x); names without a ``left_`` /
    ``right_`` prefix map to themselves. The permutation is its own inverse. Raises ``ValueError`` for a
    duplicate name or a ``left_`` / ``right_`` name without its partner.
    """
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        raise ValueError(f"duplicate keypoint names in {list(names)}")
    perm = []
    for name in names:
        if name.startswith("left_"):
            partner = "right_" + name[len("left_") :]
        elif name.startswith("right_"):
            partner = "left_" + name[len("right_") :]
        else:
            partner = name
        if partner not in index:
            raise ValueError(f"keypoint {name!r} has no {partner!r} to swap with under a horizontal flip")
        perm.append(index[partner])
    return perm
