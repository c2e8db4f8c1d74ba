"""Losses of the RoI heads, as pure tensor functions.

Each returns a scalar connected to its inputs' graph, computed in at least float32 (half / bfloat16
predictions are upcast). When there is nothing to learn from (no RoI, or no positive RoI for the box and
mask terms) it returns ``logits.sum() * 0``, so gradients are zero rather than NaN and every parameter
still takes part in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BOX_LOSSES", "MASK_LOSSES", "at_least_float32", "fast_rcnn_loss", "keypoint_loss", "mask_loss"]

BOX_LOSSES = ("smooth_l1", "l1")
MASK_LOSSES = ("sigmoid", "softmax")


def fast_rcnn_loss(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    *,
    beta: float = 1.0 / 9.0,
    kind: str = "smooth_l1",
) -> tuple[Tensor, Tensor]:
    """Classification and box-regression loss of the sampled RoIs (torchvision's ``fastrcnn_loss``).

    Args:
        class_logits: ``[R, K]`` (``K = num_classes``, 0 = background).
        box_deltas: ``[R, 4K]`` class-specific deltas (``[R, 4]`` class-agnostic also accepted).
        labels: ``int64 [R]`` in ``[0, K)``.
        regression_targets: ``[R, 4]`` encoded targets (only rows with ``labels > 0`` are read).
        beta: smooth-L1 transition point (torchvision 1/9; ``kind="l1"`` ignores it).
        kind: ``"smooth_l1"`` or ``"l1"`` (detectron2's default, = smooth-L1 with beta 0).

    Returns:
        ``(loss_cls, loss_box)``: mean cross-entropy over the ``R`` RoIs; box loss summed over the
        positive RoIs' 4 coordinates of their gt class, divided by ``R`` (all sampled RoIs, not only the
        positives -- torchvision's and detectron2's normalisation).
    """
    if kind not in BOX_LOSSES:
        raise ValueError(f"kind must be one of {BOX_LOSSES}, got {kind!r}")
    r = labels.numel()
    if r == 0:
        return class_logits.sum() * 0, box_deltas.sum() * 0
    loss_cls = F.cross_entropy(class_logits.to(at_least_float32(class_logits.dtype)), labels)
    pos = torch.nonzero(labels > 0).squeeze(1)
    if pos.numel() == 0:
        return loss_cls, box_deltas.sum() * 0
    deltas = box_deltas.reshape(r, -1, 4)
    cls = labels[pos] if deltas.shape[1] > 1 else torch.zeros_like(pos)
    pred = deltas[pos, cls]
    target = regression_targets[pos]
    dtype = torch.promote_types(at_least_float32(pred.dtype), target.dtype)
    pred, target = pred.to(dtype), target.to(dtype)
    if kind == "smooth_l1":
        loss_box = F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    else:
        loss_box = F.l1_loss(pred, target, reduction="sum")
    return loss_cls, loss_box / r


def mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor, *, kind: str = "sigmoid") -> Tensor:
    """Mask loss of the positive RoIs.

    Args:
        mask_logits: ``[R, K, M, M]`` per-class logits, or ``[R, 1, M, M]`` class-agnostic.
        labels: ``int64 [R]`` gt class (``>= 1``) of each positive RoI.
        mask_targets: ``[R, M, M]`` targets in [0, 1] (soft or binary).
        kind:
            ``"sigmoid"`` (the paper's): per-pixel binary cross-entropy with logits on the channel of the
            RoI's class only (channel 0 when class-agnostic), averaged over ``R * M * M``; the other
            channels get no gradient (no competition between classes).
            ``"softmax"`` (the multinomial ablation, Table 2b): per-pixel cross-entropy across the ``K``
            channels, the target class of a pixel being the RoI's label where ``target >= 0.5`` and the
            background channel 0 elsewhere (channel 0 acts as "not this object"), averaged over
            ``R * M * M``. Needs per-class logits.

    Returns:
        scalar; ``mask_logits.sum() * 0`` when ``R == 0``.
    """
    if kind not in MASK_LOSSES:
        raise ValueError(f"kind must be one of {MASK_LOSSES}, got {kind!r}")
    r = mask_logits.shape[0]
    if r == 0 or mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    if mask_logits.shape[-2:] != mask_targets.shape[-2:]:
        raise ValueError(
            f"mask logits {tuple(mask_logits.shape)} and targets {tuple(mask_targets.shape)} differ"
        )
    if kind == "sigmoid":
        cls = labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)
        logits = mask_logits[torch.arange(r, device=labels.device), cls]
        logits = logits.to(at_least_float32(logits.dtype))
        return F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype))
    if mask_logits.shape[1] == 1:
        raise ValueError("the softmax mask loss needs per-class logits (class_agnostic=False)")
    target = torch.where(mask_targets >= 0.5, labels.view(-1, 1, 1), torch.zeros_like(labels).view(-1, 1, 1))
    return F.cross_entropy(mask_logits.to(at_least_float32(mask_logits.dtype)), target)


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32 (or float64) even for half / bfloat16 predictions."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keypoint_loss(keypoint_logits: Tensor, heatmap_indices: Tensor, valid: Tensor) -> Tensor:
    """Keypoint loss (torchvision's ``keypointrcnn_loss``): an ``S*S``-way softmax per keypoint.

    Args:
        keypoint_logits: ``[R, K, S, S]`` logits of the positive RoIs.
        heatmap_indices: ``int64 [R, K]`` target cells ``y * S + x``
            (:func:`maskrcnn.ops.keypoints.keypoints_to_heatmap_targets`).
        valid: ``bool [R, K]``, the keypoints that take part.

    Returns:
        scalar: cross-entropy over the ``S*S`` logits of each valid keypoint, averaged over the valid
        keypoints (of all RoIs together); ``keypoint_logits.sum() * 0`` when none is valid.
    """
    r, k, h, w = keypoint_logits.shape
    if h != w:
        raise ValueError(f"keypoint heatmaps must be square, got {h}x{w}")
    if heatmap_indices.shape != (r, k) or valid.shape != (r, k):
        raise ValueError(
            f"indices {tuple(heatmap_indices.shape)} and valid {tuple(valid.shape)} must be [{r}, {k}]"
        )
    valid = valid.reshape(-1).bool()
    if not bool(valid.any()):
        return keypoint_logits.sum() * 0
    logits = keypoint_logits.reshape(r * k, h * w)[valid]
    return F.cross_entropy(logits.to(at_least_float32(logits.dtype)), heatmap_indices.reshape(-1)[valid])
