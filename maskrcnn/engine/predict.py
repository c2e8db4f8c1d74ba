"""Prediction on image files: drawings and COCO-format detections written to a folder.

``predict`` writes, for each readable image, ``<output_dir>/<stem>.png`` (the image with its detections
drawn; ``<stem>_1.png`` and so on when two inputs share a stem) and, for the whole run,
``<output_dir>/predictions.json``: a JSON list of COCO results entries (``image_id`` is the image's index in
``paths``; ``category_id`` is the model's label, or the dataset category id when ``label_to_category_id``
is given; ``segmentation`` is a compressed RLE at mask threshold 0.5) with two extra fields,
``file_name`` (the input path) and, when ``class_names`` is given, ``category_name``.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from maskrcnn.data.images import read_image
from maskrcnn.engine.evaluate import _model_device, detections_to_coco, iterate_with_progress
from maskrcnn.visualize import draw_instances, to_pil_image

__all__ = ["IMAGE_EXTENSIONS", "list_images", "load_image", "predict"]

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


def _output_name(path: str, used: set[str], output_dir: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = f"{stem}.png", 0
    while name in used or os.path.abspath(os.path.join(output_dir, name)) == os.path.abspath(path):
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return name


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
) -> list[dict]:
    """Run ``model`` on image files (``paths``: a list, or a spec for :func:`list_images`), one at a time.

    Keeps detections with ``score >= score_threshold``, writes the drawings and ``predictions.json`` (see
    the module docstring) to ``output_dir`` and returns the entries written. An image that cannot be read is
    reported on stderr with its file name and skipped; the number skipped is reported at the end.
    """
    if isinstance(paths, str):
        paths = list_images(paths)
    if device is not None:
        model.to(device)
    device = _model_device(model)
    to_category = label_to_category_id if label_to_category_id is not None else int
    os.makedirs(output_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    entries: list[dict] = []
    used: set[str] = set()
    skipped = 0
    try:
        with torch.no_grad():
            items = iterate_with_progress(
                enumerate(paths), total=len(paths), desc="predict", enabled=progress
            )
            for index, path in items:
                try:
                    image = read_image(path)  # the decoding of training and evaluation
                except Exception as e:  # any decoding failure: report it and go on
                    skipped += 1
                    print(
                        f"predict: skipping {path}: cannot read the image ({e})", file=sys.stderr, flush=True
                    )
                    continue
                pil = to_pil_image(image)  # to draw on
                (out,) = model([image.to(device)])
                keep = out["scores"] >= score_threshold
                out = {k: v[keep] for k, v in out.items()}
                drawing = draw_instances(
                    pil,
                    boxes=out["boxes"],
                    labels=out["labels"],
                    scores=out["scores"],
                    masks=out.get("masks"),
                    class_names=class_names,
                )
                drawing.save(os.path.join(output_dir, _output_name(path, used, output_dir)))
                found = detections_to_coco([out], [index], label_to_category_id=to_category)
                for entry, label in zip(found, out["labels"].tolist()):
                    entry["file_name"] = path
                    if class_names is not None:
                        entry["category_name"] = (
                            class_names[label] if label < len(class_names) else str(label)
                        )
                entries.extend(found)
    finally:
        model.train(was_training)
    with open(os.path.join(output_dir, "predictions.json"), "w") as fh:
        json.dump(entries, fh)
    done = len(paths) - skipped
    message = f"predict: {done} image(s), {len(entries)} detection(s) written to {output_dir}"
    if skipped:
        message += f"; {skipped} unreadable image(s) skipped"
    print(message, file=sys.stderr, flush=True)
    return entries
