"""``maskrcnn demo``: the main job end to end on a fresh machine, with no data and no weights.

Generates the synthetic shapes data set (COCO format, train and held-out val splits), trains a CPU-sized
Mask R-CNN (ResNet-18-FPN from scratch, BatchNorm) on it, evaluates COCO box and mask AP on the val split,
and draws predictions on val images. Everything goes under ``--output-dir`` (default ``runs/demo``).

``maskrcnn demo --task keypoints`` does the same for human pose (paper section 5): the synthetic figures
data set (:mod:`maskrcnn.data.figures`, COCO person keypoints), a CPU-sized keypoint & mask model
(:func:`keypoint_demo_config`), keypoint (OKS) and mask AP, and predictions drawn with their skeletons.
"""

from __future__ import annotations

import json
import os
import time

from maskrcnn.atomic import atomic_write
from maskrcnn.config import Config, apply_overrides, make_config

__all__ = ["DEMO_NUM_VAL", "TASKS", "demo_config", "keypoint_demo_config", "run_demo"]

TASKS = ("shapes", "keypoints")

#: Val images each task's demo evaluates on by default. Shapes: 500, because the AP of 50 images moves by
#: ~0.02 with which images they are (bootstrap over images, benchmarks/val_noise.py), as much as the margin
#: the demo's targets leave; 500 bring that to ~0.008 for ~35 s more on a 2-core CPU (benchmarks/RESULTS.md,
#: "The seeds' spread was the 50 val images"). Keypoints: 50, not yet measured.
DEMO_NUM_VAL = {"shapes": 500, "keypoints": 50}


def demo_config(output_dir: str) -> Config:
    """The demo's run config: a half-width R-18-FPN at 256 px trained from scratch on the shapes data."""
    cfg = make_config("R-18-FPN-small")
    m = cfg.model
    m.num_classes = 4  # background + circle, square, triangle
    m.backbone.norm = "bn"  # no pretrained weights: train every layer, with batch statistics
    m.backbone.frozen_stages = 0
    m.backbone.base_channels = 32  # half-width ResNet-18: 552 vs 969 ms per iteration (RESULTS.md)
    m.roi_heads.aligned = True  # RoIAlign's half-pixel alignment (detectron2's ROIAlignV2)
    m.backbone.fpn_channels = 64  # narrow FPN/RPN/heads: ~1.3x more iterations per minute, same loss per step
    m.input.min_size = (256,)  # the images' own size: no resizing
    m.input.max_size = 256
    m.rpn.anchor_sizes = ((24,), (48,), (96,), (192,), (384,))
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 600, 300
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 300, 100
    m.roi_heads.batch_size_per_image = 64
    # the mask head runs on every positive RoI (64 per iteration once training has found the objects): 64
    # wide, its convolutions were ~20% of an iteration; 32 wide, an iteration is ~17% faster, and the time
    # saved buys 100 more iterations (below)
    m.roi_heads.mask_head_channels = 32
    m.roi_heads.detections_per_img = 20
    data = os.path.join(output_dir, "data")
    cfg.data.train_images = os.path.join(data, "train")
    cfg.data.train_annotations = os.path.join(data, "annotations", "instances_train.json")
    cfg.data.val_images = os.path.join(data, "val")
    cfg.data.val_annotations = os.path.join(data, "annotations", "instances_val.json")
    cfg.data.num_workers = 1
    s = cfg.solver
    s.ims_per_batch, s.base_lr, s.reference_batch = 4, 0.02, 4
    # 1100 iterations with the LR drops late (the half-width model under-fits: it needs the long full-LR
    # phase; with 850 instead of 1000 the 64-wide mask head lost 5 points, and with 1000 the 32-wide one
    # met the mask AP target on two seeds of three): benchmarks/RESULTS.md, "The demo", the last subsection
    s.max_iter, s.steps, s.warmup_iters = 1100, (1020, 1075), 50
    s.weight_decay = 1e-4
    s.clip_grad_norm = 10.0
    cfg.output_dir = os.path.join(output_dir, "train")
    cfg.device = "auto"
    cfg.checkpoint_period = 500
    cfg.keep_checkpoints = 2
    cfg.log_period = 20
    return cfg


def keypoint_demo_config(output_dir: str) -> Config:
    """The keypoint demo's run config: :func:`demo_config`'s model and solver made a keypoint & mask model
    (background + person, COCO's 17 keypoints) with a half-width backbone, on the figures data."""
    cfg = demo_config(output_dir)
    m = cfg.model
    m.num_classes = 2  # background + person
    # demo_config's half-width backbone and aligned RoIAlign (+0.028 keypoint AP over unaligned, one run each)
    m.roi_heads.detections_per_img = 10  # at most 3 figures per image
    m.roi_heads.keypoint = True
    m.roi_heads.num_keypoints = 17
    # a narrow keypoint tower (torchvision's is 8 x 512): it runs on every positive RoI, forward and backward
    m.roi_heads.keypoint_head_channels = (64,) * 4
    m.roi_heads.mask_head_channels = 64  # as measured below (the shapes demo's went to 32 afterwards)
    data = os.path.join(output_dir, "data")
    cfg.data.train_annotations = os.path.join(data, "annotations", "person_keypoints_train.json")
    cfg.data.val_annotations = os.path.join(data, "annotations", "person_keypoints_val.json")
    # 720 iterations: keypoint AP 0.626 (AP50 0.887), mask AP 0.402 in 10.3 min on the slowest 2-core
    # machine (AVX2-only AMD EPYC); 900 reached keypoint AP 0.685 but take ~13 min there (RESULTS.md)
    cfg.solver.max_iter, cfg.solver.steps = 720, (560, 670)
    return cfg


def run_demo(
    output_dir: str = "runs/demo",
    overrides: list[str] | tuple = (),
    *,
    task: str = "shapes",
    num_train: int = 400,
    num_val: int | None = None,
) -> int:
    """Run the demo; prints where everything is and the AP reached. Returns a process exit code.

    ``task``: ``"shapes"`` (Mask R-CNN on the shapes data, :func:`demo_config`) or ``"keypoints"``
    (Keypoint & mask R-CNN on the figures data, :func:`keypoint_demo_config`). ``num_train`` /
    ``num_val``: synthetic images per split (the defaults are the demo's, ``num_val`` from
    :data:`DEMO_NUM_VAL`; tests use fewer).
    """
    import torch

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.figures import make_figures_dataset
    from maskrcnn.data.shapes import make_shapes_dataset
    from maskrcnn.engine.evaluate import format_metrics_table
    from maskrcnn.engine.predict import predict
    from maskrcnn.engine.train import train
    from maskrcnn.weights import load_model

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    start = time.time()
    if num_val is None:
        num_val = DEMO_NUM_VAL[task]
    keypoints = task == "keypoints"
    run_config = keypoint_demo_config if keypoints else demo_config
    make_dataset = make_figures_dataset if keypoints else make_shapes_dataset
    cfg = apply_overrides(run_config(output_dir), list(overrides))
    data_name = "figures" if keypoints else "shapes"
    print(f"[demo] 1/4 synthetic {data_name} data -> {os.path.join(output_dir, 'data')}")
    make_dataset(
        os.path.join(output_dir, "data"), num_train=num_train, num_val=num_val, image_size=(256, 256), seed=0
    )
    print(
        f"[demo] 2/4 training {cfg.solver.max_iter} iterations on {torch.get_num_threads()} CPU thread(s)"
        f" -> {cfg.output_dir}"
    )
    result = train(cfg, overwrite=True)  # the demo's own folder: a rerun replaces the previous demo's run
    metrics = result.get("eval") or {}
    val = CocoDataset(image_dir=cfg.data.val_images, annotation_file=cfg.data.val_annotations)
    print(
        f"[demo] 3/4 COCO evaluation{' (keypoints: OKS)' if keypoints else ''} on the held-out val split"
        f" ({len(val)} images)"
    )
    if metrics:
        print(format_metrics_table(metrics, val.class_names))
    pred_dir = os.path.join(output_dir, "predictions")
    print(f"[demo] 4/4 predictions drawn on val images -> {pred_dir}")
    model = load_model(result["final_checkpoint"])
    files = sorted(os.listdir(cfg.data.val_images))[:8]
    predict(
        model,
        [os.path.join(cfg.data.val_images, f) for f in files],
        output_dir=pred_dir,
        score_threshold=0.5,
        class_names=val.class_names,
        progress=False,
        overwrite=True,  # the demo's own folder: a rerun replaces its drawings
        skeleton=val.skeleton if keypoints else None,
    )
    summary = {
        "task": task,
        "minutes": round((time.time() - start) / 60, 2),
        "mask_AP": metrics.get("segm", {}).get("AP"),
        "mask_AP50": metrics.get("segm", {}).get("AP50"),
        "box_AP": metrics.get("bbox", {}).get("AP"),
        "box_AP50": metrics.get("bbox", {}).get("AP50"),
        **(
            {
                "keypoint_AP": metrics.get("keypoints", {}).get("AP"),
                "keypoint_AP50": metrics.get("keypoints", {}).get("AP50"),
            }
            if keypoints
            else {}
        ),
        "checkpoint": result["final_checkpoint"],
        "metrics_log": result["metrics"],
        "loss_curve": result["loss_curve"],
        "predictions": pred_dir,
    }
    with atomic_write(os.path.join(output_dir, "summary.json")) as fh:
        json.dump(summary, fh, indent=2)
    reached = "mask AP {mask_AP:.3f}, mask AP50 {mask_AP50:.3f}, box AP {box_AP:.3f}"
    if keypoints:
        reached = "keypoint AP {keypoint_AP:.3f}, keypoint AP50 {keypoint_AP50:.3f}, " + reached
    print(
        ("[demo] done in {minutes} min: " + reached).format(
            **{k: (v if v is not None else float("nan")) for k, v in summary.items()}
        )
    )
    for key in ("checkpoint", "metrics_log", "loss_curve", "predictions"):
        print(f"  {key}: {summary[key]}")
    print(f"  summary: {os.path.join(output_dir, 'summary.json')}")
    return 0
