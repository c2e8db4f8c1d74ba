"""Region Proposal Network: head, proposal selection and losses.

Shapes: ``N`` images, feature level ``l`` of size ``H_l x W_l``, ``A`` anchors per location,
``P = sum_l H_l * W_l * A`` anchors per image. Anchors (and every per-anchor tensor below) are
ordered level by level, then location by location (row-major), then anchor: index
``offset_l + (y * W_l + x) * A + a``, the layout of :class:`maskrcnn.ops.anchors.AnchorGenerator`.
Boxes are ``xyxy`` in absolute pixels of the padded batch; sizes are ``(h, w)``.

With the same weights and inputs, :class:`RPN` returns the same proposals, in the same order, as
torchvision's ``RegionProposalNetwork`` (given an anchor generator with ``strides=None``, see
:mod:`maskrcnn.ops.anchors`), and in training the same losses for the same RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.losses import at_least_float32
from maskrcnn.modeling.matcher import Matcher, subsample_labels_batch
from maskrcnn.ops.anchors import AnchorGenerator
from maskrcnn.ops.boxes import BoxCoder, box_iou, clip_boxes, large_enough
from maskrcnn.ops.nms import batched_nms

__all__ = [
    "RPN",
    "RPNHead",
    "flatten_head_outputs",
    "label_anchors",
    "rpn_losses",
    "select_proposals",
]


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then 1x1 convs for objectness and box deltas, on every level.

    Args (keyword only):
        in_channels: channels ``C`` of every feature level.
        num_anchors: anchors per location ``A``.
        num_convs: number of 3x3 conv + ReLU layers (1 in Faster/Mask R-CNN).

    ``forward(features)`` takes a list of ``[N, C, H_l, W_l]`` and returns ``(logits, deltas)``:
    lists of ``[N, A, H_l, W_l]`` objectness logits and ``[N, 4 * A, H_l, W_l]`` box deltas
    (channel ``4 * a + j`` is coordinate ``j`` of anchor ``a``). Conv weights are drawn from
    ``N(0, 0.01^2)`` with zero bias, as torchvision does.

    Parameter names: ``conv`` is a plain ``Conv2d`` when ``num_convs == 1`` (an ``nn.Sequential``
    of ``Conv2d`` otherwise), ``cls_logits``, ``bbox_pred``. torchvision's ``RPNHead`` calls the
    3x3 conv ``conv.0.0``, which :func:`maskrcnn.weights.torchvision_to_maskrcnn` maps.
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.num_convs = int(num_convs)
        convs = [nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1) for _ in range(num_convs)]
        self.conv = convs[0] if num_convs == 1 else nn.Sequential(*convs)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[N, C, H_l, W_l]`` per level -> (``[N, A, H_l, W_l]``, ``[N, 4A, H_l, W_l]``) per level."""
        convs = [self.conv] if self.num_convs == 1 else list(self.conv)
        logits, deltas = [], []
        for x in features:
            for conv in convs:
                x = F.relu(conv(x))
            logits.append(self.cls_logits(x))
            deltas.append(self.bbox_pred(x))
        return logits, deltas


def flatten_head_outputs(logits: Sequence[Tensor], deltas: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-level head outputs ``[N, A, H, W]`` / ``[N, 4A, H, W]`` -> objectness ``[N, P]`` and
    deltas ``[N, P, 4]`` in anchor order (levels concatenated)."""
    flat_logits, flat_deltas = [], []
    for lg, dt in zip(logits, deltas, strict=True):
        n, a, h, w = lg.shape
        if dt.shape != (n, 4 * a, h, w):
            raise ValueError(f"deltas {tuple(dt.shape)} do not match logits {tuple(lg.shape)}")
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(n, -1))
        flat_deltas.append(dt.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_logits, dim=1), torch.cat(flat_deltas, dim=1)


def _tv_batched_nms_limit(device: torch.device) -> int:
    """torchvision's ``batched_nms`` runs NMS per category, then sorts, above this many boxes."""
    return 1000 if device.type == "cpu" else 25_000


@torch.no_grad()
def select_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    image_sizes: Sequence[Sequence[int]],
    *,
    box_coder: BoxCoder,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """Proposals of each image from the scored, regressed anchors.

    Args:
        objectness: ``[N, P]`` logits. deltas: ``[N, P, 4]``. anchors: ``[P, 4]`` (shared by
            all images). num_anchors_per_level: ``P_l`` for each level (summing to ``P``).
        image_sizes: each image's ``(h, w)`` before padding; proposals are clipped to it.

    Per image and level the ``pre_nms_topk`` anchors with the highest logit are kept and decoded;
    boxes are clipped, those narrower or lower than ``min_size`` and those with probability
    (sigmoid) ``< score_thresh`` dropped; NMS at ``nms_thresh`` runs separately per level (and
    image, in one :func:`batched_nms` call for the batch), and the ``post_nms_topk`` best remain.
    Decoding only the kept anchors gives the same boxes as decoding all of them first. Equal
    scores are ordered as torchvision orders them: lower index first, except for images with
    more than 1000 NMS candidates (25000 on GPUs), where torchvision's final unstable sort by
    score is repeated.

    Returns ``(boxes, scores)``: per image ``[K_i, 4]`` boxes and ``[K_i]`` probabilities, by
    decreasing score, detached.
    """
    objectness = objectness.detach()
    deltas = deltas.detach()
    num_images = objectness.shape[0]
    num_levels = len(num_anchors_per_level)
    device = objectness.device
    if len(image_sizes) != num_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for {num_images} images")

    # Top-k per level (over the same [N, P] views torchvision ranks, so ties resolve the same).
    top_idx, counts = [], []
    offset = 0
    for num in num_anchors_per_level:
        k = min(int(pre_nms_topk), int(num))
        top_idx.append(objectness[:, offset : offset + num].topk(k, dim=1).indices + offset)
        counts.append(k)
        offset += num
    top_idx = torch.cat(top_idx, dim=1)  # [N, K]
    levels = torch.cat([torch.full((k,), lvl, device=device) for lvl, k in enumerate(counts)])  # [K]

    batch_idx = torch.arange(num_images, device=device)[:, None]
    scores = torch.sigmoid(objectness[batch_idx, top_idx])  # [N, K]
    boxes = box_coder.decode(deltas[batch_idx, top_idx], anchors[top_idx])  # [N, K, 4]
    boxes = torch.stack([clip_boxes(b, size) for b, size in zip(boxes, image_sizes, strict=True)])

    # Filter and suppress all images at once; NMS groups are (image, level).
    boxes = boxes.reshape(-1, 4)
    scores = scores.reshape(-1)
    groups = (batch_idx * num_levels + levels[None, :]).reshape(-1)
    keep = torch.nonzero(large_enough(boxes, min_size) & (scores >= score_thresh)).squeeze(1)
    boxes, scores, groups = boxes[keep], scores[keep], groups[keep]
    keep = batched_nms(boxes, scores, groups, nms_thresh)  # by decreasing score, ties: lower index first
    image_of = torch.div(groups, num_levels, rounding_mode="floor")
    kept_image_of = image_of[keep]
    keep = keep[torch.sort(kept_image_of, stable=True).indices]  # grouped by image, score order kept
    # NMS candidates and kept boxes per image, in one read back
    per_image = torch.arange(num_images, device=device)[:, None]
    candidates, kept = torch.stack(
        [(image_of[None, :] == per_image).sum(1), (kept_image_of[None, :] == per_image).sum(1)]
    ).tolist()
    out_boxes, out_scores = [], []
    for k, num in zip(keep.split(kept), candidates, strict=True):
        if num > _tv_batched_nms_limit(device):
            # torchvision then re-sorts the kept boxes (ascending index) by score with an unstable
            # sort; repeat that call so that equal scores come out in its order.
            k = k.sort().values
            k = k[scores[k].sort(descending=True).indices]
        k = k[:post_nms_topk]
        out_boxes.append(boxes[k])
        out_scores.append(scores[k])
    return out_boxes, out_scores


@torch.no_grad()
def label_anchors(anchors: Tensor, gt_boxes: Tensor, matcher: Matcher) -> tuple[Tensor, Tensor]:
    """Training labels of the anchors ``[P, 4]`` of one image with ground truth ``[G, 4]``.

    Returns ``labels`` float32 ``[P]`` (1 foreground, 0 background, -1 ignored) and the matched
    ground-truth box of every anchor ``[P, 4]`` (meaningful for foreground only; zeros when
    ``G == 0``, where every anchor is background).
    """
    num_anchors = anchors.shape[0]
    if gt_boxes.numel() == 0:
        labels = torch.zeros(num_anchors, dtype=torch.float32, device=anchors.device)
        return labels, torch.zeros((num_anchors, 4), dtype=torch.float32, device=anchors.device)
    matches = matcher(box_iou(gt_boxes, anchors))  # [P]
    labels = torch.where(matches >= 0, 1.0, torch.where(matches == Matcher.BETWEEN_THRESHOLDS, -1.0, 0.0))
    return labels.float(), gt_boxes[matches.clamp(min=0)]


def rpn_losses(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    labels: Tensor,
    matched_gt_boxes: Tensor,
    *,
    box_coder: BoxCoder,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    smooth_l1_beta: float = 1.0 / 9,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """RPN objectness and box losses.

    Args:
        objectness: ``[N, P]`` logits. deltas: ``[N, P, 4]`` predicted deltas.
        anchors: ``[P, 4]``. labels: ``[N, P]`` (1 / 0 / -1, from :func:`label_anchors`).
        matched_gt_boxes: ``[N, P, 4]`` ground-truth box of every anchor.

    ``batch_size_per_image`` anchors are sampled per image (:func:`subsample_labels_batch`, at most
    ``positive_fraction`` foreground). ``loss_cls`` is the mean binary cross-entropy (with logits)
    over the sampled anchors; ``loss_box`` is the smooth-L1 (``beta = smooth_l1_beta``) between the
    foreground deltas and their encoded targets, summed, divided by the number of sampled anchors.
    Both are computed in at least float32 (float64 stays float64) and are 0 (still attached to the
    graph) when nothing is sampled.
    Returns ``(loss_cls, loss_box)``, scalars.
    """
    num_images, num_anchors = objectness.shape
    pos, neg = [], []
    with torch.no_grad():
        samples = subsample_labels_batch(
            list(labels),
            num_samples=batch_size_per_image,
            positive_fraction=positive_fraction,
            generator=generator,
        )
        for i, (p, n) in enumerate(samples):
            pos.append(p + i * num_anchors)
            neg.append(n + i * num_anchors)
        pos = torch.cat(pos)
        sampled = torch.cat([pos, *neg])
    dtype = at_least_float32(objectness.dtype)
    if sampled.numel() == 0:
        zero = objectness.to(dtype).sum() * 0.0 + deltas.to(dtype).sum() * 0.0
        return zero, zero.clone()
    loss_cls = F.binary_cross_entropy_with_logits(
        objectness.reshape(-1)[sampled].to(dtype), labels.reshape(-1)[sampled].to(dtype)
    )
    with torch.no_grad():
        targets = box_coder.encode(matched_gt_boxes.reshape(-1, 4)[pos], anchors[pos % num_anchors])
    loss_box = (
        F.smooth_l1_loss(
            deltas.reshape(-1, 4)[pos].to(dtype), targets.to(dtype), beta=smooth_l1_beta, reduction="sum"
        )
        / sampled.numel()
    )
    return loss_cls, loss_box


class RPN(nn.Module):
    """Region Proposal Network: scores and regresses anchors into proposals, and its losses.

    Args (keyword only):
        head: an :class:`RPNHead` (``A`` must equal the anchor generator's anchors per location).
        anchor_generator: an :class:`AnchorGenerator` with one entry per feature level.
        pre_nms_topk, post_nms_topk: ``{True: training value, False: eval value}``; anchors kept
            per level and image before NMS, and proposals kept per image after it.
        nms_thresh: IoU threshold of the per-level NMS.
        fg_iou_thresh, bg_iou_thresh: anchor matching thresholds (low-quality matches allowed).
        batch_size_per_image, positive_fraction: anchor sampling for the losses.
        min_size: proposals narrower or lower than this (pixels) are dropped.
        score_thresh: proposals with probability below this are dropped.
        box_coder: delta encoding; ``BoxCoder(weights=(1, 1, 1, 1))`` by default.
        smooth_l1_beta: beta of the box loss.

    ``forward(features=, image_size=, image_sizes=, targets=)`` returns ``(proposals, losses)``:
    per image ``[K_i, 4]`` detached proposals (``K_i <= post_nms_topk``, by decreasing
    objectness), and ``{"loss_rpn_cls", "loss_rpn_box"}`` in training (``{}`` in eval).
    """

    def __init__(
        self,
        *,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        pre_nms_topk: Mapping[bool, int] | None = None,
        post_nms_topk: Mapping[bool, int] | None = None,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_size: float = 1e-3,
        score_thresh: float = 0.0,
        box_coder: BoxCoder | None = None,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.pre_nms_topk = dict(pre_nms_topk) if pre_nms_topk is not None else {True: 2000, False: 1000}
        self.post_nms_topk = dict(post_nms_topk) if post_nms_topk is not None else {True: 2000, False: 1000}
        for name, d in (("pre_nms_topk", self.pre_nms_topk), ("post_nms_topk", self.post_nms_topk)):
            if set(d) != {True, False}:
                raise ValueError(f"{name} must have the keys True (training) and False (eval), got {d}")
        self.nms_thresh = float(nms_thresh)
        self.matcher = Matcher(
            high_threshold=fg_iou_thresh, low_threshold=bg_iou_thresh, allow_low_quality_matches=True
        )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.min_size = float(min_size)
        self.score_thresh = float(score_thresh)
        self.box_coder = box_coder if box_coder is not None else BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.smooth_l1_beta = float(smooth_l1_beta)

    def forward(
        self,
        *,
        features: Sequence[Tensor],
        image_size: Sequence[int],
        image_sizes: Sequence[Sequence[int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals ``[K_i, 4]`` per image (+ losses in training).

        Args:
            features: ``[N, C, H_l, W_l]`` per level.
            image_size: ``(h, w)`` of the padded batch.
            image_sizes: each image's ``(h, w)`` before padding.
            targets: per image a dict with ``"boxes"`` ``[G_i, 4]`` (required in training; not
                modified).
        """
        features = list(features)
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(
            image_size=image_size, feature_sizes=[f.shape[-2:] for f in features], device=features[0].device
        )
        num_anchors_per_level = [a.shape[0] for a in anchors]
        anchors = torch.cat(anchors)  # [P, 4]
        objectness, deltas = flatten_head_outputs(logits, deltas)  # [N, P], [N, P, 4]
        if objectness.shape[1] != anchors.shape[0]:
            raise ValueError(
                f"the head predicts {objectness.shape[1]} anchors per image, the generator made "
                f"{anchors.shape[0]}: check num_anchors"
            )

        proposals, _ = select_proposals(
            objectness,
            deltas,
            anchors,
            num_anchors_per_level,
            image_sizes,
            box_coder=self.box_coder,
            pre_nms_topk=self.pre_nms_topk[self.training],
            post_nms_topk=self.post_nms_topk[self.training],
            nms_thresh=self.nms_thresh,
            min_size=self.min_size,
            score_thresh=self.score_thresh,
        )

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            if len(targets) != objectness.shape[0]:
                raise ValueError(f"got {len(targets)} targets for {objectness.shape[0]} images")
            with torch.no_grad():
                labelled = [label_anchors(anchors, t["boxes"], self.matcher) for t in targets]
                labels = torch.stack([lab for lab, _ in labelled])  # [N, P]
                matched = torch.stack([m.to(anchors.dtype) for _, m in labelled])  # [N, P, 4]
            loss_cls, loss_box = rpn_losses(
                objectness,
                deltas,
                anchors,
                labels,
                matched,
                box_coder=self.box_coder,
                batch_size_per_image=self.batch_size_per_image,
                positive_fraction=self.positive_fraction,
                smooth_l1_beta=self.smooth_l1_beta,
            )
            losses = {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}
        return proposals, losses
