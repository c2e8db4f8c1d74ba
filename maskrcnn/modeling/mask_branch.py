"""The mask branch of the RoI heads: its pooler, head and predictor, mask targets, loss and inference.

Training: on the foreground RoIs only, mask logits ``[P, C or 1, M, M]`` against targets cropped from the
ground-truth bitmaps of each RoI's matched object and resampled to ``M x M``
(:func:`maskrcnn.ops.masks.crop_and_resize_bitmasks`, without gradients); the loss of the RoI's class
channel (:func:`maskrcnn.modeling.losses.mask_loss`).

Inference: on the detections only; each gets the sigmoid of its class's ``M x M`` logits (channel 0 when
class-agnostic): ``masks [N, 1, M, M]`` probabilities in the box frame (pasting into the image is the
caller's job).

Variants (paper): FPN (``MultiLevelPooler`` 14x14 -> :class:`MaskRCNNHeads` -> :class:`MaskRCNNPredictor`,
M = 28) and C4 (no ``mask_pooler``: :class:`C4MaskPredictor` reads the box branch's res5 output, M = 14).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.modeling.losses import MASK_LOSSES, at_least_float32, mask_loss
from maskrcnn.modeling.roi_heads import RoIBranch, foreground_rois
from maskrcnn.ops.masks import crop_and_resize_bitmasks_batch

__all__ = ["MaskBranch"]


class MaskBranch(RoIBranch):
    """Per-class instance masks of the foreground RoIs and of the detections.

    Modules (keyword only; state-dict keys ``roi_heads.mask_head.mask_fcn1.weight``,
    ``roi_heads.mask_predictor.conv5_mask.weight``, ... as torchvision's):
        mask_predictor: features -> logits ``[K, num_classes (or 1), M, M]``.
        mask_head: features -> features before the predictor, or None (the ``MLPMaskHead`` ablation and C4's
            predictor work on their own).
        mask_pooler: ``MultiLevelPooler``, or None to read the box branch's shared features (C4: res5's
            ``[K, 2048, 7, 7]`` output), which needs a box head that shares them (``Res5Head``).
    Options:
        mask_loss: ``"sigmoid"`` (the paper's) or ``"softmax"`` (Table 2b ablation).
        class_agnostic: the predictor has one output channel (Table 2b ablation); must match it.
        target_aligned, target_threshold, target_sampling_ratio: how ground-truth bitmaps are cropped into
            RoI targets. The defaults (False, None, 0: soft targets, adaptive sampling) are torchvision's
            ``project_masks_on_boxes``; (True, 0.5, 0) are detectron2's.
    Targets need ``"masks"``: ``[G, H, W]`` uint8/bool bitmaps in the padded frame.
    """

    name = "mask"
    required_fields = ("masks",)

    def __init__(
        self,
        *,
        mask_predictor: nn.Module,
        mask_head: nn.Module | None = None,
        mask_pooler: nn.Module | None = None,
        mask_loss: str = "sigmoid",
        class_agnostic: bool = False,
        target_aligned: bool = False,
        target_threshold: float | None = None,
        target_sampling_ratio: int = 0,
    ) -> None:
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        if mask_loss == "softmax" and class_agnostic:
            raise ValueError("the softmax mask loss needs per-class masks (class_agnostic=False)")
        # registered even when None, so that ``roi_heads.mask_pooler`` / ``roi_heads.mask_head`` always exist
        self.add_module("mask_pooler", mask_pooler)
        self.add_module("mask_head", mask_head)
        self.mask_predictor = mask_predictor
        self.mask_loss = mask_loss
        self.class_agnostic = bool(class_agnostic)
        self.target_aligned = bool(target_aligned)
        self.target_threshold = target_threshold
        self.target_sampling_ratio = int(target_sampling_ratio)

    @property
    def uses_box_features(self) -> bool:
        return self.mask_pooler is None

    def logits(self, mask_features: Tensor) -> Tensor:
        """Mask head and predictor: ``[K, ...] -> [K, num_classes (or 1), M, M]``."""
        if self.mask_head is not None:
            mask_features = self.mask_head(mask_features)
        logits = self.mask_predictor(mask_features)
        if (logits.shape[1] == 1) != self.class_agnostic:
            raise ValueError(
                f"the mask predictor gives {logits.shape[1]} channels, "
                f"inconsistent with class_agnostic={self.class_agnostic}"
            )
        return logits

    def forward_train(
        self,
        *,
        features: list[Tensor],
        rois: list[Tensor],
        labels: list[Tensor],
        matched: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
        box_features: Tensor | None,
    ) -> dict[str, Tensor]:
        positive, pos_rois = foreground_rois(rois, labels)
        pos_labels = torch.cat(labels)[positive]
        if self.mask_pooler is None:
            mask_features = box_features[positive]  # the box branch's features, in the same RoI order
        else:
            mask_features = self.mask_pooler(features, pos_rois)
        mask_logits = self.logits(mask_features)
        with torch.no_grad():
            mask_targets = crop_and_resize_bitmasks_batch(
                [t["masks"].to(mask_logits.device) for t in targets],
                pos_rois,
                torch.cat(matched)[positive],
                mask_logits.shape[-1],
                aligned=self.target_aligned,
                sampling_ratio=self.target_sampling_ratio,
                threshold=self.target_threshold,
            )
        return {"loss_mask": mask_loss(mask_logits, pos_labels, mask_targets, kind=self.mask_loss)}

    def forward_test(
        self,
        *,
        features: list[Tensor],
        detections: list[dict[str, Tensor]],
        box_features: Tensor | None,
    ) -> None:
        boxes = [d["boxes"] for d in detections]
        if self.mask_pooler is None:
            mask_features = box_features
        else:
            mask_features = self.mask_pooler(features, boxes)
        mask_logits = self.logits(mask_features)
        labels = torch.cat([d["labels"] for d in detections])
        channel = torch.zeros_like(labels) if self.class_agnostic else labels
        rows = torch.arange(labels.shape[0], device=labels.device)
        logits = mask_logits[rows, channel]
        probs = logits.to(at_least_float32(logits.dtype)).sigmoid()[:, None]
        for d, m in zip(detections, probs.split([b.shape[0] for b in boxes]), strict=True):
            d["masks"] = m
