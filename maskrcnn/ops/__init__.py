"""Operators of Mask R-CNN, in plain PyTorch (torchvision-compatible names and signatures)."""

from maskrcnn.ops.nms import batched_nms, nms
from maskrcnn.ops.roi_align import RoIAlign, RoIPool, RoIWarp, roi_align, roi_align_levels, roi_pool, roi_warp

__all__ = [
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
    "batched_nms",
    "nms",
    "roi_align",
    "roi_align_levels",
    "roi_pool",
    "roi_warp",
]
