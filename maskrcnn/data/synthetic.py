"""Writing a synthetic COCO data set to disk: the part the shapes and figures generators share.

A generator supplies ``draw(rng, h, w) -> (image, annotations)``: one ``[h, w, 3]`` uint8 image and its
COCO annotation records without ``id`` and ``image_id``. :func:`write_dataset` then writes

* ``{root}/train/{id:07d}.png`` (ids 1 ..) and ``{root}/val/{id:07d}.png`` (ids 1000001 ..),
* ``{root}/annotations/{prefix}_{train,val}.json`` and ``{root}/meta.json`` (the parameters),

with these promises:

* deterministic: image ``i`` of a split is drawn from ``np.random.default_rng([seed, split, i])`` (split 0
  train, 1 val), so the bytes depend on the parameters only;
* reused: a complete data set made with the same parameters is returned without writing anything;
* never over someone else's files: a file it would write that exists and is not one of this generator's
  (as listed by the folder's ``meta.json``) is a :class:`FileExistsError` naming it, before anything is
  written; other files in the folder are left alone;
* resumable: ``meta.json`` first claims the files (``"complete": false``), so an interrupted run is
  recognised as this generator's and finished by the next call; images of a previous, larger data set of
  the same generator that the new one lacks are removed.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from maskrcnn.atomic import atomic_write
from maskrcnn.data.images import usable_cores

__all__ = ["instance_record", "polygon_mask", "textured_background", "write_dataset"]

_SPLITS = (("train", 0, 0), ("val", 1, 1_000_000))  # name, rng stream, image id offset
Draw = Callable[[np.random.Generator, int, int], "tuple[np.ndarray, list[dict]]"]


def _write_bytes(path: str, data: bytes) -> None:
    """Write atomically (temp file + rename), so concurrent writers of the same bytes cannot clash."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def _workers() -> int:
    """Threads for drawing images: the cores this process may use, at most 8."""
    return min(8, usable_cores())


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _read_meta(root: str) -> dict | None:
    try:
        with open(os.path.join(root, "meta.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _outputs(root: str, prefix: str, num_train: int, num_val: int) -> list[str]:
    """Every file a data set with these image counts consists of."""
    files = [os.path.join(root, "meta.json")]
    for (split, _, offset), n in zip(_SPLITS, (num_train, num_val)):
        files.append(os.path.join(root, "annotations", f"{prefix}_{split}.json"))
        files += [os.path.join(root, split, f"{offset + i + 1:07d}.png") for i in range(n)]
    return files


def _complete(root: str, meta: dict, prefix: str) -> bool:
    """True when ``root`` holds a data set made with ``meta`` and all its files exist."""
    if _read_meta(root) != meta:
        return False
    try:
        for split, _, _ in _SPLITS:
            with open(os.path.join(root, "annotations", f"{prefix}_{split}.json")) as fh:
                names = [im["file_name"] for im in json.load(fh)["images"]]
            if not all(os.path.isfile(os.path.join(root, split, n)) for n in names):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _ours(old: dict | None, generator: str, legacy_keys: frozenset[str]) -> bool:
    if old is None:
        return False
    return old.get("generator") == generator or (bool(legacy_keys) and set(old) == legacy_keys)


def _check_not_foreign(root: str, meta: dict, prefix: str, legacy_keys: frozenset[str]) -> None:
    """Raise FileExistsError when writing ``meta``'s data set would replace a file this generator did not
    write: one that exists and is not part of the data set the current ``meta.json`` (if ours) describes."""
    old = _read_meta(root)
    ours: set[str] = set()
    if _ours(old, meta["generator"], legacy_keys):
        try:
            ours = set(_outputs(root, prefix, int(old["num_train"]), int(old["num_val"])))
        except (KeyError, TypeError, ValueError):
            ours = set()
    foreign = [p for p in _outputs(root, prefix, meta["num_train"], meta["num_val"]) if os.path.lexists(p)]
    foreign = [p for p in foreign if p not in ours]
    if foreign:
        listed = ", ".join(os.path.relpath(p, root) for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise FileExistsError(
            f"{root} holds files the {meta['generator']} generator did not write ({listed}{more}); refusing "
            "to overwrite them: choose an empty or new folder"
        )


def _write_split(
    root: str, *, split: str, stream: int, offset: int, num: int, h: int, w: int, seed: int, draw: Draw
) -> tuple[list[dict], list[dict]]:
    images, annotations = [], []
    os.makedirs(os.path.join(root, split), exist_ok=True)

    def make(i: int) -> tuple[bytes, list[dict]]:
        image, records = draw(np.random.default_rng([seed, stream, i]), h, w)
        return _png_bytes(image), records

    # images are independent (each from its own seed), drawn and encoded by a thread per core (NumPy and
    # Pillow's PNG encoder release the GIL for much of it); written in order, so the output is the same
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=_workers())
    try:
        for i, (png, records) in enumerate(pool.map(make, range(num))):
            image_id = offset + i + 1
            file_name = f"{image_id:07d}.png"
            _write_bytes(os.path.join(root, split, file_name), png)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for record in records:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **record})
    finally:  # an error or Ctrl-C: the images not yet started are not drawn
        pool.shutdown(wait=True, cancel_futures=True)
    return images, annotations


def write_dataset(
    root: str,
    *,
    generator: str,
    version: int,
    prefix: str,
    categories: Sequence[dict],
    draw: Draw,
    num_train: int,
    num_val: int,
    image_size: tuple[int, int],
    seed: int,
    params: dict | None = None,
    legacy_keys: frozenset[str] = frozenset(),
) -> dict:
    """Write (or reuse) a synthetic data set under ``root`` (see the module docstring).

    ``generator`` names the generator in ``meta.json``, ``version`` is bumped when its images change,
    ``prefix`` starts the annotation files' names, ``params`` are further parameters of ``draw`` recorded
    in ``meta.json``; ``legacy_keys`` is the key set of an older ``meta.json`` without a ``generator``
    entry that this generator wrote. ``image_size`` is ``(h, w)``.

    Returns ``{"train_images", "train_annotations", "val_images", "val_annotations"}`` (paths), ready for
    :class:`maskrcnn.data.CocoDataset` and :class:`maskrcnn.config.DataConfig`.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if min(h, w) < 64:
        raise ValueError(f"image_size must be at least 64 x 64, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("the image counts must be >= 0")
    root = os.path.abspath(root)
    paths = {}
    for split, _, _ in _SPLITS:
        paths[f"{split}_images"] = os.path.join(root, split)
        paths[f"{split}_annotations"] = os.path.join(root, "annotations", f"{prefix}_{split}.json")
    meta = {
        "generator": generator,
        "version": int(version),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": [h, w],
        "seed": int(seed),
        **(params or {}),
        "complete": True,
    }
    if _complete(root, meta, prefix):
        return paths
    _check_not_foreign(root, meta, prefix, legacy_keys)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    meta_path = os.path.join(root, "meta.json")
    # claim the files first (incomplete until rewritten at the end), so that an interrupted run can be
    # resumed without being taken for someone else's files; keep claiming a previous, larger set's files
    old = _read_meta(root)
    claimed = {**meta, "complete": False}
    if _ours(old, generator, legacy_keys):
        claimed["num_train"] = max(int(num_train), int(old.get("num_train", 0)))
        claimed["num_val"] = max(int(num_val), int(old.get("num_val", 0)))
    _write_bytes(meta_path, (json.dumps(claimed, indent=1) + "\n").encode())
    for (split, stream, offset), num in zip(_SPLITS, (int(num_train), int(num_val))):
        images, annotations = _write_split(
            root, split=split, stream=stream, offset=offset, num=num, h=h, w=w, seed=int(seed), draw=draw
        )
        data = {
            "info": {
                "description": f"{generator} (synthetic), {split} split, seed {seed}",
                "version": str(version),
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": json.loads(json.dumps(list(categories))),
        }
        _write_bytes(paths[f"{split}_annotations"], json.dumps(data).encode())
    keep = set(_outputs(root, prefix, int(num_train), int(num_val)))
    for path in _outputs(root, prefix, claimed["num_train"], claimed["num_val"]):
        if path not in keep and os.path.isfile(path):  # stale images of the previous, larger set: ours
            os.remove(path)
    _write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return paths


# --------------------------------------------------------------------------------------------------
# Drawing helpers both generators use
# --------------------------------------------------------------------------------------------------


def textured_background(
    rng: np.random.Generator, h: int, w: int, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Smooth colour noise + stripes + pixel noise around a random base colour: float32 ``[h, w, 3]``.

    ``yy, xx`` are the float32 pixel row and column grids (``np.mgrid[0:h, 0:w]``).
    """
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


def polygon_mask(points: list[float], h: int, w: int) -> np.ndarray:
    """pycocotools' rasterisation of one polygon ``[x0, y0, x1, y1, ...]``: ``[h, w]`` bool."""
    rle = mask_utils.frPyObjects([points], h, w)
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle)[:, :, 0].astype(bool)


def instance_record(*, category_id: int, visible: np.ndarray, polygon: list[float] | None = None) -> dict:
    """A COCO annotation record (without ``id``, ``image_id``) of one instance's visible ``[h, w]`` bool mask.

    The segmentation is ``polygon`` when given (its rasterisation must be ``visible``), compressed RLE
    otherwise; ``area`` and ``bbox`` (xywh) are those of the visible mask.
    """
    h, w = visible.shape
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    if polygon is not None:
        segmentation: list | dict = [polygon]
    else:
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {
        "category_id": int(category_id),
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }
