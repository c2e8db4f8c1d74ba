"""Person keypoints outside the model: COCO keypoint files (loading, validation, skipping), the joint
transforms and the model's image transform (resize, flip, unknown fields refused, outputs mapped back),
COCO keypoint evaluation, and drawing."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from maskrcnn.config import Config, ConfigError, validate_config
from maskrcnn.data import (
    COCO_PERSON_KEYPOINT_NAMES,
    COCO_PERSON_SKELETON,
    CocoDataset,
    DatasetError,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    hflip,
    resize,
)
from maskrcnn.engine.evaluate import (
    KEYPOINT_STAT_NAMES,
    coco_evaluate,
    detections_to_coco,
    evaluate,
    format_metrics_table,
)
from maskrcnn.modeling.transform import ImageTransform
from maskrcnn.visualize import PALETTE, draw_instances
from tests.common import COCO_MINI

pytestmark = pytest.mark.filterwarnings("ignore:.*__array__ implementation:DeprecationWarning")

NAMES = ["nose", "left_eye", "right_eye", "left_wrist", "right_wrist"]
SKELETON = [[1, 2], [1, 3], [2, 4], [3, 5]]
SIGMAS = (0.05, 0.05, 0.05, 0.08, 0.08)
H, W = 40, 60


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MASKRCNN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _kps(*points):
    """Flat COCO keypoints from ``(x, y, v)`` triples (``None``: not labelled)."""
    flat = []
    for p in points:
        flat += [0, 0, 0] if p is None else list(p)
    return flat


def _ann(aid, iid, keypoints, *, bbox=(10, 5, 30, 25), cat=1, **extra):
    x, y, w, h = bbox
    ann = {
        "id": aid,
        "image_id": iid,
        "category_id": cat,
        "bbox": list(bbox),
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        "area": float(w * h),
        "iscrowd": 0,
        "keypoints": keypoints,
        "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0) if isinstance(keypoints, list) else 0,
    }
    ann.update(extra)
    return ann


def _good_annotations():
    return [
        _ann(1, 1, _kps((20, 10, 2), (15, 8, 2), (25, 8, 1), None, (35, 25, 2))),
        _ann(2, 1, _kps(None, None, None, None, None), bbox=(0, 0, 8, 8)),  # num_keypoints 0
        _ann(
            3, 2, _kps((30, 20, 2), (28, 18, 2), (32, 18, 2), (26, 30, 2), (34, 30, 2)), bbox=(20, 10, 20, 25)
        ),
    ]


def _write(root, annotations, categories=None, *, images=2):
    root = str(root)
    for i in range(1, images + 1):
        rgb = np.random.default_rng(i).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, f"im{i}.png"))
    if categories is None:
        categories = [{"id": 1, "name": "person", "keypoints": NAMES, "skeleton": SKELETON}]
    path = os.path.join(root, "person_keypoints.json")
    data = {
        "images": [
            {"id": i, "file_name": f"im{i}.png", "height": H, "width": W} for i in range(1, images + 1)
        ],
        "annotations": annotations,
        "categories": categories,
    }
    with open(path, "w") as fh:
        json.dump(data, fh)
    return path


def _dataset(root, annotations=None, categories=None, **kwargs):
    path = _write(root, _good_annotations() if annotations is None else annotations, categories)
    return CocoDataset(image_dir=str(root), annotation_file=path, **kwargs)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def test_keypoint_file_loads(tmp_path):
    ds = _dataset(tmp_path)
    assert ds.keypoint_names == tuple(NAMES) and ds.num_keypoints == 5
    assert ds.skeleton == ((1, 2), (1, 3), (2, 4), (3, 5))
    assert ds.flip_map == (0, 2, 1, 4, 3)
    _, t = ds[0]
    kps = t["keypoints"]
    assert kps.dtype == torch.float32 and kps.shape == (2, 5, 3)
    assert kps[0].tolist() == [[20, 10, 2], [15, 8, 2], [25, 8, 1], [0, 0, 0], [35, 25, 2]]
    assert torch.equal(kps[1], torch.zeros(5, 3))  # num_keypoints == 0: kept as a box/mask target, all v = 0
    assert t["boxes"].shape == (2, 4) and t["masks"].shape == (2, H, W)
    _, t = ds[1]
    assert t["keypoints"].shape == (1, 5, 3) and (t["keypoints"][..., 2] == 2).all()


def test_instances_file_has_no_keypoints(tmp_path):
    anns = [
        {k: v for k, v in a.items() if k not in ("keypoints", "num_keypoints")} for a in _good_annotations()
    ]
    ds = _dataset(tmp_path, anns, [{"id": 1, "name": "person"}])
    assert ds.keypoint_names == () and ds.flip_map is None and ds.num_keypoints == 0
    assert "keypoints" not in ds[0][1]
    with pytest.raises(ValueError, match="declares no keypoints"):
        _dataset(tmp_path, anns, [{"id": 1, "name": "person"}], min_keypoints_per_image=1)


def test_missing_num_keypoints_is_filled_in(tmp_path):
    anns = _good_annotations()
    del anns[0]["num_keypoints"]
    ds = _dataset(tmp_path, anns)
    assert ds.coco.anns[1]["num_keypoints"] == 4  # COCOeval's keypoint task reads it


BROKEN = {
    "wrong length": (lambda a: a.update(keypoints=a["keypoints"][:-1]), "14 values; expected 3 * 5 = 15"),
    "visibility": (lambda a: a["keypoints"].__setitem__(2, 3), "keypoint 0 (nose) has visibility 3"),
    "nan": (lambda a: a["keypoints"].__setitem__(3, float("nan")), "keypoint 1 (left_eye) has non-finite"),
    "text": (
        lambda a: a["keypoints"].__setitem__(4, "7"),
        "keypoint 1 (left_eye) has non-finite or non-numeric",
    ),
    "missing": (lambda a: a.pop("keypoints"), "no keypoints list"),
    "count": (lambda a: a.update(num_keypoints=2), "num_keypoints is 2 but 4 keypoint(s) have v > 0"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_keypoints_are_named_errors_or_skipped(tmp_path, kind, caplog):
    change, reason = BROKEN[kind]
    anns = _good_annotations()
    change(anns[0])
    with pytest.raises(DatasetError) as info:
        _dataset(tmp_path, anns)
    message = str(info.value)
    path = str(tmp_path / "person_keypoints.json")
    assert message.startswith(path) and "1 problem(s)" in message
    (line,) = [ln for ln in message.splitlines() if "annotation id" in ln]
    assert "im1.png" in line and "annotation id 1:" in line and reason in line, line
    ds = _dataset(tmp_path, anns, skip_bad=True)
    assert ds.skipped == 1 and sorted(ds.coco.anns) == [2, 3]
    assert "skipped 1 broken record(s) (0 image(s), 1 annotation(s))" in caplog.text
    assert ds[0][1]["keypoints"].shape == (1, 5, 3)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_different_keypoint_lists_are_an_error(tmp_path, skip_bad):
    cats = [
        {"id": 1, "name": "person", "keypoints": NAMES, "skeleton": SKELETON},
        {"id": 2, "name": "robot", "keypoints": ["head", "tail"], "skeleton": [[1, 2]]},
    ]
    with pytest.raises(DatasetError, match="different keypoint lists") as info:
        _dataset(tmp_path, None, cats, skip_bad=skip_bad)
    assert str(tmp_path / "person_keypoints.json") in str(info.value)
    assert "categories 1 ('person') and 2 ('robot')" in str(info.value)


@pytest.mark.parametrize(
    "category, match",
    [
        ({"keypoints": NAMES, "skeleton": [[1, 6]]}, "skeleton"),
        ({"keypoints": ["nose", "left_eye"]}, "left_eye"),  # no right_eye: cannot be flipped
        ({"keypoints": "nose"}, "list of keypoint names"),
    ],
)
def test_malformed_keypoint_categories(tmp_path, category, match):
    with pytest.raises(DatasetError, match=match):
        _dataset(tmp_path, None, [{"id": 1, "name": "person", **category}])


def test_mixed_categories_give_zero_keypoints_to_the_others(tmp_path):
    cats = [{"id": 1, "name": "person", "keypoints": NAMES, "skeleton": SKELETON}, {"id": 5, "name": "ball"}]
    anns = _good_annotations()
    anns.append({k: v for k, v in _ann(9, 2, [], bbox=(1, 1, 5, 5), cat=5).items() if k != "keypoints"})
    ds = _dataset(tmp_path, anns, cats)
    _, t = ds[1]
    assert t["labels"].tolist() == [1, 2] and torch.equal(t["keypoints"][1], torch.zeros(5, 3))


def test_min_keypoints_per_image(tmp_path):
    assert len(_dataset(tmp_path)) == 2  # default 0: every image
    ds = _dataset(tmp_path, min_keypoints_per_image=5)  # image 1 has 4 labelled keypoints, image 2 has 5
    assert ds.image_ids == [2] and ds.filtered_few_keypoints == 1
    with pytest.raises(DatasetError, match="fewer than 6 labelled keypoints"):
        _dataset(tmp_path, min_keypoints_per_image=6)
    # the config key data.min_keypoints_per_image reaches the training set
    from maskrcnn.config import apply_overrides, make_config
    from maskrcnn.engine.train import build_train_dataset

    path = _write(tmp_path, _good_annotations(), None)
    cfg = make_config("keypoint-R-50-FPN")
    cfg = apply_overrides(cfg, [f"data.train_images={tmp_path}", f"data.train_annotations={path}"])
    assert build_train_dataset(cfg).image_ids == [1, 2]
    cfg = apply_overrides(cfg, ["data.min_keypoints_per_image=5"])
    assert build_train_dataset(cfg).image_ids == [2]


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(COCO_MINI, "annotations", "person_keypoints_val2017.json")),
    reason="needs ../shared/data/coco-mini (or MASKRCNN_SHARED)",
)
def test_coco_mini_person_keypoints():
    ds = CocoDataset(
        image_dir=os.path.join(COCO_MINI, "val2017"),
        annotation_file=os.path.join(COCO_MINI, "annotations", "person_keypoints_val2017.json"),
    )
    assert ds.keypoint_names == COCO_PERSON_KEYPOINT_NAMES and ds.skeleton == COCO_PERSON_SKELETON
    assert ds.flip_map == (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
    checked = 0
    for i in range(len(ds)):
        iid = ds.image_ids[i]
        anns = ds._targets[iid]
        if not anns:
            continue
        _, t = ds[i]
        expected = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).view(-1, 17, 3)
        assert torch.equal(t["keypoints"], expected)  # COCO already has (0, 0, 0) for v = 0
        checked += 1
        if checked == 5:
            break
    assert checked == 5
    results = gt_as_keypoint_results(ds.coco)
    assert coco_evaluate(ds.coco, results, "keypoints")["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _target():
    kps = torch.tensor(
        [
            [[20, 10, 2], [15, 8, 2], [25, 8, 1], [0, 0, 0], [35, 25, 2]],
            [[0, 0, 0]] * 3 + [[5, 6, 2], [7, 6, 2]],
        ],
        dtype=torch.float32,
    )
    boxes = torch.tensor([[10.0, 5, 40, 30], [2, 3, 9, 8]])
    masks = torch.zeros((2, H, W), dtype=torch.uint8)
    masks[0, 5:30, 10:40] = 1
    target = {"boxes": boxes, "masks": masks, "keypoints": kps, "labels": torch.tensor([1, 1])}
    return torch.rand(3, H, W), {
        **target,
        "image_id": 3,
        "size": (H, W),
        "index": 0,
        "iscrowd": torch.zeros(2),
    }


def test_flip_mirrors_x_and_swaps_left_right():
    image, target = _target()
    flip_map = (0, 2, 1, 4, 3)
    flipped, out = hflip(image, target, flip_map=flip_map)
    kps, new = target["keypoints"], out["keypoints"]
    assert torch.equal(new[0, 0], torch.tensor([W - 20.0, 10, 2]))  # nose: x -> W - x
    assert torch.equal(new[0, 1], torch.tensor([W - 25.0, 8, 1]))  # left eye <- the right eye, mirrored
    assert torch.equal(new[0, 2], torch.tensor([W - 15.0, 8, 2]))
    assert torch.equal(new[0, 4], torch.zeros(3))  # right wrist <- the unlabelled left wrist: stays (0, 0, 0)
    assert torch.equal(new[1, :3], torch.zeros(3, 3))  # unlabelled keypoints stay (0, 0, 0), not (W, 0, 0)
    assert torch.equal(new[1, 3], torch.tensor([W - 7.0, 6, 2]))
    again, back = hflip(flipped, out, flip_map=flip_map)
    assert (
        torch.equal(again, image)
        and torch.equal(back["keypoints"], kps)
        and torch.equal(back["boxes"], target["boxes"])
    )
    assert torch.equal(target["keypoints"], kps) and out["image_id"] == 3  # input not modified; others kept
    # the random flip passes the map through; without one, keypoints are refused whether drawn or not
    _, via = RandomHorizontalFlip(1.0, flip_map=flip_map)(image, target)
    assert torch.equal(via["keypoints"], new)
    for p in (0.3, 1.0):
        with pytest.raises(ValueError, match="flip_map"):
            RandomHorizontalFlip(p)(image, target)
    with pytest.raises(ValueError, match="flip_map"):
        hflip(image, target)
    with pytest.raises(ValueError, match="permutation"):
        RandomHorizontalFlip(0.5, flip_map=(0, 0, 1))


def test_resize_scales_keypoints_per_axis():
    image, target = _target()
    target["area"] = torch.tensor([750.0, 35.0])
    out_image, out = resize(image, target, (20, 90))  # y x 0.5, x x 1.5
    assert out_image.shape == (3, 20, 90) and out["size"] == (20, 90)
    expected = target["keypoints"] * torch.tensor([1.5, 0.5, 1.0])
    assert torch.allclose(out["keypoints"], expected) and torch.equal(
        out["keypoints"][..., 2], target["keypoints"][..., 2]
    )
    assert torch.allclose(out["area"], target["area"] * 0.75)
    _, out = ResizeShortestEdge((20,), max_size=1000)(image, target)  # 40 x 60 -> 20 x 30
    assert torch.allclose(out["keypoints"][..., :2], target["keypoints"][..., :2] / 2)


@pytest.mark.parametrize("layer", ["hflip", "resize", "flip", "shortest_edge", "model"])
def test_unknown_target_fields_are_refused(layer):
    image, target = _target()
    target["polygons"] = [[1, 2, 3]]
    call = {
        "hflip": lambda: hflip(image, target, flip_map=(0, 2, 1, 4, 3)),
        "resize": lambda: resize(image, target, (20, 30)),
        "flip": lambda: RandomHorizontalFlip(0.0, flip_map=(0, 2, 1, 4, 3))(image, target),
        "shortest_edge": lambda: ResizeShortestEdge((20,), max_size=100)(image, target),
        "model": lambda: ImageTransform(min_size=(20,), max_size=100).resize([image], [target]),
    }[layer]
    with pytest.raises(ValueError, match="'polygons'"):
        call()


def test_model_transform_resizes_keypoints_and_maps_outputs_back():
    image, target = _target()
    transform = ImageTransform(min_size=(20,), max_size=1000)  # 40 x 60 -> 20 x 30
    (resized,), (t,) = transform.resize([image], [target])
    assert resized.shape == (3, 20, 30) and t["size"] == (20, 30)
    assert torch.allclose(t["keypoints"][..., :2], target["keypoints"][..., :2] / 2)
    assert torch.equal(t["keypoints"][..., 2], target["keypoints"][..., 2]) and t["index"] == 0
    det = {
        "boxes": torch.tensor([[5.0, 2.5, 20, 15]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.9]),
        "keypoints": torch.tensor([[[10.0, 5, 1], [3, 4, 1]]]),
        "keypoints_scores": torch.tensor([[2.0, -1.0]]),
    }
    (out,) = ImageTransform.postprocess([det], [(20, 30)], [(40, 60)])
    assert torch.allclose(out["keypoints"], torch.tensor([[[20.0, 10, 1], [6, 8, 1]]]))
    assert torch.allclose(out["boxes"], torch.tensor([[10.0, 5, 40, 30]]))
    assert torch.equal(out["keypoints_scores"], det["keypoints_scores"])
    with pytest.raises(ValueError, match="'heatmaps'"):
        ImageTransform.postprocess([{**det, "heatmaps": torch.zeros(1)}], [(20, 30)], [(40, 60)])


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def gt_as_keypoint_results(coco, shift=0.0):
    """Ground-truth persons with labelled keypoints as detections (score 1), x shifted by ``shift`` * 1..3."""
    out = []
    for a in coco.dataset["annotations"]:
        if a.get("iscrowd") or not a.get("num_keypoints"):
            continue
        kps = list(a["keypoints"])
        for i in range(0, len(kps), 3):
            kps[i] += shift * (1 + (i // 3) % 3)
            kps[i + 2] = 1
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "keypoints": kps,
                "score": 1.0,
            }
        )
    return out


def test_keypoint_evaluation_of_ground_truth_scores_one(tmp_path):
    ds = _dataset(tmp_path)
    perfect = coco_evaluate(ds.coco, gt_as_keypoint_results(ds.coco), "keypoints", oks_sigmas=SIGMAS)
    assert set(KEYPOINT_STAT_NAMES) <= set(perfect) and perfect["AP"] == pytest.approx(1.0)
    assert perfect["per_category"] == {"person": pytest.approx(1.0)}
    worse = coco_evaluate(ds.coco, gt_as_keypoint_results(ds.coco, shift=2.0), "keypoints", oks_sigmas=SIGMAS)
    assert 0 <= worse["AP"] < 1.0
    with pytest.raises(ValueError, match="data.keypoint_oks_sigmas"):
        coco_evaluate(ds.coco, [], "keypoints")  # 5 keypoints: COCO's 17 sigmas do not apply
    with pytest.raises(ValueError, match="data.keypoint_oks_sigmas has 2 values"):
        coco_evaluate(ds.coco, [], "keypoints", oks_sigmas=(0.1, 0.1))
    table = format_metrics_table(
        {"bbox": perfect | {"AP": 0.5}, "keypoints": perfect}, ["background", "person"]
    )
    assert "keypoints" in table and "AR50" in table and "keypoints AP" in table


def test_detections_to_coco_writes_keypoints():
    out = {
        "boxes": torch.tensor([[1.0, 2, 11, 22]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.5]),
        "keypoints": torch.tensor([[[3.0, 4, 1], [5, 6, 1]]]),
        "keypoints_scores": torch.tensor([[9.0, 0.1]]),
    }
    (entry,) = detections_to_coco([out], [7], label_to_category_id={1: 1})
    assert entry["keypoints"] == [3.0, 4.0, 1.0, 5.0, 6.0, 1.0] and entry["score"] == 0.5


class _OracleModel(nn.Module):
    """Returns the ground truth of each image (by its size in a one-image-per-size dataset) as detections."""

    def __init__(self, dataset, *, mask=False, keypoint=True):
        super().__init__()
        self.config = types.SimpleNamespace(roi_heads=types.SimpleNamespace(mask=mask, keypoint=keypoint))
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.calls = 0

    def forward(self, images):
        outs = []
        for _ in images:
            t = self.targets[self.calls]
            self.calls += 1
            kps = t["keypoints"].clone()
            kps[..., 2] = 1
            n = len(t["boxes"])
            outs.append(
                {
                    "boxes": t["boxes"],
                    "labels": t["labels"],
                    "scores": torch.ones(n),
                    "keypoints": kps,
                    "keypoints_scores": torch.ones(n, 5),
                }
            )
        return outs


def test_evaluate_reports_keypoints(tmp_path):
    ds = _dataset(tmp_path)
    metrics = evaluate(_OracleModel(ds), ds, progress=False, keypoint_oks_sigmas=SIGMAS)
    assert set(metrics) == {"bbox", "keypoints"}
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="data.keypoint_oks_sigmas"):
        evaluate(_OracleModel(ds), ds, progress=False)  # checked before the inference


def test_oks_sigmas_config_key():
    cfg = Config()
    assert cfg.data.keypoint_oks_sigmas == ()
    cfg.data.keypoint_oks_sigmas = (0.1, 0.2)
    validate_config(cfg)
    cfg.data.keypoint_oks_sigmas = (0.1, -0.2)
    with pytest.raises(ConfigError, match="data.keypoint_oks_sigmas"):
        validate_config(cfg)


def test_train_dataset_flip_uses_the_dataset_flip_map(tmp_path):
    from maskrcnn.engine.train import build_train_dataset

    path = _write(tmp_path, _good_annotations())
    cfg = Config()
    cfg.data.train_images, cfg.data.train_annotations = str(tmp_path), path
    ds = build_train_dataset(cfg)
    assert ds.transforms.flip_map == ds.flip_map == (0, 2, 1, 4, 3)
    torch.manual_seed(0)
    for i in range(len(ds)):
        assert ds[i][1]["keypoints"].shape[1:] == (5, 3)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def test_draw_keypoints_and_skeleton():
    image = torch.zeros(3, 60, 80)
    boxes = torch.tensor([[5.0, 5, 70, 55]])
    kps = torch.tensor([[[20.0, 20, 1], [60, 20, 1], [40, 45, 1]]])
    scores = torch.tensor([[3.0, 2.0, 0.01]])  # the third is below the 0.05 threshold
    drawn = np.asarray(
        draw_instances(image, boxes=boxes, keypoints=kps, keypoint_scores=scores, skeleton=[[1, 2], [2, 3]])
    )
    color = np.asarray(PALETTE[0])
    assert (drawn[20, 20] == color).all() and (drawn[20, 60] == color).all()  # the dots
    assert (drawn[20, 40] == color).all()  # the line between keypoints 1 and 2
    assert (drawn[45, 40] == 0).all() and (drawn[33, 50] == 0).all()  # no dot 3, no line 2-3
    # ground truth: v decides; v = 0 not drawn
    gt = torch.tensor([[[20.0, 20, 2], [60, 20, 0], [40, 45, 1]]])
    drawn = np.asarray(draw_instances(image, boxes=boxes, keypoints=gt, skeleton=[[1, 2]]))
    assert (drawn[20, 20] == color).all() and (drawn[45, 40] == color).all()
    assert (drawn[20, 60] == 0).all() and (drawn[20, 40] == 0).all()
    with pytest.raises(ValueError, match="skeleton pair"):
        draw_instances(image, boxes=boxes, keypoints=gt, skeleton=[[0, 1]])


def test_predict_draws_keypoints(tmp_path):
    from maskrcnn.engine.predict import predict

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(src / "a.png")

    class KeypointModel(nn.Module):
        def forward(self, images):
            pts = torch.tensor([[[10.0 + 4 * k, 10 + 2 * k, 1] for k in range(17)]])  # dots apart
            return [
                {
                    "boxes": torch.tensor([[5.0, 5, 70, 55]]),
                    "labels": torch.tensor([1]),
                    "scores": torch.tensor([0.9]),
                    "keypoints": pts,
                    "keypoints_scores": torch.ones(1, 17),
                }
            ]

    entries = predict(KeypointModel(), str(src), output_dir=str(tmp_path / "out"), progress=False)
    assert len(entries[0]["keypoints"]) == 51 and entries[0]["keypoints"][:3] == [10.0, 10.0, 1.0]
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png.png"))
    assert (drawn[10, 10] == np.asarray(PALETTE[0])).all()
    assert math.isclose(entries[0]["score"], 0.9, rel_tol=1e-6)
