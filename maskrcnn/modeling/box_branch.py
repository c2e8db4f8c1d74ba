"""The box branch of the RoI heads: pooler -> box head -> predictor; regression targets, loss, inference.

Training: on all sampled RoIs (chosen by :class:`maskrcnn.modeling.roi_heads.RoIHeads`), the classification
loss and, on the foreground ones, the box regression loss (:func:`maskrcnn.modeling.losses.fast_rcnn_loss`)
against the ground truth encoded by ``BoxCoder`` (targets computed without gradients).

Inference (torchvision's ``postprocess_detections``, reproduced number for number): softmax scores; boxes
decoded per class and clipped to the image; background dropped; every (RoI, class) pair with score
``> score_thresh`` and both sides ``>= 0.01`` px is a candidate; per-class NMS at ``nms_thresh``; the best
``detections_per_img`` by score are kept.

Shared features (C4). A box head with ``forward_with_features`` and ``features`` (:class:`Res5Head`) shares
its un-pooled output with the other branches: :meth:`BoxBranch.forward_train` returns it for every sampled
RoI, :meth:`BoxBranch.shared_features` recomputes it on other boxes (the detections).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.losses import BOX_LOSSES, at_least_float32, fast_rcnn_loss
from maskrcnn.ops.boxes import BoxCoder, clip_boxes, large_enough
from maskrcnn.ops.nms import batched_nms

__all__ = ["BoxBranch"]


class BoxBranch(nn.Module):
    """Classification and box regression of RoIs; the first branch :class:`RoIHeads` runs.

    Modules (keyword only; :class:`RoIHeads` registers them under these names, hence the state-dict keys
    ``roi_heads.box_head.fc6.weight``, ``roi_heads.box_predictor.cls_score.weight``, C4's
    ``roi_heads.box_head.res5.*``):
        box_pooler: ``MultiLevelPooler`` (7x7 for FPN; 14x14 on res4 for C4).
        box_head: RoI features -> ``[K, D]`` (``TwoMLPHead`` or ``Res5Head``).
        box_predictor: ``[K, D]`` -> ``(class_logits [K, num_classes], box_deltas [K, 4 * num_classes])``.
    Options:
        box_coder_weights: ``(wx, wy, ww, wh)`` of the box deltas.
        score_thresh, nms_thresh, detections_per_img: inference (0.05, 0.5, 100).
        box_loss, smooth_l1_beta: ``"smooth_l1"`` (beta 1/9, torchvision) or ``"l1"`` (detectron2).

    Boxes are xyxy in the padded-batch pixel frame; labels are ``int64``, 0 = background.
    """

    name = "box"

    def __init__(
        self,
        *,
        box_pooler: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(box_coder_weights)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.box_loss = box_loss
        self.smooth_l1_beta = float(smooth_l1_beta)

    @property
    def shares_features(self) -> bool:
        """Whether the box head gives per-RoI features to other branches (C4's res5 output)."""
        return hasattr(self.box_head, "forward_with_features") and hasattr(self.box_head, "features")

    @torch.no_grad()
    def regression_targets(
        self,
        rois: list[Tensor],
        labels: list[Tensor],
        matched: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> list[Tensor]:
        """Per image ``[S, 4]``: the matched ground truth encoded relative to each RoI (0 for background)."""
        out = []
        for r, lab, idx, t in zip(rois, labels, matched, targets, strict=True):
            gt_boxes = t["boxes"].to(device=r.device, dtype=r.dtype)
            if gt_boxes.shape[0] == 0:
                out.append(torch.zeros_like(r))
                continue
            target = self.box_coder.encode(gt_boxes[idx], r).to(r.dtype)
            out.append(torch.where((lab > 0)[:, None], target, torch.zeros_like(target)))
        return out

    def forward_train(
        self,
        *,
        features: list[Tensor],
        rois: list[Tensor],
        labels: list[Tensor],
        matched: list[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """``({"loss_cls", "loss_box"}, shared)``: ``shared`` is the box head's un-pooled output for every
        sampled RoI (``[sum S, ...]``, in the order of ``torch.cat(rois)``) when :attr:`shares_features`, else
        None. Arguments as :meth:`maskrcnn.modeling.roi_heads.RoIBranch.forward_train`."""
        reg = self.regression_targets(rois, labels, matched, targets)
        box_features = self.box_pooler(features, rois)
        if self.shares_features:
            pooled, shared = self.box_head.forward_with_features(box_features)
        else:
            pooled, shared = self.box_head(box_features), None
        class_logits, box_deltas = self.box_predictor(pooled)
        loss_cls, loss_box = fast_rcnn_loss(
            class_logits,
            box_deltas,
            torch.cat(labels),
            torch.cat(reg),
            beta=self.smooth_l1_beta,
            kind=self.box_loss,
        )
        return {"loss_cls": loss_cls, "loss_box": loss_box}, shared

    def forward_test(
        self, *, features: list[Tensor], proposals: list[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" [N, 4], "labels" int64 [N], "scores" [N]}``, sorted by decreasing score."""
        class_logits, box_deltas = self.box_predictor(self.box_head(self.box_pooler(features, proposals)))
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes)

    def shared_features(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """The box head's un-pooled output on ``boxes`` (per image ``[N_i, 4]``): ``[sum N_i, ...]``."""
        if not self.shares_features:
            raise TypeError(f"{type(self.box_head).__name__} shares no features (see shares_features)")
        return self.box_head.features(self.box_pooler(features, boxes))

    def postprocess(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: list[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` (module docstring); one dict per image."""
        num_rois, num_classes = class_logits.shape
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))
        boxes = boxes.view(num_rois, box_deltas.shape[1] // 4, 4).expand(num_rois, num_classes, 4)
        scores = F.softmax(class_logits.to(at_least_float32(class_logits.dtype)), -1)
        counts = [p.shape[0] for p in proposals]
        out = []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes, strict=True):
            # candidates: (RoI, class >= 1) pairs above the score threshold whose clipped box is not
            # degenerate, in RoI-major order (one nonzero for both tests)
            b, s = clip_boxes(b[:, 1:], size), s[:, 1:]
            wanted = (s > self.score_thresh) & large_enough(b.reshape(-1, 4), 1e-2).view(s.shape)
            flat = torch.nonzero(wanted.reshape(-1)).squeeze(1)
            b, s = b.reshape(-1, 4)[flat], s.reshape(-1)[flat]
            lab = flat % (num_classes - 1) + 1
            keep = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "labels": lab[keep], "scores": s[keep]})
        return out
