"""The orchestrator: transform -> backbone -> RPN -> RoI heads -> postprocess. Nothing else lives here."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.modeling.transform import ImageBatch, ImageTransform

__all__ = ["MaskRCNN"]


class MaskRCNN(nn.Module):
    """Mask R-CNN (or Faster R-CNN when the RoI heads have no mask branch).

    ``model(images)`` in eval mode takes a list of float RGB ``[3, H, W]`` tensors in [0, 1] and returns one
    dict per image: ``boxes [N, 4]`` (xyxy, original-image pixels), ``labels [N]`` (0 is background, never
    returned), ``scores [N]`` and ``masks [N, 1, H, W]`` (probabilities; threshold at 0.5 for binary masks).
    In training mode ``model(images, targets)`` returns a dict of named losses; each target holds
    ``boxes [G, 4]`` (xyxy pixels of that image), ``labels [G]`` (1 .. num_classes - 1) and, with a mask
    branch, ``masks [G, H, W]`` (uint8/bool).
    """

    def __init__(
        self,
        *,
        transform: ImageTransform,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        rpn_features: tuple[str, ...],
        roi_features: tuple[str, ...],
        config=None,
    ):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.rpn_features = tuple(rpn_features)
        self.roi_features = tuple(roi_features)
        self.config = config  # the ModelConfig this model was built from (saved in checkpoints)
        # what the training data said about the labels (saved in checkpoints; empty when unknown):
        # class_names ([0] the background), category_ids (label i is category_ids[i - 1]), and for keypoint
        # data keypoint_names and skeleton (1-based pairs). See maskrcnn.weights.check_metadata
        self.metadata: dict = {}
        self.precision = "fp32"  # see set_precision
        self.set_fast_inference(True)

    def set_fast_inference(self, enabled: bool) -> MaskRCNN:
        """Fast (default) or exact arithmetic.

        Fast: convolutions in channels-last (NHWC) layout, the faster one on CPUs and tensor-core GPUs, and
        frozen BatchNorms folded into their convolutions when autograd is off. Exact: NCHW and unfolded, the
        same float operations as torchvision's model, for bit-level comparisons (the fast path differs by
        float rounding, which can flip near-tied proposals of random-weight models). Returns ``self``.
        """
        from maskrcnn.modeling.backbone import FrozenBatchNorm2d

        self.fast_inference = bool(enabled)
        for module in self.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.fold = self.fast_inference
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def set_precision(self, precision: str, *, force: bool = False) -> MaskRCNN:
        """Inference in ``"bf16"`` (or ``"fp16"`` on CUDA) for the backbone and the heads' heavy layers,
        float32 for everything that decides boxes, scores and masks; ``"fp32"`` (the default) undoes it.
        Where the device lacks native support it warns and stays float32 (``force=True`` overrides). Call
        it after moving the model to its device; ``self.precision`` is the one in effect. Returns ``self``.
        See :mod:`maskrcnn.modeling.precision`."""
        from maskrcnn.modeling.precision import set_precision

        set_precision(self, precision, force=force)
        return self

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("training mode needs targets; call model.eval() for inference")
        if targets is not None:
            _check_targets(targets, len(images))
        resized, targets = self.transform.resize(images, targets)
        if self.training:
            _, losses = self._detect(self.transform.pad(resized, channels_last=self.fast_inference), targets)
            return losses
        # Inference batches only images of the same padded size: zero padding changes the features near
        # the border, so this is what makes a result independent of the other images in the call.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(resized):
            groups.setdefault(self.transform.padded_size(tuple(im.shape[-2:])), []).append(i)
        results: list[dict] = [{} for _ in images]
        for members in groups.values():
            batch = self.transform.pad([resized[i] for i in members], channels_last=self.fast_inference)
            detections, _ = self._detect(batch, None)
            originals = [(int(images[i].shape[-2]), int(images[i].shape[-1])) for i in members]
            for i, det in zip(members, self.transform.postprocess(detections, batch.image_sizes, originals)):
                results[i] = det
        return results

    def _detect(self, batch: ImageBatch, targets: list[dict] | None) -> tuple[list[dict], dict[str, Tensor]]:
        features = self.backbone(batch.tensor)  # NHWC in memory in fast mode (see set_fast_inference)
        proposals, rpn_losses = self.rpn(
            features=[features[k] for k in self.rpn_features],
            image_size=batch.padded_size,
            image_sizes=batch.image_sizes,
            targets=targets,
        )
        detections, head_losses = self.roi_heads(
            features=[features[k] for k in self.roi_features],
            proposals=proposals,
            image_sizes=batch.image_sizes,
            targets=targets,
        )
        return detections, {**rpn_losses, **head_losses}


def _check_targets(targets: list[dict], num_images: int) -> None:
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes = t.get("boxes")
        if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"target {i}: 'boxes' must be a float tensor [G, 4], got {getattr(boxes, 'shape', None)}"
            )
        if not boxes.is_floating_point():
            raise ValueError(f"target {i}: 'boxes' must be floating point, got {boxes.dtype}")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has non-positive width or height")
        labels = t.get("labels")
        if labels is None or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: 'labels' must be [G] matching boxes")
