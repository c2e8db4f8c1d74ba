"""Tests of maskrcnn.data: COCO loading (against pycocotools on real COCO images), record validation (the
file as a whole, every record, every image decoded up front), reads that fail mid-run, transforms,
samplers and loaders (determinism, exact resume, sharding, aspect-ratio grouping). Image modes:
tests/test_images.py."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from maskrcnn.data import (
    CocoDataset,
    Compose,
    DatasetError,
    GroupedBatchSampler,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
    collate,
)
from tests.common import COCO_MINI

# pycocotools' decode trips a NumPy 2 DeprecationWarning (copy=False) in the reference calls
pytestmark = pytest.mark.filterwarnings("ignore:.*__array__ implementation:DeprecationWarning")
needs_coco_mini = pytest.mark.skipif(
    not os.path.isfile(os.path.join(COCO_MINI, "annotations", "instances_val2017.json")),
    reason="needs ../shared/data/coco-mini (or MASKRCNN_SHARED)",
)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    """The image check cache of each test in a fresh folder (never ~/.cache, never the data folder)."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MASKRCNN_CACHE_DIR", str(cache))
    return cache


# --------------------------------------------------------------------------------------------------
# Real COCO: every non-crowd annotation equals pycocotools'
# --------------------------------------------------------------------------------------------------


@needs_coco_mini
@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_mini_matches_pycocotools(split):
    ds = CocoDataset(
        image_dir=os.path.join(COCO_MINI, split),
        annotation_file=os.path.join(COCO_MINI, "annotations", f"instances_{split}.json"),
    )
    coco = ds.coco
    assert ds.skipped == 0 and len(ds) == len(coco.imgs)
    assert ds.num_classes == 81 and ds.class_names[0] == "background" and len(ds.class_names) == 81
    assert ds.category_ids == sorted(coco.getCatIds())
    compared = crowd = 0
    for i in range(len(ds)):
        image, target = ds[i]
        info = ds.image_info(i)
        h, w = info["height"], info["width"]
        assert target["image_id"] == info["id"] and target["size"] == (h, w)
        assert image.dtype == torch.float32 and image.shape == (3, h, w)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=False))
        crowd += len(coco.getAnnIds(imgIds=info["id"], iscrowd=True))
        assert len(target["labels"]) == len(anns)
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), h, w)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        for k, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            expected = torch.tensor([x, y, x + bw, y + bh], dtype=torch.float64).float()
            assert torch.equal(target["boxes"][k], expected)
            assert np.array_equal(target["masks"][k].numpy(), coco.annToMask(ann))
            label = int(target["labels"][k])
            assert ds.label_to_category_id(label) == ann["category_id"]
            assert ds.category_id_to_label(ann["category_id"]) == label
            assert ds.class_names[label] == coco.cats[ann["category_id"]]["name"]
            compared += 1
    assert compared > 600 and crowd > 0  # crowd regions exist and were excluded
    # pixels: exactly PIL's decoding, scaled to [0, 1]
    info = ds.image_info(0)
    raw = np.asarray(Image.open(os.path.join(ds.image_dir, info["file_name"])).convert("RGB"))
    assert torch.equal(ds[0][0], torch.from_numpy(raw.copy()).permute(2, 0, 1).float() / 255)


@needs_coco_mini
def test_category_mapping_round_trip():
    ds = CocoDataset(
        image_dir=os.path.join(COCO_MINI, "val2017"),
        annotation_file=os.path.join(COCO_MINI, "annotations", "instances_val2017.json"),
    )
    for label in range(1, ds.num_classes):
        assert ds.category_id_to_label(ds.label_to_category_id(label)) == label
    assert ds.label_to_category_id(1) == 1 and ds.label_to_category_id(80) == 90  # COCO's ids have gaps
    with pytest.raises(KeyError):
        ds.label_to_category_id(0)  # background has no category
    with pytest.raises(KeyError):
        ds.category_id_to_label(12)  # one of COCO's unused ids


# --------------------------------------------------------------------------------------------------
# Hand-made COCO files in tmp_path
# --------------------------------------------------------------------------------------------------

CATS = [{"id": 3, "name": "b"}, {"id": 7, "name": "a"}]


def _write_image(path, h=40, w=60, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _ann(aid, iid, cat=3, bbox=(10, 5, 20, 10), segm=None, crowd=0):
    x, y, w, h = bbox
    if segm is None:
        segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {
        "id": aid,
        "image_id": iid,
        "category_id": cat,
        "bbox": list(bbox),
        "segmentation": segm,
        "area": float(w * h),
        "iscrowd": crowd,
    }


def _write_coco(root, images, annotations, categories=CATS):
    path = os.path.join(root, "ann.json")
    with open(path, "w") as fh:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, fh)
    return path


def _img(iid, name, h=40, w=60):
    return {"id": iid, "file_name": name, "height": h, "width": w}


def _broken_fixture(root):
    """One good image (id 1) and one record of every broken kind; returns the annotation file."""
    root = str(root)
    for i, name in enumerate(["good.png", "small.png", "rle.png", "poly.png", "cat.png", "box.png"]):
        _write_image(os.path.join(root, name), seed=i)
    _write_image(os.path.join(root, "small.png"), h=30, w=60)  # the record says 40 x 60
    with open(os.path.join(root, "corrupt.jpg"), "wb") as fh:
        fh.write(b"this is not an image" * 10)
    images = [
        _img(1, "good.png"),
        _img(2, "missing.png"),
        _img(3, "corrupt.jpg"),
        _img(4, "small.png"),
        _img(5, "poly.png"),
        _img(6, "cat.png"),
        _img(7, "box.png"),
        _img(8, "rle.png"),
    ]
    bad_rle = {
        "size": [30, 60],
        "counts": mask_utils.encode(np.zeros((30, 60), np.uint8, order="F"))["counts"],
    }
    bad_rle["counts"] = bad_rle["counts"].decode()
    annotations = [
        _ann(101, 1),
        _ann(102, 1, cat=7),
        _ann(201, 2),  # annotation of the missing image: dropped with it
        _ann(501, 5, segm=[[10, 5, 30, 5]]),  # 2 points
        _ann(502, 5),
        _ann(601, 6, cat=42),  # unknown category
        _ann(701, 7, bbox=(50, 5, 20, 10)),  # x + w = 70 > 60 + 1
        _ann(801, 8, segm=bad_rle),  # RLE of the wrong size
    ]
    return _write_coco(root, images, annotations)


def test_broken_records_are_all_reported(tmp_path):
    ann_file = _broken_fixture(tmp_path)
    with pytest.raises(DatasetError) as info:
        CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file)
    msg = str(info.value)
    assert ann_file in msg and "7 problem(s)" in msg
    lines = msg.splitlines()

    def line(text):
        found = [x for x in lines if text in x]
        assert found, f"{text!r} not in:\n{msg}"
        return found[0]

    assert "not found" in line("missing.png") and "image id 2" in line("missing.png")
    assert "cannot decode" in line("corrupt.jpg") and "image id 3" in line("corrupt.jpg")
    assert "does not match" in line("small.png") and "(30, 60)" in line("small.png")
    assert "poly.png" in line("annotation id 501") and "2 point" in line("annotation id 501")
    assert "cat.png" in line("annotation id 601") and "unknown category id 42" in line("annotation id 601")
    assert "box.png" in line("annotation id 701") and "outside the image" in line("annotation id 701")
    assert "rle.png" in line("annotation id 801") and "RLE size" in line("annotation id 801")
    assert not any(f"annotation id {a}" in msg for a in (101, 102, 201, 502))


def test_skip_bad_drops_broken_records(tmp_path, caplog):
    ann_file = _broken_fixture(tmp_path)
    with caplog.at_level("WARNING"):
        ds = CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file, skip_bad=True)
    assert ds.skipped == 7  # 3 images + 4 annotations
    assert "skipped 7" in caplog.text
    assert ds.image_ids == [1, 5, 6, 7, 8]  # images that only lost annotations stay
    assert sorted(ds.coco.anns) == [101, 102, 502]  # also removed from the COCO api (evaluation)
    counts = {ds.image_info(i)["id"]: len(ds[i][1]["labels"]) for i in range(len(ds))}
    assert counts == {1: 2, 5: 1, 6: 0, 7: 0, 8: 0}
    assert ds[0][1]["labels"].tolist() == [1, 2]  # category ids 3, 7 -> labels 1, 2
    filtered = CocoDataset(
        image_dir=str(tmp_path), annotation_file=ann_file, skip_bad=True, filter_empty=True
    )
    assert filtered.image_ids == [1, 5] and filtered.filtered_empty == 3


def test_error_message_is_capped(tmp_path):
    _write_image(os.path.join(tmp_path, "a.png"))
    anns = [_ann(i, 1, cat=99) for i in range(1, 31)]
    ann_file = _write_coco(str(tmp_path), [_img(1, "a.png")], anns)
    with pytest.raises(DatasetError) as info:
        CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file)
    msg = str(info.value)
    assert "30 problem(s)" in msg and "... and 10 more" in msg and len(msg.splitlines()) == 22


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])  # header intact, pixels cut


def test_truncated_jpeg_is_found_before_training(tmp_path, caplog):
    for name in ("a.png", "t.jpg"):
        _write_image(os.path.join(tmp_path, name))
    _truncate(os.path.join(tmp_path, "t.jpg"))
    ann_file = _write_coco(str(tmp_path), [_img(1, "a.png"), _img(2, "t.jpg")], [_ann(1, 1), _ann(2, 2)])
    with pytest.raises(DatasetError) as info:
        CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file)
    (line,) = [x for x in str(info.value).splitlines() if "t.jpg" in x]
    assert "image id 2" in line and "cannot decode" in line
    with caplog.at_level("WARNING"):
        ds = CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file, skip_bad=True)
    assert ds.skipped == 1 and ds.image_ids == [1] and sorted(ds.coco.anns) == [1]
    assert (
        "skipped 1 broken record(s) (1 image(s), 0 annotation(s))" in caplog.text and "t.jpg" in caplog.text
    )


def test_crowd_degenerate_rle_and_multipart_polygons(tmp_path):
    _write_image(os.path.join(tmp_path, "a.png"))
    m = np.zeros((40, 60), np.uint8, order="F")
    m[2:9, 3:50] = 1
    compressed = mask_utils.encode(m)
    compressed["counts"] = compressed["counts"].decode()
    # uncompressed RLE (column-major run lengths, starting with zeros)
    flat = m.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [40, 60], "counts": ([0] if flat[0] else []) + runs}
    anns = [
        _ann(1, 1, bbox=(3, 2, 47, 7), segm=compressed),
        _ann(2, 1, bbox=(3, 2, 47, 7), segm=uncompressed),
        _ann(3, 1, bbox=(5, 10, 40, 20), segm=[[5, 10, 20, 10, 20, 30], [30, 10, 45, 10, 45, 30, 30, 30]]),
        _ann(4, 1, bbox=(0, 0, 60, 40), segm=compressed, crowd=1),
        _ann(5, 1, bbox=(3, 2, 0.5, 7)),  # degenerate: kept for evaluation, not a training target
        _ann(6, 1, bbox=(59.5, 2, 1.2, 7)),  # within the 1 px tolerance, but 0.5 px wide once clipped
    ]
    ds = CocoDataset(
        image_dir=str(tmp_path), annotation_file=_write_coco(str(tmp_path), [_img(1, "a.png")], anns)
    )
    assert ds.num_degenerate == 2 and ds.skipped == 0 and len(ds.coco.anns) == 6
    _, target = ds[0]
    assert target["labels"].tolist() == [1, 1, 1]
    for k, aid in enumerate([1, 2, 3]):
        assert np.array_equal(target["masks"][k].numpy(), ds.coco.annToMask(ds.coco.anns[aid]))
    assert np.array_equal(target["masks"][0].numpy(), m) and np.array_equal(target["masks"][1].numpy(), m)
    assert target["masks"][2].sum() > 0


def test_empty_images_are_kept_unless_filtered(tmp_path):
    for name in ("a.png", "b.png"):
        _write_image(os.path.join(tmp_path, name))
    ann_file = _write_coco(str(tmp_path), [_img(1, "a.png"), _img(2, "b.png")], [_ann(1, 1)])
    ds = CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file)
    assert len(ds) == 2
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 40, 60) and target["masks"].dtype == torch.uint8
    assert len(CocoDataset(image_dir=str(tmp_path), annotation_file=ann_file, filter_empty=True)) == 1


# --------------------------------------------------------------------------------------------------
# The file as a whole: ambiguous or empty files are errors, skip_bad or not
# --------------------------------------------------------------------------------------------------


def _two_images(root):
    for name in ("a.png", "b.png"):
        _write_image(os.path.join(root, name))
    return [_img(1, "a.png"), _img(2, "b.png")]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_duplicate_ids_and_files_are_errors_naming_them(tmp_path, skip_bad):
    root = str(tmp_path)
    images = _two_images(root)

    def error(images, anns):
        with pytest.raises(DatasetError) as info:
            CocoDataset(image_dir=root, annotation_file=_write_coco(root, images, anns), skip_bad=skip_bad)
        msg = str(info.value)
        assert msg.startswith(os.path.join(root, "ann.json")) and "ambiguous" in msg
        return msg

    msg = error(images + [_img(2, "c.png")], [_ann(1, 1)])
    assert "duplicate image id(s) 2 (2 records)" in msg and len(msg.splitlines()) == 1
    msg = error(images, [_ann(7, 1), _ann(8, 2), _ann(7, 2), _ann(8, 1), _ann(8, 1)])
    assert "duplicate annotation id(s) 7 (2 records), 8 (3 records)" in msg
    msg = error(images + [_img(3, "./a.png")], [_ann(1, 1)])
    assert f"{os.path.join(root, 'a.png')} (image ids 1, 3)" in msg and "same file" in msg
    msg = error(images + [_img(1, "a.png")], [_ann(1, 1), _ann(1, 2)])  # all three at once, listed
    assert "3 problems" in msg and len(msg.splitlines()) == 4


@pytest.mark.parametrize("skip_bad", [False, True])
def test_empty_files_are_one_line_errors(tmp_path, skip_bad):
    root = str(tmp_path)
    images = _two_images(root)
    for imgs, anns, expected in [
        ([], [], "no image records"),
        (images, [], "no annotations"),
    ]:
        ann_file = _write_coco(root, imgs, anns)
        with pytest.raises(DatasetError) as info:
            CocoDataset(image_dir=root, annotation_file=ann_file, skip_bad=skip_bad)
        assert str(info.value).startswith(f"{ann_file}: {expected}") and "\n" not in str(info.value)
    with open(ann_file, "w") as fh:
        json.dump({"categories": CATS}, fh)  # no 'images' key at all
    with pytest.raises(DatasetError, match="no image records"):
        CocoDataset(image_dir=root, annotation_file=ann_file, skip_bad=skip_bad)


def test_no_usable_image_left_is_an_error_not_an_empty_sampler(tmp_path):
    root = str(tmp_path)
    images = _two_images(root)
    crowd_only = _write_coco(root, images, [_ann(1, 1, crowd=1)])
    with pytest.raises(DatasetError) as info:
        CocoDataset(image_dir=root, annotation_file=crowd_only, filter_empty=True)
    msg = str(info.value)
    assert msg.startswith(f"{crowd_only}: no usable image left") and "2 without annotations" in msg
    assert "\n" not in msg
    all_broken = _write_coco(root, [_img(1, "missing.png")], [_ann(1, 1)])
    with pytest.raises(DatasetError, match="no usable image left.*1 broken"):
        CocoDataset(image_dir=root, annotation_file=all_broken, skip_bad=True)
    with pytest.raises(ValueError, match="no images"):  # any other empty dataset
        build_train_loader([], batch_size=1, num_workers=0, seed=0, aspect_ratio_grouping=False)


# --------------------------------------------------------------------------------------------------
# The up-front decode of every image: cached, outside the data folder
# --------------------------------------------------------------------------------------------------


def test_dataset_check_is_cached_and_writes_nothing_next_to_the_data(tmp_path, monkeypatch, cache_in_tmp):
    import maskrcnn.data.images as images_mod

    root = tmp_path / "data"
    root.mkdir()
    images = _two_images(str(root))
    ann_file = _write_coco(str(tmp_path), images, [_ann(1, 1), _ann(2, 2)])
    calls = []
    real = images_mod.decode_image
    monkeypatch.setattr(images_mod, "decode_image", lambda p: calls.append(p) or real(p))
    CocoDataset(image_dir=str(root), annotation_file=ann_file)
    assert len(calls) == 2
    assert sorted(os.listdir(root)) == ["a.png", "b.png"] and os.listdir(cache_in_tmp)
    calls.clear()
    ds = CocoDataset(image_dir=str(root), annotation_file=ann_file)
    assert calls == []  # second build: nothing decoded
    _write_image(str(root / "b.png"), h=30)  # the file changes: checked again, and now it is wrong
    with pytest.raises(DatasetError, match=r"b.png.*\(30, 60\).*does not match"):
        CocoDataset(image_dir=str(root), annotation_file=ann_file)
    assert calls == [str(root / "b.png")]
    assert len(ds) == 2


# --------------------------------------------------------------------------------------------------
# A read that fails mid-run returns the next record
# --------------------------------------------------------------------------------------------------


def test_failed_read_after_the_check_uses_the_next_record(tmp_path, caplog):
    root = str(tmp_path)
    names = ["a.png", "b.png", "c.png"]
    for k, name in enumerate(names):
        _write_image(os.path.join(root, name), seed=k)
    images = [_img(k + 1, name) for k, name in enumerate(names)]
    ann_file = _write_coco(root, images, [_ann(1, 1), _ann(2, 2, cat=7), _ann(3, 3)])
    ds = CocoDataset(image_dir=root, annotation_file=ann_file)
    expected = [ds[i] for i in range(3)]
    os.remove(os.path.join(root, "b.png"))  # removed mid-run
    _truncate(os.path.join(root, "c.png"))  # changed mid-run
    with caplog.at_level("WARNING"):
        for _ in range(2):
            image, target = ds[1]  # b, c fail: a (wrapping around)
            assert target["image_id"] == 1 and torch.equal(image, expected[0][0])
            assert torch.equal(target["boxes"], expected[0][1]["boxes"])
    assert ds.read_failures == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # once per file
    assert "b.png" in warnings[0] and "file not found" in warnings[0] and "image id 2" in warnings[0]
    assert "c.png" in warnings[1] and "cannot decode" in warnings[1]
    assert ds[0][1]["image_id"] == 1 and ds[-1][1]["image_id"] == 1
    _write_image(os.path.join(root, "b.png"), h=30)  # back, but another size
    assert ds[1][1]["image_id"] == 1
    os.remove(os.path.join(root, "a.png"))
    with pytest.raises(DatasetError, match="none of the 3 images can be read"):
        ds[0]
    with pytest.raises(IndexError):
        ds[3]


# --------------------------------------------------------------------------------------------------
# EXIF orientation: records have the upright size
# --------------------------------------------------------------------------------------------------


def _as_tensor(rgb):
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("orientation,rotate", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_applied(tmp_path, orientation, rotate):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "e.png")
    Image.fromarray(rgb).save(path, exif=exif.tobytes())
    expected = np.rot90(rgb, k=rotate)  # 6: turn 90 degrees clockwise to display, 8: counter-clockwise
    # the record has the displayed size; the raw size is reported as a mismatch
    h, w = expected.shape[:2]
    ds = CocoDataset(
        image_dir=str(tmp_path),
        annotation_file=_write_coco(str(tmp_path), [_img(1, "e.png", h, w)], [_ann(1, 1, bbox=(1, 1, 5, 5))]),
    )
    assert torch.equal(ds[0][0], _as_tensor(expected))
    if orientation != 3:
        with pytest.raises(
            DatasetError, match=r"\(h, w\) = \(30, 20\) \(after EXIF orientation\) does not match"
        ):
            CocoDataset(
                image_dir=str(tmp_path),
                annotation_file=_write_coco(
                    str(tmp_path), [_img(1, "e.png", 20, 30)], [_ann(1, 1, bbox=(1, 1, 5, 5))]
                ),
            )


def test_exif_orientation_jpeg(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "e.jpg")
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    decoded = np.asarray(Image.open(path).convert("RGB"))  # raw pixels, no orientation
    ds = CocoDataset(
        image_dir=str(tmp_path),
        annotation_file=_write_coco(
            str(tmp_path), [_img(1, "e.jpg", 24, 16)], [_ann(1, 1, bbox=(1, 1, 5, 5))]
        ),
    )
    assert torch.equal(ds[0][0], _as_tensor(np.rot90(decoded, k=-1)))


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _tight_boxes(masks):
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return torch.tensor(boxes, dtype=torch.float32)


def _random_target(h=37, w=53, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros((n, h, w), dtype=torch.uint8)
    for k in range(n):
        x0, y0 = int(torch.randint(0, w - 5, (), generator=g)), int(torch.randint(0, h - 5, (), generator=g))
        x1 = int(torch.randint(x0 + 1, w + 1, (), generator=g))
        y1 = int(torch.randint(y0 + 1, h + 1, (), generator=g))
        masks[k, y0:y1, x0:x1] = (torch.rand(y1 - y0, x1 - x0, generator=g) > 0.3).to(torch.uint8)
        masks[k, y0, x0] = masks[k, y1 - 1, x1 - 1] = 1
    image = torch.rand(3, h, w, generator=g)
    target = {"boxes": _tight_boxes(masks), "masks": masks, "labels": torch.ones(n, dtype=torch.int64)}
    return image, {**target, "size": (h, w), "image_id": 7}


def test_flip_boxes_agree_with_flipped_masks():
    image, target = _random_target()
    flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(out["masks"], target["masks"].flip(-1))
    assert torch.equal(out["boxes"], _tight_boxes(out["masks"]))
    assert out["image_id"] == 7 and out["size"] == target["size"]
    again, back = RandomHorizontalFlip(p=1.0)(flipped, out)
    assert torch.equal(again, image) and torch.equal(back["boxes"], target["boxes"])
    same, kept = RandomHorizontalFlip(p=0.0)(image, target)
    assert same is image and torch.equal(kept["boxes"], target["boxes"])
    assert torch.equal(target["boxes"], _tight_boxes(target["masks"]))  # input not modified


def test_transforms_deterministic_given_torch_seed():
    image, target = _random_target()
    t = Compose([RandomHorizontalFlip(0.5), ResizeShortestEdge((20, 30, 40), max_size=60)])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append([t(image, target) for _ in range(8)])
    for (a, ta), (b, tb) in zip(*runs):
        assert (
            torch.equal(a, b)
            and torch.equal(ta["boxes"], tb["boxes"])
            and torch.equal(ta["masks"], tb["masks"])
        )
    sizes = {tuple(im.shape[-2:]) for im, _ in runs[0]}
    assert len(sizes) > 1  # the size is random


def test_resize_shortest_edge():
    image, target = _random_target(h=40, w=100)
    out, t = ResizeShortestEdge((20,), max_size=1000)(image, target)
    assert out.shape == (3, 20, 50) and t["masks"].shape == (5, 20, 50) and t["size"] == (20, 50)
    assert torch.allclose(t["boxes"], target["boxes"] / 2)
    assert torch.equal(t["masks"], target["masks"][:, ::2, ::2])  # nearest
    out, t = ResizeShortestEdge((80,), max_size=150)(image, target)  # capped by the long side
    assert out.shape == (3, 60, 150)
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 40, 100, dtype=torch.uint8)}
    _, t = ResizeShortestEdge((20,), max_size=1000)(image, empty)
    assert t["masks"].shape == (0, 20, 50)


# --------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------


def _take(iterable, n, start=0):
    return list(itertools.islice(iter(iterable), start, start + n))


def test_training_sampler_epochs_seed_and_resume():
    n = 13
    s = TrainingSampler(n, seed=5)
    stream = _take(s, 3 * n)
    for e in range(3):
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(5 + e)).tolist()
        assert stream[e * n : (e + 1) * n] == expected
    assert _take(TrainingSampler(n, seed=5), 3 * n) == stream
    assert _take(TrainingSampler(n, seed=6), 3 * n) != stream
    for k in (0, 1, 12, 13, 30):
        assert _take(TrainingSampler(n, seed=5, start_index=k), 20) == _take(s, 20, start=k)


def test_training_sampler_sharding():
    n = 11
    r0, r1 = (TrainingSampler(n, seed=1, rank=r, world_size=2) for r in (0, 1))
    a, b = _take(r0, r0.per_epoch), _take(r1, r1.per_epoch)
    assert len(a) == 6 and len(b) == 5
    assert not set(a) & set(b) and sorted(a + b) == list(range(n))  # disjoint, cover the epoch
    full = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    assert a == full[0::2] and b == full[1::2]
    assert _take(TrainingSampler(n, seed=1, rank=1, world_size=2, start_index=7), 10) == _take(
        r1, 10, start=7
    )


def test_grouped_batch_sampler():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    batches = list(GroupedBatchSampler(list(range(10)), groups, 2))
    assert batches == [[1, 2], [0, 3], [5, 6], [4, 7], [8, 9]]


class _FakeDataset(torch.utils.data.Dataset):
    """Cheap images whose pixels encode the index; landscape or portrait; a random flip transform."""

    def __init__(self, n=23):
        self.sizes = [(8, 12) if i % 3 else (12, 8) for i in range(n)]
        self.flip = RandomHorizontalFlip(0.5)

    def __len__(self):
        return len(self.sizes)

    def image_info(self, i):
        return {"id": 100 + i, "height": self.sizes[i][0], "width": self.sizes[i][1]}

    def __getitem__(self, i):
        h, w = self.sizes[i]
        image = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w) + 1000 * i
        target = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]), "image_id": 100 + i, "index": i}
        return self.flip(image, target)


def _batches(loader, n):
    return [(imgs, tgts) for imgs, tgts in itertools.islice(iter(loader), n)]


def _same(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert [t["index"] for t in ta] == [t["index"] for t in tb]
        assert all(torch.equal(x, y) for x, y in zip(ia, ib))
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb))


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_deterministic_and_resumes_exactly(grouping):
    ds = _FakeDataset()
    kw = {"batch_size": 3, "seed": 4, "aspect_ratio_grouping": grouping}
    full = _batches(build_train_loader(ds, num_workers=0, **kw), 20)  # > 2 epochs
    assert all(len(imgs) == 3 for imgs, _ in full)
    if grouping:
        for imgs, _ in full:
            assert len({im.shape[-2] >= im.shape[-1] for im in imgs}) == 1
    flips = [bool(t["boxes"][0, 0] != 1.0) for _, tgts in full for t in tgts]
    assert 0 < sum(flips) < len(flips)
    _same(_batches(build_train_loader(ds, num_workers=2, **kw), 20), full)  # workers change nothing
    for k in (1, 7, 16):
        _same(_batches(build_train_loader(ds, num_workers=0, start_iter=k, **kw), 20 - k), full[k:])
    other = _batches(build_train_loader(ds, num_workers=0, **{**kw, "seed": 5}), 20)
    assert [t["index"] for _, ts in other for t in ts] != [t["index"] for _, ts in full for t in ts]


def test_train_loader_sharded_and_leaves_global_rng_alone():
    ds = _FakeDataset(n=24)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    kw = {"batch_size": 2, "num_workers": 0, "seed": 1, "world_size": 2, "aspect_ratio_grouping": False}
    r0 = _batches(build_train_loader(ds, rank=0, **kw), 6)
    r1 = _batches(build_train_loader(ds, rank=1, **kw), 6)
    assert torch.equal(torch.get_rng_state(), state)
    i0 = {t["index"] for _, ts in r0 for t in ts}
    i1 = {t["index"] for _, ts in r1 for t in ts}
    assert len(i0) == len(i1) == 12 and not i0 & i1  # one epoch: disjoint halves
    _same(_batches(build_train_loader(ds, rank=1, start_iter=4, **kw), 2), r1[4:])
    with pytest.raises(TypeError, match="image_info"):
        build_train_loader(list(range(4)), batch_size=2, num_workers=0, seed=0)


def test_test_loader_each_image_once():
    ds = _FakeDataset(n=11)
    ds.flip = RandomHorizontalFlip(0.0)
    seen = []
    for rank in (0, 1):
        for imgs, tgts in build_test_loader(ds, batch_size=2, num_workers=0, rank=rank, world_size=2):
            assert len(imgs) == len(tgts) <= 2
            seen += [t["index"] for t in tgts]
            assert all(t["image_id"] == 100 + t["index"] for t in tgts)
    assert sorted(seen) == list(range(11))


def test_collate():
    images, targets = collate([(torch.zeros(3, 2, 2), {"a": 1}), (torch.ones(3, 4, 5), {"a": 2})])
    assert [im.shape[-1] for im in images] == [2, 5] and [t["a"] for t in targets] == [1, 2]
