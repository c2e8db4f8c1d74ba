"""COCO-format instance segmentation data, validated before training starts.

Conventions: images are float RGB ``[3, H, W]`` tensors in [0, 1]; boxes are xyxy float32 in absolute pixels
(COCO's ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``); sizes are ``(h, w)``; labels are contiguous,
0 is background and label ``i`` (1 .. K) is the ``i``-th of the dataset's sorted category ids.

Every record is checked when the dataset is built, so that a broken record stops a run before training,
not hours into it: image files exist, their headers are readable and their size (after EXIF orientation)
matches the record; annotations name a known image and category, have a box inside the image (1 px
tolerance) and a well-formed segmentation (polygon parts of at least 3 points, RLE of the image's size).
By default every problem found is listed in one :class:`DatasetError`; ``skip_bad=True`` drops the broken
records instead and logs how many.

Not training targets (kept in :attr:`CocoDataset.coco` for evaluation): crowd regions (``iscrowd=1``) and
degenerate boxes (width or height < 1 px once clipped to the image; real COCO has a few such records, so
they are not treated as errors, only counted in ``num_degenerate`` and logged).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor

__all__ = ["CocoDataset", "DatasetError", "read_image", "image_header_size"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # problems listed in a DatasetError message; the rest are counted
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message lists the problems (file, ids, reason)."""


@dataclass(frozen=True)
class _Problem:
    image_id: object
    ann_id: object | None
    file: str | None
    reason: str
    drops_image: bool  # True: the whole image record is unusable

    def describe(self) -> str:
        where = f"image id {self.image_id}"
        if self.file is not None:
            where += f" ({self.file})"
        if self.ann_id is not None:
            where += f", annotation id {self.ann_id}"
        return f"{where}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Image reading
# --------------------------------------------------------------------------------------------------


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) from the header only (no pixel decoding; PNG reads only early chunks)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # Pillow would decode the whole PNG looking for a late eXIf chunk
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: exif_transpose will not use it either
        return 1


def image_header_size(path: str) -> tuple[int, int]:
    """``(h, w)`` of an image file as displayed (EXIF orientation applied), reading only its header."""
    with Image.open(path) as im:
        w, h = im.size
        if _orientation(im) in (5, 6, 7, 8):  # transposed or rotated by 90 degrees
            w, h = h, w
    return h, w


def _to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 array of any PIL mode. 16-bit modes ("I;16*", "I") are scaled by 65535/255
    (the maximum of a 16-bit value; "I" images with larger values by 2**31 - 1); alpha is dropped."""
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if im.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I" (32-bit integer)
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 2.0**31 - 1
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    # "1", "L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV": Pillow's conversions
    # (palette looked up; alpha dropped, not composited)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str) -> Tensor:
    """Decode an image file into a float32 RGB ``[3, H, W]`` tensor in [0, 1] with its EXIF orientation
    applied. Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted to RGB.
    Raises :class:`DatasetError` naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            arr = _to_rgb_uint8(im)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


# --------------------------------------------------------------------------------------------------
# Record validation
# --------------------------------------------------------------------------------------------------


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_segmentation(segm, h: int, w: int) -> str | None:
    """The reason ``segm`` is broken, or None."""
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation (no polygon)"
        for k, part in enumerate(segm):
            if not isinstance(part, list) or not all(_number(v) for v in part):
                return f"polygon part {k} is not a list of finite numbers"
            if len(part) % 2:
                return f"polygon part {k} has an odd number of coordinates ({len(part)})"
            if len(part) < 6:
                return f"polygon part {k} has {len(part) // 2} point(s); at least 3 are needed"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(size, (list, tuple)) or len(size) != 2 or counts is None:
            return "RLE segmentation needs 'size' [h, w] and 'counts'"
        if [int(size[0]), int(size[1])] != [h, w]:
            return f"RLE size {list(size)} does not match the image size [{h}, {w}]"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                return f"uncompressed RLE counts do not sum to h * w = {h * w}"
        elif not isinstance(counts, (str, bytes)):
            return f"RLE counts must be a list or a string, got {type(counts).__name__}"
        return None
    return f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}"


def _check_annotation(ann: dict, img: dict, known_categories: set) -> str | None:
    """The reason an annotation is broken, or None (degenerate boxes are not broken, see the module doc)."""
    h, w = img["height"], img["width"]
    if ann.get("category_id") not in known_categories:
        return f"unknown category id {ann.get('category_id')!r}"
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_number(v) for v in box):
        return f"bbox must be 4 finite numbers [x, y, w, h], got {box!r}"
    x, y, bw, bh = box
    if bw < 0 or bh < 0:
        return f"bbox {list(box)} has a negative width or height"
    tol = 1.0
    if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
        return f"bbox {list(box)} (x, y, w, h) is outside the image (w={w}, h={h})"
    if "segmentation" not in ann:
        return "no segmentation"
    return _check_segmentation(ann["segmentation"], h, w)


def _check_image_record(img: dict) -> str | None:
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return "no file_name"
    for key in ("height", "width"):
        if not isinstance(img.get(key), int) or isinstance(img.get(key), bool) or img[key] < 1:
            return f"{key} must be a positive integer, got {img.get(key)!r}"
    return None


def _check_image_file(path: str, img: dict) -> str | None:
    if not os.path.isfile(path):
        return "image file not found"
    try:
        size = image_header_size(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable image file: {e}"
    if size != (img["height"], img["width"]):
        return (
            f"image size (h, w) = {size} (after EXIF orientation) does not match the record's "
            f"({img['height']}, {img['width']})"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance annotations in COCO format.

    ``dataset[i]`` is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in [0, 1]; ``target`` holds
    ``boxes`` float32 ``[G, 4]`` (xyxy pixels, clipped to the image), ``labels`` int64 ``[G]`` (1 .. K),
    ``masks`` uint8 ``[G, H, W]`` (exactly pycocotools' ``annToMask``), ``image_id`` (int) and ``size``
    ``(h, w)`` of the returned image. Crowd regions and degenerate boxes are not in the targets.
    ``transforms(image, target) -> (image, target)`` is applied last.
    """

    def __init__(
        self,
        *,
        image_dir: str,
        annotation_file: str,
        filter_empty: bool = False,
        skip_bad: bool = False,
        transforms=None,
    ):
        self.image_dir = str(image_dir)
        self.annotation_file = str(annotation_file)
        self.transforms = transforms
        self.coco = _load_coco(self.annotation_file)

        self.category_ids: list[int] = sorted(self.coco.cats)
        self._cat_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.class_names: list[str] = ["background"] + [
            str(self.coco.cats[c].get("name", c)) for c in self.category_ids
        ]
        self.num_classes = len(self.category_ids) + 1

        problems = self._validate()
        bad_images = {p.image_id for p in problems if p.drops_image}
        bad_anns = {p.ann_id for p in problems if p.ann_id is not None}
        if problems and not skip_bad:
            raise DatasetError(self._report(problems))
        self.skipped = len(bad_images) + len(bad_anns)  # broken records (not the good annotations of
        # dropped images, which go with them)
        if problems:
            self._drop(bad_images, bad_anns)
            logger.warning(
                "%s: skipped %d broken record(s) (%d image(s), %d annotation(s)); first: %s",
                self.annotation_file,
                self.skipped,
                len(bad_images),
                self.skipped - len(bad_images),
                problems[0].describe(),
            )

        # training targets per image: non-crowd annotations with a box of at least 1 x 1 pixel
        self._targets: dict[int, list[dict]] = {}
        self.num_degenerate = 0
        for iid in self.coco.imgs:
            keep = []
            h, w = self.coco.imgs[iid]["height"], self.coco.imgs[iid]["width"]
            for ann in self.coco.imgToAnns.get(iid, []):
                if ann.get("iscrowd", 0):
                    continue
                x, y, bw, bh = ann["bbox"]
                if min(x + bw, w) - max(x, 0) < 1 or min(y + bh, h) - max(y, 0) < 1:  # clipped size
                    self.num_degenerate += 1
                    continue
                keep.append(ann)
            self._targets[iid] = keep
        if self.num_degenerate:
            logger.warning(
                "%s: %d annotation(s) with a box narrower or lower than 1 px are not training targets",
                self.annotation_file,
                self.num_degenerate,
            )

        image_ids = sorted(self.coco.imgs)
        self.filtered_empty = 0
        if filter_empty:
            kept = [i for i in image_ids if self._targets[i]]
            self.filtered_empty = len(image_ids) - len(kept)
            if self.filtered_empty:
                logger.info(
                    "%s: dropped %d image(s) without (non-crowd) annotations",
                    self.annotation_file,
                    self.filtered_empty,
                )
            image_ids = kept
        self.image_ids: list[int] = image_ids

    # ---------------------------------------------------------------------------------------------
    def _validate(self) -> list[_Problem]:
        coco = self.coco
        problems: list[_Problem] = []
        checked: list[tuple[int, str, dict]] = []
        bad_records = set()
        for iid, img in coco.imgs.items():
            reason = _check_image_record(img)
            if reason is not None:
                bad_records.add(iid)
                problems.append(_Problem(iid, None, img.get("file_name"), reason, True))
            else:
                checked.append((iid, os.path.join(self.image_dir, img["file_name"]), img))
        # header reads are I/O bound: overlap them (a no-op cost for small datasets)
        workers = min(16, max(1, len(checked) // 64))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(lambda c: _check_image_file(c[1], c[2]), checked))
        for (iid, path, _), reason in zip(checked, reasons):
            if reason is not None:
                problems.append(_Problem(iid, None, path, reason, True))

        known = set(coco.cats)
        for ann in coco.dataset.get("annotations", []):
            img = coco.imgs.get(ann.get("image_id"))
            if img is None:
                reason, file = "refers to an image id that is not in 'images'", None
            elif img["id"] in bad_records:
                continue  # reported with its image
            else:
                reason, file = _check_annotation(ann, img, known), img["file_name"]
            if reason is not None:
                path = None if file is None else os.path.join(self.image_dir, file)
                problems.append(_Problem(ann.get("image_id"), ann.get("id"), path, reason, False))
        return problems

    def _report(self, problems: list[_Problem]) -> str:
        lines = [
            f"{self.annotation_file}: {len(problems)} problem(s) found (images in {self.image_dir}); "
            "fix them, or pass skip_bad=True (data.skip_bad_records=true) to drop the broken records:"
        ]
        lines += ["  " + p.describe() for p in problems[:_MAX_LISTED]]
        if len(problems) > _MAX_LISTED:
            lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
        return "\n".join(lines)

    def _drop(self, bad_images: set, bad_anns: set) -> None:
        """Remove broken records from ``self.coco`` too, so that evaluation sees the same ground truth."""
        data = self.coco.dataset
        data["images"] = [im for im in data.get("images", []) if im.get("id") not in bad_images]
        data["annotations"] = [
            a
            for a in data.get("annotations", [])
            if a.get("id") not in bad_anns and a.get("image_id") not in bad_images
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict:
        """The COCO image record (``id``, ``file_name``, ``height``, ``width``, ...) of ``dataset[index]``."""
        return self.coco.imgs[self.image_ids[index]]

    def label_to_category_id(self, label: int) -> int:
        """Contiguous label (1 .. num_classes - 1) -> dataset category id."""
        label = int(label)
        if not 1 <= label < self.num_classes:
            raise KeyError(f"label {label} is not an object class (1 .. {self.num_classes - 1})")
        return self.category_ids[label - 1]

    def category_id_to_label(self, cid: int) -> int:
        """Dataset category id -> contiguous label (1 .. num_classes - 1)."""
        try:
            return self._cat_to_label[int(cid)]
        except KeyError:
            raise KeyError(f"unknown category id {cid}; known: {self.category_ids}") from None

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        img = self.image_info(index)
        iid = img["id"]
        path = os.path.join(self.image_dir, img["file_name"])
        try:
            image = read_image(path)
        except DatasetError as e:
            raise DatasetError(f"image id {iid}: {e}") from e
        h, w = img["height"], img["width"]
        if tuple(image.shape[-2:]) != (h, w):
            raise DatasetError(
                f"{path} (image id {iid}): decoded size {tuple(image.shape[-2:])} does not match the "
                f"record's ({h}, {w})"
            )
        anns = self._targets[iid]
        if anns:
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            boxes[:, 0::2].clamp_(0, w)
            boxes[:, 1::2].clamp_(0, h)
            boxes = boxes.float()
            labels = torch.tensor([self._cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
            rles = [self.coco.annToRLE(a) for a in anns]
            with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
                warnings.filterwarnings(
                    "ignore", message=".*__array__ implementation", category=DeprecationWarning
                )
                decoded = mask_utils.decode(rles)  # [H, W, G], Fortran order
            masks = torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))
        else:
            boxes = torch.zeros((0, 4), dtype=torch.float32)
            labels = torch.zeros((0,), dtype=torch.int64)
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": int(iid), "size": (h, w)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.annotation_file!r}, images={len(self)}, classes={self.num_classes - 1}, "
            f"skipped={self.skipped})"
        )


def _load_coco(annotation_file: str) -> COCO:
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"annotation file not found: {annotation_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(annotation_file)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{annotation_file}: not valid JSON: {e}") from e
    except (AssertionError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{annotation_file}: not a COCO annotation file ({type(e).__name__}: {e})") from e
    return coco
