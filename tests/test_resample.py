"""maskrcnn.engine.resample: the bootstrap's shortcut (re-accumulating per-image matches) against
pycocotools run from scratch on the resampled split."""

import numpy as np
import pytest

from maskrcnn.engine.resample import Resampler


def _coco(images, annotations, detections):
    """pycocotools objects: bbox GT ``{image_id: [xywh, ...]}``, detections ``[(image_id, xywh, score)]``."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = {
        "images": [{"id": i, "height": 100, "width": 100} for i in images],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, b) in enumerate((i, b) for i in images for b in annotations.get(i, []))
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        found = [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in detections]
        dt = coco.loadRes(found)
    return coco, dt


def test_resampling_equals_evaluating_the_resampled_split():
    """The bootstrap's shortcut (re-accumulating per-image matches) against pycocotools run from scratch on
    a data set that holds the drawn images under new ids, a repeated image twice."""
    truth = {1: [[10, 10, 30, 30]], 2: [[50, 50, 20, 40], [5, 5, 10, 10]], 3: [[20, 30, 40, 20]]}
    found = [
        (1, [12, 11, 30, 28], 0.9),  # IoU ~0.8
        (1, [60, 60, 20, 20], 0.8),  # a false positive
        (2, [50, 55, 20, 40], 0.7),  # IoU ~0.78
        (2, [5, 5, 12, 12], 0.95),  # IoU ~0.69
        (3, [25, 30, 40, 20], 0.6),  # IoU ~0.78
    ]
    resampler = Resampler(*_coco([1, 2, 3], truth, found), "bbox")
    for picks in ([0, 1, 2], [1], [0, 0, 2], [2, 2, 1, 0, 1]):
        ids = [resampler.img_ids[p] for p in picks]
        # the reference: image k of the drawn split becomes image k + 1 of a new data set
        ref_truth = {k + 1: truth[i] for k, i in enumerate(ids)}
        ref_found = [(k + 1, b, s) for k, i in enumerate(ids) for j, b, s in found if j == i]
        reference = Resampler(*_coco(list(ref_truth), ref_truth, ref_found), "bbox")
        expected = tuple(_summarized(reference.ev).stats[:3])  # pycocotools' own AP, AP50 and AP75
        assert resampler.ap(np.array(picks)) == pytest.approx(expected, abs=1e-12), picks
    assert resampler.ap(np.array([0, 1, 2]))[0] != resampler.ap(np.array([0, 0, 2]))[0]  # the draw matters


def _summarized(ev):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return ev


def test_all_images_once_is_the_evaluation_itself():
    """Picking every image once gives coco_evaluate's AP, AP50 and AP75, on a results object made as it
    makes its own (results_object: the task's field only)."""
    from maskrcnn.engine.evaluate import coco_evaluate, results_object

    truth = {1: [[10, 10, 30, 30]], 2: [[50, 50, 20, 40]], 3: [[20, 30, 40, 20]]}
    found = [(1, [12, 11, 30, 28], 0.9), (2, [50, 58, 20, 40], 0.7), (3, [26, 30, 40, 20], 0.6)]
    gt, _ = _coco([1, 2, 3], truth, found)
    results = [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in found]
    metrics = coco_evaluate(gt, results, "bbox")
    resampler = Resampler(gt, results_object(gt, results, "bbox"), "bbox")
    assert resampler.ap(np.arange(3)) == pytest.approx((metrics["AP"], metrics["AP50"], metrics["AP75"]))
    assert len({metrics["AP"], metrics["AP50"], metrics["AP75"]}) == 3  # three different numbers checked
    empty = Resampler(gt, results_object(gt, [], "bbox"), "bbox")
    assert empty.ap(np.array([0, 2])) == (0.0, 0.0, 0.0)  # no detections: zero, not undefined
