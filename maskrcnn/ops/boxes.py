"""Box utilities and the box coder.

Conventions: boxes are ``xyxy`` float in absolute pixels with no legacy "+1" (width is
``x2 - x1``); image sizes are ``(h, w)``. Every function is vectorised, differentiable where it
makes sense and runs on whatever device its inputs live on. Half-precision inputs are upcast to
float32 where products or logarithms of coordinates are taken (areas overflow float16 beyond
~256x256 px).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "BoxCoder",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "clip_boxes",
    "large_enough",
    "remove_small_boxes",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, half, bfloat16, integers) -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(t: Tensor) -> Tensor:
    """Floating tensors below float32 (half, bfloat16) and integer tensors become float32."""
    return t.to(_compute_dtype(t.dtype))


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of boxes ``[..., 4]`` -> ``[...]``.

    Like torchvision, inverted boxes are not clamped (their area is negative); half inputs are
    upcast to float32.
    """
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``boxes1 [N, 4]`` and ``boxes2 [M, 4]`` -> ``[N, M]``.

    Pairs whose union is zero (two zero-area boxes) get IoU 0 instead of NaN, with a finite
    gradient. Computed in at least float32.
    """
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    positive = union > 0
    safe_union = torch.where(positive, union, torch.ones_like(union))
    return torch.where(positive, inter / safe_union, torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Clamp boxes ``[..., 4*K]`` to an image of ``size = (h, w)``: x into [0, w], y into [0, h].

    Any leading dimensions, and class-specific layouts ``[N, 4*K]`` (even entries are x, odd
    entries are y), are supported. Returns a new tensor of the same shape and dtype.
    """
    h, w = int(size[0]), int(size[1])
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """bool ``[N]``: the boxes ``[N, 4]`` whose width and height are both ``>= min_size``."""
    return (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64 ``[K]``, ascending) of the boxes ``[N, 4]`` whose width and height are both
    ``>= min_size``."""
    return torch.nonzero(large_enough(boxes, min_size)).squeeze(1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``(cx, cy, w, h)`` with ``w = x2 - x1``, ``cx = x1 + w / 2``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w = x2 - x1
    h = y2 - y1
    return torch.stack((x1 + 0.5 * w, y1 + 0.5 * h, w, h), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` ``(cx, cy, w, h)`` -> xyxy (inverse of :func:`box_xyxy_to_cxcywh`)."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w = 0.5 * w
    half_h = 0.5 * h
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


class BoxCoder:
    """Encodes boxes as ``(dx, dy, dw, dh)`` offsets relative to reference boxes, and back.

    With reference (anchor / proposal) box of width ``w = x2 - x1``, height ``h`` and centre
    ``(cx, cy) = (x1 + w/2, y1 + h/2)``, and target box ``(w*, h*, cx*, cy*)``::

        dx = wx * (cx* - cx) / w       dy = wy * (cy* - cy) / h
        dw = ww * log(w* / w)          dh = wh * log(h* / h)

    ``weights = (wx, wy, ww, wh)``: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
    When decoding, ``dw / ww`` and ``dh / wh`` are clamped from above at ``bbox_xform_clip``
    before ``exp``. The arithmetic follows the same order as torchvision's ``BoxCoder`` so
    that its numbers are reproduced (no "+1" anywhere).

    Computation is in the dtype of the inputs, upcast to at least float32.
    """

    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries, got {weights!r}")
        self.weights = tuple(float(v) for v in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip})"

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Regression targets ``[..., 4]`` that take ``proposals [..., 4]`` to ``reference_boxes [..., 4]``.

        ``reference_boxes`` are the targets (e.g. matched ground-truth boxes), ``proposals`` the
        boxes they are expressed relative to (anchors or proposals); leading dims broadcast.
        Proposals must have positive width and height (else inf/NaN), and so must the
        reference boxes for ``dw``/``dh`` to be finite.
        """
        dtype = _compute_dtype(torch.promote_types(reference_boxes.dtype, proposals.dtype))
        reference_boxes = reference_boxes.to(dtype)
        proposals = proposals.to(dtype)
        wx, wy, ww, wh = self.weights

        ex_widths = proposals[..., 2] - proposals[..., 0]
        ex_heights = proposals[..., 3] - proposals[..., 1]
        ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
        ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights

        gt_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
        gt_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
        gt_ctr_x = reference_boxes[..., 0] + 0.5 * gt_widths
        gt_ctr_y = reference_boxes[..., 1] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas [..., 4*K]`` to reference ``boxes [..., 4]`` -> boxes ``[..., 4*K]``.

        ``K = 1`` for class-agnostic deltas (RPN), ``K = num_classes`` for the class-specific
        box head, where ``deltas[:, 4*k : 4*k+4]`` is the offset for class ``k``. Leading dims
        of ``deltas`` and ``boxes`` must match (or broadcast). The output layout matches
        ``deltas``; reshape to ``[..., K, 4]`` as needed. Computed in the dtype of ``deltas``
        upcast to at least float32 (``boxes`` are cast to it, as torchvision does).
        """
        if deltas.shape[-1] % 4 != 0:
            raise ValueError(f"last dim of deltas must be a multiple of 4, got shape {tuple(deltas.shape)}")
        deltas = _upcast(deltas)
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights

        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = (boxes[..., 0] + 0.5 * widths)[..., None]
        ctr_y = (boxes[..., 1] + 0.5 * heights)[..., None]
        widths = widths[..., None]
        heights = heights[..., None]

        dx = deltas[..., 0::4] / wx
        dy = deltas[..., 1::4] / wy
        dw = (deltas[..., 2::4] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3::4] / wh).clamp(max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)

        out = torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1
        )  # [..., K, 4]
        return out.flatten(-2)
