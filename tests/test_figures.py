"""Tests of the synthetic person-keypoints dataset (stick figures): COCO format, keypoint consistency,
visibility, left/right, determinism, reuse and refusing to overwrite other files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn.data.figures import CATEGORY, FLIP_INDICES, KEYPOINT_NAMES, SKELETON, make_figures_dataset
from maskrcnn.data.shapes import make_shapes_dataset
from tests.common import assert_refuses_a_foreign_file

SMALL = {"num_train": 12, "num_val": 4, "image_size": (160, 192)}
K = len(KEYPOINT_NAMES)


def _files(root):
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def _mask(coco: COCO, ann: dict) -> np.ndarray:
    with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
        warnings.filterwarnings("ignore", message=".*__array__ implementation", category=DeprecationWarning)
        return coco.annToMask(ann).astype(bool)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    return root, make_figures_dataset(str(root), seed=0, **SMALL)


def _annotations(paths):
    for split in ("train", "val"):
        coco = _coco(paths[f"{split}_annotations"])
        for ann in coco.dataset["annotations"]:
            yield coco, coco.imgs[ann["image_id"]], ann


def test_layout_and_category(figures):
    root, paths = figures
    assert paths == {
        "train_images": os.path.join(root, "train"),
        "train_annotations": os.path.join(root, "annotations", "person_keypoints_train.json"),
        "val_images": os.path.join(root, "val"),
        "val_annotations": os.path.join(root, "annotations", "person_keypoints_val.json"),
    }
    assert len(os.listdir(paths["train_images"])) == 12 and len(os.listdir(paths["val_images"])) == 4
    for split in ("train", "val"):
        coco = _coco(paths[f"{split}_annotations"])
        assert list(coco.cats.values()) == [CATEGORY] and CATEGORY["keypoints"] == list(KEYPOINT_NAMES)
        assert all((im["height"], im["width"]) == (160, 192) for im in coco.imgs.values())
        per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.imgs]
        assert min(per_image) >= 1 and max(per_image) <= 3

    # the flip map swaps left and right names and is its own inverse; the skeleton is 1-based
    def mirror(name: str) -> str:
        side, _, part = name.partition("_")
        return {"left": "right_" + part, "right": "left_" + part}.get(side, name)

    for i, j in enumerate(FLIP_INDICES):
        assert KEYPOINT_NAMES[j] == mirror(KEYPOINT_NAMES[i]) and FLIP_INDICES[j] == i
    assert all(1 <= a <= K and 1 <= b <= K for a, b in SKELETON)


def test_same_constants_as_the_keypoints_module():
    keypoints = pytest.importorskip("maskrcnn.data.keypoints")
    assert KEYPOINT_NAMES == tuple(keypoints.COCO_PERSON_KEYPOINT_NAMES)
    assert SKELETON == tuple(tuple(p) for p in keypoints.COCO_PERSON_SKELETON)
    # the flip map of the names (its home is being settled: look in both places)
    for module in ("maskrcnn.ops.keypoints", "maskrcnn.data.keypoints"):
        flip_map = getattr(pytest.importorskip(module), "keypoint_flip_map", None)
        if flip_map is not None:
            assert FLIP_INDICES == tuple(flip_map(KEYPOINT_NAMES))
            break


def test_annotations_are_consistent(figures):
    _, paths = figures
    counts = {0: 0, 1: 0, 2: 0}
    heights = []
    for coco, img, ann in _annotations(paths):
        h, w = img["height"], img["width"]
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], str)
        mask = _mask(coco, ann)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum() >= 100
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        heights.append(ann["bbox"][3])
        kps = ann["keypoints"]
        assert len(kps) == 3 * K
        kp = np.array(kps, dtype=np.float64).reshape(K, 3)
        v = kp[:, 2]
        assert set(v.tolist()) <= {0, 1, 2} and all(isinstance(x, int) for x in kps[2::3])
        assert ann["num_keypoints"] == int((v > 0).sum()) >= 8
        assert (kp[v == 0] == 0).all()  # COCO: unlabelled keypoints are (0, 0, 0)
        labelled = kp[v > 0]
        assert (labelled[:, 0] >= 0).all() and (labelled[:, 0] < w).all()
        assert (labelled[:, 1] >= 0).all() and (labelled[:, 1] < h).all()
        x0, y0, bw, bh = ann["bbox"]
        for x, y, vis in kp:
            counts[int(vis)] += 1
            if vis == 2:  # on the figure's visible mask (the pixel under it), hence inside its box
                assert mask[int(y), int(x)]
                assert x0 <= x <= x0 + bw and y0 <= y <= y0 + bh
        assert (v == 2).sum() >= 6
    assert all(counts.values())  # visible, occluded and outside-the-image keypoints all occur
    assert counts[2] > 4 * counts[1]
    assert min(heights) < 80 and max(heights) > 60  # varied scale


def test_occluded_keypoints_are_covered(figures):
    """Some v = 1 keypoints lie under another figure (others under the figure's own other limb, or under an
    un-annotated occluder block)."""
    _, paths = figures
    under_other = 0
    for coco, img, ann in _annotations(paths):
        kp = np.array(ann["keypoints"], dtype=np.float64).reshape(K, 3)
        same_image = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        others = [_mask(coco, a) for a in same_image if a["id"] != ann["id"]]
        for x, y, vis in kp:
            if vis == 1:
                under_other += any(m[int(y), int(x)] for m in others)
    assert under_other > 0


def test_left_and_right_are_distinct_and_consistent(figures):
    """Left/right landmarks of a figure are apart, and the figure's left is on the image's right (figures
    face the viewer and stand within 25 degrees of upright): the cue that makes left and right learnable."""
    _, paths = figures
    pairs = [(i, j) for i, j in enumerate(FLIP_INDICES) if i < j]
    checked = 0
    for _, _, ann in _annotations(paths):
        kp = np.array(ann["keypoints"], dtype=np.float64).reshape(K, 3)
        size = max(ann["bbox"][2:])
        for left, right in pairs:
            if kp[left, 2] and kp[right, 2]:
                assert np.hypot(*(kp[left, :2] - kp[right, :2])) > 0.02 * size
        for left, right in ((1, 2), (3, 4), (5, 6), (11, 12)):  # eyes, ears, shoulders, hips
            if kp[left, 2] and kp[right, 2]:
                assert kp[left, 0] > kp[right, 0]
                checked += 1
    assert checked > 20


def test_deterministic_bytes_and_seed_changes_them(figures, tmp_path):
    root, _ = figures
    make_figures_dataset(str(tmp_path / "same"), seed=0, **SMALL)
    make_figures_dataset(str(tmp_path / "other"), seed=1, **SMALL)
    a, b, c = _files(root), _files(tmp_path / "same"), _files(tmp_path / "other")
    assert len(a) == 12 + 4 + 3 and a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in images) == len(images)


def test_reused_when_complete_regenerated_otherwise(figures, tmp_path):
    root = tmp_path / "d"
    paths = make_figures_dataset(str(root), seed=0, **SMALL)
    first = os.path.join(paths["train_images"], "0000001.png")
    os.utime(first, (1, 1))
    assert make_figures_dataset(str(root), seed=0, **SMALL) == paths
    assert os.path.getmtime(first) == 1  # reused, not rewritten
    os.remove(os.path.join(paths["val_images"], "1000002.png"))
    make_figures_dataset(str(root), seed=0, **SMALL)  # incomplete: regenerated
    assert _files(root) == _files(figures[0])
    make_figures_dataset(str(root), seed=0, **{**SMALL, "num_val": 2})  # other parameters: regenerated
    with open(root / "meta.json") as fh:
        assert json.load(fh)["num_val"] == 2
    assert sorted(os.listdir(root / "val")) == ["1000001.png", "1000002.png"]  # its own stale files go
    make_figures_dataset(str(root), seed=0, **SMALL)  # and back: still its own files
    assert _files(root) == _files(figures[0])


def test_refuses_to_overwrite_files_it_did_not_write(tmp_path):
    assert_refuses_a_foreign_file(make_figures_dataset, tmp_path / "a", "train/0000003.png", seed=0, **SMALL)

    # the shapes dataset uses the same image names and meta.json: not ours either
    shapes = tmp_path / "shapes"
    make_shapes_dataset(str(shapes), num_train=2, num_val=1, image_size=(64, 64))
    before = _files(shapes)
    with pytest.raises(FileExistsError, match="meta.json"):
        make_figures_dataset(str(shapes), seed=0, **SMALL)
    assert _files(shapes) == before

    # other files in the folder are left alone
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    make_figures_dataset(str(tmp_path / "b"), seed=0, num_train=1, num_val=1)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_interrupted_run_is_resumed(figures, tmp_path):
    root = tmp_path / "r"
    make_figures_dataset(str(root), seed=0, **SMALL)
    with open(root / "meta.json") as fh:
        meta = json.load(fh)
    with open(root / "meta.json", "w") as fh:  # what an interrupted run leaves behind
        json.dump({**meta, "complete": False}, fh)
    os.remove(root / "annotations" / "person_keypoints_val.json")
    make_figures_dataset(str(root), seed=0, **SMALL)
    assert _files(root) == _files(figures[0])


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 64"):
        make_figures_dataset(str(tmp_path), num_train=1, num_val=1, image_size=(32, 256))
    with pytest.raises(ValueError):
        make_figures_dataset(str(tmp_path), num_train=-1, num_val=1)


def test_loads_through_coco_dataset(figures):
    from maskrcnn.data import CocoDataset

    _, paths = figures
    ds = CocoDataset(image_dir=paths["train_images"], annotation_file=paths["train_annotations"])
    _, target = ds[0]
    if "keypoints" not in target:
        pytest.skip("CocoDataset does not load keypoints yet")
    assert tuple(ds.keypoint_names) == KEYPOINT_NAMES
    assert tuple(ds.flip_map) == FLIP_INDICES
    coco = _coco(paths["train_annotations"])
    for i in range(len(ds)):
        image, target = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[ds.image_info(i)["id"]]))
        expected = np.array([a["keypoints"] for a in anns], dtype=np.float32).reshape(-1, K, 3)
        assert target["keypoints"].shape == (len(anns), K, 3)
        np.testing.assert_allclose(target["keypoints"].numpy(), expected)
        assert target["masks"].shape[0] == len(anns)
