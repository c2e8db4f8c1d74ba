"""COCO evaluation: model outputs as COCO results entries, pycocotools scoring, and the inference loop.

Metrics are pycocotools' ``COCOeval`` numbers, unchanged: fractions in [0, 1], ``-1`` where COCO leaves a
value undefined (no ground truth of that size, say). Each task is scored on its own copy of the results:
box AP without the masks, mask AP without the boxes, so that COCO's small/medium/large split uses the
mask area for masks (``loadRes`` would otherwise take the box area of an entry that has both).

Keypoints (iou type ``"keypoints"``, object keypoint similarity): scored when the ground truth has
categories that declare ``keypoints`` and the model predicts them, on entries holding only the keypoints
(so that, as in COCO's own keypoint results files, ``loadRes`` takes a detection's area from its keypoints'
extent), over the keypoint categories only. The OKS sigmas are COCO's for its 17 person keypoints; other
keypoint sets need their own (``data.keypoint_oks_sigmas``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from maskrcnn.atomic import atomic_write
from maskrcnn.ops import device as _device
from maskrcnn.progress import iterate_with_progress

__all__ = [
    "KEYPOINT_STAT_NAMES",
    "MASK_THRESHOLD",
    "STAT_NAMES",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate",
    "format_metrics_table",
    "outputs_to_host",
    "resolve_oks_sigmas",
    "results_object",
]

#: Mask probabilities at or above this are the object (torchvision's and detectron2's 0.5).
MASK_THRESHOLD = 0.5

#: Names of ``COCOeval.stats`` for boxes and masks, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
#: Names of ``COCOeval.stats`` for keypoints (20 detections per image; no small objects), in its order.
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
_IOU_TYPES = ("bbox", "segm", "keypoints")


# --------------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# --------------------------------------------------------------------------------------------------


def encode_masks(masks: Tensor, threshold: float = MASK_THRESHOLD) -> list[dict]:
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
    mask_threshold: float = MASK_THRESHOLD,
) -> list[dict]:
    """COCO results entries for per-image model outputs.

    Each detection gives ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` plus
    ``"segmentation"`` (compressed RLE of ``mask >= mask_threshold``, JSON-ready) when the output has
    ``masks`` and ``"keypoints"`` (the flat ``[x1, y1, 1, x2, y2, 1, ...]`` of COCO's results format, the
    visibility column set to 1 as in torchvision's reference; OKS ignores it) when it has ``keypoints``
    ``[N, K, 3]``. ``label_to_category_id`` maps a contiguous label to the dataset's category id (a callable
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
        keypoints = None
        if "keypoints" in out:
            kps = out["keypoints"].detach().to(device="cpu", dtype=torch.float64)[..., :3].clone()
            kps[..., 2] = 1.0
            keypoints = kps.flatten(1).tolist()
        image_id = int(image_id)
        for i, (box, label, score) in enumerate(zip(xywh.tolist(), labels, scores)):
            entry = {"image_id": image_id, "category_id": categories[label], "bbox": box, "score": score}
            if rles is not None:
                entry["segmentation"] = rles[i]
            if keypoints is not None:
                entry["keypoints"] = keypoints[i]
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


def results_object(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """pycocotools' results object of COCO results entries for one task: each entry keeps only that task's
    field (``bbox``, ``segmentation`` or ``keypoints``), so that ``loadRes`` takes areas from it; an empty
    object for no entries. ``results`` is not modified."""
    keep = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    drop = {"bbox", "segmentation", "keypoints"} - {keep}
    dets = [{k: v for k, v in r.items() if k not in drop} for r in results]  # loadRes writes into them
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)


def keypoint_categories(coco_gt: COCO) -> dict[int, int]:
    """``{category id: K}`` of the categories of ``coco_gt`` that declare ``keypoints`` names."""
    return {cid: len(c["keypoints"]) for cid, c in sorted(coco_gt.cats.items()) if c.get("keypoints")}


def resolve_oks_sigmas(num_keypoints: int, sigmas: Sequence[float] = ()) -> np.ndarray:
    """The OKS sigmas for ``num_keypoints`` keypoints: ``sigmas`` when given (one per keypoint), else COCO's
    person sigmas when there are 17; any other count without sigmas is an error naming the config key."""
    from maskrcnn.data.keypoints import COCO_PERSON_OKS_SIGMAS

    if len(sigmas):
        if len(sigmas) != num_keypoints:
            raise ValueError(
                f"data.keypoint_oks_sigmas has {len(sigmas)} values but the data set has {num_keypoints} "
                "keypoints (one sigma per keypoint)"
            )
        return np.asarray(sigmas, dtype=np.float64)
    if num_keypoints == len(COCO_PERSON_OKS_SIGMAS):
        return np.asarray(COCO_PERSON_OKS_SIGMAS, dtype=np.float64)
    raise ValueError(
        f"data.keypoint_oks_sigmas is empty but the data set has {num_keypoints} keypoints, not COCO's 17 "
        "person keypoints: give one OKS sigma per keypoint (COCO's are 0.025 .. 0.107: the spread of human "
        "annotations, relative to the object's scale)"
    )


def coco_evaluate(
    coco_gt: COCO,
    results: list[dict],
    iou_type: str,
    *,
    image_ids: Iterable[int] | None = None,
    oks_sigmas: Sequence[float] = (),
) -> dict:
    """Score COCO results entries against ``coco_gt`` with pycocotools' ``COCOeval``.

    ``iou_type`` is ``"bbox"``, ``"segm"`` or ``"keypoints"``; ``image_ids`` restricts the evaluation
    (default: every image of ``coco_gt``; images without detections count as misses). Returns
    ``COCOeval.stats`` under :data:`STAT_NAMES` (:data:`KEYPOINT_STAT_NAMES` for keypoints),
    ``per_category`` ``{category name: AP}`` (AP@[.5:.95], all areas, the most detections; ``None`` for a
    category without ground truth in the evaluated images) and ``summary``, the text
    ``COCOeval.summarize`` prints. Crowd regions are handled by ``COCOeval`` (detections on them are
    ignored). ``results`` is not modified. No results give zeros (``-1`` where COCO has no ground truth).

    Keypoints are scored over the categories that declare keypoints, with ``oks_sigmas``
    (:func:`resolve_oks_sigmas`: COCO's for 17 keypoints when empty); ground truth without such
    categories is an error.
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be 'bbox', 'segm' or 'keypoints', got {iou_type!r}")
    unknown = {r["image_id"] for r in results} - set(coco_gt.imgs)
    if unknown:
        raise ValueError(
            f"results for {len(unknown)} image id(s) not in the ground truth, e.g. {min(unknown)}"
        )
    if iou_type == "segm" and any("segmentation" not in d for d in results):
        raise ValueError("segm evaluation needs a 'segmentation' in every result entry")
    sigmas = None
    if iou_type == "keypoints":
        kp_cats = keypoint_categories(coco_gt)
        if not kp_cats:
            raise ValueError(
                "iou_type 'keypoints' needs ground truth whose categories declare 'keypoints' (COCO's "
                "person_keypoints_*.json); this one has none"
            )
        k = next(iter(kp_cats.values()))
        sigmas = resolve_oks_sigmas(k, oks_sigmas)
        results = [d for d in results if d["category_id"] in kp_cats]
        for d in results:
            if len(d.get("keypoints", ())) != 3 * k:
                raise ValueError(
                    f"keypoint evaluation needs 'keypoints' of 3 * {k} values in every result entry of a "
                    f"keypoint category; image id {d['image_id']} has {len(d.get('keypoints', ()))}"
                )
    coco_dt = results_object(coco_gt, results, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        if sigmas is not None:
            ev.params.catIds = sorted(kp_cats)
            ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ev.summarize()
    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
    metrics: dict = {name: float(v) for name, v in zip(names, ev.stats)}
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


def outputs_to_host(out: Mapping[str, Tensor], keep: Tensor | None = None) -> dict[str, Tensor]:
    """One image's outputs copied to the host, the detections ``keep`` (bool ``[N]``) selects (all when None),
    with ``masks`` thresholded at :data:`MASK_THRESHOLD` on their device first (bool: a quarter of the bytes
    to copy and to hold). What :func:`detections_to_coco` and drawing make of them is unchanged."""
    out = dict(out)
    if "masks" in out:
        out["masks"] = out["masks"] >= MASK_THRESHOLD
    return {k: (v if keep is None else v[keep]).cpu() for k, v in out.items()}


def _overlap(device: torch.device) -> bool:
    """Whether :func:`evaluate` encodes detections in a thread beside the model: where the device runs
    ahead of the host (every device but the CPU, :func:`maskrcnn.ops.device.host_reads_stall`)."""
    return _device.host_reads_stall(device)


def evaluate(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    output_dir: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    keypoint_oks_sigmas: Sequence[float] = (),
) -> dict:
    """Run ``model`` over a ``CocoDataset`` and score it: ``{"bbox": metrics, "segm": metrics,
    "keypoints": metrics}``, each as :func:`coco_evaluate` returns it: no ``"segm"`` for a model without
    masks, ``"keypoints"`` only when the dataset declares keypoints and the model predicts them (its
    ``roi_heads.keypoint``, or ``keypoints`` in its outputs), scored with ``keypoint_oks_sigmas``
    (``data.keypoint_oks_sigmas``; empty: COCO's, for 17 keypoints; checked before inference).

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
    config = _unwrap(model).config
    with_masks = bool(config.roi_heads.mask)
    num_keypoints = int(getattr(dataset, "num_keypoints", 0) or 0)
    model_keypoints = bool(getattr(config.roi_heads, "keypoint", False))
    sigmas = None
    if num_keypoints and model_keypoints:
        sigmas = resolve_oks_sigmas(num_keypoints, keypoint_oks_sigmas)  # fail before the inference
    loader = build_test_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size
    )
    try:
        total = len(loader)
    except TypeError:
        total = None

    per_image: dict[int, list[dict]] = {}
    encode = functools.partial(detections_to_coco, label_to_category_id=dataset.label_to_category_id)
    # Beside a device that runs ahead of the host (a GPU), a thread encodes each image's detections (the
    # masks' RLEs: pycocotools on the host) while the next batch runs; on a CPU, here, one after the other.
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") if _overlap(device) else None
    pending: collections.deque = collections.deque()  # (image id, future), at most two waiting

    def finish_oldest() -> None:
        image_id, future = pending.popleft()
        per_image[image_id] = future.result()

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
                    if encoder is None:
                        per_image[image_id] = encode([out], [image_id])
                        continue
                    pending.append((image_id, encoder.submit(encode, [outputs_to_host(out)], [image_id])))
                    while len(pending) > 2:
                        finish_oldest()
            while pending:
                finish_oldest()
    finally:
        if encoder is not None:
            encoder.shutdown(wait=True, cancel_futures=True)
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
        if sigmas is None and num_keypoints and any("keypoints" in r for r in results):
            sigmas = resolve_oks_sigmas(num_keypoints, keypoint_oks_sigmas)
        if sigmas is not None:
            metrics["keypoints"] = coco_evaluate(
                dataset.coco, results, "keypoints", image_ids=image_ids, oks_sigmas=sigmas
            )
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
    """A plain-text table of ``evaluate``'s metrics (in percent): the COCO summary per task (keypoints
    under their own header: COCO reports other numbers for them), then the per-category AP, listed in
    ``class_names`` order (index 0, the background, skipped) when given."""
    tasks = [t for t in _IOU_TYPES if t in metrics]
    if not tasks:
        return "(no metrics)"
    label = max(6, max(len(t) for t in tasks) + 1)
    lines = []
    for group, stat_names in (
        ([t for t in tasks if t != "keypoints"], STAT_NAMES),
        (["keypoints"], KEYPOINT_STAT_NAMES),
    ):
        group = [t for t in group if t in metrics]
        if not group:
            continue
        if lines:
            lines.append("")
        lines.append(f"{'':{label}}" + "".join(f"{name:>7}" for name in stat_names))
        for task in group:
            lines.append(
                f"{task:{label}}" + "".join(f"{_pct(metrics[task].get(name)):>7}" for name in stat_names)
            )
    names = list(class_names[1:]) if class_names is not None else list(metrics[tasks[0]]["per_category"])
    if names:
        width = max(12, max(len(n) for n in names))
        cols = {t: max(9, len(t) + 4) for t in tasks}
        header = f"{'category':<{width}}" + "".join(f"{t + ' AP':>{cols[t]}}" for t in tasks)
        cells = [
            f"{name:<{width}}"
            + "".join(f"{_pct(metrics[t]['per_category'].get(name)):>{cols[t]}}" for t in tasks)
            for name in names
        ]
        columns = 3 if len(cells) > 12 else 1
        rows = -(-len(cells) // columns)
        lines += ["", "   ".join([header] * min(columns, len(cells)))]
        for r in range(rows):
            lines.append("   ".join(cells[c * rows + r] for c in range(columns) if c * rows + r < len(cells)))
    return "\n".join(lines)
