"""Joint transforms of an ``(image, target)`` pair.

``image`` is float ``[3, H, W]``. A transform changes every target field that depends on the image's
geometry and passes the others through; a field it does not know is refused (``ValueError`` naming it),
never passed through untransformed:

- geometric (:data:`GEOMETRIC_FIELDS`): ``boxes`` float ``[G, 4]`` (xyxy pixels), ``masks`` uint8
  ``[G, H, W]``, ``keypoints`` float ``[G, K, 3]`` (``(x, y, v)`` pixels, COCO's coordinates as stored,
  ``v = 0`` keypoints are ``(0, 0, 0)``: see :mod:`maskrcnn.data.keypoints`), ``area`` ``[G]`` (pixels:
  scaled by a resize) and ``size`` ``(h, w)``;
- not geometric (:data:`NON_GEOMETRIC_FIELDS`): ``labels``, ``image_id``, ``index`` (the loader's dataset
  index), ``iscrowd``.

Transforms return new objects (the inputs are not modified). Random choices come from torch's global RNG, so
a transform is deterministic given ``torch.manual_seed`` (the training loader seeds each sample from its
position in the data stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GEOMETRIC_FIELDS",
    "NON_GEOMETRIC_FIELDS",
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "check_target_fields",
    "hflip",
    "resize",
]

#: Target fields that the transforms change with the image.
GEOMETRIC_FIELDS = ("boxes", "masks", "keypoints", "area", "size")
#: Target fields that do not depend on the image's geometry (passed through).
NON_GEOMETRIC_FIELDS = ("labels", "image_id", "index", "iscrowd")


def check_target_fields(target: dict, where: str) -> None:
    """Raise ``ValueError`` naming the fields of ``target`` that the transforms do not know."""
    unknown = [k for k in target if k not in GEOMETRIC_FIELDS and k not in NON_GEOMETRIC_FIELDS]
    if unknown:
        raise ValueError(
            f"{where}: unknown target field(s) {', '.join(map(repr, unknown))}: a transform cannot tell "
            f"whether it depends on the image geometry (known: {', '.join(GEOMETRIC_FIELDS)}, transformed; "
            f"{', '.join(NON_GEOMETRIC_FIELDS)}, passed through); add it to maskrcnn.data.transforms"
        )


def hflip(image: Tensor, target: dict, *, flip_map: Sequence[int] | None = None) -> tuple[Tensor, dict]:
    """Mirror left-right in continuous pixel coordinates: ``x -> W - x`` for boxes (``x1' = W - x2``,
    ``x2' = W - x1``) and keypoints, masks flipped with the image.

    Keypoints follow torchvision's detection reference (``_flip_coco_person_keypoints``): ``x' = W - x``
    (not ``W - 1 - x``: the same continuous mirror as the boxes), ``y`` and ``v`` kept, then reordered by
    ``flip_map`` (keypoint ``i`` of the result is keypoint ``flip_map[i]`` of the input: a left wrist
    becomes a right wrist; see :func:`maskrcnn.ops.keypoints.keypoint_flip_map`), and every ``v = 0``
    keypoint is ``(0, 0, 0)`` afterwards (COCO's convention). Flipping twice gives the input back (for
    targets that follow that convention). Keypoints without a ``flip_map`` are an error.
    """
    check_target_fields(target, "hflip")
    target = dict(target)
    width = image.shape[-1]
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kps = target["keypoints"]
        if flip_map is None:
            raise ValueError(
                "hflip: the target has keypoints but no flip_map was given (left and right keypoints must "
                "swap: pass the dataset's flip_map)"
            )
        if len(flip_map) != kps.shape[1]:
            raise ValueError(
                f"hflip: flip_map has {len(flip_map)} entries but there are {kps.shape[1]} keypoints"
            )
        kps = kps[:, list(flip_map)].clone()
        kps[..., 0] = width - kps[..., 0]
        target["keypoints"] = torch.where(kps[..., 2:] > 0, kps, torch.zeros((), dtype=kps.dtype))
    return image.flip(-1), target


def resize(image: Tensor, target: dict, size: tuple[int, int]) -> tuple[Tensor, dict]:
    """Resize to ``size (h, w)``: bilinear image, nearest-neighbour masks, boxes and keypoints ``(x, y)``
    scaled per axis (keypoint ``v`` unchanged), ``area`` by both factors."""
    check_target_fields(target, "resize")
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
    if "keypoints" in target:
        kps = target["keypoints"]
        scale = torch.tensor([nw / w, nh / h, 1.0], dtype=kps.dtype, device=kps.device)
        target["keypoints"] = kps * scale
    if "area" in target:
        target["area"] = target["area"] * (nw / w) * (nh / h)
    if "size" in target:
        target["size"] = (nh, nw)
    return image, target


class RandomHorizontalFlip:
    """Flip with probability ``p`` (one ``torch.rand`` draw per call, also when ``p`` is 0 or 1);
    ``flip_map`` is the keypoints' left/right permutation (:func:`hflip`; a dataset's ``flip_map``)."""

    def __init__(self, p: float = 0.5, *, flip_map: Sequence[int] | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.flip_map = tuple(int(i) for i in flip_map) if flip_map is not None else None
        if self.flip_map is not None and sorted(self.flip_map) != list(range(len(self.flip_map))):
            raise ValueError(f"flip_map must be a permutation of 0 .. K - 1, got {self.flip_map}")

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if self.p > 0 and self.flip_map is None and "keypoints" in target:  # whether drawn or not
            raise ValueError(
                "RandomHorizontalFlip: the target has keypoints but no flip_map was given (left and right "
                "keypoints must swap: RandomHorizontalFlip(p, flip_map=dataset.flip_map))"
            )
        if float(torch.rand(())) < self.p:
            return hflip(image, target, flip_map=self.flip_map)
        check_target_fields(target, "RandomHorizontalFlip")
        return image, dict(target)

    def __repr__(self) -> str:
        extra = f", flip_map={self.flip_map}" if self.flip_map is not None else ""
        return f"RandomHorizontalFlip(p={self.p}{extra})"


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
