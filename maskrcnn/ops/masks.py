"""Mask operations: pasting predicted masks into the image, and building mask-head targets.

Conventions: boxes are ``xyxy`` float in absolute pixels; image sizes are ``(h, w)``; pixel ``(i, j)``
covers the continuous square ``[j, j + 1) x [i, i + 1)`` (its centre is ``(j + 0.5, i + 0.5)``).

* :func:`paste_masks_in_image` -- inference: put ``M x M`` mask probabilities back into the image
  with exactly torchvision's legacy ``paste_masks_in_image`` semantics (vectorised, no loop per box).
* :func:`crop_and_resize_bitmasks` -- training: RoIAlign the ground-truth bitmaps inside the positive
  RoIs (torchvision and detectron2 conventions, see :data:`TORCHVISION_MASK_TARGETS` and
  :data:`DETECTRON2_MASK_TARGETS`).
* :func:`crop_and_resize_polygons` -- training: rasterise polygon annotations directly inside the RoIs
  (detectron2's way, sharper than resampling a bitmap).
* :func:`polygons_to_bitmask` -- full-image rasterisation of polygons with pycocotools.
* :func:`expand_boxes_to_int`, :func:`paste_resize_taps` -- the pasting's two building blocks, shared
  with the ONNX exporter's graph (``maskrcnn.export``) so both paste with the same arithmetic.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from maskrcnn.ops import device as _device
from maskrcnn.ops.roi_align import roi_align, roi_align_levels

__all__ = [
    "DETECTRON2_MASK_TARGETS",
    "TORCHVISION_MASK_TARGETS",
    "crop_and_resize_bitmasks",
    "crop_and_resize_bitmasks_batch",
    "crop_and_resize_polygons",
    "expand_boxes_to_int",
    "paste_masks_in_image",
    "paste_resize_taps",
    "polygons_to_bitmask",
]

# Keyword sets for crop_and_resize_bitmasks reproducing each library's mask targets.
#: torchvision ``project_masks_on_boxes``: ``roi_align(gt[:, None], rois, (M, M), 1.0)`` -> soft targets.
TORCHVISION_MASK_TARGETS = MappingProxyType({"aligned": False, "sampling_ratio": -1, "threshold": None})
#: detectron2 ``BitMasks.crop_and_resize``: ``ROIAlign((M, M), 1.0, 0, aligned=True)`` then ``>= 0.5``.
DETECTRON2_MASK_TARGETS = MappingProxyType({"aligned": True, "sampling_ratio": 0, "threshold": 0.5})

# --------------------------------------------------------------------------------------------------
# Pasting
# --------------------------------------------------------------------------------------------------


def expand_boxes_to_int(boxes: Tensor, scale: float) -> Tensor:
    """Grow ``boxes [N, 4]`` by ``scale`` around their centres and truncate to int64 (towards zero).

    The float operations, their order and dtype follow the legacy code exactly, so the integer boxes
    (a discontinuous function of the input) are bit-identical to torchvision's.
    """
    half_w = ((boxes[:, 2] - boxes[:, 0]) * 0.5) * scale
    half_h = ((boxes[:, 3] - boxes[:, 1]) * 0.5) * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    out = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
    return out.to(boxes.dtype).to(torch.int64)


def paste_resize_taps(start: Tensor, stop: Tensor, length: int, src_size: int, dtype: torch.dtype):
    """1-D bilinear resize taps of a ``src_size`` signal pasted at ``[start, stop]`` (inclusive).

    For every box ``n`` and image position ``p < length``: source taps ``i0, i1`` (int64
    ``[N, length]``), weights ``l0, l1`` (``dtype``) and whether ``p`` lies inside the box. The resize
    target has ``max(stop - start + 1, 1)`` samples; the rule is PyTorch's ``upsample_bilinear``
    with ``align_corners=False``: ``scale = in / out`` in ``dtype``, ``src = (dst + 0.5) * scale - 0.5``
    clamped at 0, ``i0 = min(floor(src), in - 1)``, ``i1 = min(i0 + 1, in - 1)``, ``l1 = src - i0``,
    ``l0 = 1 - l1``. ``src`` is evaluated with a single rounding, as the fused multiply-add of
    PyTorch's compiled kernels does (exact in float64 before rounding to float32).
    """
    pos = torch.arange(length, device=start.device)
    dst = pos[None, :] - start[:, None]  # [N, length] position inside the resized mask
    inside = (dst >= 0) & (pos[None, :] <= stop[:, None])
    out_size = (stop - start + 1).clamp(min=1).to(dtype)
    scale = torch.tensor(float(src_size), dtype=dtype, device=start.device) / out_size  # [N]
    hp = dtype if start.device.type == "mps" else torch.float64  # MPS has no float64
    src = (dst.to(hp) + 0.5) * scale.to(hp)[:, None] - 0.5
    src = src.to(dtype).clamp(min=0)
    i0 = src.floor().to(torch.int64).clamp(max=src_size - 1)
    l1 = (src - i0.to(dtype)).clamp(0, 1)
    i1 = (i0 + 1).clamp(max=src_size - 1)
    return i0, i1, 1 - l1, l1, inside


def _blend_rows(table: Tensor, base: Tensor, i0: Tensor, i1: Tensor, l0: Tensor, l1: Tensor, inside: Tensor):
    """``out[n * L + p] = l0 * table[base_n + i0] + l1 * table[base_n + i1]`` for all ``[N, L]`` taps.

    One fused gather-and-blend pass (``embedding_bag`` with two weighted rows per bag, the second
    tap first, as in PyTorch's kernel). Positions outside the box read an appended zero row, so they
    are exactly 0. ``table`` is ``[R, C]``; returns ``[N * L, C]``.
    """
    zero_row = table.shape[0]
    table = torch.cat([table, table.new_zeros((1, table.shape[1]))])
    base = base[:, None]
    idx = torch.stack(
        [(base + i1).masked_fill(~inside, zero_row), (base + i0).masked_fill(~inside, zero_row)], -1
    )
    wts = torch.stack([l1, l0], -1)
    return torch.nn.functional.embedding_bag(
        idx.reshape(-1, 2), table, per_sample_weights=wts.reshape(-1, 2), mode="sum"
    )


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Sequence[int], padding: int = 1) -> Tensor:
    """Paste per-detection mask probabilities into the full image.

    Args:
        masks: ``[N, 1, M, M]`` or ``[N, M, M]`` probabilities (typically ``M = 28``).
        boxes: ``[N, 4]`` xyxy detection boxes in image pixels.
        image_size: ``(h, w)`` of the output.
        padding: zero border added around each mask before resizing.

    Returns:
        ``[N, 1, h, w]`` in ``masks``' dtype and device (not thresholded).

    Semantics are exactly torchvision's ``paste_masks_in_image`` (legacy Detectron): the mask is
    zero-padded by ``padding`` pixels, the box grown by ``(M + 2 padding) / M`` around its centre and
    truncated to int64 ``(x1, y1, x2, y2)``; the padded mask is bilinearly resized
    (``align_corners=False``) to ``(y2 - y1 + 1, x2 - x1 + 1)`` (at least 1) and written at
    ``(x1, y1)``, clipped to the image; everything else is 0. Boxes that torchvision would mishandle
    (entirely left of / above the image, where its slicing wraps around or fails) give empty masks.

    Implementation: bilinear resizing is separable, so it runs as two vectorised passes over all
    detections -- columns (``[N, M + 2 padding, w]``), then rows straight into the ``[N, h, w]``
    output -- each a fused two-tap gather-and-blend with the same weights and arithmetic as
    ``F.interpolate``. No loop over detections; the output is written once.
    """
    im_h, im_w = int(image_size[0]), int(image_size[1])
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [N, 1, M, M] or [N, M, M], got {tuple(masks.shape)}")
    if not masks.is_floating_point():
        masks = masks.float()
    n = masks.shape[0]
    if n == 0 or im_h == 0 or im_w == 0:
        return masks.new_zeros((n, 1, im_h, im_w))
    boxes = boxes.to(masks.device)
    src_h, src_w = masks.shape[-2] + 2 * padding, masks.shape[-1] + 2 * padding
    scale = float(masks.shape[-1] + 2 * padding) / masks.shape[-1]
    ib = expand_boxes_to_int(boxes, scale)
    # PyTorch interpolates half/bfloat16 in float32 ("opmath"); do the same.
    cdtype = masks.dtype if masks.dtype in (torch.float32, torch.float64) else torch.float32
    mpad = torch.nn.functional.pad(masks[:, 0].to(cdtype), (padding,) * 4)  # [N, src_h, src_w]
    det = torch.arange(n, device=masks.device)

    # Horizontal pass: the padded mask's columns are table rows -> [N, w, src_h] -> [N, src_h, w].
    cols = mpad.transpose(1, 2).reshape(n * src_w, src_h)
    taps = paste_resize_taps(ib[:, 0], ib[:, 2], im_w, src_w, cdtype)
    rows = _blend_rows(cols, det * src_w, *taps).view(n, im_w, src_h).transpose(1, 2)
    rows = rows.reshape(n * src_h, im_w)

    # Vertical pass: every output row blends two rows of its own detection -> [N * h, w].
    taps = paste_resize_taps(ib[:, 1], ib[:, 3], im_h, src_h, cdtype)
    out = _blend_rows(rows, det * src_h, *taps)
    return out.view(n, 1, im_h, im_w).to(masks.dtype)


# --------------------------------------------------------------------------------------------------
# Mask targets
# --------------------------------------------------------------------------------------------------


def _target_dtype(boxes: Tensor) -> torch.dtype:
    return boxes.dtype if boxes.is_floating_point() else torch.float32


def crop_and_resize_bitmasks(
    masks: Tensor,
    boxes: Tensor,
    indices: Tensor,
    size: int,
    *,
    aligned: bool = True,
    sampling_ratio: int = 0,
    threshold: float | None = 0.5,
) -> Tensor:
    """RoIAlign ground-truth bitmaps inside RoIs: mask-head targets ``[N, size, size]``.

    Args:
        masks: ``[G, H, W]`` ground-truth masks of one image (bool, uint8 or float).
        boxes: ``[N, 4]`` xyxy RoIs in the same pixel frame (typically the positive proposals).
        indices: ``[N]`` int, which ground-truth mask each RoI is matched to.
        size: output side ``M``.
        aligned: RoIAlign's half-pixel correction (``True``: pixel ``k`` covers ``[k, k + 1)``).
        sampling_ratio: samples per bin side, ``<= 0`` for adaptive ``ceil(roi_side / M)``.
        threshold: if not None, binarise with ``target >= threshold`` (still returned as float); ties
            are decided up to a few ulps, as exact arithmetic would.

    Returns:
        ``[N, size, size]`` in ``boxes``' floating dtype (float32 for integer boxes).

    Conventions (see :data:`TORCHVISION_MASK_TARGETS`, :data:`DETECTRON2_MASK_TARGETS`):

    * torchvision ``project_masks_on_boxes``: ``aligned=False, sampling_ratio=-1, threshold=None``
      (soft targets in [0, 1]);
    * detectron2 ``BitMasks.crop_and_resize`` (the defaults here): ``aligned=True, sampling_ratio=0,
      threshold=0.5``.

    The RoIs index the ``G``-image batch ``masks[:, None]`` through their batch column (as torchvision
    does), so no ``[N, H, W]`` gather of ``masks[indices]`` is made; the only copy is the
    float conversion of the ``G`` masks (skipped when they already have the right dtype).
    """
    dtype = _target_dtype(boxes)
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros((0, size, size), dtype=dtype, device=boxes.device)
    if masks.dim() != 3:
        raise ValueError(f"masks must be [G, H, W], got {tuple(masks.shape)}")
    boxes = boxes.to(device=masks.device, dtype=dtype)
    rois = torch.cat([indices.to(device=masks.device, dtype=dtype)[:, None], boxes], dim=1)
    # Alternative with an explicit gather: roi_align(masks[indices][:, None], boxes.split(...)) -- it
    # costs N x H x W memory instead of G x H x W, hence the batch-index form.
    out = roi_align(
        masks[:, None].to(dtype),
        rois,
        (size, size),
        spatial_scale=1.0,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )[:, 0]
    return _binarise(out, threshold)


def _binarise(out: Tensor, threshold: float | None) -> Tensor:
    if threshold is None:
        return out
    # Bitmaps make exact ties common (e.g. a sample on the boundary between a 0 and a 1 pixel is exactly
    # 0.5); a few ulps of slack make them count as ">=" whatever the summation order.
    slack = 8 * torch.finfo(out.dtype).eps * max(1.0, abs(threshold))
    return (out >= threshold - slack).to(out.dtype)


# Where host reads stall, the batch's masks are RoIAligned in one pass from a float copy of them all: as many
# images at a time as keep that copy under this many values (128 MiB in float32).
_BATCH_TABLE_VALUES = 1 << 25


def crop_and_resize_bitmasks_batch(
    masks: Sequence[Tensor],
    rois: Tensor,
    indices: Tensor,
    size: int,
    *,
    aligned: bool = True,
    sampling_ratio: int = 0,
    threshold: float | None = 0.5,
) -> Tensor:
    """:func:`crop_and_resize_bitmasks` over a batch: ``[K, size, size]`` targets, equal bit for bit to
    one call per image, concatenated.

    Args:
        masks: per image ``[G_i, H_i, W_i]`` ground-truth masks.
        rois: ``[K, 5]`` (image, x1, y1, x2, y2), grouped by image in image order.
        indices: ``[K]`` int, the ground-truth mask of each RoI within its image.
        size, aligned, sampling_ratio, threshold: as :func:`crop_and_resize_bitmasks`.

    On a CPU, one call per image. Where host reads stall, every image's masks are one map of a single
    RoIAlign pass (:func:`maskrcnn.ops.roi_align.roi_align_levels`, each map merged or not as one call on
    it would be): 3 host reads for the batch instead of 3 per image (more passes only when the float copy
    of the masks would exceed ``_BATCH_TABLE_VALUES``)."""
    dtype = _target_dtype(rois)
    if rois.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=dtype, device=rois.device)
    kw = dict(aligned=aligned, sampling_ratio=sampling_ratio)
    image = rois[:, 0].long()
    if not _device.host_reads_stall(rois.device):
        counts = torch.bincount(image, minlength=len(masks)).tolist()
        if len(counts) > len(masks) or (image[1:] < image[:-1]).any():
            raise ValueError(f"rois must be grouped by image in order, with images < {len(masks)}")
        parts = zip(masks, rois.split(counts), indices.split(counts), strict=True)
        return torch.cat(
            [crop_and_resize_bitmasks(m, r[:, 1:], i, size, threshold=threshold, **kw) for m, r, i in parts]
        )
    groups, start, values = [], 0, 0
    for i, m in enumerate(masks):
        if i > start and values + m.numel() > _BATCH_TABLE_VALUES:
            groups.append((start, i))
            start, values = i, 0
        values += m.numel()
    groups.append((start, len(masks)))

    def crop(first: int, end: int, r: Tensor, i: Tensor) -> Tensor:  # images first..end-1 in one pass
        maps = [m[:, None].to(device=rois.device, dtype=dtype) for m in masks[first:end]]
        boxes = torch.cat([i.to(dtype)[:, None], r[:, 1:].to(dtype)], dim=1)
        crops = roi_align_levels(maps, boxes, r[:, 0].long() - first, (size, size), [1.0] * len(maps), **kw)
        return _binarise(crops[:, 0], threshold)

    if len(groups) == 1:
        return crop(0, len(masks), rois, indices)
    out = torch.empty((rois.shape[0], size, size), dtype=dtype, device=rois.device)
    for first, end in groups:
        sel = torch.nonzero((image >= first) & (image < end)).squeeze(1)
        out[sel] = crop(first, end, rois[sel], indices[sel])
    return out


def _valid_parts(polygons) -> list[np.ndarray]:
    """float64 copies of the polygon parts with at least 3 vertices (fewer have no area)."""
    parts = [np.asarray(p, dtype=np.float64).reshape(-1) for p in polygons]
    return [p.copy() for p in parts if p.size >= 6]


def polygons_to_bitmask(polygons, h: int, w: int) -> np.ndarray:
    """Rasterise one instance's polygon parts (flat ``[x0, y0, x1, y1, ...]`` in pixels) -> ``bool [h, w]``.

    pycocotools convention: pixel ``(i, j)`` is set when the polygon covers (about) its centre
    ``(j + 0.5, i + 0.5)``; the union of all parts is taken.
    """
    from pycocotools import mask as mask_util

    parts = _valid_parts(polygons)
    if not parts or h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects(parts, h, w))
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning (copy=False)
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        return mask_util.decode(rle).astype(bool)


def crop_and_resize_polygons(polygons, boxes: Tensor, indices: Tensor, size: int, eps: float = 0.1) -> Tensor:
    """Rasterise polygon annotations inside RoIs (detectron2's polygon mask targets).

    Args:
        polygons: per ground-truth instance, a list of polygon parts, each a flat
            ``[x0, y0, x1, y1, ...]`` (list or ndarray) in image pixels.
        boxes: ``[N, 4]`` xyxy RoIs.
        indices: ``[N]`` which instance each RoI is matched to.
        size: output side ``M``.
        eps: minimum box side used in the scale (avoids dividing by zero for degenerate boxes).

    Returns:
        ``[N, size, size]`` binary float targets in ``boxes``' floating dtype and device.

    Each polygon is mapped into the RoI frame, ``x' = (x - x1) * (size / max(x2 - x1, eps))`` (same
    for y), then rasterised on the ``size x size`` grid with pycocotools (pixel ``(i, j)`` covers
    ``[j, j + 1) x [i, i + 1)`` of the RoI frame and is set when the polygon covers about its centre).
    That is the ``aligned=True`` pixel model, so this matches ``crop_and_resize_bitmasks`` with
    :data:`DETECTRON2_MASK_TARGETS` on the full-image rasterisation, minus resampling blur.
    """
    dtype = _target_dtype(boxes)
    n = boxes.shape[0]
    out = np.zeros((n, size, size), dtype=np.float32)
    boxes_np = boxes.detach().to("cpu", torch.float64).numpy()
    for i, g in enumerate(indices.tolist()):
        x1, y1, x2, y2 = boxes_np[i]
        rw = size / max(x2 - x1, eps)
        rh = size / max(y2 - y1, eps)
        parts = _valid_parts(polygons[g])
        for p in parts:
            p[0::2] = (p[0::2] - x1) * rw
            p[1::2] = (p[1::2] - y1) * rh
        out[i] = polygons_to_bitmask(parts, size, size)
    return torch.from_numpy(out).to(device=boxes.device, dtype=dtype)
