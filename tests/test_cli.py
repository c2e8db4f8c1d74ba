"""The command line end to end on a tiny synthetic data set: train -> eval -> predict, and its errors."""

import json
import os

import pytest

from maskrcnn.cli import main
from maskrcnn.data.shapes import make_shapes_dataset

TINY = [
    "model.num_classes=4",
    "model.input.min_size=(64,)",
    "model.input.max_size=64",
    "model.rpn.pre_nms_topk_train=100",
    "model.rpn.post_nms_topk_train=50",
    "model.rpn.pre_nms_topk_test=100",
    "model.rpn.post_nms_topk_test=50",
    "model.roi_heads.batch_size_per_image=16",
    "model.roi_heads.mask_head_channels=32",
    "solver.ims_per_batch=2",
    "solver.max_iter=3",
    "solver.warmup_iters=1",
    "solver.steps=(2,)",
    "data.num_workers=0",
    "checkpoint_period=2",
    "log_period=1",
    "device=cpu",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(str(root), num_train=6, num_val=3, image_size=(64, 64), seed=1, max_objects=2)


def test_train_eval_predict(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    data = [
        f"data.train_images={shapes['train_images']}",
        f"data.train_annotations={shapes['train_annotations']}",
        f"data.val_images={shapes['val_images']}",
        f"data.val_annotations={shapes['val_annotations']}",
    ]
    assert main(["train", "--config", "R-18-FPN-small", "--output-dir", str(out), *TINY, *data]) == 0
    for name in (
        "model_final.pt",
        "model_0000002.pt",
        "last_checkpoint",
        "metrics.jsonl",
        "loss_curve.png",
        "config.yaml",
    ):
        assert (out / name).exists(), name
    # the saved config reproduces the run
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "config.yaml"),
                "--output-dir",
                str(tmp_path / "again"),
                "solver.max_iter=1",
                "solver.steps=()",
            ]
        )
        == 0
    )

    eval_dir = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--config",
                "R-18-FPN-small",
                "--weights",
                str(out / "model_final.pt"),
                "--output-dir",
                str(eval_dir),
                *TINY,
                *data,
            ]
        )
        == 0
    )
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"}
    assert "AP50" in capsys.readouterr().out

    pred_dir = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(out / "model_final.pt"),
                shapes["val_images"],
                "--output-dir",
                str(pred_dir),
                "--score-threshold",
                "0",
                "--classes",
                "circle,square,triangle",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(list(pred_dir.glob("*.png"))) == len(os.listdir(shapes["val_images"]))
    assert isinstance(json.loads((pred_dir / "predictions.json").read_text()), list)


def test_bad_configuration_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "solver.not_a_key=1"]) == 2
    assert "unknown config key 'solver.not_a_key'" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path), "solver.base_lr=fast"]) == 2
    assert "solver.base_lr" in capsys.readouterr().err
    assert main(["train", "--config", "R-77-FPN"]) == 2
    assert "unknown configuration" in capsys.readouterr().err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("solver:\n  base_lr: [1, 2\n")
    assert main(["train", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    for command in ("train", "eval", "predict", "demo", "configs"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: maskrcnn " + command in capsys.readouterr().out
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "solver.base_lr" in out and "R-50-FPN" in out


def test_demo_end_to_end_with_its_own_config(tmp_path, capsys):
    """The demo's real model and schedule settings, cut to two iterations on a few images."""
    from maskrcnn.demo import run_demo

    short = ["solver.max_iter=2", "solver.steps=(1,)", "solver.warmup_iters=1", "data.num_workers=0"]
    assert run_demo(str(tmp_path), short, num_train=4, num_val=2) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"minutes", "mask_AP", "mask_AP50", "box_AP", "checkpoint", "predictions"}
    assert os.path.isfile(summary["checkpoint"]) and os.path.isdir(summary["predictions"])
    assert (tmp_path / "train" / "loss_curve.png").is_file()
    assert "[demo] done" in capsys.readouterr().out
