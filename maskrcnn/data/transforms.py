"""Joint transforms of an ``(image, target)`` pair.

``image`` is float ``[3, H, W]``; ``target`` may hold ``boxes`` float ``[G, 4]`` (xyxy pixels), ``masks``
uint8 ``[G, H, W]`` and ``size`` ``(h, w)``; other keys pass through. Transforms return new objects (the
inputs are not modified). Random choices come from torch's global RNG, so a transform is deterministic given
``torch.manual_seed`` (the training loader seeds each sample from its position in the data stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Compose", "RandomHorizontalFlip", "ResizeShortestEdge", "hflip", "resize"]


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror left-right: ``x1' = W - x2``, ``x2' = W - x1``; masks flipped with the image."""
    target = dict(target)
    width = image.shape[-1]
    if "keypoints" in target:
        raise ValueError("flipping keypoints needs a left/right flip map, which this transform does not have")
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def resize(image: Tensor, target: dict, size: tuple[int, int]) -> tuple[Tensor, dict]:
    """Resize to ``size (h, w)``: bilinear image, nearest-neighbour masks, boxes scaled per axis."""
    h, w = image.shape[-2:]
    nh, nw = int(size[0]), int(size[1])
    target = dict(target)
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if "boxes" in target:
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    if "masks" in target:
        m = target["masks"]
        if m.shape[0] == 0:
            target["masks"] = m.new_zeros((0, nh, nw))
        else:
            target["masks"] = F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(
                m.dtype
            )
    if "size" in target:
        target["size"] = (nh, nw)
    return image, target


class RandomHorizontalFlip:
    """Flip with probability ``p`` (one ``torch.rand`` draw per call, also when ``p`` is 0 or 1)."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if float(torch.rand(())) < self.p:
            return hflip(image, target)
        return image, dict(target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShortestEdge:
    """Resize so that the shorter side is one of ``sizes`` (drawn with ``torch.randint``) and the longer
    side at most ``max_size``: scale ``min(size / short, max_size / long)``, rounded output sizes."""

    def __init__(self, sizes: tuple[int, ...], max_size: int):
        sizes = tuple(int(s) for s in (sizes if isinstance(sizes, Sequence) else (sizes,)))
        if not sizes or min(sizes) < 1 or max_size < 1:
            raise ValueError(f"sizes and max_size must be positive, got {sizes}, {max_size}")
        self.sizes = sizes
        self.max_size = int(max_size)

    def output_size(self, size: tuple[int, int], short: int) -> tuple[int, int]:
        h, w = size
        scale = min(short / min(h, w), self.max_size / max(h, w))
        return max(1, int(round(h * scale))), max(1, int(round(w * scale)))

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        short = self.sizes[int(torch.randint(len(self.sizes), ()))]
        new_size = self.output_size((int(image.shape[-2]), int(image.shape[-1])), short)
        return resize(image, target, new_size)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(sizes={self.sizes}, max_size={self.max_size})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"
