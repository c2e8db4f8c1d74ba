"""Image batching for the detector: normalise, resize, pad; and mapping results back to the images.

Conventions: images are float RGB ``[3, H, W]`` in [0, 1]; sizes are ``(h, w)``; boxes are xyxy pixels.
The numbers follow torchvision's ``GeneralizedRCNNTransform`` (normalise first, then resize by the single
factor ``min(min_size / short side, max_size / long side)`` with bilinear interpolation and
``recompute_scale_factor=True``, then zero-pad bottom/right to a multiple of ``size_divisible``), so that
torchvision's weights give torchvision's detections.

Every target field that depends on the image geometry is resized (:data:`TARGET_FIELDS`: ``boxes``,
``masks``, ``keypoints`` ``[G, K, 3]`` (x and y scaled, ``v`` kept), ``area``, ``size``), the others
pass through, and an unknown one is refused with a ``ValueError`` naming it rather than passed through
unscaled; the same holds for the outputs mapped back by :meth:`ImageTransform.postprocess`
(:data:`OUTPUT_FIELDS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.masks import paste_masks_in_image

__all__ = [
    "OUTPUT_FIELDS",
    "TARGET_FIELDS",
    "ImageBatch",
    "ImageTransform",
    "resize_boxes",
    "resize_keypoints",
]

#: Training target fields: ``(resized with the image, passed through)``.
TARGET_FIELDS = (("boxes", "masks", "keypoints", "area", "size"), ("labels", "image_id", "index", "iscrowd"))
#: Detection fields that :meth:`ImageTransform.postprocess` knows: ``(mapped back, passed through)``.
OUTPUT_FIELDS = (("boxes", "masks", "keypoints"), ("labels", "scores", "keypoints_scores"))


def _check_fields(d: dict, known: tuple[tuple[str, ...], tuple[str, ...]], what: str) -> None:
    unknown = [k for k in d if k not in known[0] and k not in known[1]]
    if unknown:
        raise ValueError(
            f"ImageTransform: unknown {what} field(s) {', '.join(map(repr, unknown))}: it cannot tell "
            f"whether they depend on the image size (known: {', '.join(known[0])}, resized; "
            f"{', '.join(known[1])}, passed through); add them to maskrcnn.modeling.transform"
        )


@dataclass
class ImageBatch:
    """A padded batch: ``tensor [N, 3, H, W]``; ``image_sizes`` are the resized ``(h, w)`` before padding."""

    tensor: Tensor
    image_sizes: list[tuple[int, int]]

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])


def resize_boxes(boxes: Tensor, *, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Scale ``[N, 4]`` xyxy boxes from an image of ``from_size (h, w)`` to one of ``to_size``."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[0], dtype=torch.float32, device=boxes.device
    )
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[1], dtype=torch.float32, device=boxes.device
    )
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def resize_keypoints(keypoints: Tensor, *, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Scale ``[N, K, 3]`` keypoints ``(x, y, v)`` from an image of ``from_size (h, w)`` to one of
    ``to_size``: x and y per axis (torchvision's ``resize_keypoints``, number for number), ``v`` kept."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=keypoints.device) / torch.tensor(
        from_size[0], dtype=torch.float32, device=keypoints.device
    )
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=keypoints.device) / torch.tensor(
        from_size[1], dtype=torch.float32, device=keypoints.device
    )
    out = keypoints.clone()
    out[..., 0] *= ratio_w
    out[..., 1] *= ratio_h
    return out


class ImageTransform(nn.Module):
    """Normalise, resize and pad a list of images (and their targets) into an :class:`ImageBatch`.

    ``min_size`` is a tuple: in training one is drawn at random per image (multi-scale training), in
    evaluation the last one is used. ``max_size`` caps the longer side.
    """

    def __init__(
        self,
        *,
        min_size: tuple[int, ...] = (800,),
        max_size: int = 1333,
        size_divisible: int = 32,
        pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.min_size = tuple(
            int(s) for s in (min_size if isinstance(min_size, (tuple, list)) else (min_size,))
        )
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        # Python floats, made tensors in each image's dtype (a float32 buffer would round them for float64)
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)

    def scale_factor(self, size: tuple[int, int], min_size: int) -> float:
        """The resize factor for an image of ``size (h, w)``."""
        return min(min_size / min(size), self.max_size / max(size))

    def _resize(self, image: Tensor, target: dict | None) -> tuple[Tensor, dict | None]:
        min_size = self.min_size[-1]
        if self.training and len(self.min_size) > 1:  # multi-scale training, drawn from torch's RNG
            min_size = self.min_size[int(torch.randint(len(self.min_size), ()))]
        h, w = image.shape[-2:]
        factor = self.scale_factor((h, w), min_size)
        image = F.interpolate(
            image[None],
            scale_factor=factor,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        if target is None:
            return image, None
        _check_fields(target, TARGET_FIELDS, "target")
        target = dict(target)  # never mutate the caller's targets
        new_size = (int(image.shape[-2]), int(image.shape[-1]))
        if "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], from_size=(h, w), to_size=new_size)
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0] == 0:
                target["masks"] = masks.new_zeros((0, *new_size))
            else:
                target["masks"] = F.interpolate(masks[:, None].float(), size=new_size)[:, 0].to(torch.uint8)
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], from_size=(h, w), to_size=new_size)
        if "area" in target:
            target["area"] = target["area"] * (new_size[0] / h) * (new_size[1] / w)
        if "size" in target:
            target["size"] = new_size
        return image, target

    def resize(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[list[Tensor], list[dict] | None]:
        """Normalise and resize each image (and its targets; the caller's dicts are not modified)."""
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {i}: expected a float RGB tensor [3, H, W], got {tuple(image.shape)}"
                )
            if not image.is_floating_point():
                raise ValueError(f"image {i}: expected float values in [0, 1], got dtype {image.dtype}")
        resized, new_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            mean = torch.as_tensor(self.pixel_mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
            std = torch.as_tensor(self.pixel_std, dtype=image.dtype, device=image.device).view(3, 1, 1)
            image = (image - mean) / std
            image, target = self._resize(image, targets[i] if targets is not None else None)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        return resized, new_targets

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``size (h, w)`` rounded up to a multiple of ``size_divisible``."""
        stride = self.size_divisible
        return int(math.ceil(size[0] / stride) * stride), int(math.ceil(size[1] / stride) * stride)

    def pad(self, images: list[Tensor], *, channels_last: bool = False) -> ImageBatch:
        """Zero-pad resized images (bottom/right) into one ``[N, 3, H, W]`` batch (NHWC memory if asked)."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        ph, pw = self.padded_size((max(s[0] for s in sizes), max(s[1] for s in sizes)))
        layout = torch.channels_last if channels_last else torch.contiguous_format
        batch = torch.empty(
            (len(images), 3, ph, pw), dtype=images[0].dtype, device=images[0].device, memory_format=layout
        ).zero_()
        for i, im in enumerate(images):
            batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        return ImageBatch(batch, sizes)

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None
    ) -> tuple[ImageBatch, list[dict] | None]:
        """Normalise, resize and pad: ``(ImageBatch, resized targets)``."""
        resized, targets = self.resize(images, targets)
        return self.pad(resized), targets

    @staticmethod
    def postprocess(
        detections: list[dict], image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]
    ) -> list[dict]:
        """Map boxes and keypoints ``[N, K, 3]`` back to the original images and paste ``[N, 1, M, M]`` masks
        into ``[N, 1, H, W]``; an output field not in :data:`OUTPUT_FIELDS` is an error."""
        results = []
        for det, size, original in zip(detections, image_sizes, original_sizes):
            _check_fields(det, OUTPUT_FIELDS, "output")
            det = dict(det)
            det["boxes"] = resize_boxes(det["boxes"], from_size=size, to_size=original)
            if "masks" in det:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], original)
            if "keypoints" in det:
                det["keypoints"] = resize_keypoints(det["keypoints"], from_size=size, to_size=original)
            results.append(det)
        return results

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, size_divisible={self.size_divisible}"
