"""Prediction on image files (list_images, predict) and drawing (maskrcnn.visualize.draw_instances)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.data.images import read_image
from maskrcnn.engine import predict as predict_module
from maskrcnn.engine.evaluate import detections_to_coco
from maskrcnn.engine.predict import (
    NoReadableImagesError,
    OutputConflictError,
    check_output_dir,
    list_images,
    load_image,
    predict,
)
from maskrcnn.visualize import PALETTE, draw_instances, to_pil_image
from tests.common import tiny_model
from tests.reference.drawing_ref import blend_masks_naive


@pytest.fixture(scope="module")
def mask_model():
    return tiny_model()


@pytest.fixture(scope="module")
def box_model():
    return tiny_model(mask=False)


def write_images(folder, sizes=((40, 48), (48, 32))) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    g = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"im{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray((g.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# list_images
# --------------------------------------------------------------------------------------------------


def test_list_images_file_folder_glob_and_list(tmp_path):
    paths = write_images(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "sub").mkdir()
    upper = tmp_path / "a" / "UPPER.JPEG"
    Image.new("RGB", (8, 8)).save(upper, "JPEG")
    assert list_images(str(tmp_path / "a")) == sorted(paths + [str(upper)])
    assert list_images(paths[1]) == [paths[1]]
    assert list_images(str(tmp_path / "a" / "*.png")) == [paths[1]]
    assert list_images(str(tmp_path / "**" / "im*")) == paths
    assert list_images([paths[1], str(tmp_path / "a")]) == [paths[1]] + sorted([paths[0], str(upper)])
    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "empty"), str(tmp_path / "nothing*.jpg"), str(tmp_path / "missing.jpg")):
        with pytest.raises(FileNotFoundError, match="no image"):
            list_images(spec)


def test_read_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 20), (255, 0, 0)).save(path, exif=exif)
    assert load_image(str(path)).size == (20, 30)
    Image.new("L", (5, 7)).save(tmp_path / "gray.png")
    assert load_image(str(tmp_path / "gray.png")).mode == "RGB"


# --------------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------------


def test_predict_folder_writes_drawings_and_json_and_skips_corrupt(tmp_path, capsys, mask_model):
    paths = write_images(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    model = mask_model
    model.train()
    out = tmp_path / "out"
    entries = predict(
        model,
        str(tmp_path / "in"),
        output_dir=str(out),
        score_threshold=0.0,
        class_names=["background", "cat", "dog"],
        label_to_category_id={1: 3, 2: 7},
        progress=False,
    )
    assert model.training  # mode restored
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 unreadable image(s) skipped" in err
    assert sorted(os.listdir(out)) == ["im0.jpg.png", "im1.png.png", "predictions.json"]
    assert entries.read == paths and entries.unreadable == [str(tmp_path / "in" / "broken.jpg")]
    for path, name in zip(paths, ("im0.jpg.png", "im1.png.png")):
        with Image.open(out / name) as drawn, Image.open(path) as original:
            assert drawn.size == original.size
    written = json.loads((out / "predictions.json").read_text())
    assert written == entries and entries, "an untrained model still gives low-score detections"
    order = list_images(str(tmp_path / "in"))  # broken.jpg comes first: image_id is the index in this list
    for e in entries:
        assert e["file_name"] == order[e["image_id"]] and e["image_id"] in (1, 2)
        assert e["category_id"] in (3, 7) and e["category_name"] == {3: "cat", 7: "dog"}[e["category_id"]]
        with Image.open(e["file_name"]) as im:
            assert e["segmentation"]["size"] == [im.height, im.width]
        assert len(e["bbox"]) == 4 and 0.0 <= e["score"] <= 1.0


def test_predict_glob_threshold_and_faster_rcnn(tmp_path, capsys, mask_model, box_model):
    write_images(tmp_path / "in")
    high = predict(
        mask_model, str(tmp_path / "in" / "*.png"), output_dir=str(tmp_path / "o1"), score_threshold=2.0
    )
    assert high == [] and sorted(os.listdir(tmp_path / "o1")) == ["im1.png.png", "predictions.json"]
    entries = predict(
        box_model,
        list_images(str(tmp_path / "in" / "*")),
        output_dir=str(tmp_path / "o2"),
        score_threshold=0.0,
    )
    assert entries and all("segmentation" not in e for e in entries)
    assert {e["category_id"] for e in entries} <= {1, 2}  # labels when no mapping is given
    assert "unreadable" not in capsys.readouterr().err


def test_predict_same_name_in_two_folders_and_same_stem_do_not_collide(tmp_path, mask_model):
    a = write_images(tmp_path / "a", sizes=((32, 32),))
    b = write_images(tmp_path / "b", sizes=((40, 40),))
    predict(mask_model, a + b, output_dir=str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["a", "b", "predictions.json"]
    assert os.listdir(tmp_path / "out" / "a") == ["im0.jpg.png"] and os.listdir(tmp_path / "out" / "b") == [
        "im0.jpg.png"
    ]
    # good.jpg and good.png: one drawing each
    folder = tmp_path / "same"
    folder.mkdir()
    for ext in ("jpg", "png"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / f"good.{ext}")
    predict(mask_model, str(folder), output_dir=str(tmp_path / "out2"), progress=False)
    assert sorted(os.listdir(tmp_path / "out2")) == ["good.jpg.png", "good.png.png", "predictions.json"]


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_refuses_an_output_folder_that_holds_inputs(tmp_path, mask_model):
    """The data loss seen: `predict folder --output-dir folder` drew good.jpg over good.png."""
    folder = tmp_path / "photos"
    write_images(folder)
    Image.new("RGB", (32, 32), (0, 200, 0)).save(folder / "im0.png")  # im0.jpg and im0.png
    before = _snapshot(tmp_path)
    for output_dir in (folder, tmp_path, folder / ".."):  # the inputs' folder, or one above it
        with pytest.raises(
            OutputConflictError, match=r"refusing to write predictions to .*: it holds the input"
        ):
            predict(mask_model, str(folder), output_dir=str(output_dir), progress=False, overwrite=True)
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced
    # an output folder inside the input folder is fine, and a folder listing does not pick up its drawings
    inside = folder / "pred"
    predict(mask_model, str(folder), output_dir=str(inside), progress=False)
    assert list_images(str(folder)) == sorted(str(p) for p in before if p.parent == folder)
    # a recursive glob would: refused rather than predicting on drawings
    with pytest.raises(OutputConflictError, match="it holds the input"):
        predict(mask_model, str(folder / "**" / "*"), output_dir=str(inside), overwrite=True, progress=False)


def test_predict_never_writes_over_existing_files_unless_overwrite(tmp_path, mask_model):
    paths = write_images(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "im0.jpg.png").write_bytes(b"an earlier drawing")
    with pytest.raises(OutputConflictError, match=r"im0.jpg.png exists .*--overwrite"):
        predict(mask_model, paths, output_dir=str(out), progress=False)
    assert sorted(os.listdir(out)) == ["im0.jpg.png", "notes.txt"]  # nothing written
    predict(mask_model, paths, output_dir=str(out), progress=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["im0.jpg.png", "im1.png.png", "notes.txt", "predictions.json"]
    assert (out / "notes.txt").read_text() == "mine"
    with Image.open(out / "im0.jpg.png") as drawn:
        assert drawn.size == (48, 40)
    with pytest.raises(OutputConflictError, match="predictions.json exists"):
        check_output_dir([paths[0] + ".jpg"], str(out))  # checked alone too (by the CLI, before the model)
    assert check_output_dir(paths, str(tmp_path / "new")) == [
        str(tmp_path / "new" / "im0.jpg.png"),
        str(tmp_path / "new" / "im1.png.png"),
        str(tmp_path / "new" / "predictions.json"),
    ]


def test_predict_when_no_image_can_be_read(tmp_path, mask_model):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image")
    with pytest.raises(NoReadableImagesError, match=r"none of the 2 input image\(s\) could be read .*a.jpg"):
        predict(mask_model, str(folder), output_dir=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def _run_files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_predict_with_several_writers_writes_what_one_writes(tmp_path, capsys, mask_model):
    sizes = [(40 + 4 * i, 48 - 2 * i) for i in range(7)]
    paths = write_images(tmp_path / "in", sizes=sizes)
    broken = tmp_path / "in" / "im3.png"  # one unreadable image in the middle
    broken.write_bytes(b"not a png")
    runs = {}
    for writers in (1, 3):
        out = tmp_path / f"out{writers}"
        entries = predict(
            mask_model, paths, output_dir=str(out), score_threshold=0.0, progress=False, writers=writers
        )
        assert entries.read == [p for p in paths if p != str(broken)]
        assert entries.unreadable == [str(broken)]
        assert [e["image_id"] for e in entries] == sorted(e["image_id"] for e in entries)  # input order
        runs[writers] = (list(entries), _run_files(out), capsys.readouterr().err.replace(str(out), "OUT"))
    assert runs[1] == runs[3] and runs[1][0], "same entries, drawings, json and messages"
    with pytest.raises(ValueError, match="writers"):
        predict(mask_model, paths, output_dir=str(tmp_path / "o0"), progress=False, writers=0)


def test_default_writers_one_beside_a_cpu_model_up_to_four_beside_an_accelerator(monkeypatch):
    assert predict_module.default_writers(torch.device("cpu")) == 1
    for cores, expected in ((1, 1), (2, 1), (4, 3), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert predict_module.default_writers(torch.device("cuda", 0)) == expected


def test_predict_entries_are_the_models_masks_at_one_half(tmp_path, mask_model):
    (path,) = write_images(tmp_path / "in", sizes=[(44, 52)])
    entries = predict(
        mask_model, [path], output_dir=str(tmp_path / "out"), score_threshold=0.0, progress=False
    )
    mask_model.eval()
    with torch.no_grad():
        (out,) = mask_model([read_image(path)])
    expected = detections_to_coco([out], [0], label_to_category_id=int)
    assert [e["segmentation"] for e in entries] == [e["segmentation"] for e in expected] and expected
    assert [e["bbox"] for e in entries] == [e["bbox"] for e in expected]


def test_predict_stops_on_a_write_error_and_on_an_interruption_keeping_whole_drawings(
    tmp_path, monkeypatch, mask_model
):
    paths = write_images(tmp_path / "in", sizes=[(40, 48)] * 6)
    real = predict_module._draw_and_write

    def failing(out, **kw):
        if kw["index"] == 2:
            raise OSError(28, "No space left on device")
        return real(out, **kw)

    monkeypatch.setattr(predict_module, "_draw_and_write", failing)
    with pytest.raises(OSError, match="No space left"):
        predict(mask_model, paths, output_dir=str(tmp_path / "full"), progress=False, writers=2)
    monkeypatch.setattr(predict_module, "_draw_and_write", real)
    written = os.listdir(tmp_path / "full")
    assert "im0.jpg.png" in written and "im2.jpg.png" not in written and "predictions.json" not in written

    calls = []

    class Interrupted(torch.nn.Module):  # the user presses Ctrl-C during the fourth image
        def __init__(self):
            super().__init__()
            self.inner = mask_model

        def forward(self, images):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return self.inner(images)

    with pytest.raises(KeyboardInterrupt):
        predict(Interrupted(), paths, output_dir=str(tmp_path / "stop"), progress=False, writers=2)
    written = sorted(os.listdir(tmp_path / "stop"))  # every image that went through the model: whole
    assert written == ["im0.jpg.png", "im1.png.png", "im2.jpg.png"]
    for name in written:
        with Image.open(tmp_path / "stop" / name) as im:
            im.load()


# --------------------------------------------------------------------------------------------------
# draw_instances
# --------------------------------------------------------------------------------------------------


def test_draw_instances_changes_masked_pixels_only_near_instances():
    h, w = 120, 160
    image = torch.full((3, h, w), 0.5)
    masks = torch.zeros(2, 1, h, w)
    masks[0, 0, 60:100, 20:60] = 0.9
    masks[1, 0, 70:110, 100:150] = 0.3  # below the mask threshold
    boxes = torch.tensor([[20.0, 60.0, 60.0, 100.0], [100.0, 70.0, 150.0, 110.0]])
    out = draw_instances(
        image,
        boxes=boxes,
        labels=torch.tensor([1, 2]),
        scores=torch.tensor([0.9, 0.8]),
        masks=masks,
        class_names=["background", "cat", "dog"],
        alpha=0.5,
    )
    assert isinstance(out, Image.Image) and out.size == (w, h) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    expected = np.round(128 * 0.5 + np.asarray(PALETTE[0]) * 0.5)
    np.testing.assert_allclose(pixels[80, 40], expected, atol=1)  # inside mask 0, away from the outline
    assert (pixels[85, 125] == 128).all()  # inside box 1 but its mask is below the threshold
    assert (pixels[5:50, 70:95] == 128).all()  # far from both instances
    assert (pixels[:60, 20:60] != 128).any()  # the label is drawn above box 0


def test_draw_instances_inputs_and_filters():
    pil = Image.new("RGB", (50, 40), (10, 20, 30))
    masks = np.zeros((1, 40, 50), dtype=bool)
    masks[0, 10:20, 10:20] = True
    boxes = np.array([[10.0, 10.0, 20.0, 20.0]])
    kept = np.asarray(draw_instances(pil, boxes=boxes, labels=[1], scores=[0.4], masks=masks))
    assert (kept[15, 15] != (10, 20, 30)).any()
    dropped = draw_instances(pil, boxes=boxes, labels=[1], scores=[0.4], masks=masks, score_threshold=0.5)
    assert (np.asarray(dropped) == np.asarray(pil)).all()
    assert (np.asarray(pil) == (10, 20, 30)).all()  # input untouched
    gt = draw_instances(pil, boxes=boxes, labels=[1])  # ground truth: no scores, no masks
    assert gt.size == (50, 40)
    empty = draw_instances(pil, boxes=torch.zeros(0, 4), labels=torch.zeros(0), scores=torch.zeros(0))
    assert (np.asarray(empty) == np.asarray(pil)).all()
    with pytest.raises(ValueError, match="masks"):
        draw_instances(pil, boxes=boxes, labels=[1], scores=[1.0], masks=np.zeros((1, 8, 8)))


def test_draw_instances_blends_exactly_the_thresholded_mask():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(1, 1, 30, 40, generator=g)
    out = np.asarray(
        draw_instances(torch.zeros(3, 30, 40), boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]), masks=prob)
    )
    changed = (out != 0).any(axis=2)
    # away from the box outline in the corner, exactly the pixels with probability >= 0.5 are coloured
    np.testing.assert_array_equal(changed[3:], (prob[0, 0, 3:] >= 0.5).numpy())


def test_draw_instances_blends_overlapping_masks_like_the_naive_loop():
    # overlapping masks, one empty, one touching the image's corner: every pixel as the naive blend has it
    # (boxes drawn off the image, so that only the masks change pixels)
    g = torch.Generator().manual_seed(1)
    h, w, n = 37, 53, 6
    image = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(n, 1, h, w)
    for i, (y0, y1, x0, x1) in enumerate([(0, 20, 0, 30), (10, 37, 20, 53), (5, 6, 5, 6), (0, 0, 0, 0)]):
        masks[i, 0, y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g)
    masks[4:, 0] = torch.rand(n - 4, h, w, generator=g)  # scattered pixels anywhere
    far = torch.tensor([[w + 10.0, h + 10.0, w + 20.0, h + 20.0]]).repeat(n, 1)
    out = draw_instances(image, boxes=far, masks=masks, alpha=0.4)
    binary = (masks[:, 0] >= 0.5).numpy()
    expected = blend_masks_naive(np.asarray(to_pil_image(image)), binary, PALETTE[:n], 0.4)
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda(tmp_path):
    write_images(tmp_path / "in")
    model = tiny_model().cuda()
    entries = predict(model, str(tmp_path / "in"), output_dir=str(tmp_path / "out"), score_threshold=0.0)
    assert entries and sorted(os.listdir(tmp_path / "out")) == [
        "im0.jpg.png",
        "im1.png.png",
        "predictions.json",
    ]
