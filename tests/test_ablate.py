"""``maskrcnn ablate``: each variant changes only what it names, the verdicts, and a run end to end."""

import json
import os

import numpy as np
import pytest

from maskrcnn.ablate import TABLES, _judge, ablation_config, write_report
from maskrcnn.cli import main
from maskrcnn.config import config_to_dict
from maskrcnn.modeling.build import build_model


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


ALL_VARIANTS = {v.key: v for t in TABLES.values() for v in t.variants}


@pytest.mark.parametrize("key", sorted(ALL_VARIANTS))
def test_each_variant_changes_only_the_keys_it_names_and_builds(key, tmp_path):
    v = ALL_VARIANTS[key]
    base = _flat(config_to_dict(ablation_config(str(tmp_path), iters=10, seed=0)))
    cfg = ablation_config(str(tmp_path), iters=10, seed=0, overrides=v.overrides)
    changed = {k for k, value in _flat(config_to_dict(cfg)).items() if base[k] != value}
    assert changed == {o.split("=", 1)[0] for o in v.overrides}
    model = build_model(cfg.model)
    hc = cfg.model.roi_heads
    assert model.roi_heads.box_pooler.kind == model.roi_heads.mask_pooler.kind == hc.pooler
    (mask,) = [b for b in model.roi_heads._branches if hasattr(b, "mask_loss")]
    assert (mask.mask_loss, mask.class_agnostic) == (hc.mask_loss, hc.class_agnostic_mask)
    assert type(model.roi_heads.mask_predictor).__name__ == (
        "MLPMaskHead" if hc.mask_head == "mlp" else "MaskRCNNPredictor"
    )
    # the paper's RoIAlign (no half-pixel offset), the demo's half-width backbone, in every variant
    assert hc.aligned is False and cfg.model.backbone.base_channels == 32
    # one map at the form's stride (FPN: P2-P5), read by the FPN model's heads (never res5 per RoI)
    stride = {"fpn": 4, "c4": 16, "c5": 32}[cfg.model.backbone.kind]
    assert model.roi_heads.box_pooler.scales[0] == 1 / stride
    assert type(model.roi_heads.box_head).__name__ == "TwoMLPHead"


def test_every_table_has_the_papers_numbers_and_2c_2d_pool_one_coarse_map():
    for t in TABLES.values():
        keys = [v.key for v in t.variants]
        assert len(set(keys)) == len(keys)
        assert all(a in keys and b in keys for a, b, _ in t.claims)
        assert all(v.paper is not None and v.paper[0] is not None for v in t.variants)
    assert ALL_VARIANTS["c5-align"].paper == (30.9, 51.8, 32.1)  # ../shared/docs/paper.md, Table 2d
    assert {o.split("=")[0] for o in ALL_VARIANTS["c5-pool"].overrides} >= {"model.backbone.kind"}
    for v in TABLES["2c"].variants:  # the paper's 2c is C4: a stride-16 map
        assert "model.backbone.kind=c4" in v.overrides and "model.roi_heads.box_head=mlp" in v.overrides


def test_schedule_scales_with_the_iterations(tmp_path):
    s = ablation_config(str(tmp_path), iters=400, seed=3).solver
    assert (s.max_iter, s.steps, s.warmup_iters) == (400, (340, 380), 50)
    tiny = ablation_config(str(tmp_path), iters=3, seed=0)
    assert tiny.solver.steps == (3,) and tiny.solver.warmup_iters == 1 and tiny.seed == 0


def _summary(values: dict[str, list[float]], seeds: int) -> dict:
    runs = [
        {"variant": k, "seed": s, "segm": {"AP": ap, "AP50": ap, "AP75": ap}, "bbox": {"AP": ap}}
        for k, aps in values.items()
        for s, ap in enumerate(aps)
    ]
    return {"seeds": seeds, "runs": runs}


def test_verdicts_count_a_difference_only_beyond_twice_the_noise():
    label = {"a": "A", "b": "B"}
    # means 0.50 vs 0.40 (10 points), std 1.41 points each: noise 2 * sqrt(2 + 2) = 4.0 points
    clear = _summary({"a": [0.49, 0.51], "b": [0.39, 0.41]}, 2)
    assert _judge(clear, "a", "b", ">", label) == (
        "A beats B: AP +10.0 (holds; noise 4.0), AP75 +10.0 (holds; noise 4.0)"
    )
    assert _judge(clear, "b", "a", ">", label).endswith("AP75 -10.0 (does not hold; noise 4.0)")
    assert "(does not hold; noise 4.0)" in _judge(clear, "a", "b", "~", label)
    close = _summary({"a": [0.45, 0.51], "b": [0.44, 0.48]}, 2)  # +2 points, spread 4.2 and 2.8
    assert "AP +2.0 (same direction, within noise; noise 10.2)" in _judge(close, "a", "b", ">", label)
    assert _judge(close, "a", "b", "~", label) == "A is about equal to B: AP +2.0 (holds; noise 10.2)"
    one = _summary({"a": [0.505], "b": [0.50]}, 1)  # one seed: 1 point
    assert "AP +0.5 (same direction, within noise; noise 1.0)" in _judge(one, "a", "b", ">", label)
    # the val images' noise adds to the seeds': AP 2 * sqrt(2 + 2 + 36) = 12.6, AP75 2 * sqrt(2 + 2 + 1) = 4.5
    clear["image_noise"] = {"a|b": {"AP": 6.0, "AP75": 1.0}}
    assert _judge(clear, "a", "b", ">", label) == (
        "A beats B: AP +10.0 (same direction, within noise; noise 12.6), AP75 +10.0 (holds; noise 4.5)"
    )
    one["image_noise"] = {"a|b": {"AP": 2.0}}  # one seed: twice the images' spread, at least 1 point
    assert "(same direction, within noise; noise 4.0)" in _judge(one, "a", "b", ">", label)


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh)


def test_image_noise_is_a_paired_bootstrap(tmp_path):
    """Table 2e's claim (align-avg vs mlp) on 6 val images of squares: identical detections differ by 0
    on every draw (the draws are shared); against no detections at all, the spread is that of align-avg's
    own AP over the same draws."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    from maskrcnn.ablate import BOOTSTRAP_SAMPLES, _image_noise
    from maskrcnn.engine.resample import Resampler

    def rle(x, y, side):
        m = np.zeros((64, 64), dtype=np.uint8, order="F")
        m[y : y + side, x : x + side] = 1
        r = mask_util.encode(m)
        return {"size": r["size"], "counts": r["counts"].decode()}

    images = [{"id": i, "height": 64, "width": 64} for i in range(1, 7)]
    truth = [
        {
            "id": i,
            "image_id": i,
            "category_id": 1,
            "bbox": [8, 8, 20, 20],
            "area": 400,
            "iscrowd": 0,
            "segmentation": rle(8, 8, 20),
        }
        for i in range(1, 7)
    ]
    _write_json(
        str(tmp_path / "data" / "annotations" / "instances_val.json"),
        {"images": images, "annotations": truth, "categories": [{"id": 1, "name": "square"}]},
    )
    # image i: a square shifted by i - 1 px (IoU falls with i), plus a false positive on odd images
    found = [
        {
            "image_id": i,
            "category_id": 1,
            "bbox": [8 + i - 1, 8, 20, 20],
            "score": 0.9,
            "segmentation": rle(8 + i - 1, 8, 20),
        }
        for i in range(1, 7)
    ] + [
        {
            "image_id": i,
            "category_id": 1,
            "bbox": [40, 40, 10, 10],
            "score": 0.95,
            "segmentation": rle(40, 40, 10),
        }
        for i in (1, 3, 5)
    ]
    runs = [{"variant": v, "seed": 0, "num_val": 6} for v in ("align-avg", "mlp")]
    summary = {"tables": ["2e"], "seeds": 1, "runs": runs}
    for r in runs:
        _write_json(str(tmp_path / "runs" / f"{r['variant']}-s0" / "eval_final" / "coco_results.json"), found)
    assert _image_noise(summary, str(tmp_path)) == {"align-avg|mlp": {"AP": 0.0, "AP75": 0.0}}

    _write_json(str(tmp_path / "runs" / "mlp-s0" / "eval_final" / "coco_results.json"), [])
    noise = _image_noise(summary, str(tmp_path))["align-avg|mlp"]
    gt = COCO(str(tmp_path / "data" / "annotations" / "instances_val.json"))
    alone = Resampler(gt, gt.loadRes(found), "segm")
    draws = np.random.default_rng(0).integers(0, 6, size=(BOOTSTRAP_SAMPLES, 6))
    own = 100 * np.array([alone.ap(p) for p in draws])[:, [0, 2]].std(axis=0, ddof=1)
    assert noise["AP"] == pytest.approx(own[0], abs=1e-3) and noise["AP75"] == pytest.approx(own[1], abs=1e-3)
    assert noise["AP"] > 1  # the draws matter

    os.remove(str(tmp_path / "runs" / "mlp-s0" / "eval_final" / "coco_results.json"))
    assert _image_noise(summary, str(tmp_path)) == {}  # a run without detections on file: left out


def test_report_names_every_variant_beside_the_paper(tmp_path):
    values = {v.key: [0.3 + 0.01 * i, 0.31 + 0.01 * i] for i, v in enumerate(ALL_VARIANTS.values())}
    summary = {**_summary(values, 2), "tables": list(TABLES), "iters": 10, "num_train": 4, "num_val": 2}
    write_report(summary, str(tmp_path))
    md = (tmp_path / "ablations.md").read_text()
    for t in TABLES.values():
        assert f"## Table {t.key}:" in md
        for v in t.variants:
            assert f"| {v.label} |" in md
    assert "| C4, RoIPool (max) | 33.5 +- 0.7 |" in md  # 4th of ALL_VARIANTS: mean of 0.33 and 0.34
    assert "| 26.9 / 48.8 / 26.4 |" in md and "29.7 / – / –" in md
    assert (tmp_path / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "ablations.json").read_text())["runs"] == summary["runs"]


def test_ablate_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys):
    out = str(tmp_path / "abl")
    args = ["ablate", "--table", "2b", "--seeds", "1", "--iters", "3", "--output-dir", out]
    small = ["--num-train", "8", "--num-val", "4", "--device", "cpu"]
    assert main(args + small) == 0
    printed = capsys.readouterr().out
    assert "3 runs (3 variants x 1 seed(s), 3 iterations each), 0 already done" in printed
    assert "s per iteration measured here: about" in printed
    for name in ("ablations.md", "ablations.json", "ablations.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    summary = json.load(open(os.path.join(out, "ablations.json")))
    assert [(r["variant"], r["seed"]) for r in summary["runs"]] == [
        ("softmax", 0),
        ("align-avg", 0),
        ("agnostic", 0),
    ]
    assert all(set(r["segm"]) == {"AP", "AP50", "AP75"} for r in summary["runs"])
    assert set(summary["image_noise"]) == {"align-avg|softmax", "align-avg|agnostic"}
    assert "draws of the 4 val images" in printed
    md = open(os.path.join(out, "ablations.md")).read()
    assert md.count("| sigmoid") == 2 and "| softmax (multinomial) |" in md

    # an interrupted run (no result.json yet) continues from its checkpoint; finished runs are not rerun
    result = os.path.join(out, "runs", "agnostic-s0", "result.json")
    kept = os.path.getmtime(os.path.join(out, "runs", "softmax-s0", "result.json"))
    os.remove(result)
    assert main(args + small) == 0
    printed = capsys.readouterr().out
    assert "2 already done" in printed and "run 1/1: agnostic (seed 0)" in printed
    assert os.path.isfile(result)
    assert os.path.getmtime(os.path.join(out, "runs", "softmax-s0", "result.json")) == kept

    # the same folder with another schedule: refused with one line naming the run's file
    assert main(["ablate", "--table", "2b", "--seeds", "1", "--iters", "4", "--output-dir", out] + small) == 2
    err = capsys.readouterr().err
    assert "result.json holds a run of other settings (iters: 3 here, 4 asked)" in err

    # another training set in the same folder: refused before the data folder is touched
    meta = (tmp_path / "abl" / "data" / "meta.json").read_bytes()
    other = ["--num-train", "10", "--num-val", "4", "--device", "cpu"]
    assert main(args + other) == 2
    assert "(num_train: 8 here, 10 asked)" in capsys.readouterr().err
    assert (tmp_path / "abl" / "data" / "meta.json").read_bytes() == meta

    # another val split: the finished runs' final models are evaluated again, not retrained
    def state(run):
        d = os.path.join(out, "runs", run)
        return json.load(open(os.path.join(d, "result.json"))), os.path.getmtime(
            os.path.join(d, "model_final.pt")
        )

    before = {r["variant"]: state(f"{r['variant']}-s0") for r in summary["runs"]}
    assert main(args + ["--num-train", "8", "--num-val", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "3 finished run(s) were scored on another val split" in printed and "run 1/" not in printed
    for variant, (result, mtime) in before.items():
        now, now_mtime = state(f"{variant}-s0")
        assert now_mtime == mtime and now["minutes"] == result["minutes"]
        assert now["num_val"] == 6 and now["earlier_evals"] == [
            {"num_val": 4, "bbox": result["bbox"], "segm": result["segm"]}
        ]
        assert os.path.isfile(os.path.join(out, "runs", f"{variant}-s0", "eval_val6", "metrics.json"))
    assert json.load(open(os.path.join(out, "ablations.json")))["num_val"] == 6
    # back to the first 4 images (the generator draws each image from its own seed): the training run's
    # own final evaluation, to the last digit
    assert main(args + small) == 0
    for variant, (result, _) in before.items():
        now, _ = state(f"{variant}-s0")
        assert (now["num_val"], now["bbox"], now["segm"]) == (4, result["bbox"], result["segm"])
        assert [e["num_val"] for e in now["earlier_evals"]] == [4, 6]

    # a finished run of another model (the variants' definitions or the demo's model changed since): refused
    saved = os.path.join(out, "runs", "softmax-s0", "config.yaml")
    text = open(saved).read()
    assert "mask_head_channels: 64\n" in text
    with open(saved, "w") as fh:
        fh.write(text.replace("mask_head_channels: 64\n", "mask_head_channels: 32\n"))
    assert main(args + small) == 2
    err = capsys.readouterr().err
    assert "softmax-s0/config.yaml: the finished run was trained with other settings" in err
    assert "model.roi_heads.mask_head_channels: 32 -> 64" in err
