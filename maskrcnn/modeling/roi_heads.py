"""The second stage: RoI sampling, then the box branch and every other branch (mask, keypoint) in turn.

Training (per image): the ground-truth boxes are appended to the (detached) proposals; each RoI is matched
to its best ground truth (IoU >= ``fg_iou_thresh`` foreground, < ``bg_iou_thresh`` background, in between
ignored); ``batch_size_per_image`` RoIs are sampled with at most ``positive_fraction`` foreground. Label
assignment runs without gradients. The box branch (:class:`maskrcnn.modeling.box_branch.BoxBranch`) is
trained on all sampled RoIs; each other branch gets the same RoIs, labels and matched objects and picks the
ones it learns from (the mask branch: the foreground ones).

Inference: the box branch turns the proposals into detections (torchvision's ``postprocess_detections``);
each other branch then adds its outputs to them (the mask branch: ``masks [N, 1, M, M]``).

Branches and state dicts. A branch is an ``nn.Module`` whose children carry torchvision's names
(``box_pooler``, ``box_head``, ``box_predictor``; ``mask_pooler``, ``mask_head``, ``mask_predictor``;
``keypoint_head``, ``keypoint_predictor``). :class:`RoIHeads` registers those children flat under its own
name space (``roi_heads.box_head.fc6.weight``, not ``roi_heads.box.box_head...``) and keeps the branch
objects in a plain tuple, so checkpoints keep torchvision's keys. A branch therefore holds no parameters or
buffers of its own.

C4 (paper Fig. 4 left): the box head is ``Res5Head``, whose res5 output the box branch shares; a mask branch
without a pooler reads it -- of the sampled RoIs in training, recomputed on the detections at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.modeling.box_branch import BoxBranch
from maskrcnn.modeling.matcher import Matcher, subsample_labels_batch
from maskrcnn.ops.boxes import box_iou

__all__ = ["RoIBranch", "RoIHeads", "foreground_rois"]


def foreground_rois(rois: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The batch's foreground RoIs, found with one host read: ``(positive, fg_rois)``, ``positive`` int64
    ``[P]`` their positions in the batch's concatenated RoIs (image by image) and ``fg_rois`` ``[P, 5]``
    (image, x1, y1, x2, y2). ``rois``, ``labels``: per image ``[S_i, 4]`` and ``[S_i]`` (0 background)."""
    positive = torch.nonzero(torch.cat(labels) > 0).squeeze(1)
    image = torch.cat([torch.full_like(lab, i) for i, lab in enumerate(labels)])[positive]
    boxes = torch.cat(rois)[positive]
    return positive, torch.cat([image[:, None].to(boxes.dtype), boxes], dim=1)


class RoIBranch(nn.Module):
    """What a branch run after the box branch implements (mask, keypoint).

    Class attributes: ``name`` (in messages) and ``required_fields``, the target keys its training reads
    (mask: ``("masks",)``; keypoint: ``("keypoints",)``); :class:`RoIHeads` checks them before anything runs
    and names the missing one. ``uses_box_features`` (attribute or property): whether it reads the box
    branch's shared features (C4's res5 output) instead of pooling its own.

    ``forward_train(*, features, rois, labels, matched, targets, box_features) -> {"loss_<name>": Tensor}``:
        features: the maps the poolers expect (``[N, C, H_l, W_l]`` each, finest first).
        rois: per image the sampled RoIs ``[S_i, 4]`` (xyxy, padded-batch pixel frame, detached).
        labels: per image ``int64 [S_i]``, 0 = background, 1..K-1 = the matched object's class.
        matched: per image ``int64 [S_i]``, index of the matched object in the image's targets (0 for
            background RoIs: read it only where ``labels > 0``).
        targets: per image dicts (``"boxes"``, ``"labels"`` and the ``required_fields``).
        box_features: the box branch's shared features ``[sum S_i, ...]`` in the order of ``torch.cat(rois)``
            (C4), else None.
        Losses are scalars, zero (with a graph) when there is nothing to learn from.
    ``forward_test(*, features, detections, box_features) -> None``:
        detections: per image ``{"boxes" [N_i, 4] (xyxy, padded-batch frame), "labels" int64 [N_i],
            "scores" [N_i]}``; the branch adds its outputs to each dict (mask: ``"masks" [N_i, 1, M, M]``).
        box_features: the box branch's shared features on the detections ``[sum N_i, ...]`` (in the order
            of ``torch.cat`` of the boxes) when some branch ``uses_box_features``, else None.
    Both are called by :class:`RoIHeads`, which decides the mode; a branch's own ``training`` flag follows
    the heads' ``train()`` / ``eval()``.
    """

    name: str = "branch"
    required_fields: tuple[str, ...] = ()
    uses_box_features: bool = False

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
        raise NotImplementedError

    def forward_test(
        self,
        *,
        features: list[Tensor],
        detections: list[dict[str, Tensor]],
        box_features: Tensor | None,
    ) -> None:
        raise NotImplementedError


class RoIHeads(nn.Module):
    """RoI sampling, the box branch, then each of ``branches`` in order.

    Args (keyword only):
        box_branch: :class:`maskrcnn.modeling.box_branch.BoxBranch`.
        branches: :class:`RoIBranch` objects (``MaskBranch``; a keypoint branch), run in this order.
        fg_iou_thresh, bg_iou_thresh: matching thresholds (0.5, 0.5: no ignored RoIs).
        batch_size_per_image, positive_fraction: RoI sampling (512 / 0.25 for FPN; 64 / 0.25 for C4).
    The branches' modules become children of this module under their own names (module docstring); the
    branch objects are :attr:`box_branch` and :attr:`branches`. Replace a module through the heads
    (``heads.box_predictor = ...``), which updates its branch, not through the branch.

    ``forward(*, features, proposals, image_sizes, targets=None) -> (detections, losses)``:
        features: the maps the poolers expect (``[N, C, H_l, W_l]`` each, finest first).
        proposals: per image ``[P_i, 4]`` xyxy boxes in the padded-batch pixel frame (detached here).
        image_sizes: per image ``(h, w)`` of the valid (unpadded) area; boxes are clipped to it.
        targets (training): per image ``{"boxes": [G, 4] float, "labels": int64 [G] in 1..K-1}`` and the
            fields the branches need (``"masks": [G, H, W]`` uint8/bool bitmaps in the padded frame).
    Training returns ``([], {"loss_cls", "loss_box"[, "loss_mask"]})``; evaluation returns one dict per
    image ``{"boxes" [N, 4], "labels" int64 [N], "scores" [N][, "masks" [N, 1, M, M]]}`` and ``{}``;
    detections are sorted by decreasing score. Inputs are never modified.
    """

    def __init__(
        self,
        *,
        box_branch: BoxBranch,
        branches: Sequence[RoIBranch] = (),
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
    ) -> None:
        super().__init__()
        all_branches = (box_branch, *branches)
        names = [b.name for b in all_branches]
        if len(set(names)) != len(names):
            raise ValueError(f"branch names must be unique, got {names}")
        for b in all_branches:
            if list(b.parameters(recurse=False)) or list(b.buffers(recurse=False)):
                raise TypeError(f"the {b.name} branch holds parameters or buffers itself (not in a child)")
            for child_name, child in b._modules.items():
                if child_name in self._modules:
                    raise ValueError(f"two branches name a module {child_name!r}")
                self.add_module(child_name, child)
        for b in branches:
            if b.uses_box_features and not box_branch.shares_features:
                raise TypeError(
                    f"the {b.name} branch reads the box head's features, but "
                    f"{type(box_branch.box_head).__name__} shares none (Res5Head does)"
                )
        self._branches = all_branches  # a tuple: not registered as modules (their children are, above)

        self.matcher = Matcher(
            high_threshold=fg_iou_thresh, low_threshold=bg_iou_thresh, allow_low_quality_matches=False
        )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    @property
    def box_branch(self) -> BoxBranch:
        return self._branches[0]

    @property
    def branches(self) -> tuple[RoIBranch, ...]:
        """The branches run after the box branch, in order."""
        return self._branches[1:]

    def __setattr__(self, name: str, value) -> None:
        """``heads.box_predictor = FastRCNNPredictor(...)`` (fine-tuning) replaces the branch's module too."""
        super().__setattr__(name, value)
        for b in self.__dict__.get("_branches", ()):
            if name in b._modules:
                setattr(b, name, value)

    def train(self, mode: bool = True) -> RoIHeads:
        super().train(mode)  # the branches' modules are children of this module
        for b in self._branches:
            b.training = mode
        return self

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
            for b in self.branches:
                for field in b.required_fields:
                    if any(field not in t for t in targets):
                        raise ValueError(f"the {b.name} branch needs {field!r} in every target")
            return [], self._forward_train(list(features), list(proposals), list(targets))
        return self._forward_test(list(features), [p.detach() for p in proposals], list(image_sizes)), {}

    @torch.no_grad()
    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Per image: sampled RoIs ``[S, 4]``, labels ``int64 [S]`` (0 = background) and matched gt index
        ``int64 [S]`` (0 for background RoIs)."""
        candidates = []  # per image: (RoIs, labels, matched gt index), before sampling
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
            candidates.append((props, lab, idx))
        samples = subsample_labels_batch(  # one read back for the batch; torchvision's draws
            [lab for _, lab, _ in candidates],
            num_samples=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
        )
        rois, labels, matched = [], [], []
        for (props, lab, idx), (pos, neg) in zip(candidates, samples, strict=True):
            keep = torch.cat([pos, neg]).sort().values  # ascending, like torchvision
            rois.append(props[keep])
            labels.append(lab[keep])
            matched.append(idx[keep])
        return rois, labels, matched

    def _forward_train(self, features, proposals, targets) -> dict[str, Tensor]:
        rois, labels, matched = self._sample(proposals, targets)
        sample = dict(features=features, rois=rois, labels=labels, matched=matched, targets=targets)
        losses, box_features = self.box_branch.forward_train(**sample)
        for b in self.branches:
            branch_losses = b.forward_train(**sample, box_features=box_features)
            if repeated := sorted(losses.keys() & branch_losses.keys()):
                raise ValueError(f"the {b.name} branch repeats the losses {repeated}")
            losses.update(branch_losses)
        return losses

    def _forward_test(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        detections = self.box_branch.forward_test(
            features=features, proposals=proposals, image_sizes=image_sizes
        )
        box_features = None
        if any(b.uses_box_features for b in self.branches):
            box_features = self.box_branch.shared_features(features, [d["boxes"] for d in detections])
        for b in self.branches:
            b.forward_test(features=features, detections=detections, box_features=box_features)
        return detections
