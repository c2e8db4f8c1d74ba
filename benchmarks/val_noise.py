"""How much a val split's COCO AP depends on which images it holds: bootstrap over images.

    .venv/bin/python benchmarks/val_noise.py --annotations A --results R [--sizes 50 300 500] [--samples 200]

``A`` is the split's COCO instances JSON, ``R`` an evaluation's detections (``coco_results.json``, which
``maskrcnn eval`` and training's final evaluation write). For mask (``segm``) and box AP and AP50 it prints,
per split size N in ``--sizes``:

* the AP of the first N images (by image id: the split a smaller synthetic data set would have had);
* the bootstrap standard error of an N-image split: the std of the AP over ``--samples`` splits of N images
  drawn with replacement from all of ``A``'s images (an image drawn twice counts twice).

Each resampled split re-accumulates pycocotools' per-image matches (``maskrcnn.engine.resample``): one
``COCOeval.accumulate`` per sample.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maskrcnn.engine.resample import Resampler  # noqa: E402


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
            first = resampler.ap(order[:n])[:2]
            draws = [resampler.ap(rng.integers(0, len(order), size=n))[:2] for _ in range(args.samples)]
            boot = np.array(draws)
            std = boot.std(axis=0, ddof=1)
            print(f"| {name} | {n} | {first[0]:.4f} | {first[1]:.4f} | {std[0]:.4f} | {std[1]:.4f} |")


if __name__ == "__main__":
    main()
