"""Prediction on image files: drawings and COCO-format detections written to a folder.

``predict`` writes, for each readable image, a drawing (the image with its detections) named after the
whole input file name, ``<output_dir>/<name>.png`` (``good.jpg`` -> ``good.jpg.png``, so ``good.jpg`` and
``good.png`` do not collide); when the inputs come from several folders, their folders below the deepest
common one are mirrored (``a/im.jpg``, ``b/im.jpg`` -> ``a/im.jpg.png``, ``b/im.jpg.png``). For the whole
run it writes ``<output_dir>/predictions.json``: a JSON list of COCO results entries (``image_id`` is the
image's index in ``paths``; ``category_id`` is the dataset category id when ``label_to_category_id`` is
given or the model's checkpoint recorded its training data's (``model.metadata``), else the model's
label; ``segmentation`` is a compressed RLE at mask threshold 0.5) with two extra fields, ``file_name``
(the input path) and, when class names are given or recorded, ``category_name``. A
keypoint model's entries hold ``keypoints`` (COCO's flat ``[x, y, 1] * K``), and its drawings show the
keypoints and the ``skeleton`` (COCO's person skeleton for 17 keypoints unless another is given).

No data is lost (:func:`check_output_dir`, run before anything is written): an output folder that holds any
input (or is an input's folder) is refused, and a file that exists is never written over unless
``overwrite=True``, which replaces only this run's own outputs (its drawings and ``predictions.json``).
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import nn

from maskrcnn.atomic import atomic_write
from maskrcnn.data.images import ImageReadError, read_image
from maskrcnn.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
from maskrcnn.engine.evaluate import _model_device, detections_to_coco, outputs_to_host
from maskrcnn.ops import device as _device
from maskrcnn.progress import iterate_with_progress
from maskrcnn.visualize import KEYPOINT_THRESHOLD, draw_instances, to_pil_image
from maskrcnn.weights import recorded_labels

__all__ = [
    "IMAGE_EXTENSIONS",
    "NoReadableImagesError",
    "OutputConflictError",
    "Predictions",
    "check_output_dir",
    "default_writers",
    "list_images",
    "load_image",
    "output_names",
    "predict",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(spec: str | Sequence[str]) -> list[str]:
    """Image paths from an image file, a folder (its image files by extension, sorted, not recursive), a
    glob pattern (matching files with an image extension, sorted; ``**`` recurses), or a list of these.
    Raises ``FileNotFoundError`` when nothing matches."""
    if not isinstance(spec, str):
        paths: list[str] = []
        for item in spec:
            paths.extend(p for p in list_images(item) if p not in paths)
        if not paths:
            raise FileNotFoundError("no images given")
        return paths
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        paths = sorted(
            os.path.join(spec, name)
            for name in os.listdir(spec)
            if _is_image_name(name) and os.path.isfile(os.path.join(spec, name))
        )
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {spec!r}")
        return paths
    paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and _is_image_name(p))
    if not paths:
        raise FileNotFoundError(
            f"no images match {spec!r} (expected an image file, a folder of images or a glob pattern)"
        )
    return paths


def load_image(path: str) -> Image.Image:
    """An 8-bit RGB PIL image, upright: :func:`maskrcnn.data.images.read_image` (the decoding of training
    and evaluation) as PIL."""
    return to_pil_image(read_image(path))


class OutputConflictError(ValueError):
    """Writing the predictions would overwrite an input or an existing file; nothing was written."""


class NoReadableImagesError(ValueError):
    """None of the input images could be read; nothing was written."""


class Predictions(list):
    """The entries :func:`predict` wrote (a list), with ``read`` and ``unreadable``: the input paths read
    and those that could not be."""

    def __init__(self, entries=(), *, read=(), unreadable=()):
        super().__init__(entries)
        self.read, self.unreadable = list(read), list(unreadable)


def output_names(paths: Sequence[str]) -> list[str]:
    """The drawing of each input, relative to the output folder: the input's file name plus ``.png``, under
    the input's folder relative to the deepest folder common to all inputs (unique for distinct inputs)."""
    absolute = [os.path.abspath(p) for p in paths]
    if not absolute:
        return []
    base = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [os.path.relpath(p, base) + ".png" for p in absolute]


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(paths: Sequence[str], output_dir: str, *, overwrite: bool = False) -> list[str]:
    """Where :func:`predict` will write (the drawings, then ``predictions.json``), after checking that it
    cannot lose data: raises :class:`OutputConflictError` when an input lies inside ``output_dir`` (or is
    one of its files), and, unless ``overwrite``, when any of those files exists already. Writes nothing."""
    out = os.path.realpath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputConflictError(f"output folder {output_dir} is a file")
    for path in paths:
        if _inside(os.path.realpath(path), out):
            raise OutputConflictError(
                f"refusing to write predictions to {output_dir}: it holds the input {path}; "
                "choose an output folder outside the input folders"
            )
    targets = [os.path.join(output_dir, name) for name in output_names(paths)]
    targets.append(os.path.join(output_dir, "predictions.json"))
    for target in dict.fromkeys(targets):
        if os.path.isdir(target):
            raise OutputConflictError(f"{target} is a folder; choose another output folder")
        if os.path.lexists(target) and not overwrite:
            raise OutputConflictError(
                f"{target} exists (an earlier run?); choose another output folder, or overwrite it "
                "(--overwrite, overwrite=True: replaces this run's drawings and predictions.json only)"
            )
    return targets


#: Images decoded ahead of the model, at most.
_READ_AHEAD = 2


def default_writers(device: torch.device) -> int:
    """Threads that draw and write predictions: 1 beside a model on the CPU (which has the cores busy); beside
    a device that runs ahead of the host (:func:`maskrcnn.ops.device.host_reads_stall`: a GPU), up to 4,
    leaving the host a core."""
    if not _device.host_reads_stall(device):
        return 1
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _read(path: str):
    """The image (float ``[3, H, W]``), or the :class:`ImageReadError` that names the file."""
    try:
        return read_image(path)  # the decoding of training and evaluation
    except ImageReadError as e:
        return e


def _draw_and_write(
    out: dict,
    *,
    image,
    index: int,
    path: str,
    drawing: str,
    class_names,
    to_category,
    skeleton,
    keypoint_threshold,
) -> list[dict]:
    """Draws one image's detections (CPU tensors) into ``drawing`` (atomically) and returns its entries."""
    kps = out.get("keypoints")
    lines = skeleton
    if lines is None and kps is not None and kps.shape[1] == len(COCO_PERSON_KEYPOINT_NAMES):
        lines = COCO_PERSON_SKELETON
    picture = draw_instances(
        to_pil_image(image),
        boxes=out["boxes"],
        labels=out["labels"],
        scores=out["scores"],
        masks=out.get("masks"),
        class_names=class_names,
        keypoints=kps,
        keypoint_scores=out.get("keypoints_scores") if kps is not None else None,
        skeleton=lines,
        keypoint_threshold=keypoint_threshold,
    )
    os.makedirs(os.path.dirname(drawing), exist_ok=True)
    with atomic_write(drawing, "wb") as fh:
        picture.save(fh, format="PNG")
    found = detections_to_coco([out], [index], label_to_category_id=to_category)
    for entry, label in zip(found, out["labels"].tolist()):
        entry["file_name"] = path
        if class_names is not None:
            entry["category_name"] = class_names[label] if label < len(class_names) else str(label)
    return found


def predict(
    model: nn.Module,
    paths: str | Sequence[str],
    *,
    output_dir: str,
    score_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
    label_to_category_id: Callable[[int], int] | Mapping[int, int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    skeleton: Sequence[Sequence[int]] | None = None,
    keypoint_threshold: float = KEYPOINT_THRESHOLD,
    writers: int | None = None,
) -> Predictions:
    """Run ``model`` on image files (``paths``: a list, or a spec for :func:`list_images`), one at a time.

    Keeps detections with ``score >= score_threshold``, writes the drawings and ``predictions.json`` (see
    the module docstring) to ``output_dir`` and returns the entries written (:class:`Predictions`). First
    :func:`check_output_dir` (``overwrite``) refuses an output that could overwrite an input or an
    existing file. An image that cannot be read is reported on stderr with its file name and skipped, and
    the number skipped is reported at the end; when none can be read, :class:`NoReadableImagesError` is
    raised and nothing is written.

    The drawing, encoding and writing of each image runs in ``writers`` threads (:func:`default_writers`
    when None), beside the model and a thread that decodes the next images: the outputs are the same, in
    the same order, as one image after the other.

    Keypoints (a model that outputs ``keypoints``) are drawn where their ``keypoints_scores`` exceed
    ``keypoint_threshold``, joined by ``skeleton`` (1-based pairs, e.g. a ``CocoDataset``'s ``skeleton``;
    ``None``: COCO's person skeleton when there are 17 keypoints, no lines otherwise).

    ``class_names``, ``label_to_category_id`` and ``skeleton`` default to what the model's checkpoint
    recorded of its training data (``model.metadata``: the dataset's names, its category ids, so that
    ``category_id`` is the dataset's and not the contiguous label, and its skeleton); a model without
    metadata (torchvision's weights, older checkpoints) gives labels as category ids and no names.
    """
    if isinstance(paths, str):
        paths = list_images(paths)
    *drawings, json_path = check_output_dir(paths, output_dir, overwrite=overwrite)
    drawing_of = dict(zip(paths, drawings))
    if device is not None:
        model.to(device)
    device = _model_device(model)
    recorded_names, recorded_ids = recorded_labels(model)
    class_names = recorded_names if class_names is None else class_names
    to_category = recorded_ids if label_to_category_id is None else label_to_category_id
    if skeleton is None:
        skeleton = (getattr(model, "metadata", None) or {}).get("skeleton")
    write = functools.partial(
        _draw_and_write,
        class_names=class_names,
        to_category=to_category,
        skeleton=skeleton,
        keypoint_threshold=keypoint_threshold,
    )
    was_training = model.training
    model.eval()
    entries: list[dict] = []
    read: list[str] = []
    skipped = 0
    # Three stages overlap: a thread decodes the next images, the model runs here, ``writers`` threads draw,
    # encode and write the previous ones (PIL, numpy and zlib run part of that work outside the GIL). A few
    # images wait at each side, so memory stays bounded; entries keep the inputs' order.
    writers = default_writers(device) if writers is None else int(writers)
    if writers < 1:
        raise ValueError(f"writers must be >= 1, got {writers}")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-read")
    writer = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="predict-write")
    reads: collections.deque = collections.deque()
    writes: collections.deque = collections.deque()
    pending = iter(enumerate(paths))

    def finish_oldest_write() -> None:
        path, future = writes.popleft()
        entries.extend(future.result())  # an error while writing stops the run here
        read.append(path)

    try:
        with torch.no_grad():
            bar = iterate_with_progress(range(len(paths)), total=len(paths), desc="predict", enabled=progress)
            for _ in bar:
                while len(reads) <= _READ_AHEAD and (item := next(pending, None)) is not None:
                    reads.append((*item, reader.submit(_read, item[1])))
                index, path, future = reads.popleft()
                image = future.result()
                if isinstance(image, ImageReadError):  # the file is named in the message: report it, go on
                    skipped += 1
                    print(f"predict: skipping unreadable image {image}", file=sys.stderr, flush=True)
                    continue
                (out,) = model([image.to(device)])
                out = outputs_to_host(out, keep=out["scores"] >= score_threshold)
                writes.append(
                    (
                        path,
                        writer.submit(
                            write, out, image=image, index=index, path=path, drawing=drawing_of[path]
                        ),
                    )
                )
                while len(writes) > writers:
                    finish_oldest_write()
            while writes:
                finish_oldest_write()
    finally:
        for pool in (reader, writer):  # an interruption: drop what has not started, finish what has
            pool.shutdown(wait=True, cancel_futures=True)
        model.train(was_training)
    done = set(read)
    unreadable = [p for p in dict.fromkeys(paths) if p not in done]
    if not read:
        raise NoReadableImagesError(
            f"none of the {len(paths)} input image(s) could be read (first: {', '.join(unreadable[:3])}); "
            "nothing written"
        )
    with atomic_write(json_path) as fh:
        json.dump(entries, fh)
    message = f"predict: {len(read)} image(s), {len(entries)} detection(s) written to {output_dir}"
    if skipped:
        message += f"; {skipped} unreadable image(s) skipped"
    print(message, file=sys.stderr, flush=True)
    return Predictions(entries, read=read, unreadable=unreadable)
