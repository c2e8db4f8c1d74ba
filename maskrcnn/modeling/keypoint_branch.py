"""The keypoint branch of the RoI heads (paper section 5; torchvision's Keypoint R-CNN).

Each of K keypoints is a one-hot ``S x S`` mask (S = 56) over its RoI: the head turns pooled RoI features
(14x14) into logits ``[R, K, S, S]``, trained with a softmax cross-entropy over the S^2 cells of each labelled
keypoint.

Training: on the foreground RoIs only; each keypoint of the RoI's matched object with ``v > 0`` that falls
inside the RoI is a target (:func:`maskrcnn.ops.keypoints.keypoints_to_heatmap_targets`, torchvision's
``keypoints_to_heatmap``); ``loss_keypoint`` is the cross-entropy averaged over those
(:func:`maskrcnn.modeling.losses.keypoint_loss`), zero with a graph when there are none.

Inference: on the detections; each detection's maps are upsampled to its box and the argmax cell's centre
mapped back to pixels (:func:`maskrcnn.ops.keypoints.heatmaps_to_keypoints`): ``keypoints [N, K, 3]``
rows ``(x, y, 1)`` in the padded-batch frame and ``keypoints_scores [N, K]`` (the upsampled logit there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.modeling.losses import keypoint_loss
from maskrcnn.modeling.roi_heads import RoIBranch, foreground_rois
from maskrcnn.ops.keypoints import heatmaps_to_keypoints, keypoints_to_heatmap_targets

__all__ = ["KeypointBranch"]


class KeypointBranch(RoIBranch):
    """Keypoints of the foreground RoIs and of the detections.

    Modules (keyword only; state-dict keys ``roi_heads.keypoint_head.0.weight`` ...,
    ``roi_heads.keypoint_predictor.kps_score_lowres.weight``, as torchvision's):
        keypoint_pooler: ``MultiLevelPooler`` (14x14).
        keypoint_head: :class:`maskrcnn.modeling.keypoint_head.KeypointRCNNHeads`.
        keypoint_predictor: :class:`maskrcnn.modeling.keypoint_head.KeypointRCNNPredictor` (logits
            ``[R, K, S, S]``).
    Targets need ``"keypoints"``: float ``[G, K, 3]`` rows ``(x, y, v)`` in the padded-batch pixel frame,
    ``v > 0`` labelled.
    """

    name = "keypoint"
    required_fields = ("keypoints",)

    def __init__(
        self, *, keypoint_pooler: nn.Module, keypoint_head: nn.Module, keypoint_predictor: nn.Module
    ) -> None:
        super().__init__()
        self.keypoint_pooler = keypoint_pooler
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor

    def logits(self, features: list[Tensor], boxes: list[Tensor] | Tensor) -> Tensor:
        """Pool, head, predictor: per image ``[R_i, 4]`` boxes (or ``[R, 5]`` rois) -> ``[R, K, S, S]``."""
        return self.keypoint_predictor(self.keypoint_head(self.keypoint_pooler(features, boxes)))

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
        logits = self.logits(features, pos_rois)
        boxes = pos_rois[:, 1:]
        with torch.no_grad():
            # each RoI's matched object among the batch's: its index in its image plus the image's offset
            first, offsets = 0, []
            for t, m in zip(targets, matched, strict=True):
                offsets.append(torch.full_like(m, first))
                first += t["keypoints"].shape[0]
            objects = (torch.cat(matched) + torch.cat(offsets))[positive]
            gt = torch.cat([t["keypoints"] for t in targets]).to(device=boxes.device, dtype=boxes.dtype)
            indices, valid = keypoints_to_heatmap_targets(gt[objects], boxes, heatmap_size=logits.shape[-1])
        return {"loss_keypoint": keypoint_loss(logits, indices, valid)}

    def forward_test(
        self,
        *,
        features: list[Tensor],
        detections: list[dict[str, Tensor]],
        box_features: Tensor | None,
    ) -> None:
        boxes = [d["boxes"] for d in detections]
        logits = self.logits(features, boxes)
        keypoints, scores = heatmaps_to_keypoints(logits, torch.cat(boxes))
        counts = [b.shape[0] for b in boxes]
        for d, k, s in zip(detections, keypoints.split(counts), scores.split(counts), strict=True):
            d["keypoints"] = k.to(d["boxes"].dtype)
            d["keypoints_scores"] = s.to(d["scores"].dtype)
