"""A synthetic COCO-format dataset of circles, squares and triangles, easy enough to train on a CPU.

Each image has 1 .. ``max_objects`` shapes, 12-39% of the shorter image side across (30-100 px in 256 px
images), of random colour (so the class is the shape), on a textured background (smooth colour noise,
stripes, pixel noise). Later shapes occlude earlier ones; placements that would leave an earlier shape less
than half visible are redrawn, so every annotated instance is mostly visible and no visible shape is left
unannotated. Segmentations are polygons for unoccluded squares and triangles and compressed RLE otherwise
(circles, occluded shapes), so both decoding paths are used. Category ids are non-contiguous (1 circle,
5 square, 9 triangle) to exercise the label mapping. Boxes are the tight boxes of the visible masks.

The output is deterministic for a seed (byte-identical files). A complete dataset made with the same
parameters (recorded in ``meta.json``) is reused; one made by this generator with other parameters is
regenerated; files this generator did not write are never overwritten (:class:`FileExistsError`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from maskrcnn.data.synthetic import instance_record, polygon_mask, textured_background, write_dataset

__all__ = ["CATEGORIES", "draw_image", "make_shapes_dataset"]

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 5, "name": "square", "supercategory": "shape"},
    {"id": 9, "name": "triangle", "supercategory": "shape"},
)
_VERSION = 1  # bump when the generated data changes, so that old folders are regenerated
_GENERATOR = "maskrcnn.data.shapes"
# meta.json of this generator before it recorded its name (same images): still its own files
_LEGACY_META_KEYS = frozenset({"version", "num_train", "num_val", "image_size", "seed", "max_objects"})
_MIN_VISIBLE = 0.5  # fraction of a shape that must stay visible when later shapes are placed
_MIN_CONTRAST = 80.0  # minimum RGB distance between a shape's colour and the background beneath it


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
    return polygon_mask(polygon, h, w), polygon


def draw_image(
    rng: np.random.Generator, h: int, w: int, *, max_objects: int = 4
) -> tuple[np.ndarray, list[dict]]:
    """One image ``[h, w, 3]`` uint8 and its COCO annotation records (without ``id`` and ``image_id``)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = textured_background(rng, h, w, yy, xx)
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
    records = [
        instance_record(category_id=c, visible=vis, polygon=p if p is not None and (vis == f).all() else None)
        for c, f, vis, p in shapes
    ]
    return image, records


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
    :class:`maskrcnn.data.CocoDataset` and :class:`maskrcnn.config.DataConfig`. Raises
    :class:`FileExistsError`, before writing anything, when a file it would write exists and was not
    written by this generator (:func:`maskrcnn.data.synthetic.write_dataset`).
    """
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    return write_dataset(
        root,
        generator=_GENERATOR,
        version=_VERSION,
        prefix="instances",
        categories=CATEGORIES,
        draw=functools.partial(draw_image, max_objects=int(max_objects)),
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
        params={"max_objects": int(max_objects)},
        legacy_keys=_LEGACY_META_KEYS,
    )
