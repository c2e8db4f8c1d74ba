"""Drawing detections on images: translucent masks, box outlines, "name score" labels and keypoints with
their skeleton (PIL and numpy)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["KEYPOINT_THRESHOLD", "PALETTE", "draw_instances", "to_pil_image"]

#: Keypoints scored at or below this are not drawn: detectron2's visualizer's ``_KEYPOINT_THRESHOLD``.
KEYPOINT_THRESHOLD = 0.05


def _palette(n: int) -> list[tuple[int, int, int]]:
    # hues stepped by the golden ratio stay far apart for any prefix of the list
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.1 + i * 0.618033988749895) % 1.0, 0.75 if i % 2 else 0.6, 0.95)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return out


#: Instance ``i`` (in the drawn order) gets ``PALETTE[i % len(PALETTE)]``.
PALETTE = _palette(32)


@lru_cache(maxsize=1)
def _font():
    return ImageFont.load_default()


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_pil_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a float ``[3, H, W]`` tensor in [0, 1] or a uint8 ``[H, W, 3]``
    array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
        array = (
            (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        )
        return Image.fromarray(array, "RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


def _binary_masks(masks, n: int, size: tuple[int, int], threshold: float) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach()
        masks = (masks if masks.dtype == torch.bool else masks >= threshold).cpu().numpy()
    else:
        masks = np.asarray(masks)
        masks = masks if masks.dtype == bool else masks >= threshold
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.shape != (n, *size):
        raise ValueError(
            f"expected masks [{n}, 1, {size[0]}, {size[1]}] or [{n}, {size[0]}, {size[1]}], got {masks.shape}"
        )
    return masks


def draw_instances(
    image,
    *,
    boxes,
    labels=None,
    scores=None,
    masks=None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
    keypoints=None,
    keypoint_scores=None,
    skeleton: Sequence[Sequence[int]] | None = None,
    keypoint_threshold: float = KEYPOINT_THRESHOLD,
) -> Image.Image:
    """Draw instances on a copy of ``image`` (PIL image or float ``[3, H, W]`` tensor in [0, 1]).

    ``boxes [N, 4]`` are xyxy pixels; ``labels [N]`` are named by ``class_names[label]`` when given;
    ``scores [N]`` (optional, e.g. for ground truth) drop instances below ``score_threshold`` and are
    printed after the name; ``masks`` (``[N, 1, H, W]`` or ``[N, H, W]``, probabilities thresholded at
    ``mask_threshold``, or bool) are blended in with opacity ``alpha``. Instance ``i`` of those kept gets
    colour ``PALETTE[i]``; the first instance is drawn on top. Returns an RGB PIL image of the same size.

    ``keypoints [N, K, 3]`` (``(x, y, v)`` pixels; or ``[N, K, 2]``) are drawn as dots in the instance's
    colour with a dark outline, joined by ``skeleton`` lines (COCO's 1-based index pairs) where both ends
    are drawn. A keypoint is drawn when its ``keypoint_scores [N, K]`` entry is above ``keypoint_threshold``
    (detectron2's default, 0.05; the scores as the model gives them), or without scores when its ``v > 0``
    (ground truth: labelled keypoints).
    """
    canvas = to_pil_image(image)
    width, height = canvas.size
    boxes = _numpy(boxes).reshape(-1, 4).astype(np.float64)
    n = len(boxes)
    labels = _numpy(labels).reshape(-1).astype(np.int64) if labels is not None else None
    scores = _numpy(scores).reshape(-1).astype(np.float64) if scores is not None else None
    for name, values in (("labels", labels), ("scores", scores)):
        if values is not None and len(values) != n:
            raise ValueError(f"got {n} boxes but {len(values)} {name}")
    binary = _binary_masks(masks, n, (height, width), mask_threshold) if masks is not None else None
    points, shown = _keypoints(keypoints, keypoint_scores, n, keypoint_threshold)

    keep = np.ones(n, dtype=bool) if scores is None else scores >= score_threshold
    boxes = boxes[keep]
    labels = labels[keep] if labels is not None else None
    scores = scores[keep] if scores is not None else None
    binary = binary[keep] if binary is not None else None
    points = points[keep] if points is not None else None
    shown = shown[keep] if shown is not None else None
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]

    if binary is not None and len(binary):
        canvas = _blend_masks(canvas, binary, colors, alpha)

    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(width, height) / 400))
    font = _font()
    for i in reversed(range(len(boxes))):
        x1, y1, x2, y2 = boxes[i].tolist()
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        draw.rectangle((x1, y1, x2, y2), outline=colors[i], width=line)
        parts = []
        if labels is not None:
            label = int(labels[i])
            parts.append(
                class_names[label]
                if class_names is not None and 0 <= label < len(class_names)
                else str(label)
            )
        if scores is not None:
            parts.append(f"{scores[i]:.2f}")
        if not parts:
            continue
        text = " ".join(parts)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 2
        tx = min(max(x1, 0), max(width - tw, 0))
        ty = y1 - th if y1 - th >= 0 else max(y1, 0)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colors[i])
        r, g, b = colors[i]
        ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill=ink, font=font)
    if points is not None:
        _draw_keypoints(draw, points, shown, colors, skeleton or (), line)
    return canvas


def _blend_masks(canvas: Image.Image, binary: np.ndarray, colors, alpha: float) -> Image.Image:
    """``canvas`` with each mask of ``binary [N, H, W]`` blended in (``pixel * (1 - alpha) + colour * alpha``
    in float32, then rounded), the last mask first so that the first ends on top. Each mask's pixels are
    looked for only inside the rows and columns it covers."""
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    rows, cols = binary.any(axis=2), binary.any(axis=1)  # [N, H], [N, W]
    for i in reversed(range(len(binary))):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if not ys.size:
            continue
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        region, inside = pixels[y0:y1, x0:x1], binary[i, y0:y1, x0:x1]
        region[inside] = region[inside] * (1.0 - alpha) + np.asarray(colors[i], np.float32) * alpha
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def _keypoints(keypoints, scores, n: int, threshold: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(xy [N, K, 2], drawn [N, K] bool)`` of the ``keypoints`` argument of :func:`draw_instances`."""
    if keypoints is None:
        if scores is not None:
            raise ValueError("keypoint_scores given without keypoints")
        return None, None
    kps = _numpy(keypoints).astype(np.float64)
    if kps.ndim != 3 or kps.shape[0] != n or kps.shape[2] not in (2, 3):
        raise ValueError(f"expected keypoints [{n}, K, 3] or [{n}, K, 2], got {kps.shape}")
    if scores is not None:
        scores = _numpy(scores).astype(np.float64)
        if scores.shape != kps.shape[:2]:
            raise ValueError(f"expected keypoint_scores {kps.shape[:2]}, got {scores.shape}")
        shown = scores > threshold
    elif kps.shape[2] == 3:
        shown = kps[..., 2] > 0
    else:
        shown = np.ones(kps.shape[:2], dtype=bool)
    return kps[..., :2], shown & np.isfinite(kps[..., :2]).all(-1)


def _draw_keypoints(draw, points: np.ndarray, shown: np.ndarray, colors, skeleton, line: int) -> None:
    k = points.shape[1]
    for a, b in skeleton:
        if not (1 <= a <= k and 1 <= b <= k):
            raise ValueError(f"skeleton pair ({a}, {b}) is not 1-based indices of {k} keypoints")
    radius = line + 2
    for i in reversed(range(len(points))):  # the first instance ends on top
        for a, b in skeleton:
            if shown[i, a - 1] and shown[i, b - 1]:
                (xa, ya), (xb, yb) = points[i, a - 1], points[i, b - 1]
                draw.line((xa, ya, xb, yb), fill=colors[i], width=line + 1)
        for j in np.nonzero(shown[i])[0]:
            x, y = points[i, j]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colors[i], outline=(0, 0, 0))
