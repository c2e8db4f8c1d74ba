"""A synthetic COCO-format dataset of circles, squares and triangles, easy enough to train on a CPU.

Each image has 1 .. ``max_objects`` shapes, 12-39% of the shorter image side across (30-100 px in 256 px
images), of random colour (so the class is the shape), on a textured background (smooth colour noise,
stripes, pixel noise). Later shapes occlude earlier ones; placements that would leave an earlier shape less
than half visible are redrawn, so every annotated instance is mostly visible and no visible shape is left
unannotated. Segmentations are polygons for unoccluded squares and triangles and compressed RLE otherwise
(circles, occluded shapes), so both decoding paths are used. Category ids are non-contiguous (1 circle,
5 square, 9 triangle) to exercise the label mapping. Boxes are the tight boxes of the visible masks.

The output is deterministic for a seed (byte-identical files), and a complete dataset made with the same
parameters (recorded in ``meta.json``) is reused instead of rewritten.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskrcnn.atomic import atomic_write

__all__ = ["CATEGORIES", "make_shapes_dataset"]

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 5, "name": "square", "supercategory": "shape"},
    {"id": 9, "name": "triangle", "supercategory": "shape"},
)
_VERSION = 1  # bump when the generated data changes, so that old folders are regenerated
_SPLITS = {"train": 0, "val": 1}
_MIN_VISIBLE = 0.5  # fraction of a shape that must stay visible when later shapes are placed
_MIN_CONTRAST = 80.0  # minimum RGB distance between a shape's colour and the background beneath it


def _write_bytes(path: str, data: bytes) -> None:
    """Write atomically (temp file + rename), so concurrent writers of the same bytes cannot clash."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def _png_bytes(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _background(rng: np.random.Generator, h: int, w: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Smooth colour noise + stripes + pixel noise around a random base colour: float32 ``[h, w, 3]``."""
    base = rng.uniform(50, 205, size=3).astype(np.float32)
    gh, gw = h // 48 + 2, w // 48 + 2
    grid = rng.normal(0.0, 35.0, size=(gh, gw, 3)).astype(np.float32)
    # separable bilinear upsampling of the coarse grid (elementwise, so the bytes do not depend on BLAS)
    fy = (np.arange(h, dtype=np.float32) + 0.5) * (gh - 1) / h
    fx = (np.arange(w, dtype=np.float32) + 0.5) * (gw - 1) / w
    y0, x0 = fy.astype(int), fx.astype(int)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    wy, wx = (fy - y0)[:, None, None], (fx - x0)[None, :, None]
    rows = grid[:, x0] * (1 - wx) + grid[:, x1] * wx  # [gh, w, 3]
    smooth = rows[y0] * (1 - wy) + rows[y1] * wy
    angle, period = rng.uniform(0, math.pi), rng.uniform(10, 40)
    amplitude, phase = rng.uniform(0, 25), rng.uniform(0, 2 * math.pi)
    k = np.float32(2 * math.pi / period)
    stripes = np.sin(
        (xx * np.float32(math.cos(angle)) + yy * np.float32(math.sin(angle))) * k + np.float32(phase)
    )
    noise = rng.standard_normal(size=(h, w, 3), dtype=np.float32) * np.float32(6.0)
    smooth += base
    smooth += (np.float32(amplitude) * stripes)[..., None]
    smooth += noise
    return smooth


def _polygon_mask(points: list[float], h: int, w: int) -> np.ndarray:
    """pycocotools' rasterisation of one polygon: ``[h, w]`` bool."""
    rle = mask_utils.frPyObjects([points], h, w)
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _draw_shape(rng, kind: int, h: int, w: int, yy, xx) -> tuple[np.ndarray, list[float] | None]:
    """A random shape entirely inside the image: ``(full mask [h, w] bool, polygon or None)``."""
    size = rng.uniform(0.12, 0.39) * min(h, w)
    if kind == 1:  # circle of diameter `size`; pixel (i, j) is inside when its centre is
        r = size / 2
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r, None
    if kind == 5:  # square of side `size`, rotated by at most 15 degrees
        theta = math.radians(rng.uniform(-15, 15))
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        radius = size / 2
    else:  # equilateral triangle of side `size`, any rotation
        theta = rng.uniform(0, 2 * math.pi)
        corners = [(math.cos(a), math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        radius = size / math.sqrt(3)  # circumradius
    c, s = math.cos(theta), math.sin(theta)
    pts = [(radius * (u * c - v * s), radius * (u * s + v * c)) for u, v in corners]
    ext_x = max(abs(p[0]) for p in pts)
    ext_y = max(abs(p[1]) for p in pts)
    cx, cy = rng.uniform(ext_x + 1, w - ext_x - 1), rng.uniform(ext_y + 1, h - ext_y - 1)
    polygon = [round(v, 2) for x, y in pts for v in (cx + x, cy + y)]
    return _polygon_mask(polygon, h, w), polygon


def _make_image(rng: np.random.Generator, h: int, w: int, max_objects: int):
    """One image ``[h, w, 3]`` uint8 and its instances ``[(category_id, visible mask, polygon or None)]``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = _background(rng, h, w, yy, xx)
    background = canvas.copy()
    shapes: list[tuple[int, np.ndarray, np.ndarray, list | None]] = []  # (cid, full, visible, polygon)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = int(rng.choice([c["id"] for c in CATEGORIES]))
        for _attempt in range(20):
            full, polygon = _draw_shape(rng, kind, h, w, yy, xx)
            if full.sum() < 50:
                continue
            if all((vis & ~full).sum() >= _MIN_VISIBLE * f.sum() for _, f, vis, _ in shapes):
                break
        else:
            continue  # no placement leaves the others visible enough: fewer shapes in this image
        under = background[full].mean(axis=0)
        colour = rng.uniform(0, 255, size=3)
        for _attempt in range(10):
            if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
                break
            colour = rng.uniform(0, 255, size=3)
        else:
            colour = np.where(under > 127, under - 110, under + 110)
        canvas[full] = colour + rng.normal(0.0, 4.0, size=(int(full.sum()), 3))
        shapes = [(c, f, vis & ~full, p) for c, f, vis, p in shapes]
        shapes.append((kind, full, full.copy(), polygon))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    instances = [(c, vis, p if p is not None and (vis == f).all() else None) for c, f, vis, p in shapes]
    return image, instances


def _make_split(root: str, split: str, num: int, image_size: tuple[int, int], seed: int, max_objects: int):
    h, w = image_size
    images, annotations = [], []
    os.makedirs(os.path.join(root, split), exist_ok=True)
    id_offset = 0 if split == "train" else 1_000_000
    for i in range(num):
        rng = np.random.default_rng([seed, _SPLITS[split], i])
        image, instances = _make_image(rng, h, w, max_objects)
        image_id = id_offset + i + 1
        file_name = f"{image_id:07d}.png"
        _write_bytes(os.path.join(root, split, file_name), _png_bytes(image))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for cid, visible, polygon in instances:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            if polygon is not None:
                segmentation = [polygon]
            else:
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cid,
                    "segmentation": segmentation,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": f"maskrcnn synthetic shapes, {split} split, seed {seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    _write_bytes(path, json.dumps(data).encode())
    return path


def _read_meta(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "meta.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _complete(root: str, meta: dict, paths: dict) -> bool:
    """True when ``root`` holds a dataset made with ``meta`` and all its files exist."""
    if _read_meta(root) != meta:
        return False
    try:
        for split in ("train", "val"):
            with open(paths[f"{split}_annotations"]) as fh:
                names = [im["file_name"] for im in json.load(fh)["images"]]
            if not all(os.path.isfile(os.path.join(paths[f"{split}_images"], n)) for n in names):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def make_shapes_dataset(
    root: str,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
    max_objects: int = 4,
) -> dict:
    """Write (or reuse) the shapes dataset under ``root``: ``train/*.png``, ``val/*.png``,
    ``annotations/instances_{train,val}.json`` and ``meta.json``. ``image_size`` is ``(h, w)``.

    Returns ``{"train_images", "train_annotations", "val_images", "val_annotations"}`` (paths), ready for
    :class:`maskrcnn.data.CocoDataset` and :class:`maskrcnn.config.DataConfig`.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if min(h, w) < 64:
        raise ValueError(f"image_size must be at least 64 x 64, got {image_size}")
    if max_objects < 1 or num_train < 0 or num_val < 0:
        raise ValueError("max_objects must be >= 1 and the image counts >= 0")
    root = os.path.abspath(root)
    paths = {
        "train_images": os.path.join(root, "train"),
        "train_annotations": os.path.join(root, "annotations", "instances_train.json"),
        "val_images": os.path.join(root, "val"),
        "val_annotations": os.path.join(root, "annotations", "instances_val.json"),
    }
    meta = {
        "version": _VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [h, w],
        "seed": int(seed),
        "max_objects": int(max_objects),
    }
    if _complete(root, meta, paths):
        return paths
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    meta_path = os.path.join(root, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # incomplete until rewritten at the end
    _make_split(root, "train", int(num_train), (h, w), int(seed), int(max_objects))
    _make_split(root, "val", int(num_val), (h, w), int(seed), int(max_objects))
    _write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return paths
