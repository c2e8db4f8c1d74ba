"""The orchestrator: transform -> backbone -> RPN -> RoI heads -> postprocess. Nothing else lives here."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskrcnn.modeling.transform import ImageBatch, ImageTransform

__all__ = ["MaskRCNN", "fast_layout"]


def fast_layout(device: torch.device, *, training: bool, channels: int) -> torch.memory_format:
    """The memory layout of the fast mode's convolutions on ``device``, for a model whose RPN convolves
    maps of ``channels`` channels (the FPN's width).

    Channels-last (NHWC) for inference, the faster one on every CPU measured and on tensor-core GPUs, and
    for training on CUDA, on CPUs with AVX-512, and for narrow models. NCHW for training a model of 128
    channels or more on other CPUs: there oneDNN's NHWC weight gradient takes 1.6-3.5x the NCHW time,
    growing with the map (a 3x3 256-channel convolution at P2 of a 512 x 682 image: 2.0 s against 0.58 s),
    which costs a 256-channel R-18-FPN a third more per iteration (12.5 vs 8.4 s), while the demo's
    64-channel model trains 10-20% faster in channels-last (benchmarks/RESULTS.md, "Training (CPU)").
    """
    if not training or device.type == "cuda":
        return torch.channels_last
    if device.type != "cpu":
        return torch.contiguous_format
    if channels < 128 or torch.backends.cpu.get_cpu_capability() == "AVX512":
        return torch.channels_last
    return torch.contiguous_format


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
        self.rpn_channels = max((m.in_channels for m in rpn.modules() if isinstance(m, nn.Conv2d)), default=0)
        # the fast mode's layout in training: None for fast_layout's choice on the device, or a
        # torch.memory_format to measure or override it (benchmarks --layout); applied by train()
        self.training_layout: torch.memory_format | None = None
        self.set_fast_inference(True)

    def set_fast_inference(self, enabled: bool) -> MaskRCNN:
        """Fast (default) or exact arithmetic.

        Fast: convolutions in the layout that is faster on the parameters' device (see :func:`fast_layout`:
        channels-last (NHWC) for inference; for training where its backward is fast too), and frozen
        BatchNorms folded into their convolutions when autograd is off. Exact: NCHW and unfolded, the same
        float operations as torchvision's model, for bit-level comparisons (the fast path differs by float
        rounding, which can flip near-tied proposals of random-weight models). Returns ``self``.
        """
        from maskrcnn.modeling.backbone import FrozenBatchNorm2d

        self.fast_inference = bool(enabled)
        for module in self.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.fold = self.fast_inference
        self._layout = None
        return self._use_layout()

    @property
    def layout(self) -> torch.memory_format:
        """The parameters' memory layout now: ``torch.channels_last`` or ``torch.contiguous_format``."""
        return self._layout

    def train(self, mode: bool = True) -> MaskRCNN:
        """``nn.Module.train``, and the layout for the mode (:func:`fast_layout`), so that it is in place
        before a wrapper such as DistributedDataParallel records the parameters' strides."""
        super().train(mode)
        return self._use_layout()

    def _use_layout(self) -> MaskRCNN:
        """Put the parameters into the layout of the current mode, device and setting (no-op if there)."""
        if not self.fast_inference:
            layout = torch.contiguous_format
        elif self.training and self.training_layout is not None:
            layout = self.training_layout
        else:
            device = next(self.parameters()).device
            layout = fast_layout(device, training=self.training, channels=self.rpn_channels)
        if layout != self._layout:
            self.to(memory_format=layout)
            self._layout = layout
        return self

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
        self._use_layout()  # the model may have moved to another device since train() / eval()
        channels_last = self._layout == torch.channels_last
        if self.training:
            _, losses = self._detect(self.transform.pad(resized, channels_last=channels_last), targets)
            return losses
        # Inference batches only images of the same padded size: zero padding changes the features near
        # the border, so this is what makes a result independent of the other images in the call.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(resized):
            groups.setdefault(self.transform.padded_size(tuple(im.shape[-2:])), []).append(i)
        results: list[dict] = [{} for _ in images]
        for members in groups.values():
            batch = self.transform.pad([resized[i] for i in members], channels_last=channels_last)
            detections, _ = self._detect(batch, None)
            originals = [(int(images[i].shape[-2]), int(images[i].shape[-1])) for i in members]
            for i, det in zip(members, self.transform.postprocess(detections, batch.image_sizes, originals)):
                results[i] = det
        return results

    def _detect(self, batch: ImageBatch, targets: list[dict] | None) -> tuple[list[dict], dict[str, Tensor]]:
        features = self.backbone(batch.tensor)  # in the batch's layout (see fast_layout)
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
        labels = t.get("labels")
        if labels is None or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: 'labels' must be [G] matching boxes")
    # degenerate boxes, with one read back from the device for the whole batch
    bad = [(t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1) for t in targets]
    if not bad:
        return
    for i, any_bad in enumerate(torch.stack([b.any().to(bad[0].device) for b in bad]).tolist()):
        if any_bad:
            j = int(bad[i].nonzero()[0])
            box = targets[i]["boxes"][j].tolist()
            raise ValueError(f"target {i}: box {j} {box} has non-positive width or height")
