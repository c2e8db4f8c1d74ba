"""COCO evaluation: model outputs as COCO results entries, pycocotools scoring, and the inference loop.

Metrics are pycocotools' ``COCOeval`` numbers, unchanged: fractions in [0, 1], ``-1`` where COCO leaves a
value undefined (no ground truth of that size, say). Each task is scored on its own copy of the results:
box AP without the masks, mask AP without the boxes, so that COCO's small/medium/large split uses the
mask area for masks (``loadRes`` would otherwise take the box area of an entry that has both).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from maskrcnn.atomic import atomic_write
from maskrcnn.progress import iterate_with_progress

__all__ = ["STAT_NAMES", "detections_to_coco", "coco_evaluate", "evaluate", "format_metrics_table"]

#: Names of ``COCOeval.stats`` for boxes and masks, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# --------------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# --------------------------------------------------------------------------------------------------


def encode_masks(masks: Tensor, threshold: float = 0.5) -> list[dict]:
    """Compressed RLEs (``counts`` as ``str``) of ``masks >= threshold`` (``[N, 1, H, W]`` or ``[N, H, W]``,
    probabilities or bool), encoded in one pycocotools call."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.shape[0] == 0:
        return []
    binary = masks if masks.dtype == torch.bool else masks >= threshold
    # [N, W, H] C-contiguous is [H, W, N] Fortran-ordered after .transpose(2, 1, 0), the layout
    # pycocotools wants; the transpose runs on the masks' device, before the copy to the host.
    hwn = binary.transpose(1, 2).to(torch.uint8).contiguous().cpu().numpy().transpose(2, 1, 0)
    rles = mask_utils.encode(hwn)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    outputs: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    *,
    label_to_category_id: Callable[[int], int] | Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict]:
    """COCO results entries for per-image model outputs.

    Each detection gives ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
    ``"segmentation"`` (compressed RLE of ``mask >= mask_threshold``, JSON-ready) when the output has
    ``masks``. ``label_to_category_id`` maps a contiguous label to the dataset's category id (a callable
    such as ``CocoDataset.label_to_category_id``, or a mapping).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs but {len(image_ids)} image ids")
    to_category = label_to_category_id if callable(label_to_category_id) else label_to_category_id.__getitem__
    results: list[dict] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach()
        if boxes.shape[0] == 0:
            continue
        xywh = boxes.to(device="cpu", dtype=torch.float64)
        xywh[:, 2:] -= xywh[:, :2]
        labels = out["labels"].tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        categories = {label: int(to_category(label)) for label in set(labels)}
        rles = encode_masks(out["masks"].detach(), mask_threshold) if "masks" in out else None
        image_id = int(image_id)
        for i, (box, label, score) in enumerate(zip(xywh.tolist(), labels, scores)):
            entry = {"image_id": image_id, "category_id": categories[label], "bbox": box, "score": score}
            if rles is not None:
                entry["segmentation"] = rles[i]
            results.append(entry)
    return results


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (``loadRes`` cannot take an empty list)."""
    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO, results: list[dict], iou_type: str, *, image_ids: Iterable[int] | None = None
) -> dict:
    """Score COCO results entries against ``coco_gt`` with pycocotools' ``COCOeval``.

    ``iou_type`` is ``"bbox"`` or ``"segm"``; ``image_ids`` restricts the evaluation (default: every image
    of ``coco_gt``; images without detections count as misses). Returns the twelve ``COCOeval.stats``
    under :data:`STAT_NAMES`, ``per_category`` ``{category name: AP}`` (AP@[.5:.95], all areas, 100
    detections; ``None`` for a category without ground truth in the evaluated images) and ``summary``, the
    text ``COCOeval.summarize`` prints. Crowd regions are handled by ``COCOeval`` (detections on them are
    ignored). ``results`` is not modified. No results give zeros (``-1`` where COCO has no ground truth).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    dets = [{k: v for k, v in r.items() if k != drop} for r in results]  # loadRes writes into the entries
    unknown = {r["image_id"] for r in results} - set(coco_gt.imgs)
    if unknown:
        raise ValueError(
            f"results for {len(unknown)} image id(s) not in the ground truth, e.g. {min(unknown)}"
        )
    if iou_type == "segm" and any("segmentation" not in d for d in dets):
        raise ValueError("segm evaluation needs a 'segmentation' in every result entry")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.summarize()
    metrics: dict = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # [iou thresholds, recall points, categories, areas, max dets]
    per_category = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_category[coco_gt.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else None
    metrics["per_category"] = per_category
    metrics["summary"] = text.getvalue()
    return metrics


# --------------------------------------------------------------------------------------------------
# Inference over a dataset
# --------------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    output_dir: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Run ``model`` over a ``CocoDataset`` and score it: ``{"bbox": metrics, "segm": metrics}`` (no
    ``"segm"`` for a model without masks), each as :func:`coco_evaluate` returns it.

    Under ``torch.distributed`` every process runs its shard and the detections are gathered on rank 0,
    which scores them and writes ``output_dir/coco_results.json`` (the detections, COCO results format)
    and ``output_dir/metrics.json``; every rank returns the same metrics. The model runs in eval mode
    under ``torch.no_grad()`` on ``device`` (default: where its parameters are) and gets its training
    mode back afterwards. The dataset must give images at their annotated size (the model resizes).
    """
    from maskrcnn.data.loader import build_test_loader

    rank, world_size = _dist()
    if device is not None:
        model.to(device)
    device = _model_device(model)
    with_masks = bool(_unwrap(model).config.roi_heads.mask)
    loader = build_test_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size
    )
    try:
        total = len(loader)
    except TypeError:
        total = None

    per_image: dict[int, list[dict]] = {}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            batches = iterate_with_progress(
                loader, total=total, desc="evaluate", enabled=progress and rank == 0
            )
            for images, targets in batches:
                outputs = model([im.to(device, non_blocking=True) for im in images])
                for image, target, out in zip(images, targets, outputs):
                    image_id = int(target["image_id"])
                    info = dataset.coco.imgs[image_id]
                    if tuple(image.shape[-2:]) != (info["height"], info["width"]):
                        raise ValueError(
                            f"image id {image_id}: the dataset gives a {tuple(image.shape[-2:])} image but "
                            f"its COCO record says ({info['height']}, {info['width']}); evaluate on images "
                            "at their original size (no resizing transforms: the model resizes itself)"
                        )
                    per_image[image_id] = detections_to_coco(
                        [out], [image_id], label_to_category_id=dataset.label_to_category_id
                    )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    local_images = len(per_image)

    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(per_image, parts, dst=0)
        if rank == 0:
            per_image = {k: v for part in parts for k, v in part.items()}

    metrics: dict = {}
    if rank == 0:
        image_ids = [int(i) for i in dataset.image_ids]
        missing = set(image_ids) - set(per_image)
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(image_ids)} images got no inference result (e.g. image id "
                f"{min(missing)}); scoring the other {len(image_ids) - len(missing)}",
                stacklevel=2,
            )
            image_ids = [i for i in image_ids if i in per_image]
        results = [entry for i in image_ids for entry in per_image[i]]
        if progress:
            print(
                f"evaluate: {len(image_ids)} images, {len(results)} detections, "
                f"{seconds:.1f}s inference ({seconds / max(local_images, 1):.3f}s per image on rank 0)",
                file=sys.stderr,
                flush=True,
            )
        metrics["bbox"] = coco_evaluate(dataset.coco, results, "bbox", image_ids=image_ids)
        if with_masks:
            metrics["segm"] = coco_evaluate(dataset.coco, results, "segm", image_ids=image_ids)
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            with atomic_write(os.path.join(output_dir, "coco_results.json")) as fh:
                json.dump(results, fh)
            with atomic_write(os.path.join(output_dir, "metrics.json")) as fh:
                json.dump(metrics, fh, indent=2)
    if world_size > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "-" if value is None or value < 0 else f"{100 * value:.1f}"


def format_metrics_table(metrics: Mapping[str, Mapping], class_names: Sequence[str] | None = None) -> str:
    """A plain-text table of ``evaluate``'s metrics (in percent): the COCO summary per task, then the
    per-category AP, listed in ``class_names`` order (index 0, the background, skipped) when given."""
    tasks = [t for t in ("bbox", "segm") if t in metrics]
    if not tasks:
        return "(no metrics)"
    lines = [f"{'':6}" + "".join(f"{name:>7}" for name in STAT_NAMES)]
    for task in tasks:
        lines.append(f"{task:6}" + "".join(f"{_pct(metrics[task].get(name)):>7}" for name in STAT_NAMES))
    names = list(class_names[1:]) if class_names is not None else list(metrics[tasks[0]]["per_category"])
    if names:
        width = max(12, max(len(n) for n in names))
        header = f"{'category':<{width}}" + "".join(f"{t + ' AP':>9}" for t in tasks)
        cells = [
            f"{name:<{width}}" + "".join(f"{_pct(metrics[t]['per_category'].get(name)):>9}" for t in tasks)
            for name in names
        ]
        columns = 3 if len(cells) > 12 else 1
        rows = -(-len(cells) // columns)
        lines += ["", "   ".join([header] * min(columns, len(cells)))]
        for r in range(rows):
            lines.append("   ".join(cells[c * rows + r] for c in range(columns) if c * rows + r < len(cells)))
    return "\n".join(lines)
