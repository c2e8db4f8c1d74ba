"""The second stage: RoI sampling and losses in training, detections and their masks at inference.

Training (per image): the ground-truth boxes are appended to the (detached) proposals; each RoI is matched
to its best ground truth (IoU >= ``fg_iou_thresh`` foreground, < ``bg_iou_thresh`` background, in between
ignored); ``batch_size_per_image`` RoIs are sampled with at most ``positive_fraction`` foreground. The box
branch is trained on all sampled RoIs, the mask branch on the foreground ones, with targets cropped from
the ground-truth bitmaps and resampled to the logits' ``M x M``. Label assignment runs without gradients.

Inference (torchvision's ``postprocess_detections``, reproduced number for number): softmax scores; boxes
decoded per class and clipped to the image; background dropped; every (RoI, class) pair with score
``> score_thresh`` and both sides ``>= 0.01`` px is a candidate; per-class NMS at ``nms_thresh``; the best
``detections_per_img`` by score are kept. The mask branch then runs on those boxes only; each detection
gets the sigmoid of its class's ``M x M`` mask logits (``masks [N, 1, M, M]``, in the box frame; pasting into
the image is the caller's job).

Variants (paper): FPN (``MultiLevelPooler`` 7x7 -> :class:`TwoMLPHead`; mask 14x14 -> :class:`MaskRCNNHeads`
-> :class:`MaskRCNNPredictor`) and C4 (``shared_res5=True``: 14x14 on res4 -> :class:`Res5Head`; the mask
predictor reads res5's 7x7 output -- of the positive RoIs in training, recomputed on the detections at
inference -- and there is no mask pooler).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.losses import BOX_LOSSES, MASK_LOSSES, at_least_float32, fast_rcnn_loss, mask_loss
from maskrcnn.modeling.matcher import Matcher, subsample_labels
from maskrcnn.ops.boxes import BoxCoder, box_iou, clip_boxes, remove_small_boxes
from maskrcnn.ops.masks import crop_and_resize_bitmasks
from maskrcnn.ops.nms import batched_nms

__all__ = ["RoIHeads"]


class RoIHeads(nn.Module):
    """Box (and mask) heads on top of a feature pyramid (or the single C4 map).

    Modules (keyword only):
        box_pooler: ``MultiLevelPooler`` for the box branch.
        box_head: RoI features -> ``[K, D]`` (``TwoMLPHead`` or ``Res5Head``).
        box_predictor: ``[K, D]`` -> ``(class_logits [K, num_classes], box_deltas [K, 4 * num_classes])``.
        mask_pooler, mask_head, mask_predictor: the mask branch; it is enabled when ``mask_predictor`` is
            given. ``mask_head`` may be None (e.g. the ``MLPMaskHead`` ablation is a predictor on its own).
            ``mask_pooler`` is required unless ``shared_res5``.
    Options:
        fg_iou_thresh, bg_iou_thresh: matching thresholds (0.5, 0.5: no ignored RoIs).
        batch_size_per_image, positive_fraction: RoI sampling (512 / 0.25 for FPN; 64 / 0.25 for C4).
        box_coder_weights: ``(wx, wy, ww, wh)`` of the box deltas.
        score_thresh, nms_thresh, detections_per_img: inference (0.05, 0.5, 100).
        box_loss, smooth_l1_beta: ``"smooth_l1"`` (beta 1/9, torchvision) or ``"l1"`` (detectron2).
        mask_loss: ``"sigmoid"`` (the paper's) or ``"softmax"`` (Table 2b ablation); see
            :func:`maskrcnn.modeling.losses.mask_loss`.
        class_agnostic_mask: the mask predictor has one output channel (Table 2b ablation); must match it.
        mask_target_aligned, mask_target_threshold, mask_target_sampling_ratio: how ground-truth bitmaps are
            cropped into RoI targets (:func:`maskrcnn.ops.masks.crop_and_resize_bitmasks`). The defaults
            (False, None, 0: soft targets, adaptive sampling) are torchvision's ``project_masks_on_boxes``;
            (True, 0.5, 0) are detectron2's.
        shared_res5: C4 mode. ``box_head`` must be a ``Res5Head``; in training the mask branch reads the
            res5 output computed by the box branch for the positive RoIs, at inference it re-runs
            ``box_pooler`` and res5 on the detections. ``mask_pooler`` must be None.

    ``forward(*, features, proposals, image_sizes, targets=None) -> (detections, losses)``:
        features: the maps the poolers expect (``[N, C, H_l, W_l]`` each, finest first).
        proposals: per image ``[P_i, 4]`` xyxy boxes in the padded-batch pixel frame (detached here).
        image_sizes: per image ``(h, w)`` of the valid (unpadded) area; boxes are clipped to it.
        targets (training): per image ``{"boxes": [G, 4] float, "labels": int64 [G] in 1..K-1,
            "masks": [G, H, W] uint8/bool bitmaps in the padded frame (needed with a mask branch)}``.
    Training returns ``([], {"loss_cls", "loss_box"[, "loss_mask"]})``; evaluation returns one dict per
    image ``{"boxes" [N, 4], "labels" int64 [N], "scores" [N][, "masks" [N, 1, M, M]]}`` and ``{}``;
    detections are sorted by decreasing score. Inputs are never modified.
    """

    def __init__(
        self,
        *,
        box_pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_pooler: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        mask_loss: str = "sigmoid",
        class_agnostic_mask: bool = False,
        mask_target_aligned: bool = False,
        mask_target_threshold: float | None = None,
        mask_target_sampling_ratio: int = 0,
        shared_res5: bool = False,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        if mask_loss == "softmax" and class_agnostic_mask:
            raise ValueError("the softmax mask loss needs per-class masks (class_agnostic_mask=False)")
        if shared_res5:
            if not hasattr(box_head, "forward_with_features") or not hasattr(box_head, "features"):
                raise TypeError(
                    "shared_res5=True needs a Res5Head box_head (features, forward_with_features)"
                )
            if mask_pooler is not None:
                raise ValueError("shared_res5=True reuses the box pooler; mask_pooler must be None")
        elif mask_predictor is not None and mask_pooler is None:
            raise ValueError("a mask branch needs mask_pooler (or shared_res5=True)")
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

        self.matcher = Matcher(
            high_threshold=fg_iou_thresh, low_threshold=bg_iou_thresh, allow_low_quality_matches=False
        )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.box_coder = BoxCoder(box_coder_weights)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.mask_loss = mask_loss
        self.class_agnostic_mask = bool(class_agnostic_mask)
        self.mask_target_aligned = bool(mask_target_aligned)
        self.mask_target_threshold = mask_target_threshold
        self.mask_target_sampling_ratio = int(mask_target_sampling_ratio)
        self.shared_res5 = bool(shared_res5)

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        *,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if len(proposals) != len(image_sizes):
            raise ValueError(f"got {len(proposals)} proposal sets for {len(image_sizes)} images")
        if self.training:
            if targets is None or len(targets) != len(proposals):
                raise ValueError("training needs one target dict per image")
            return [], self._forward_train(list(features), list(proposals), list(targets))
        return self._forward_test(list(features), [p.detach() for p in proposals], list(image_sizes)), {}

    # ----------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Per image: sampled RoIs ``[S, 4]``, labels ``int64 [S]`` (0 = background), matched gt index
        ``int64 [S]`` (0 for background RoIs) and regression targets ``[S, 4]`` (zero for background)."""
        rois, labels, matched, reg = [], [], [], []
        for props, t in zip(proposals, targets, strict=True):
            gt_boxes = t["boxes"].to(device=props.device, dtype=props.dtype)
            gt_labels = t["labels"].to(device=props.device, dtype=torch.int64)
            props = torch.cat([props.detach(), gt_boxes])
            if gt_boxes.shape[0] == 0:
                idx = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                lab = torch.zeros_like(idx)
            else:
                m = self.matcher(box_iou(gt_boxes, props))
                idx = m.clamp(min=0)
                lab = gt_labels[idx]
                lab = torch.where(m == Matcher.BELOW_LOW_THRESHOLD, torch.zeros_like(lab), lab)
                lab = torch.where(m == Matcher.BETWEEN_THRESHOLDS, torch.full_like(lab, -1), lab)
            pos, neg = subsample_labels(
                lab, num_samples=self.batch_size_per_image, positive_fraction=self.positive_fraction
            )
            keep = torch.cat([pos, neg]).sort().values  # ascending, like torchvision
            props, lab, idx = props[keep], lab[keep], idx[keep]
            if gt_boxes.shape[0] == 0:
                target = torch.zeros_like(props)
            else:
                target = self.box_coder.encode(gt_boxes[idx], props).to(props.dtype)
                target = torch.where((lab > 0)[:, None], target, torch.zeros_like(target))
            rois.append(props)
            labels.append(lab)
            matched.append(idx)
            reg.append(target)
        return rois, labels, matched, reg

    def _forward_train(self, features, proposals, targets) -> dict[str, Tensor]:
        rois, labels, matched, reg = self._sample(proposals, targets)
        box_features = self.box_pooler(features, rois)
        if self.shared_res5:
            pooled, res5_out = self.box_head.forward_with_features(box_features)
        else:
            pooled = self.box_head(box_features)
        class_logits, box_deltas = self.box_predictor(pooled)
        all_labels = torch.cat(labels)
        loss_cls, loss_box = fast_rcnn_loss(
            class_logits, box_deltas, all_labels, torch.cat(reg), beta=self.smooth_l1_beta, kind=self.box_loss
        )
        losses = {"loss_cls": loss_cls, "loss_box": loss_box}
        if not self.has_mask:
            return losses

        positive = [lab > 0 for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, positive, strict=True)]
        if self.shared_res5:
            mask_features = res5_out[all_labels > 0]
        else:
            mask_features = self.mask_pooler(features, pos_rois)
        mask_logits = self._mask_logits(mask_features)
        size = mask_logits.shape[-1]
        with torch.no_grad():
            mask_targets = []
            for t, r, p, idx in zip(targets, pos_rois, positive, matched, strict=True):
                if "masks" not in t:
                    raise ValueError("the mask branch needs 'masks' in every target")
                crop = crop_and_resize_bitmasks(
                    t["masks"],
                    r,
                    idx[p],
                    size,
                    aligned=self.mask_target_aligned,
                    sampling_ratio=self.mask_target_sampling_ratio,
                    threshold=self.mask_target_threshold,
                )
                mask_targets.append(crop.to(mask_logits.device))
            mask_targets = torch.cat(mask_targets)
        pos_labels = all_labels[all_labels > 0]
        losses["loss_mask"] = mask_loss(mask_logits, pos_labels, mask_targets, kind=self.mask_loss)
        return losses

    def _mask_logits(self, mask_features: Tensor) -> Tensor:
        if self.mask_head is not None:
            mask_features = self.mask_head(mask_features)
        logits = self.mask_predictor(mask_features)
        if (logits.shape[1] == 1) != self.class_agnostic_mask:
            raise ValueError(
                f"the mask predictor gives {logits.shape[1]} channels, "
                f"inconsistent with class_agnostic_mask={self.class_agnostic_mask}"
            )
        return logits

    # ---------------------------------------------------------------------------------------- inference

    def _forward_test(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        box_features = self.box_pooler(features, proposals)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_features))
        detections = self._postprocess(class_logits, box_deltas, proposals, image_sizes)
        if not self.has_mask:
            return detections
        boxes = [d["boxes"] for d in detections]
        if self.shared_res5:
            mask_features = self.box_head.features(self.box_pooler(features, boxes))
        else:
            mask_features = self.mask_pooler(features, boxes)
        mask_logits = self._mask_logits(mask_features)
        labels = torch.cat([d["labels"] for d in detections])
        channel = torch.zeros_like(labels) if self.class_agnostic_mask else labels
        rows = torch.arange(labels.shape[0], device=labels.device)
        logits = mask_logits[rows, channel]
        probs = logits.to(at_least_float32(logits.dtype)).sigmoid()[:, None]
        for d, m in zip(detections, probs.split([b.shape[0] for b in boxes]), strict=True):
            d["masks"] = m
        return detections

    def _postprocess(self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes):
        """torchvision's ``postprocess_detections`` (module docstring); one dict per image."""
        num_rois, num_classes = class_logits.shape
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))
        boxes = boxes.view(num_rois, box_deltas.shape[1] // 4, 4).expand(num_rois, num_classes, 4)
        scores = F.softmax(class_logits.to(at_least_float32(class_logits.dtype)), -1)
        counts = [p.shape[0] for p in proposals]
        out = []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes, strict=True):
            # candidates: (RoI, class >= 1) pairs above the score threshold, in RoI-major order
            flat = torch.nonzero(s[:, 1:].reshape(-1) > self.score_thresh).squeeze(1)
            roi, lab = flat // (num_classes - 1), flat % (num_classes - 1) + 1
            b, s = clip_boxes(b[roi, lab], size), s[roi, lab]
            keep = remove_small_boxes(b, 1e-2)
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "labels": lab[keep], "scores": s[keep]})
        return out

