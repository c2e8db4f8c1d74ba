"""``maskrcnn demo --task keypoints``: the keypoint demo's own config, a few iterations on tiny data."""

from __future__ import annotations

import json
import os

import pytest

from maskrcnn.cli import build_parser
from maskrcnn.config import validate_config
from maskrcnn.demo import demo_config, keypoint_demo_config, run_demo

SHORT = ["solver.max_iter=3", "solver.steps=(2,)", "solver.warmup_iters=1", "data.num_workers=0"]


def test_keypoint_demo_config_is_a_keypoint_and_mask_model_on_the_figures_data(tmp_path):
    cfg = keypoint_demo_config(str(tmp_path))
    validate_config(cfg)
    hc = cfg.model.roi_heads
    assert hc.keypoint and hc.mask and hc.num_keypoints == 17 and cfg.model.num_classes == 2
    assert cfg.data.train_annotations.endswith("person_keypoints_train.json")
    assert cfg.data.val_annotations.endswith("person_keypoints_val.json")
    assert cfg.data.horizontal_flip > 0  # the figures' left/right cue survives the flip with the swap
    assert cfg.output_dir == os.path.join(str(tmp_path), "train")
    # the shapes demo's config is untouched by the keypoint task
    assert not demo_config(str(tmp_path)).model.roi_heads.keypoint


def test_demo_task_option():
    parser = build_parser()
    assert parser.parse_args(["demo"]).task == "shapes"
    args = parser.parse_args(["demo", "--task", "keypoints", "solver.max_iter=1"])
    assert args.task == "keypoints" and args.overrides == ["solver.max_iter=1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--task", "faces"])
    with pytest.raises(ValueError, match="task"):
        run_demo("unused", task="faces")


def test_keypoint_demo_end_to_end(tmp_path, capsys):
    """Data, training, keypoint (OKS) and mask evaluation, drawings and summary on 4 + 2 tiny images."""
    assert run_demo(str(tmp_path), SHORT, task="keypoints", num_train=4, num_val=2) == 0
    out = capsys.readouterr().out
    assert "[demo] done" in out and "keypoint AP" in out
    assert (tmp_path / "data" / "annotations" / "person_keypoints_val.json").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "keypoints"
    assert set(summary) >= {
        "minutes", "keypoint_AP", "keypoint_AP50", "mask_AP", "mask_AP50", "box_AP", "checkpoint",
        "metrics_log", "loss_curve", "predictions",
    }  # fmt: skip
    for key in ("keypoint_AP", "keypoint_AP50", "mask_AP", "box_AP"):
        assert isinstance(summary[key], float), key  # evaluated (-1.0 when nothing is detected yet)
    assert os.path.isfile(summary["checkpoint"]) and os.path.isfile(summary["loss_curve"])
    drawings = sorted(os.listdir(summary["predictions"]))
    assert "predictions.json" in drawings
    assert sum(name.endswith(".png") for name in drawings) == 2  # every val image, drawn
    # the final evaluation scored keypoints, logged beside box and mask AP
    with open(summary["metrics_log"]) as fh:
        records = [json.loads(line) for line in fh]
    final = [r["eval"] for r in records if "eval" in r][-1]
    assert {"bbox", "segm", "keypoints"} <= set(final)
    # the loss the keypoint branch trains with is in the log
    assert any("loss_keypoint" in r for r in records)
