"""COCO evaluation: results conversion, scoring against pycocotools run directly, and the inference loop."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine import evaluate as evaluate_module
from maskrcnn.engine.evaluate import (
    STAT_NAMES,
    coco_evaluate,
    detections_to_coco,
    evaluate,
    format_metrics_table,
)
from tests.common import COCO_MINI, tiny_model

COCO_MINI_VAL = os.path.join(COCO_MINI, "annotations", "instances_val2017.json")
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# pycocotools decode() with numpy 2 warns about __array__(copy=...); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def polygon_annotation(ann_id, image_id, category_id, polygon, h, w, *, iscrowd=0):
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": iscrowd,
        "segmentation": [polygon],
    }
    if iscrowd:
        rle["counts"] = rle["counts"].decode("ascii")
        ann["segmentation"] = rle
    return ann


def rect(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def synthetic_gt() -> dict:
    """Three 160x200 images, two categories (ids 3 and 7), small/medium/large objects and a crowd region."""
    h, w = 160, 200
    images = [{"id": i, "file_name": f"{i:04d}.png", "height": h, "width": w} for i in (11, 12, 13)]
    shapes = [
        (11, 3, rect(10, 10, 30, 28)),  # small
        (11, 7, rect(40, 20, 120, 90)),  # medium
        (11, 3, [130, 100, 190, 100, 160, 150]),  # triangle, medium
        (12, 7, rect(5, 5, 195, 150)),  # large
        (12, 3, rect(50, 40, 58, 50)),  # small, inside the large one
        (13, 3, rect(20, 30, 90, 120)),
        (13, 7, rect(100, 30, 170, 60)),
        (13, 7, rect(100, 70, 171, 101)),
    ]
    anns = [polygon_annotation(k + 1, i, c, p, h, w) for k, (i, c, p) in enumerate(shapes)]
    anns.append(polygon_annotation(len(anns) + 1, 13, 3, rect(120, 110, 195, 155), h, w, iscrowd=1))
    categories = [{"id": 3, "name": "cat", "supercategory": "animal"}, {"id": 7, "name": "dog"}]
    return {"images": images, "annotations": anns, "categories": categories}


def gt_as_results(coco: COCO) -> list[dict]:
    """The non-crowd ground truth as detections with score 1."""
    results = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = coco.annToRLE(ann)
        counts = rle["counts"]
        seg = {"size": rle["size"], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": list(ann["bbox"]),
                "score": 1.0,
                "segmentation": seg,
            }
        )
    return results


def erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def perturbed(results: list[dict], images: dict, seed: int = 0) -> list[dict]:
    """Jittered boxes, eroded masks, random scores, some detections dropped and some false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for r in results:
        if rng.random() < 0.2:
            continue
        x, y, w, h = r["bbox"]
        box = [x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h), w * rng.uniform(0.85, 1.1), h]
        mask = mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        for _ in range(int(rng.integers(0, 3))):
            mask = erode(mask.astype(bool)).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({**r, "bbox": box, "score": float(rng.random()), "segmentation": rle})
    cats = sorted({r["category_id"] for r in results})
    for image_id, info in list(images.items())[:20]:  # false positives
        hh, ww = info["height"], info["width"]
        x, y = rng.uniform(0, ww / 2), rng.uniform(0, hh / 2)
        w, h = rng.uniform(4, ww / 2), rng.uniform(4, hh / 2)
        mask = np.zeros((hh, ww), np.uint8)
        mask[int(y) : int(y + h), int(x) : int(x + w)] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        cat = cats[int(rng.integers(len(cats)))]
        out.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "score": 0.5,
                "segmentation": rle,
            }
        )
    return out


def pycocotools_direct(coco_gt: COCO, results: list[dict], iou_type: str):
    """COCOeval run by hand; box AP scores the entries without masks, mask AP without boxes."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    dets = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def load_coco_mini() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(COCO_MINI_VAL)


needs_coco_mini = pytest.mark.skipif(not os.path.isfile(COCO_MINI_VAL), reason="needs ../shared coco-mini")


# --------------------------------------------------------------------------------------------------
# detections_to_coco
# --------------------------------------------------------------------------------------------------


def test_detections_to_coco_round_trip():
    g = torch.Generator().manual_seed(0)
    h, w = 37, 53
    boxes = torch.tensor([[1.5, 2.0, 20.0, 30.25], [10.0, 0.0, 53.0, 37.0], [0.0, 0.0, 1.0, 1.0]])
    masks = torch.rand(3, 1, h, w, generator=g)
    masks[2] = 0.0  # an empty mask still encodes
    out = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 1]),
        "scores": torch.tensor([0.9, 0.5, 0.25]),
        "masks": masks,
    }
    results = detections_to_coco([out], [42], label_to_category_id={1: 18, 2: 90}.get, mask_threshold=0.6)
    assert len(results) == 3
    json.loads(json.dumps(results))  # JSON-ready
    for r, box, mask, label, score in zip(results, boxes, masks, (1, 2, 1), (0.9, 0.5, 0.25)):
        assert r["image_id"] == 42 and isinstance(r["image_id"], int)
        assert r["category_id"] == {1: 18, 2: 90}[label]
        x1, y1, x2, y2 = box.tolist()
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert r["score"] == pytest.approx(score)
        seg = r["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [h, w]
        decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        np.testing.assert_array_equal(decoded, (mask[0] >= 0.6).numpy().astype(np.uint8))


def test_detections_to_coco_mappings_bool_masks_and_no_masks():
    masks = torch.zeros(2, 8, 9, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    out = {
        "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 2, 3]]),
        "labels": torch.tensor([2, 1]),
        "scores": torch.ones(2),
    }
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    res = detections_to_coco([out, empty], [torch.tensor(5), 6], label_to_category_id={1: 10, 2: 20})
    assert [r["category_id"] for r in res] == [20, 10]
    assert all("segmentation" not in r for r in res) and {r["image_id"] for r in res} == {5}
    res = detections_to_coco([{**out, "masks": masks}], [1], label_to_category_id=lambda label: label)
    np.testing.assert_array_equal(mask_utils.decode(res[0]["segmentation"]), masks[0].numpy())
    assert mask_utils.area(res[1]["segmentation"]) == 0
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([out], [1, 2], label_to_category_id=int)


# --------------------------------------------------------------------------------------------------
# coco_evaluate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_against_itself_scores_one(iou_type):
    coco = make_coco(synthetic_gt())
    results = gt_as_results(coco)
    before = copy.deepcopy(results)
    m = coco_evaluate(coco, results, iou_type)
    assert results == before  # not modified
    for name in AP_NAMES + ("AR100",):
        assert m[name] == pytest.approx(1.0), name
    assert m["per_category"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert "Average Precision" in m["summary"]


@needs_coco_mini
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_mini_ground_truth_against_itself_scores_one(iou_type):
    coco = load_coco_mini()
    m = coco_evaluate(coco, gt_as_results(coco), iou_type)
    for name in AP_NAMES + ("AR100",):
        assert m[name] == pytest.approx(1.0), name
    assert all(v is None or v == pytest.approx(1.0) for v in m["per_category"].values())
    assert sum(v is not None for v in m["per_category"].values()) > 20


def _check_against_pycocotools(coco, results, iou_type, image_ids=None):
    m = coco_evaluate(coco, results, iou_type, image_ids=image_ids)
    direct = pycocotools_direct(coco, results, iou_type) if image_ids is None else None
    if image_ids is not None:
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            direct = COCOeval(coco, coco.loadRes(dets), iou_type)
            direct.params.imgIds = sorted(image_ids)
            direct.evaluate()
            direct.accumulate()
            direct.summarize()
    assert [m[name] for name in STAT_NAMES] == [float(v) for v in direct.stats]
    precision = direct.eval["precision"]
    for k, cat_id in enumerate(direct.params.catIds):
        p = precision[:, :, k, 0, -1]
        expected = float(p[p > -1].mean()) if (p > -1).any() else None
        assert m["per_category"][coco.cats[cat_id]["name"]] == expected
    return m


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perturbed_results_match_pycocotools_synthetic(iou_type):
    coco = make_coco(synthetic_gt())
    results = perturbed(gt_as_results(coco), coco.imgs, seed=1)
    m = _check_against_pycocotools(coco, results, iou_type)
    assert 0.0 < m["AP"] < 1.0
    _check_against_pycocotools(coco, results, iou_type, image_ids=[11, 13])


@needs_coco_mini
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perturbed_results_match_pycocotools_coco_mini(iou_type):
    coco = load_coco_mini()
    m = _check_against_pycocotools(coco, perturbed(gt_as_results(coco), coco.imgs), iou_type)
    assert 0.0 < m["AP"] < 1.0


def test_mask_ap_uses_the_mask_area():
    """A detection with a small mask in a large box counts as small for mask AP (as COCO defines it)."""
    coco = make_coco(synthetic_gt())
    results = [r for r in gt_as_results(coco) if r["image_id"] == 11]
    mask = np.zeros((160, 200), np.uint8)
    mask[100:110, 20:30] = 1  # 100 pixels: small
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    fp = {
        "image_id": 11,
        "category_id": 7,
        "bbox": [0.0, 0.0, 190.0, 150.0],
        "score": 0.99,
        "segmentation": rle,
    }
    m = coco_evaluate(coco, results + [fp], "segm", image_ids=[11])
    assert m["APs"] == pytest.approx(1.0)  # no small dog in image 11: the small false positive is ignored
    assert m["APl"] == -1.0  # no large ground truth there
    assert m["APm"] < 1.0  # the 'dog' false positive outranks the medium dog


def test_crowd_regions_are_ignored():
    coco = make_coco(synthetic_gt())
    crowd = next(a for a in coco.dataset["annotations"] if a["iscrowd"])
    x, y, w, h = crowd["bbox"]
    on_crowd = {"image_id": 13, "category_id": 3, "bbox": [x + 2, y + 2, w - 4, h - 4], "score": 0.99}
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in gt_as_results(coco)]
    assert coco_evaluate(coco, results + [on_crowd], "bbox")["AP"] == pytest.approx(1.0)


def test_empty_results_give_zeros():
    coco = make_coco(synthetic_gt())
    for iou_type in ("bbox", "segm"):
        m = coco_evaluate(coco, [], iou_type)
        assert all(m[name] == 0.0 for name in STAT_NAMES), m
        assert m["per_category"] == {"cat": 0.0, "dog": 0.0}
        assert "Average Precision" in m["summary"]
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(coco, [], "keypoints")
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(coco, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], "bbox")
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(coco, [{"image_id": 11, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], "segm")


def test_format_metrics_table():
    coco = make_coco(synthetic_gt())
    results = gt_as_results(coco)
    metrics = {"bbox": coco_evaluate(coco, results, "bbox"), "segm": coco_evaluate(coco, results, "segm")}
    table = format_metrics_table(metrics, ["background", "cat", "dog", "bird"])
    assert "AP50" in table and "segm" in table and "100.0" in table
    lines = table.splitlines()
    assert any(line.startswith("cat") for line in lines)
    assert any(line.startswith("bird") and line.rstrip().endswith("-") for line in lines)  # no ground truth
    assert "dog" in format_metrics_table({"bbox": metrics["bbox"]})


# --------------------------------------------------------------------------------------------------
# evaluate(): inference over a dataset written to disk
# --------------------------------------------------------------------------------------------------


class StandInCocoDataset:
    """The parts of ``maskrcnn.data.coco.CocoDataset`` that evaluation uses (until that module exists)."""

    def __init__(self, *, image_dir, annotation_file, filter_empty=False, skip_bad=False, transforms=None):
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(annotation_file)
        self.image_dir = image_dir
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_names = ["background"] + [self.coco.cats[c]["name"] for c in self.category_ids]
        self.num_classes = len(self.class_names)

    def label_to_category_id(self, label):
        return self.category_ids[int(label) - 1]

    def image_info(self, index):
        return self.coco.imgs[self.image_ids[index]]

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, index):
        info = self.image_info(index)
        with Image.open(os.path.join(self.image_dir, info["file_name"])) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return image, {"image_id": info["id"], "size": tuple(image.shape[-2:])}


def stand_in_build_test_loader(dataset, *, batch_size=1, num_workers=0, rank=0, world_size=1):
    indices = list(range(rank, len(dataset), world_size))
    for start in range(0, len(indices), batch_size):
        images, targets = zip(*(dataset[i] for i in indices[start : start + batch_size]))
        yield list(images), list(targets)


def install_data_stand_ins():
    """Use the real ``maskrcnn.data`` modules when they exist, the stand-ins above otherwise."""
    try:
        from maskrcnn.data.coco import CocoDataset
    except ImportError:
        CocoDataset = StandInCocoDataset
    try:
        import maskrcnn.data.loader  # noqa: F401
    except ImportError:
        if "maskrcnn.data" not in sys.modules:
            sys.modules["maskrcnn.data"] = types.ModuleType("maskrcnn.data")
        module = types.ModuleType("maskrcnn.data.loader")
        module.build_test_loader = stand_in_build_test_loader
        sys.modules["maskrcnn.data.loader"] = module
    return CocoDataset


@pytest.fixture
def data_stand_ins():
    saved = {k: sys.modules.get(k) for k in ("maskrcnn.data", "maskrcnn.data.loader")}
    yield install_data_stand_ins()
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def write_tiny_dataset(root) -> tuple[str, str]:
    """Three 48x64 PNGs with coloured rectangles, annotated as two categories (ids 3 and 7) in COCO json."""
    g = np.random.default_rng(0)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    h, w = 48, 64
    images, anns = [], []
    for i in range(3):
        pixels = (g.random((h, w, 3)) * 50).astype(np.uint8)
        for j in range(2):
            x1, y1 = int(g.integers(0, w // 2)), int(g.integers(0, h // 2))
            x2, y2 = x1 + int(g.integers(10, w // 2)), y1 + int(g.integers(10, h // 2))
            pixels[y1:y2, x1:x2, j] = 230
            cat = (3, 7)[j]
            anns.append(polygon_annotation(len(anns) + 1, 100 + i, cat, rect(x1, y1, x2, y2), h, w))
        name = f"img{i}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, name))
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": synthetic_gt()["categories"]}, fh)
    return image_dir, ann_file


def test_evaluate_end_to_end(tmp_path, data_stand_ins, capsys):
    CocoDataset = data_stand_ins
    image_dir, ann_file = write_tiny_dataset(tmp_path)
    dataset = CocoDataset(image_dir=image_dir, annotation_file=ann_file)
    model = tiny_model(dataset.num_classes)
    model.train()
    out_dir = tmp_path / "eval"
    metrics = evaluate(model, dataset, batch_size=2, output_dir=str(out_dir), progress=True)
    assert model.training  # mode restored
    assert set(metrics) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert set(STAT_NAMES) <= set(metrics[task]) and set(metrics[task]["per_category"]) == {"cat", "dog"}
    assert json.loads((out_dir / "metrics.json").read_text())["bbox"]["AP"] == metrics["bbox"]["AP"]
    results = json.loads((out_dir / "coco_results.json").read_text())
    assert results, "an untrained model with a 0.05 score threshold still detects something"
    assert {r["image_id"] for r in results} <= {100, 101, 102}
    assert {r["category_id"] for r in results} <= {3, 7}
    assert all("segmentation" in r for r in results)
    # the written results score to the returned metrics
    assert coco_evaluate(dataset.coco, results, "segm")["AP"] == metrics["segm"]["AP"]
    assert "evaluate" in capsys.readouterr().err

    faster = tiny_model(dataset.num_classes, mask=False)
    metrics = evaluate(faster, dataset, progress=False)
    assert set(metrics) == {"bbox"}


def test_evaluate_encoding_in_a_thread_writes_the_same_results(tmp_path, data_stand_ins, monkeypatch):
    # beside a GPU the masks' RLEs are encoded in a thread while the next batch runs: the same results
    image_dir, ann_file = write_tiny_dataset(tmp_path)
    dataset = data_stand_ins(image_dir=image_dir, annotation_file=ann_file)
    model = tiny_model(dataset.num_classes)
    runs = {}
    for overlap in (False, True):
        monkeypatch.setattr(evaluate_module, "_overlap", lambda device, overlap=overlap: overlap)
        out_dir = tmp_path / f"overlap-{overlap}"
        metrics = evaluate(model, dataset, batch_size=2, output_dir=str(out_dir), progress=False)
        runs[overlap] = (metrics, (out_dir / "coco_results.json").read_text())
    assert runs[False] == runs[True] and json.loads(runs[True][1])
    monkeypatch.undo()  # the real switch: a thread beside a GPU only
    assert evaluate_module._overlap(torch.device("cuda")) and not evaluate_module._overlap(
        torch.device("cpu")
    )


def _distributed_worker(rank, world_size, init_file, image_dir, ann_file, out_dir):
    CocoDataset = install_data_stand_ins()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        dataset = CocoDataset(image_dir=image_dir, annotation_file=ann_file)
        model = tiny_model(dataset.num_classes)
        metrics = evaluate(model, dataset, output_dir=out_dir, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(metrics, fh)
    finally:
        torch.distributed.destroy_process_group()


# Before torch 2.8 (pytorch/pytorch#154976) destroying a gloo group held the GIL while joining its worker
# threads, and a worker freeing evaluate's last broadcast needed the GIL: a deadlock at the end of this test
# in about 1 run in 5 on a loaded 2-core machine with torch 2.4.1 (never seen with 2.13).
_GLOO_TEARDOWN_DEADLOCKS = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 8)


@pytest.mark.skipif(_GLOO_TEARDOWN_DEADLOCKS, reason="torch < 2.8: gloo teardown can deadlock (#154976)")
@pytest.mark.usefixtures("one_thread")  # as the workers: the same kernels on the same images, same rounding
def test_evaluate_distributed_matches_single_process(tmp_path, data_stand_ins):
    CocoDataset = data_stand_ins
    image_dir, ann_file = write_tiny_dataset(tmp_path)
    dataset = CocoDataset(image_dir=image_dir, annotation_file=ann_file)
    single = evaluate(
        tiny_model(dataset.num_classes), dataset, output_dir=str(tmp_path / "one"), progress=False
    )
    out_dir = tmp_path / "two"
    out_dir.mkdir()
    torch.multiprocessing.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), image_dir, ann_file, str(out_dir)),
        nprocs=2,
    )
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns rank 0's metrics
    for task in ("bbox", "segm"):
        assert ranks[0][task]["AP"] == pytest.approx(single[task]["AP"], abs=1e-6)
    one = json.loads((tmp_path / "one" / "coco_results.json").read_text())
    two = json.loads((out_dir / "coco_results.json").read_text())
    assert len(one) == len(two) and [r["image_id"] for r in one] == [r["image_id"] for r in two]
    for a, b in zip(one, two):
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["category_id"] == b["category_id"]


class _Halved:
    """A dataset that gives images at half their annotated size."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        return image[:, ::2, ::2].contiguous(), target


def test_evaluate_rejects_resized_images(tmp_path, data_stand_ins):
    image_dir, ann_file = write_tiny_dataset(tmp_path)
    dataset = data_stand_ins(image_dir=image_dir, annotation_file=ann_file)
    with pytest.raises(ValueError, match="original size"):
        evaluate(tiny_model(dataset.num_classes), _Halved(dataset), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_on_cuda_matches_cpu(tmp_path, data_stand_ins):
    image_dir, ann_file = write_tiny_dataset(tmp_path)
    dataset = data_stand_ins(image_dir=image_dir, annotation_file=ann_file)
    cpu = evaluate(tiny_model(dataset.num_classes), dataset, progress=False)
    gpu = evaluate(tiny_model(dataset.num_classes), dataset, device="cuda", progress=False)
    for task in ("bbox", "segm"):
        assert gpu[task]["AP"] == pytest.approx(cpu[task]["AP"], abs=0.02)
