"""Tests of the synthetic shapes dataset: determinism, reuse, both segmentation kinds, consistency."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from maskrcnn.data import CocoDataset, make_shapes_dataset
from tests.common import assert_refuses_a_foreign_file

SMALL = {"num_train": 10, "num_val": 4, "image_size": (128, 160)}


def _files(root):
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, make_shapes_dataset(str(root), seed=0, **SMALL)


def test_deterministic_bytes_and_seed_changes_them(shapes, tmp_path):
    root, _ = shapes
    make_shapes_dataset(str(tmp_path / "same"), seed=0, **SMALL)
    make_shapes_dataset(str(tmp_path / "other"), seed=1, **SMALL)
    a, b, c = _files(root), _files(tmp_path / "same"), _files(tmp_path / "other")
    assert len(a) == 10 + 4 + 3 and a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in images) == len(images)


def test_same_bytes_with_one_drawing_thread_or_several(shapes, tmp_path, monkeypatch):
    from maskrcnn.data import synthetic

    root, _ = shapes
    monkeypatch.setattr(synthetic, "_workers", lambda: 1)
    make_shapes_dataset(str(tmp_path / "one"), seed=0, **SMALL)
    monkeypatch.setattr(synthetic, "_workers", lambda: 5)
    make_shapes_dataset(str(tmp_path / "five"), seed=0, **SMALL)
    assert _files(tmp_path / "one") == _files(tmp_path / "five") == _files(root)


def test_reused_when_complete_regenerated_otherwise(shapes, tmp_path):
    root = tmp_path / "d"
    paths = make_shapes_dataset(str(root), seed=0, **SMALL)
    first = os.path.join(paths["train_images"], "0000001.png")
    os.utime(first, (1, 1))
    assert make_shapes_dataset(str(root), seed=0, **SMALL) == paths
    assert os.path.getmtime(first) == 1  # reused, not rewritten
    os.remove(os.path.join(paths["val_images"], "1000002.png"))
    make_shapes_dataset(str(root), seed=0, **SMALL)  # incomplete: regenerated
    assert _files(root) == _files(shapes[0])
    make_shapes_dataset(str(root), seed=0, **{**SMALL, "num_val": 2})  # other parameters: regenerated
    with open(root / "meta.json") as fh:
        assert json.load(fh)["num_val"] == 2


def test_loads_through_coco_dataset_with_consistent_masks(shapes):
    _, paths = shapes
    seen_kinds, labels = set(), set()
    for split in ("train", "val"):
        ds = CocoDataset(image_dir=paths[f"{split}_images"], annotation_file=paths[f"{split}_annotations"])
        assert ds.category_ids == [1, 5, 9] and ds.class_names == [
            "background",
            "circle",
            "square",
            "triangle",
        ]
        seen_kinds |= {type(a["segmentation"]).__name__ for a in ds.coco.anns.values()}
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 128, 160) and len(target["labels"]) >= 1
            labels |= set(target["labels"].tolist())
            union = torch.zeros(128, 160, dtype=torch.int64)
            for box, mask in zip(target["boxes"], target["masks"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert len(ys) >= 50
                tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert box.tolist() == [float(v) for v in tight]
                union += mask
            assert int(union.max()) == 1  # visible masks do not overlap (occlusion applied)
    assert seen_kinds == {"list", "dict"}  # polygons and compressed RLE
    assert labels == {1, 2, 3}


def test_occluded_shapes_stay_mostly_visible(shapes):
    _, paths = shapes
    with open(paths["train_annotations"]) as fh:
        data = json.load(fh)
    rles = [a for a in data["annotations"] if isinstance(a["segmentation"], dict)]
    assert rles and all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    sizes = np.array([max(a["bbox"][2:]) for a in data["annotations"]])
    assert sizes.min() >= 10 and sizes.max() <= 0.4 * 128 + 2


def test_refuses_to_overwrite_files_it_did_not_write(shapes, tmp_path):
    """The demo and the ablation write the data set into a folder the user names: never over their files."""
    assert_refuses_a_foreign_file(make_shapes_dataset, tmp_path / "a", "val/1000002.png", seed=0, **SMALL)

    (tmp_path / "b" / "annotations").mkdir(parents=True)  # a user's COCO annotations of the same name
    (tmp_path / "b" / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(FileExistsError, match="instances_train.json"):
        make_shapes_dataset(str(tmp_path / "b"), seed=0, **SMALL)

    (tmp_path / "c").mkdir()  # other files in the folder are left alone
    (tmp_path / "c" / "notes.txt").write_text("mine")
    make_shapes_dataset(str(tmp_path / "c"), seed=0, **SMALL)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    assert _files(tmp_path / "c") == {**_files(shapes[0]), "notes.txt": b"mine"}


def test_folder_of_the_earlier_meta_format_is_its_own(shapes, tmp_path):
    """meta.json written before the generator recorded its name: regenerated in place, not refused."""
    root = tmp_path / "old"
    make_shapes_dataset(str(root), seed=0, **SMALL)
    legacy = {
        "version": 1,
        "num_train": 10,
        "num_val": 4,
        "image_size": [128, 160],
        "seed": 0,
        "max_objects": 4,
    }
    (root / "meta.json").write_text(json.dumps(legacy))
    make_shapes_dataset(str(root), seed=0, **{**SMALL, "num_val": 2})
    assert sorted(os.listdir(root / "val")) == ["1000001.png", "1000002.png"]
    (root / "meta.json").write_text(json.dumps({**legacy, "extra": 1}))  # not the earlier format: refused
    with pytest.raises(FileExistsError, match="meta.json"):
        make_shapes_dataset(str(root), seed=0, **SMALL)


def test_interrupted_run_is_resumed(shapes, tmp_path):
    root = tmp_path / "r"
    make_shapes_dataset(str(root), seed=0, **SMALL)
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "complete": False}))  # what an interruption leaves
    os.remove(root / "annotations" / "instances_val.json")
    make_shapes_dataset(str(root), seed=0, **SMALL)
    assert _files(root) == _files(shapes[0])
