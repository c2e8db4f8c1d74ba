"""COCO-format instance segmentation data, validated before training starts.

Conventions: images are float RGB ``[3, H, W]`` tensors in [0, 1], read by
:func:`maskrcnn.data.images.read_image` (the one decoding path; sizes after EXIF orientation); boxes are
xyxy float32 in absolute pixels (COCO's ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``); sizes are
``(h, w)``; labels are contiguous, 0 is background and label ``i`` (1 .. K) is the ``i``-th of the dataset's
sorted category ids.

Everything is checked when the dataset is built, so that a broken record stops a run before training, not
hours into it:

- the file as a whole (always errors, ``skip_bad`` or not: the data set is ambiguous or empty): duplicate
  image ids, duplicate annotation ids, two image records naming the same file, no images, no annotations;
- every image file is decoded completely (:func:`maskrcnn.data.images.check_images`: in parallel, cached by
  path, size and mtime outside the data folder) and its upright size must equal the record's
  ``(height, width)``;
- annotations name a known image and category, have a box inside the image (1 px tolerance) and a
  well-formed segmentation (polygon parts of at least 3 points, RLE of the image's size);
- person keypoints (COCO's ``person_keypoints_*.json``: categories that declare ``keypoints`` names and a
  ``skeleton``): every category declaring keypoints must declare the same list (a file-level error
  otherwise), and an annotation of such a category needs ``keypoints``, a flat ``[x, y, v] * K`` list of
  finite numbers with ``v`` in {0, 1, 2} and, when given, ``num_keypoints`` equal to the number of ``v > 0``
  (filled in when missing: COCO's keypoint evaluation needs it).

By default every record problem found is listed in one :class:`DatasetError`; ``skip_bad=True`` drops the
broken records instead and logs how many. A dataset left with no image is an error either way.

Keypoints (see :mod:`maskrcnn.data.keypoints` for the conventions): when the categories declare keypoints,
every target also holds ``keypoints`` float32 ``[G, K, 3]`` = ``(x, y, v)`` in the image's pixels as COCO
stores them, with ``v = 0`` keypoints ``(0, 0, 0)``; an annotation with ``num_keypoints == 0`` stays a box
and mask target with all ``v = 0`` (an instance of a category without keypoints, too). The dataset exposes
``keypoint_names``, ``skeleton`` (1-based pairs) and ``flip_map`` (the left/right permutation for
:func:`maskrcnn.data.transforms.hflip`, from :func:`maskrcnn.ops.keypoints.keypoint_flip_map`; ``None``
without keypoints).

Not training targets (kept in :attr:`CocoDataset.coco` for evaluation): crowd regions (``iscrowd=1``) and
degenerate boxes (width or height < 1 px once clipped to the image; real COCO has a few such records, so
they are not treated as errors, only counted in ``num_degenerate`` and logged).

An image that passed the check but cannot be read later (changed or removed during a run) does not stop
the run: ``dataset[i]`` logs a warning naming the file (once per file and process), counts it in
``read_failures`` and returns the next readable record ``i + 1, i + 2, ...`` (wrapping around); only when
no image can be read at all is it an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from torch import Tensor

from maskrcnn.data.images import ImageReadError, check_images, read_image
from maskrcnn.ops.keypoints import keypoint_flip_map

__all__ = ["CocoDataset", "DatasetError"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # problems listed in a DatasetError message; the rest are counted


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


def _check_keypoints(ann: dict, names: Sequence[str]) -> str | None:
    """The reason the ``keypoints`` of an annotation of a keypoint category are broken, or None."""
    k = len(names)
    kps = ann.get("keypoints")
    if not isinstance(kps, (list, tuple)):
        return f"no keypoints list (its category declares {k} keypoints: a flat [x, y, v] * {k} list)"
    if len(kps) != 3 * k:
        return f"keypoints has {len(kps)} values; expected 3 * {k} = {3 * k} ([x, y, v] per keypoint)"
    for i in range(k):
        x, y, v = kps[3 * i : 3 * i + 3]
        if not (_number(x) and _number(y)):
            return f"keypoint {i} ({names[i]}) has non-finite or non-numeric coordinates ({x!r}, {y!r})"
        if not _number(v) or v not in (0, 1, 2):
            return f"keypoint {i} ({names[i]}) has visibility {v!r}; expected 0 (not labelled), 1 or 2"
    labelled = sum(1 for v in kps[2::3] if v > 0)
    n = ann.get("num_keypoints")
    if n is not None and (not _number(n) or n != labelled):
        return f"num_keypoints is {n!r} but {labelled} keypoint(s) have v > 0"
    return None


def _check_annotation(
    ann: dict, img: dict, known_categories: set, keypoint_names: dict | None = None
) -> str | None:
    """The reason an annotation is broken, or None (degenerate boxes are not broken, see the module doc).
    ``keypoint_names``: ``{category id: names}`` of the categories that declare keypoints."""
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
    reason = _check_segmentation(ann["segmentation"], h, w)
    if reason is None and keypoint_names and ann["category_id"] in keypoint_names:
        reason = _check_keypoints(ann, keypoint_names[ann["category_id"]])
    return reason


def _check_image_record(img: dict) -> str | None:
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return "no file_name"
    for key in ("height", "width"):
        if not isinstance(img.get(key), int) or isinstance(img.get(key), bool) or img[key] < 1:
            return f"{key} must be a positive integer, got {img.get(key)!r}"
    return None


def _duplicates(values) -> list[tuple[object, int]]:
    """``(value, count)`` of each value seen more than once, in order of first appearance."""
    counts = Counter(values)
    return [(v, n) for v, n in counts.items() if n > 1]


def _listed(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_structure(annotation_file: str, image_dir: str, data: dict) -> None:
    """Raise :class:`DatasetError` for a file that is ambiguous (duplicate ids, two records of one image
    file) or empty: never skippable, no record of it can be trusted to be the right one."""
    images, anns = data.get("images") or [], data.get("annotations") or []
    if not images:
        raise DatasetError(f"{annotation_file}: no image records ('images' is empty or missing)")
    if not anns:
        raise DatasetError(
            f"{annotation_file}: no annotations ('annotations' is empty or missing): nothing to train or "
            "evaluate on"
        )
    problems = []
    dup = _duplicates(im.get("id") for im in images)
    if dup:
        problems.append(
            f"duplicate image id(s) {_listed([f'{v!r} ({n} records)' for v, n in dup])}: the data set is "
            "ambiguous (annotations cannot tell which record they belong to); give each image a unique id"
        )
    dup = _duplicates(a.get("id") for a in anns)
    if dup:
        problems.append(
            f"duplicate annotation id(s) {_listed([f'{v!r} ({n} records)' for v, n in dup])}: the data set "
            "is ambiguous (evaluation matches annotations by id); give each annotation a unique id"
        )
    by_file: dict[str, list] = {}
    for im in images:
        if isinstance(im.get("file_name"), str) and im["file_name"]:
            by_file.setdefault(os.path.normpath(im["file_name"]), []).append(im.get("id"))
    dup_files = [(f, ids) for f, ids in by_file.items() if len(ids) > 1]
    if dup_files:
        listed = _listed(
            [f"{os.path.join(image_dir, f)} (image ids {', '.join(map(repr, ids))})" for f, ids in dup_files]
        )
        problems.append(
            f"several image records name the same file: {listed}: the data set is ambiguous (one image, two "
            "sets of annotations); merge the records"
        )
    if len(problems) == 1:
        raise DatasetError(f"{annotation_file}: {problems[0]}")
    if problems:
        raise DatasetError(
            f"{annotation_file}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)
        )


def _keypoint_spec(annotation_file: str, cats: dict) -> tuple[tuple[str, ...], tuple, dict]:
    """``(names, skeleton, {category id: names})`` of the categories that declare ``keypoints`` (empty
    without). Raises :class:`DatasetError` (never skippable: every target depends on it) when the
    declarations are malformed or two categories declare different keypoint lists."""
    declared = {cid: c["keypoints"] for cid, c in sorted(cats.items()) if c.get("keypoints")}
    if not declared:
        return (), (), {}
    for cid, names in declared.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DatasetError(
                f"{annotation_file}: category id {cid}: 'keypoints' must be a list of keypoint names, got "
                f"{names!r}"
            )
    first, names = next(iter(declared.items()))
    for cid, other in declared.items():
        if other != names:
            raise DatasetError(
                f"{annotation_file}: categories {first} ({cats[first].get('name')!r}) and {cid} "
                f"({cats[cid].get('name')!r}) declare different keypoint lists ({len(names)}: {names[:3]}... "
                f"vs {len(other)}: {other[:3]}...); one dataset has one keypoint list"
            )
    try:
        keypoint_flip_map(names)
    except ValueError as e:
        raise DatasetError(f"{annotation_file}: category id {first}: {e}") from None
    skeleton = cats[first].get("skeleton") or []
    k = len(names)
    if not isinstance(skeleton, list) or not all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(_number(i) and int(i) == i and 1 <= i <= k for i in p)
        for p in skeleton
    ):
        raise DatasetError(
            f"{annotation_file}: category id {first}: 'skeleton' must be a list of [i, j] pairs of 1-based "
            f"keypoint indices in 1 .. {k}, got {skeleton!r}"
        )
    return tuple(names), tuple((int(a), int(b)) for a, b in skeleton), {cid: names for cid in declared}


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance annotations in COCO format.

    ``dataset[i]`` is ``(image, target)``: ``image`` float32 ``[3, H, W]`` in [0, 1]; ``target`` holds
    ``boxes`` float32 ``[G, 4]`` (xyxy pixels, clipped to the image), ``labels`` int64 ``[G]`` (1 .. K),
    ``masks`` uint8 ``[G, H, W]`` (exactly pycocotools' ``annToMask``), ``image_id`` (int) and ``size``
    ``(h, w)`` of the returned image, and ``keypoints`` float32 ``[G, K, 3]`` when the categories declare
    keypoints (see the module docstring). Crowd regions and degenerate boxes are not in the targets.
    ``transforms(image, target) -> (image, target)`` is applied last. When the image of record ``i`` cannot
    be read any more, ``dataset[i]`` is the next readable record (see the module docstring).

    ``filter_empty`` drops images without training targets; ``min_keypoints_per_image`` (default 0: keep
    all) drops images whose training targets have fewer labelled (``v > 0``) keypoints in all. torchvision's
    detection reference trains keypoint models on images with at least 10 (its
    ``_coco_remove_images_without_annotations``), detectron2 with at least 1
    (``DATALOADER.MIN_KEYPOINTS_PER_IMAGE``); an image kept with none trains only the box (and mask) heads.
    Images dropped either way are counted in ``filtered_empty`` and ``filtered_few_keypoints``.
    """

    def __init__(
        self,
        *,
        image_dir: str,
        annotation_file: str,
        filter_empty: bool = False,
        skip_bad: bool = False,
        min_keypoints_per_image: int = 0,
        transforms=None,
    ):
        self.image_dir = str(image_dir)
        self.annotation_file = str(annotation_file)
        self.transforms = transforms
        self.coco = _load_coco(self.annotation_file)
        _check_structure(self.annotation_file, self.image_dir, self.coco.dataset)

        self.category_ids: list[int] = sorted(self.coco.cats)
        self._cat_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.class_names: list[str] = ["background"] + [
            str(self.coco.cats[c].get("name", c)) for c in self.category_ids
        ]
        self.num_classes = len(self.category_ids) + 1
        names, skeleton, self._keypoint_names = _keypoint_spec(self.annotation_file, self.coco.cats)
        self.keypoint_names: tuple[str, ...] = names  # () without keypoints
        self.skeleton: tuple[tuple[int, int], ...] = skeleton  # 1-based pairs, COCO's
        self.num_keypoints = len(names)
        self.flip_map: tuple[int, ...] | None = tuple(keypoint_flip_map(names)) if names else None
        if min_keypoints_per_image and not names:
            raise ValueError(
                f"min_keypoints_per_image={min_keypoints_per_image} but {self.annotation_file} declares no "
                "keypoints (no category has a 'keypoints' list)"
            )

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
        for ann in self.coco.dataset.get("annotations", []):  # COCOeval's keypoint task reads it
            if ann["category_id"] in self._keypoint_names and "num_keypoints" not in ann:
                ann["num_keypoints"] = sum(1 for v in ann["keypoints"][2::3] if v > 0)
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
        self.filtered_few_keypoints = 0
        if min_keypoints_per_image > 0:
            kept = [i for i in image_ids if self._labelled_keypoints(i) >= min_keypoints_per_image]
            self.filtered_few_keypoints = len(image_ids) - len(kept)
            if self.filtered_few_keypoints:
                logger.info(
                    "%s: dropped %d image(s) with fewer than %d labelled keypoints (min_keypoints_per_image)",
                    self.annotation_file,
                    self.filtered_few_keypoints,
                    min_keypoints_per_image,
                )
            image_ids = kept
        if not image_ids:
            few = (
                f", {self.filtered_few_keypoints} with fewer than {min_keypoints_per_image} labelled "
                "keypoints"
                if min_keypoints_per_image > 0
                else ""
            )
            raise DatasetError(
                f"{self.annotation_file}: no usable image left ({len(self.coco.imgs) + len(bad_images)} "
                f"record(s): {len(bad_images)} broken, {self.filtered_empty} without annotations"
                f"{' dropped by filter_empty' if filter_empty else ''}{few})"
            )
        self.image_ids: list[int] = image_ids
        self.read_failures = 0  # reads that failed after the check, in this process (see the module doc)
        self._warned: set[str] = set()

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
        # decode every file completely (cached across runs): a truncated file is found now, not mid-run
        sizes = check_images([path for _, path, _ in checked])
        for iid, path, img in checked:
            size = sizes[path]
            if isinstance(size, ImageReadError):
                problems.append(_Problem(iid, None, path, size.reason, True))
            elif size != (img["height"], img["width"]):
                reason = (
                    f"decoded image size (h, w) = {size} (after EXIF orientation) does not match the "
                    f"record's ({img['height']}, {img['width']})"
                )
                problems.append(_Problem(iid, None, path, reason, True))

        known = set(coco.cats)
        for ann in coco.dataset.get("annotations", []):
            img = coco.imgs.get(ann.get("image_id"))
            if img is None:
                reason, file = "refers to an image id that is not in 'images'", None
            elif img["id"] in bad_records:
                continue  # reported with its image
            else:
                reason, file = _check_annotation(ann, img, known, self._keypoint_names), img["file_name"]
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

    def _labelled_keypoints(self, image_id: int) -> int:
        """Keypoints with ``v > 0`` in the training targets of image ``image_id``."""
        return sum(
            sum(1 for v in a["keypoints"][2::3] if v > 0)
            for a in self._targets[image_id]
            if a["category_id"] in self._keypoint_names
        )

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict:
        """The COCO image record (``id``, ``file_name``, ``height``, ``width``, ...) of ``dataset[index]``."""
        return self.coco.imgs[self.image_ids[index]]

    def metadata(self) -> dict:
        """What a model trained on this data keeps about its labels (``MaskRCNN.metadata``, saved in its
        checkpoints): ``class_names``, ``category_ids`` and, with keypoints, ``keypoint_names`` and
        ``skeleton``."""
        meta = {"class_names": list(self.class_names), "category_ids": list(self.category_ids)}
        if self.keypoint_names:
            meta["keypoint_names"] = list(self.keypoint_names)
            meta["skeleton"] = [list(pair) for pair in self.skeleton]
        return meta

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

    def _read(self, index: int) -> Tensor:
        """The image of ``dataset[index]``; :class:`ImageReadError` also when its size is not the record's."""
        img = self.image_info(index)
        path = os.path.join(self.image_dir, img["file_name"])
        image = read_image(path)
        if tuple(image.shape[-2:]) != (img["height"], img["width"]):
            raise ImageReadError(
                path,
                f"decoded size {tuple(image.shape[-2:])} does not match the record's "
                f"({img['height']}, {img['width']}) (the file changed after the check)",
            )
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        first_error = None
        for attempt in range(n):  # index, index + 1, ... (wrapping): deterministic, never endless
            i = (index + attempt) % n
            try:
                image = self._read(i)
            except ImageReadError as e:
                self.read_failures += 1
                first_error = first_error or e
                if e.path not in self._warned:
                    self._warned.add(e.path)
                    logger.warning(
                        "image id %s: %s; it passed the check when the dataset was built, so the file "
                        "changed; using the next record instead (%d failed read(s) in this process)",
                        self.image_info(i)["id"],
                        e,
                        self.read_failures,
                    )
                continue
            return self._sample(i, image)
        raise DatasetError(
            f"{self.annotation_file}: none of the {n} images can be read any more (first: {first_error}); "
            f"were the files in {self.image_dir} moved or removed?"
        )

    def _sample(self, index: int, image: Tensor) -> tuple[Tensor, dict]:
        img = self.image_info(index)
        iid = img["id"]
        h, w = img["height"], img["width"]
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
        if self.num_keypoints:
            target["keypoints"] = self._keypoints(anns)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _keypoints(self, anns: list[dict]) -> Tensor:
        """``[G, K, 3]`` float32 of ``anns``: ``v = 0`` keypoints, and all of an annotation whose category has
        no keypoints, are ``(0, 0, 0)``."""
        k = self.num_keypoints
        zeros = [0.0] * (3 * k)
        rows = [a["keypoints"] if a["category_id"] in self._keypoint_names else zeros for a in anns]
        kps = torch.tensor(rows, dtype=torch.float32).reshape(len(anns), k, 3)
        return torch.where(kps[..., 2:] > 0, kps, torch.zeros(()))

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
