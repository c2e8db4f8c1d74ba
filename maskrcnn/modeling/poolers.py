"""Multi-level RoI pooling: each RoI is pooled from one feature level chosen by its size (FPN eq. 1).

A box of ``sqrt(area) = s`` pixels goes to level ``k = floor(k0 + log2(s / s0) + 1e-6)`` with ``k0 =
canonical_level`` (4) and ``s0 = canonical_scale`` (224), clamped to the levels available (level ``k`` is
the map of stride ``2**k``). The arithmetic is torchvision's ``LevelMapper`` (in the boxes' dtype, the
``1e-6`` added last), so level assignment, and hence the pooled features, match it exactly. With a
single level (C4, or any one-map model) no level is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.ops import device as _device
from maskrcnn.ops.roi_align import boxes_to_rois, roi_align, roi_align_levels, roi_pool, roi_warp

__all__ = ["MultiLevelPooler", "assign_levels", "POOLER_KINDS"]

#: RoI operators (paper Table 2c): RoIAlign (avg / max over samples), RoIPool, RoIWarp (max / avg).
POOLER_KINDS = ("align", "align_max", "pool", "warp_max", "warp_avg")


def assign_levels(
    boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224, canonical_level: float = 4
) -> Tensor:
    """Pyramid level of each box ``[K, 4]`` -> ``int64 [K]`` in ``[k_min, k_max]`` (absolute levels).

    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``, computed in the boxes' dtype
    in exactly this order (torchvision's numbers; half-precision boxes are upcast to float32). Empty and
    inverted boxes (area <= 0) go to ``k_min``.
    """
    if boxes.dtype in (torch.float16, torch.bfloat16):  # areas overflow float16
        boxes = boxes.float()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    s = torch.sqrt(w * h)
    eps = torch.tensor(1e-6, dtype=s.dtype, device=s.device)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + eps)
    lvl = torch.nan_to_num(lvl, nan=k_min)  # inverted boxes (negative area)
    return lvl.clamp(min=k_min, max=k_max).to(torch.int64)


class MultiLevelPooler(nn.Module):
    """Pool a fixed-size feature for every RoI from a list of feature maps.

    Args (keyword only):
        output_size: ``oh`` or ``(oh, ow)`` (7 for the FPN box head, 14 for the mask head and C4).
        scales: ``1 / stride`` of each feature map, finest first (FPN ``[1/4, 1/8, 1/16, 1/32]``, C4
            ``[1/16]``). With several maps the strides must be successive powers of two.
        sampling_ratio: samples per bin and axis for RoIAlign / RoIWarp (``<= 0``: adaptive).
        aligned: RoIAlign half-pixel alignment (``kind="align"/"align_max"`` only).
        kind: ``"align"`` (RoIAlign, average of the samples; the paper's default), ``"align_max"``,
            ``"pool"`` (RoIPool), ``"warp_max"`` / ``"warp_avg"`` (RoIWarp);
            see :mod:`maskrcnn.ops.roi_align`.
        canonical_scale, canonical_level: ``s0`` and ``k0`` of the level rule (module docstring).

    ``forward(features, boxes)``: ``features`` one ``[N, C, H_l, W_l]`` map per scale; ``boxes`` one
    ``[L_i, 4]`` xyxy tensor (image pixels) per image. Returns ``[sum L_i, C, oh, ow]`` in the order of the
    concatenated boxes and the features' dtype. Gradients flow to the features, not the boxes.
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        scales: Sequence[float],
        sampling_ratio: int = 2,
        aligned: bool = False,
        kind: str = "align",
        canonical_scale: float = 224,
        canonical_level: float = 4,
    ) -> None:
        super().__init__()
        if kind not in POOLER_KINDS:
            raise ValueError(f"kind must be one of {POOLER_KINDS}, got {kind!r}")
        scales = [float(s) for s in scales]
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.scales = scales
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.kind = kind
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.k_min = round(-math.log2(scales[0]))
        self.k_max = self.k_min + len(scales) - 1
        if len(scales) > 1:
            for i, s in enumerate(scales):
                if abs(s - 2.0 ** -(self.k_min + i)) > 1e-9 * s:
                    raise ValueError(f"several levels need scales 2**-k, 2**-(k+1), ...; got {scales}")

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        if self.kind == "align":
            return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)
        if self.kind == "align_max":
            return roi_align(
                feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned, mode="max"
            )
        if self.kind == "pool":
            return roi_pool(feature, rois, self.output_size, scale)
        mode = "max" if self.kind == "warp_max" else "avg"
        return roi_warp(feature, rois, self.output_size, scale, self.sampling_ratio, mode=mode)

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor] | Tensor) -> Tensor:
        """``boxes``: per image ``[L_i, 4]``, or ``[K, 5]`` rois (image, x1, y1, x2, y2). Returns ``[K, C,
        oh, ow]`` in RoI order."""
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature maps (one per scale), got {len(features)}")
        ref = features[0]
        rois = boxes_to_rois(boxes if isinstance(boxes, Tensor) else list(boxes)).to(device=ref.device)
        if len(features) == 1:
            return self._pool(ref, rois, self.scales[0])
        if not rois.is_floating_point():
            rois = rois.to(ref.dtype)
        with torch.no_grad():
            levels = (
                assign_levels(rois[:, 1:], self.k_min, self.k_max, self.canonical_scale, self.canonical_level)
                - self.k_min
            )
        num_rois = rois.shape[0]
        if num_rois == 0:
            return self._pool(ref, rois, self.scales[0])
        if self.kind == "align" and _device.host_reads_stall(ref.device):
            # every level in one pass: two host reads, not two per level, at the price of a copy of all
            # levels into one table (on a CPU that copy costs more than the reads: 1.3-5x slower there)
            return roi_align_levels(
                list(features), rois, levels, self.output_size, self.scales, self.sampling_ratio, self.aligned
            )
        out = None
        # The RoIs of each level (ascending) from one sort and one read of the per-level counts.
        order = torch.sort(levels, stable=True).indices
        counts = (levels[None, :] == torch.arange(len(features), device=levels.device)[:, None]).sum(1)
        per_level = order.split(counts.tolist())
        for idx, feature, scale in zip(per_level, features, self.scales, strict=True):
            if idx.numel() == 0:
                continue
            pooled = self._pool(feature, rois[idx], scale)
            if out is None:
                # same shape and memory layout as the pooled blocks (channels-last)
                out = pooled.new_zeros((num_rois,) + pooled.shape[1:], dtype=ref.dtype)
                out = out.contiguous(memory_format=torch.channels_last)
            out.index_copy_(0, idx, pooled.to(ref.dtype))
        return out
