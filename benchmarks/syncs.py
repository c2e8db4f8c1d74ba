"""Host reads per inference call and per training iteration (what becomes a host-device synchronisation on a
GPU), counted on the CPU, side by side with torchvision's Mask R-CNN (through ../shared/tools/tvref).

A CPU never waits for a device, so the reads are counted from what is dispatched (tests/syncs.py: ``item``,
``tolist``, ``nonzero``, boolean-mask indexing, ``unique``, ...). Ours runs the code paths it takes on a
GPU (tests/syncs.py ``device_paths``: NMS's torch backend and device block sizes). torchvision's NMS is one
read per call (its CUDA kernel copies the suppression mask to the host), and its ``batched_nms`` is made to
pick the branch it picks on CUDA (one NMS with offset coordinates up to 20,000 box coordinates; on the CPU
it switches to one NMS per class above 4,000). RoIAlign kernels read nothing back on either side.

    /tmp/tvref-venv/bin/python benchmarks/syncs.py [--images 4] [--train-size 512] [--train-batch 2]

Inference: R-50-FPN with tests/tv_parity.py's seeded weights on coco-mini val images at --size (the
default 800), one image per call. Training: one iteration (forward and backward) of benchmarks/train.py's
R-18-FPN on its synthetic batch of --train-batch images (the reads do not depend on the depth). Prints a
markdown table, then each side's sites by count. With --no-torchvision (or where tvref cannot load it),
ours only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _torchvision(shared: str):
    try:
        sys.path.insert(0, os.path.join(shared, "tools", "tvref"))
        import tvref

        tv = tvref.install()
    except Exception as e:  # noqa: BLE001 - no torchvision: ours only
        print(f"torchvision left out: {type(e).__name__}: {e}")
        return None
    import torchvision.ops.boxes as tv_boxes

    def like_cuda(boxes, scores, idxs, iou_threshold):  # torchvision's CUDA branch choice
        if boxes.numel() > 20_000:
            return tv_boxes._batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
        return tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)

    tv_boxes.batched_nms = like_cuda
    return tv


def _counter(name: str, tv):
    from tests.syncs import PACKAGE, count_syncs, device_paths

    if name == "maskrcnn":
        import contextlib

        @contextlib.contextmanager
        def both():
            with device_paths(), count_syncs(launches=True) as syncs:
                yield syncs

        return both
    root = os.path.dirname(tv.__file__) + os.sep
    roots = {"torchvision": root, "maskrcnn": PACKAGE}
    return lambda: count_syncs(roots, extra_ops=("torchvision.nms",), launches=True)


def _training_models(tv, size: int):
    import torch

    from maskrcnn.config import get_config
    from maskrcnn.modeling.build import build_model

    cfg = get_config("R-50-FPN")
    cfg.backbone.name = "resnet18"
    cfg.num_classes = 5
    cfg.input.min_size, cfg.input.max_size = (size,), 2 * size
    torch.manual_seed(0)
    models = {"maskrcnn": build_model(cfg)}
    if tv is not None:
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
        models["torchvision"] = MaskRCNN(backbone, num_classes=5, min_size=size, max_size=2 * size)
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--images", type=int, default=4, help="coco-mini val images (sorted by name)")
    ap.add_argument("--size", type=int, default=800, help="inference: the images' shorter side")
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--train-batch", type=int, default=2, help="images per training iteration")
    ap.add_argument("--nms-block", type=int, default=0, help="ours: NMS's device block (default: its own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="sites listed per side")
    ap.add_argument("--no-torchvision", action="store_true", help="ours only")
    args = ap.parse_args(argv)
    args.command = " ".join(argv if argv is not None else sys.argv[1:])
    tv = None if args.no_torchvision else _torchvision(args.shared)
    import importlib
    from unittest import mock

    # ours: the IoU values its NMS computes (the device work of the torch backend), and its device block;
    # patched for this call only (the suite runs main in its own process)
    nms_module = importlib.import_module("maskrcnn.ops.nms")
    block = args.nms_block or nms_module._DEVICE_BLOCK
    tile = max(nms_module._DEVICE_TILE_ELEMS, block**2)
    iou_values = []
    iou_gt = nms_module._iou_gt_torch
    with (
        mock.patch.object(nms_module, "_DEVICE_BLOCK", block),
        mock.patch.object(nms_module, "_DEVICE_TILE_ELEMS", tile),
        mock.patch.object(
            nms_module,
            "_iou_gt_torch",
            lambda a, b, t: iou_values.append(a.shape[1] * b.shape[1]) or iou_gt(a, b, t),
        ),
    ):
        return _measure(args, tv, iou_values, block)


def _measure(args, tv, iou_values: list[int], block: int) -> int:
    import torch

    from benchmarks.inference import paired_models
    from benchmarks.train import synthetic_batch
    from tests.tv_parity import read_image

    torch.set_num_threads(args.threads)
    folder = os.path.join(args.shared, "data", "coco-mini", "val2017")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))[: args.images]
    images = [read_image(os.path.join(folder, f)) for f in files]
    rows, sites, files, nms_values = {}, {}, {}, {}
    for name, model in paired_models(tv, size=args.size).items():
        counter = _counter(name, tv)
        per_call, detections, ops = [], [], []
        for im in images:
            iou_values.clear()
            with torch.no_grad(), counter() as syncs:
                (out,) = model([im])
            nms_values.setdefault(name, []).append(sum(iou_values))
            per_call.append(syncs.total)
            detections.append(len(out["boxes"]))
            ops.append(sum(syncs.launches.values()))
        sites[name] = syncs.by_site  # of the last image
        files[name] = syncs.launches
        rows[name] = [per_call, detections, ops]
    batch = synthetic_batch(args.train_batch, args.train_size, 0, 5)
    for name, model in _training_models(tv, args.train_size).items():
        model.train()
        iou_values.clear()
        with _counter(name, tv)() as syncs:
            losses = model(*batch)
            sum(losses.values()).backward()
        nms_values[f"{name} training"] = sum(iou_values)
        rows[name] += [syncs.total, sum(syncs.launches.values())]
        sites[f"{name} training"] = syncs.by_site
        files[f"{name} training"] = syncs.launches

    print(
        f"torch {torch.__version__}; {len(images)} coco-mini val images at {args.size} px, one per call;"
        f" training: one iteration of R-18-FPN, batch {args.train_batch} at {args.train_size} px;"
        f" command: benchmarks/syncs.py {args.command}"
    )
    print()
    print(
        "| model | reads per inference call, median (min-max) | detections per image | reads per training"
        " iteration | kernel ops per inference call, median (min-max) | kernel ops per training iteration |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (per_call, detections, ops, train, train_ops) in rows.items():
        print(
            f"| {name} | {statistics.median(per_call):g} ({min(per_call)}-{max(per_call)}) |"
            f" {min(detections)}-{max(detections)} | {train} | {statistics.median(ops):g}"
            f" ({min(ops)}-{max(ops)}) | {train_ops} |"
        )
    if "maskrcnn" in nms_values:
        print(
            f"\nmaskrcnn's NMS (device block {block}): IoU values computed, median per"
            f" inference call {statistics.median(nms_values['maskrcnn']) / 1e6:.1f}M, per training"
            f" iteration {nms_values['maskrcnn training'] / 1e6:.1f}M"
        )
    for name, counter in sites.items():
        what = name if name.endswith("training") else f"{name} inference (last image)"
        print(f"\n{what}: reads by site, top {args.top}\n")
        for (op, site), n in counter.most_common(args.top):
            print(f"    {n:5d}  {op:28s} {site}")
    for name, counter in files.items():
        what = name if name.endswith("training") else f"{name} inference (last image)"
        print(f"\n{what}: kernel ops by file, top {args.top}\n")
        for file, n in counter.most_common(args.top):
            print(f"    {n:6d}  {file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
