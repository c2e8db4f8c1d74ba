"""The command line end to end on a tiny synthetic data set: train -> eval -> predict, and its errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

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


def test_demo_evaluates_on_its_tasks_val_split_size_by_default(tmp_path, monkeypatch):
    """The shapes demo's default val split is 500 images: the AP of 50 moved by ~0.02 with which images they
    were (benchmarks/val_noise.py), as much as the margin of the demo's targets."""
    import maskrcnn.data.figures
    import maskrcnn.data.shapes
    from maskrcnn.demo import DEMO_NUM_VAL, run_demo

    asked = {}

    class Stop(Exception):
        pass

    def record(task):
        def make(root, *, num_train, num_val, **kwargs):
            asked[task] = (num_train, num_val)
            raise Stop

        return make

    monkeypatch.setattr(maskrcnn.data.shapes, "make_shapes_dataset", record("shapes"))
    monkeypatch.setattr(maskrcnn.data.figures, "make_figures_dataset", record("keypoints"))
    for task in ("shapes", "keypoints"):
        with pytest.raises(Stop):
            run_demo(str(tmp_path / task), task=task)
    assert asked == {"shapes": (400, 500), "keypoints": (400, 50)} and DEMO_NUM_VAL["shapes"] == 500
    assert not any(tmp_path.iterdir())  # nothing written before the data


# --------------------------------------------------------------------------------------------------
# Every mistake: one line naming the key, file or record, exit status 2, no traceback
# --------------------------------------------------------------------------------------------------


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_config_file_is_named(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", "--config", missing]) == 2
    assert _error(capsys) == f"maskrcnn train: error: config file not found: {missing}"
    assert main(["eval", "--weights", "w.pt", "--config", "nope"]) == 2
    assert "unknown configuration 'nope': --config takes a model preset (R-101-C4" in _error(capsys)


@pytest.mark.parametrize(
    "override, message",
    [
        ("solver.base_lr=-0.1", "solver.base_lr=-0.1: expected a positive number"),
        ("model.input.min_size=[224,", "model.input.min_size=[224,: cannot read the value"),
        ("model.input.min_size=[-5]", "model.input.min_size=(-5,): expected a non-empty tuple of positive"),
        ("model.input.pixel_mean=[0.5]", "model.input.pixel_mean=(0.5,): expected 3 numbers"),
        (
            "model.pixel_mean=[0.5]",
            "unknown config key 'model.pixel_mean'; did you mean model.input.pixel_mean?",
        ),
        ("solver.base_lr", "override 'solver.base_lr' must look like KEY=VALUE"),
        ("device=gpu", "device='gpu': expected 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_overrides_are_one_line_naming_the_key(tmp_path, capsys, override, message):
    assert main(["train", "--output-dir", str(tmp_path / "run"), override]) == 2
    line = _error(capsys)
    assert line.startswith(f"maskrcnn train: error: {message}"), line
    assert not (tmp_path / "run").exists()


def test_bad_override_message_is_exact(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "solver.base_lr=-0.1"]) == 2
    assert (
        capsys.readouterr().err == "maskrcnn train: error: solver.base_lr=-0.1: expected a positive number\n"
    )


def test_overrides_anywhere_among_the_options():
    from maskrcnn.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--config", "X", "--resume", "a=1", "--device", "cpu", "b=2", "-v"])
    assert args.overrides == ["a=1", "b=2"] and args.resume and args.device == "cpu" and args.verbose
    args = parser.parse_args(["eval", "a=1", "--weights", "w.pt", "b=2", "--config", "X", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.weights == "w.pt"
    args = parser.parse_args(["predict", "--weights", "w", "a.jpg", "--score-threshold", "0.1", "b.jpg"])
    assert args.images == ["a.jpg", "b.jpg"] and args.score_threshold == 0.1
    args = parser.parse_args(["demo", "--output-dir", "d", "solver.max_iter=1", "--verbose"])
    assert args.overrides == ["solver.max_iter=1"] and args.verbose


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys, checkpoint, images):
    expected = "error: device=cuda but CUDA is not available on this machine"
    assert main(["train", "--output-dir", str(tmp_path), "device=cuda", "--config", "R-18-FPN-small"]) == 2
    assert _error(capsys) == f"maskrcnn train: {expected}"
    eval_args = ["--weights", checkpoint, "data.val_images=x", "data.val_annotations=y.json"]
    assert main(["eval", *eval_args, "--device", "cuda", "--output-dir", str(tmp_path / "e")]) == 2
    assert _error(capsys) == f"maskrcnn eval: {expected}"
    out = str(tmp_path / "p")
    assert main(["predict", "--weights", checkpoint, images, "--device", "cuda", "--output-dir", out]) == 2
    assert _error(capsys) == f"maskrcnn predict: {expected}"


def _deny_writes(monkeypatch):
    """Running as root, a read-only folder is still writable: make the write probe fail as it would."""
    import tempfile

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, "tmpXXXX"))

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)


def test_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch, checkpoint, images):
    _deny_writes(monkeypatch)
    ro = str(tmp_path / "ro")
    assert main(["train", "--config", "R-18-FPN-small", "--output-dir", ro]) == 2
    assert _error(capsys) == f"maskrcnn train: error: cannot write to {ro}: permission denied"
    data = ["data.val_images=x", "data.val_annotations=y.json"]
    assert main(["eval", "--weights", checkpoint, "--output-dir", ro, *data]) == 2
    assert _error(capsys) == f"maskrcnn eval: error: cannot write to {ro}: permission denied"
    assert main(["predict", "--weights", checkpoint, images, "--output-dir", ro]) == 2
    assert _error(capsys) == f"maskrcnn predict: error: cannot write to {ro}: permission denied"


def test_eval_without_val_data_is_one_line(capsys):
    assert main(["eval", "--weights", "w.pt"]) == 2
    assert (
        _error(capsys)
        == "maskrcnn eval: error: eval needs data.val_images=DIR and data.val_annotations=FILE.json"
    )


def test_verbose_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    from maskrcnn import config

    with pytest.raises(config.ConfigError):
        main(["-v", "train", "--output-dir", str(tmp_path), "solver.base_lr=-1"])
    with pytest.raises(config.ConfigError):
        main(["train", "--output-dir", str(tmp_path), "solver.base_lr=-1", "--verbose"])

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(config, "load_config_file", bug)
    (tmp_path / "run.yaml").write_text("seed: 1\n")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", str(tmp_path / "run.yaml")])


# --------------------------------------------------------------------------------------------------
# predict and weights from the command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from tests.common import tiny_model

    return tiny_model(num_classes=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from maskrcnn.weights import save_checkpoint

    path = tmp_path_factory.mktemp("weights") / "model.pt"
    save_checkpoint(path, model)
    return str(path)


@pytest.fixture()
def images(tmp_path):
    """A folder with good.jpg and good.png (same stem) and nothing else."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 32), (200, 30, 30)).save(folder / "good.jpg")
    Image.new("RGB", (40, 32), (30, 200, 30)).save(folder / "good.png")
    return str(folder)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_predict_refuses_to_write_into_the_input_folder(tmp_path, capsys, checkpoint, images):
    before = _snapshot(tmp_path)
    for out in (images, str(tmp_path)):
        # the weights do not exist: the refusal comes first, before any model is loaded
        argv = [
            "predict",
            "--weights",
            str(tmp_path / "absent.pt"),
            images,
            "--output-dir",
            out,
            "--overwrite",
        ]
        assert main(argv) == 2
        assert _error(capsys) == (
            f"maskrcnn predict: error: refusing to write predictions to {out}: it holds the input "
            f"{os.path.join(images, 'good.jpg')}; choose an output folder outside the input folders"
        )
    assert _snapshot(tmp_path) == before


def test_predict_outputs_are_distinct_and_never_overwritten(tmp_path, capsys, checkpoint, images):
    out = str(tmp_path / "pred")
    argv = ["predict", "--weights", checkpoint, images, "--output-dir", out, "--device", "cpu"]
    assert main(argv) == 0
    assert sorted(os.listdir(out)) == ["good.jpg.png", "good.png.png", "predictions.json"]
    assert "on 2 image(s)" in capsys.readouterr().out
    drawn = _snapshot(out)
    assert main(argv) == 2  # a second run into the same folder
    assert _error(capsys) == (
        f"maskrcnn predict: error: {os.path.join(out, 'good.jpg.png')} exists (an earlier run?); "
        "choose another output folder, or overwrite it (--overwrite, overwrite=True: replaces this run's "
        "drawings and predictions.json only)"
    )
    assert _snapshot(out) == drawn
    assert main([*argv, "--overwrite"]) == 0
    assert _snapshot(out) == drawn  # the same drawings again
    assert main([*argv, "--overwrite", "--writers", "2"]) == 0
    assert _snapshot(out) == drawn  # with two writer threads, too
    assert "--overwrite" in build_help("predict") and "holds any input" in build_help("predict")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--overwrite", "--writers", "0"])
    assert exit_.value.code == 2 and "--writers: expected an integer >= 1, got 0" in capsys.readouterr().err


def build_help(command):
    from maskrcnn.cli import build_parser

    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[command].format_help()


def test_predict_exit_status_with_unreadable_images(tmp_path, capsys, checkpoint, images):
    (Path(images) / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "p1")
    assert main(["predict", "--weights", checkpoint, images, "--output-dir", out]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err
    assert "on 2 image(s); 1 of 3 image(s) could not be read (named above)" in captured.out
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.jpg", "b.png"):
        (bad / name).write_bytes(b"nope")
    assert main(["predict", "--weights", checkpoint, str(bad), "--output-dir", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "a.jpg" in err and "b.png" in err  # each named
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("maskrcnn predict: error: none of the 2 input image(s) could be read")
    )
    assert not (tmp_path / "p2").exists()


def test_weights_errors_name_the_file(tmp_path, capsys, model, images):
    bare = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), bare)
    out = str(tmp_path / "pred")
    assert main(["predict", "--weights", bare, images, "--output-dir", out]) == 2
    assert _error(capsys).startswith(
        f"maskrcnn predict: error: {bare} is a bare maskrcnn state dict (no config inside)"
    )
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("preset: R-18-FPN-small\nmodel:\n  num_classes: 3\n")
    assert main(["predict", "--weights", bare, "--config", str(run_yaml), images, "--output-dir", out]) == 0
    capsys.readouterr()
    wrong = ["--config", "R-18-FPN-small", images, "--output-dir", str(tmp_path / "p2")]
    assert main(["predict", "--weights", bare, *wrong]) == 2  # 91 classes: the shapes differ
    assert "roi_heads.box_predictor.cls_score.weight (3, 256) vs (91, 256)" in _error(capsys)
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    assert main(["predict", "--weights", str(text), images, "--output-dir", str(tmp_path / "p3")]) == 2
    assert _error(capsys).startswith(f"maskrcnn predict: error: cannot read checkpoint {text}")
    assert main(["predict", "--weights", str(tmp_path / "none.pt"), images, "--output-dir", out + "4"]) == 2
    assert _error(capsys) == f"maskrcnn predict: error: checkpoint not found: {tmp_path / 'none.pt'}"


def test_train_cli_refuses_another_run_and_stops_cleanly_on_sigterm(tmp_path, monkeypatch, capsys):
    """The train command's side of the run-folder protection and of a scheduler's SIGTERM."""
    import signal

    from maskrcnn.engine import train as train_module
    from maskrcnn.engine.interrupt import TrainingInterrupted

    stopped = "training stopped by SIGTERM after iteration 3 of 9; checkpoint c.pt. Resume with: ..."

    def interrupted(cfg, **kwargs):
        assert kwargs == {"resume": False, "overwrite": True}
        raise TrainingInterrupted(
            stopped,
            signum=signal.SIGTERM,
            iteration=3,
            checkpoint="c.pt",
        )

    monkeypatch.setattr(train_module, "train", interrupted)
    args = ["train", "--config", "R-18-FPN-small", f"output_dir={tmp_path / 'run'}", "--overwrite"]
    assert main(args) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == f"maskrcnn train: {stopped}"

    def refused(cfg, **kwargs):
        raise train_module.RunExistsError("runs/x holds another run (model_final.pt): pass --resume ...")

    monkeypatch.setattr(train_module, "train", refused)
    assert main(args[:-1]) == 2
    assert capsys.readouterr().err.strip() == (
        "maskrcnn train: error: runs/x holds another run (model_final.pt): pass --resume ..."
    )

    def second_ctrl_c(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", second_ctrl_c)
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == "maskrcnn train: interrupted"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_real_signal_to_maskrcnn_train_checkpoints_and_exits(shapes, tmp_path, signame):
    """The whole command in its own process (2 loader workers, which Ctrl-C reaches too): the signal
    finishes the iteration, a checkpoint is written, one line names it, the exit status is 128 + signum."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [*TINY, "solver.max_iter=10000", "checkpoint_period=0", "data.num_workers=2", f"output_dir={out}"]
    args += [f"data.train_images={shapes['train_images']}"]
    args += [f"data.train_annotations={shapes['train_annotations']}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "maskrcnn.cli", "train", "--config", "R-18-FPN-small", *args],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's: the signal reaches the workers too
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + getattr(signal, signame), err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"maskrcnn train: training stopped by {signame} after iteration "), err
    assert "Traceback" not in err
    checkpoint = (out / "last_checkpoint").read_text().strip()
    assert checkpoint in last and (out / checkpoint).exists() and "--resume" in last
    assert not [n for n in os.listdir(out) if ".tmp." in n]


def test_predict_eval_and_serve_take_precision(tmp_path, capsys, caplog, checkpoint, images):
    """--precision bf16: bf16 where the CPU has it, else one warning and float32 (either way: done)."""
    from maskrcnn.modeling.precision import native_support

    out = str(tmp_path / "pred")
    argv = ["predict", "--weights", checkpoint, images, "--output-dir", out, "--device", "cpu"]
    assert main([*argv, "--precision", "bf16"]) == 0
    assert "on 2 image(s)" in capsys.readouterr().out
    native, why = native_support("bf16", "cpu")
    assert native or f"precision bf16: {why}; staying float32" in caplog.text
    for command in ("predict", "eval", "serve"):
        assert "--precision {fp32,bf16,fp16}" in build_help(command)


def test_predict_and_serve_take_test_time_settings(tmp_path, capsys, checkpoint, images):
    """--set KEY=VALUE: detectron2's ``--opts MODEL.ROI_HEADS.NMS_THRESH_TEST 0.3`` at predict and serve; it
    must act (detections per image follow it), and a key the weights depend on, or a key of another section
    (which a loaded model has not), must be refused by name, not dropped."""
    per_image = {}
    for n in (2, 3):
        out = tmp_path / f"pred{n}"
        argv = ["predict", "--weights", checkpoint, images, "--output-dir", str(out), "--device", "cpu"]
        keys = ["model.roi_heads.score_thresh=0.0", f"model.roi_heads.detections_per_img={n}"]
        assert main([*argv, "--score-threshold", "0", "--set", *keys]) == 0
        entries = json.loads((out / "predictions.json").read_text())
        counts = {}
        for e in entries:
            counts[e["image_id"]] = counts.get(e["image_id"], 0) + 1
        per_image[n] = sorted(counts.values())
    assert per_image == {2: [2, 2], 3: [3, 3]}  # a random model at threshold 0 fills every slot
    capsys.readouterr()
    for command in ("predict", "serve"):
        argv = [command, "--weights", checkpoint, "--device", "cpu"]
        argv += [images, "--output-dir", str(tmp_path / "refused")] if command == "predict" else []
        assert main([*argv, "--set", "model.roi_heads.aligned=true"]) == 2
        assert _error(capsys).startswith(f"maskrcnn {command}: error: model.roi_heads.aligned: False -> True")
        assert main([*argv, "--set", "data.num_workers=0"]) == 2
        assert _error(capsys) == (
            f"maskrcnn {command}: error: --set data.num_workers=0: only model.* test-time keys apply to a "
            "loaded model"
        )
        assert "--set KEY=VALUE [KEY=VALUE ...]" in build_help(command)
    assert not (tmp_path / "refused").exists()


def _renumbered(annotations: str, out: Path, ids: dict[int, int]) -> str:
    """A copy of a COCO file with its category ids renumbered by ``ids`` (names kept)."""
    data = json.loads(Path(annotations).read_text())
    for c in data["categories"]:
        c["id"] = ids[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = ids[a["category_id"]]
    out.write_text(json.dumps(data))
    return str(out)


def test_checkpoints_name_the_classes_and_keep_the_datas_category_ids(shapes, tmp_path, capsys):
    """Trained on categories 7, 3, 12 (not 1..K): predict and serve give those ids and the names without
    --classes; eval on data numbered otherwise is refused instead of scoring labels as other classes."""
    from maskrcnn.serve.app import Predictor
    from maskrcnn.weights import load_model

    ids = {1: 7, 5: 3, 9: 12}  # circle, square, triangle (the shapes data numbers them 1, 5, 9)
    train_ann = _renumbered(shapes["train_annotations"], tmp_path / "train.json", ids)
    val_ann = _renumbered(shapes["val_annotations"], tmp_path / "val.json", ids)
    out = tmp_path / "run"
    data = [f"data.train_images={shapes['train_images']}", f"data.train_annotations={train_ann}"]
    assert main(["train", "--config", "R-18-FPN-small", "--output-dir", str(out), *TINY, *data]) == 0
    weights = str(out / "model_final.pt")
    meta = load_model(weights).metadata
    # labels follow the sorted category ids: 3 (square), 7 (circle), 12 (triangle)
    assert meta == {"class_names": ["background", "square", "circle", "triangle"], "category_ids": [3, 7, 12]}

    pred = tmp_path / "pred"
    args = ["predict", "--weights", weights, shapes["val_images"], "--output-dir", str(pred)]
    assert main([*args, "--score-threshold", "0", "--device", "cpu"]) == 0
    entries = json.loads((pred / "predictions.json").read_text())
    assert entries and {e["category_id"] for e in entries} <= {3, 7, 12}
    names = dict(zip(meta["category_ids"], meta["class_names"][1:]))
    assert all(e["category_name"] == names[e["category_id"]] for e in entries)

    predictor = Predictor(load_model(weights), score_threshold=0.0)
    image = next(Path(shapes["val_images"]).iterdir())
    found = predictor.predict(image.read_bytes(), file_name=image.name)["detections"]
    assert found and all(names[d["category_id"]] == d["category_name"] for d in found)
    assert predictor.info()["class_names"] == meta["class_names"]

    other = ["data.val_images=" + shapes["val_images"], "data.val_annotations=" + shapes["val_annotations"]]
    eval_args = ["eval", "--weights", weights, "--output-dir", str(tmp_path / "eval"), "device=cpu", *other]
    assert main(eval_args) == 2
    err = _error(capsys)
    assert "was trained on category ids [3, 7, 12]" in err and "has [1, 5, 9]" in err
    ok = ["data.val_images=" + shapes["val_images"], f"data.val_annotations={val_ann}"]
    assert (
        main(["eval", "--weights", weights, "--output-dir", str(tmp_path / "eval2"), "device=cpu", *ok]) == 0
    )


def test_eval_applies_test_time_keys_to_a_checkpoint_and_refuses_model_changes(shapes, tmp_path, capsys):
    """As detectron2's ``MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0`` at --eval-only: the override must act (it was
    silently dropped: a checkpoint kept its own config), and an architecture key must not pass silently."""
    from maskrcnn.weights import save_checkpoint
    from tests.common import tiny_model

    weights = str(tmp_path / "w.pt")
    save_checkpoint(weights, tiny_model(num_classes=4))
    data = [f"data.val_images={shapes['val_images']}", f"data.val_annotations={shapes['val_annotations']}"]
    data += ["device=cpu", "data.num_workers=0"]
    per_image = {}
    for n in (2, 3):
        out = tmp_path / f"eval{n}"
        keys = ["model.roi_heads.score_thresh=0.0", f"model.roi_heads.detections_per_img={n}"]
        assert main(["eval", "--weights", weights, "--output-dir", str(out), *data, *keys]) == 0
        results = json.loads((out / "coco_results.json").read_text())
        counts = {}
        for r in results:
            counts[r["image_id"]] = counts.get(r["image_id"], 0) + 1
        per_image[n] = sorted(counts.values())
    assert per_image == {2: [2, 2, 2], 3: [3, 3, 3]}  # a random model at threshold 0 fills every slot
    capsys.readouterr()
    refused = ["model.roi_heads.aligned=true", "model.roi_heads.score_thresh=0.1"]
    assert main(["eval", "--weights", weights, "--output-dir", str(tmp_path / "e"), *data, *refused]) == 2
    message = _error(capsys)
    assert message.startswith("maskrcnn eval: error: model.roi_heads.aligned: False -> True: the weights"), (
        message
    )
    assert "roi_heads.score_thresh" in message.split("only test-time keys can change here")[1]
