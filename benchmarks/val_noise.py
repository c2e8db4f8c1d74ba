"""How much a val split's COCO AP depends on which images it holds: bootstrap over images.

    .venv/bin/python benchmarks/val_noise.py --annotations A --results R [--sizes 50 300 500] [--samples 200]

``A`` is the split's COCO instances JSON, ``R`` an evaluation's detections (``coco_results.json``, which
``maskrcnn eval`` and training's final evaluation write). For mask (``segm``) and box AP and AP50 it prints,
per split size N in ``--sizes``:

* the AP of the first N images (by image id: the split a smaller synthetic data set would have had);
* the bootstrap standard error of an N-image split: the std of the AP over ``--samples`` splits of N images
  drawn with replacement from all of ``A``'s images (an image drawn twice counts twice).

pycocotools matches detections to ground truth once per image (``COCOeval.evaluate``); each resampled split
only re-accumulates those per-image matches in its own image order, so a sample costs one
``COCOeval.accumulate``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json

import numpy as np


def _summary(ev) -> tuple[float, float]:
    """AP (IoU .50:.95) and AP50, all areas, 100 detections: pycocotools' first two summary numbers."""
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] for area "all", maxDets 100
    ap = precision[precision > -1]
    ap50 = precision[0][precision[0] > -1]
    return float(ap.mean()) if ap.size else -1.0, float(ap50.mean()) if ap50.size else -1.0


class Resampler:
    """One ``COCOeval`` of all images, re-accumulated over any list of its images (repeats allowed)."""

    def __init__(self, coco_gt, coco_dt, iou_type: str) -> None:
        from pycocotools.cocoeval import COCOeval

        self.ev = COCOeval(coco_gt, coco_dt, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            self.ev.evaluate()
        self.img_ids = list(self.ev.params.imgIds)  # the order of evalImgs' innermost index
        self.evaluated = self.ev.evalImgs
        self.params = copy.deepcopy(self.ev._paramsEval)

    def ap(self, picks: np.ndarray) -> tuple[float, float]:
        """AP and AP50 of the split made of ``self.img_ids[p]`` for each ``p`` in ``picks``."""
        n_img, n_area = len(self.img_ids), len(self.params.areaRng)
        n_cat = len(self.params.catIds) if self.params.useCats else 1
        ev = self.ev
        ev.evalImgs = [
            self.evaluated[k * n_area * n_img + a * n_img + int(i)]
            for k in range(n_cat)
            for a in range(n_area)
            for i in picks
        ]
        params = copy.copy(self.params)
        params.imgIds = list(range(len(picks)))  # positions, so that a repeated image is a separate entry
        ev.params, ev._paramsEval = params, copy.copy(params)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate()
        return _summary(ev)


def main() -> None:
    from pycocotools.coco import COCO

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", required=True, help="the val split's COCO instances JSON")
    ap.add_argument("--results", required=True, help="an evaluation's coco_results.json on that split")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 300, 500], help="split sizes N")
    ap.add_argument("--samples", type=int, default=200, help="bootstrap samples per size (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(args.annotations)
        with open(args.results) as fh:
            detections = json.load(fh)
    rng = np.random.default_rng(args.seed)
    print(f"{args.annotations}: {len(gt.getImgIds())} images; {args.results}; {args.samples} samples/size")
    print("| AP of | N | AP (first N) | AP50 (first N) | bootstrap std of AP | bootstrap std of AP50 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for iou_type, name in (("segm", "mask"), ("bbox", "box")):
        field = "segmentation" if iou_type == "segm" else "bbox"
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([d for d in detections if field in d])
        resampler = Resampler(gt, dt, iou_type)
        order = np.argsort(resampler.img_ids)  # positions of the images by ascending id
        for n in args.sizes:
            if n > len(order):
                raise SystemExit(f"--sizes {n}: the split has only {len(order)} images")
            first = resampler.ap(order[:n])
            boot = np.array([resampler.ap(rng.integers(0, len(order), size=n)) for _ in range(args.samples)])
            std = boot.std(axis=0, ddof=1)
            print(f"| {name} | {n} | {first[0]:.4f} | {first[1]:.4f} | {std[0]:.4f} | {std[1]:.4f} |")


if __name__ == "__main__":
    main()
