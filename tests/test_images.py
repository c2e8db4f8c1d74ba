"""Tests of maskrcnn.data.images: every image mode decoded the same way by training (CocoDataset), prediction
and read_image; EXIF orientation; named errors for broken files; the cached, parallel up-front check."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import maskrcnn.data.images as images_mod
from maskrcnn.data import CocoDataset, ImageReadError, check_images, read_image
from maskrcnn.engine.predict import load_image, predict


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MASKRCNN_CACHE_DIR", str(cache))
    return cache


def _as_tensor(rgb):
    """uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` / 255."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG of ``arr`` uint16 ``[H, W, C]`` (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA), written by
    hand: Pillow cannot write 16-bit colour PNGs."""
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
G16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (20, 30, 3), dtype=np.uint16)


def _gray3(gray):
    return np.repeat(gray[..., None], 3, axis=2)


def _make(kind: str, folder) -> tuple[str, torch.Tensor | None]:
    """Write an image of ``kind`` and return its path and the expected ``read_image`` tensor (None when only
    the agreement of the readers is tested)."""
    path = os.path.join(folder, kind)
    if kind == "rgb.png":
        Image.fromarray(RGB).save(path)
        return path, _as_tensor(RGB)
    if kind == "rgb.jpg":
        Image.fromarray(RGB).save(path, quality=90)
        with Image.open(path) as im:
            return path, _as_tensor(np.asarray(im))
    if kind == "l.png":
        Image.fromarray(GRAY, "L").save(path)
        return path, _as_tensor(_gray3(GRAY))
    if kind == "1bit.png":
        Image.fromarray(GRAY > 127).save(path)
        with Image.open(path) as im:
            assert im.mode == "1"
        return path, _as_tensor(_gray3(np.where(GRAY > 127, 255, 0).astype(np.uint8)))
    if kind == "p.png":
        pal = Image.fromarray(RGB).quantize(colors=16)
        pal.save(path)
        palette = np.array(pal.getpalette()[: 16 * 3], dtype=np.uint8).reshape(16, 3)
        return path, _as_tensor(palette[np.asarray(pal)])
    if kind == "p_transparent.png":
        pal = Image.fromarray(RGB).quantize(colors=16)
        pal.save(path, transparency=3)  # palette entry 3 transparent: dropped, its colour kept
        with Image.open(path) as im:
            assert im.mode == "P" and "transparency" in im.info
        palette = np.array(pal.getpalette()[: 16 * 3], dtype=np.uint8).reshape(16, 3)
        return path, _as_tensor(palette[np.asarray(pal)])
    if kind == "rgba.png":
        Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").save(path)
        return path, _as_tensor(RGB)  # alpha dropped, not composited
    if kind == "la.png":
        Image.fromarray(np.dstack([GRAY, ALPHA]), "LA").save(path)
        return path, _as_tensor(_gray3(GRAY))
    if kind == "cmyk.jpg":
        Image.fromarray(RGB).convert("CMYK").save(path, quality=95)
        with Image.open(path) as im:
            assert im.mode == "CMYK"
            return path, _as_tensor(np.asarray(im.convert("RGB")))  # Pillow's CMYK -> RGB
    if kind == "i16.png":
        Image.fromarray(G16).save(path)
        with Image.open(path) as im:
            assert im.mode in ("I;16", "I")  # "I" before Pillow 10
        return path, torch.from_numpy(_gray3(G16).astype(np.float32) / 65535).permute(2, 0, 1)
    if kind == "i32.tif":
        Image.fromarray(G16.astype(np.int32), "I").save(path)
        return path, torch.from_numpy(_gray3(G16).astype(np.float32) / 65535).permute(2, 0, 1)
    if kind == "rgb16.png":
        with open(path, "wb") as fh:
            fh.write(_png16(RGB16))
        return path, _as_tensor((RGB16 >> 8).astype(np.uint8))  # Pillow keeps the high byte
    raise AssertionError(kind)


KINDS = [
    "rgb.png",
    "rgb.jpg",
    "l.png",
    "1bit.png",
    "p.png",
    "p_transparent.png",
    "rgba.png",
    "la.png",
    "cmyk.jpg",
    "i16.png",
    "i32.tif",
    "rgb16.png",
]


@pytest.mark.parametrize("kind", KINDS)
def test_read_image_modes(tmp_path, kind):
    path, expected = _make(kind, tmp_path)
    image = read_image(path)
    assert image.dtype == torch.float32 and image.shape == (3, 20, 30) and image.is_contiguous()
    assert torch.equal(image, expected)
    assert 0 <= float(image.min()) and float(image.max()) <= 1


def test_16_bit_gray_uses_the_full_range(tmp_path):
    g16 = np.array([[0, 1, 257, 32768, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g.png")
    out = read_image(str(tmp_path / "g.png"))
    assert torch.equal(out[0, 0], torch.from_numpy(g16[0].astype(np.float32) / 65535))
    assert float(out.max()) == 1.0 and 0 < float(out[0, 0, 1]) < 1 / 255  # not 8-bit, not all white
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_cmyk_jpeg_is_close_to_the_rgb_it_came_from(tmp_path):
    path, _ = _make("cmyk.jpg", tmp_path)
    assert (read_image(path) - _as_tensor(RGB)).abs().mean() < 0.03


@pytest.mark.parametrize("mode,values", [("I", [-1, 5]), ("I", [0, 70000]), ("F", [0.0, 0.5])])
def test_integer_and_float_images_without_a_known_range_are_errors(tmp_path, mode, values):
    dtype = np.int32 if mode == "I" else np.float32
    path = str(tmp_path / "x.tif")
    Image.fromarray(np.array([values] * 3, dtype=dtype), mode).save(path)
    with pytest.raises(ImageReadError, match="no known range") as info:
        read_image(path)
    assert info.value.path == path and str(info.value).startswith(f"{path}: ")


# --------------------------------------------------------------------------------------------------
# The same tensor from every reader: training (CocoDataset), prediction, read_image
# --------------------------------------------------------------------------------------------------


class _RecordingModel(torch.nn.Module):
    """Records the images it is given; detects nothing."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs += [im.clone() for im in images]
        return [
            {
                "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64),
                "scores": torch.zeros(0),
                "masks": torch.zeros(0, 1, *im.shape[-2:]),
            }
            for im in images
        ]


def _one_image_coco(folder, name, h, w) -> str:
    ann_file = os.path.join(folder, f"{name}.json")
    box = [1, 1, 5, 4]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 20.0, "iscrowd": 0}
    ann["segmentation"] = [[1, 1, 6, 1, 6, 5, 1, 5]]
    with open(ann_file, "w") as fh:
        json.dump(
            {
                "images": [{"id": 1, "file_name": name, "height": h, "width": w}],
                "annotations": [ann],
                "categories": [{"id": 1, "name": "thing"}],
            },
            fh,
        )
    return ann_file


@pytest.mark.parametrize("kind", KINDS + ["exif6.jpg"])
def test_training_and_prediction_read_identical_tensors(tmp_path, kind):
    if kind == "exif6.jpg":
        path = str(tmp_path / kind)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(RGB).save(path, exif=exif.tobytes(), quality=90)
    else:
        path, _ = _make(kind, tmp_path)
    reference = read_image(path)
    h, w = reference.shape[-2:]
    ds = CocoDataset(image_dir=str(tmp_path), annotation_file=_one_image_coco(tmp_path, kind, h, w))
    train_side = ds[0][0]
    model = _RecordingModel()
    predict(model, [path], output_dir=str(tmp_path / "out"), progress=False)
    (predict_side,) = model.inputs
    assert torch.equal(train_side, reference) and torch.equal(predict_side, reference)
    # the drawing's background is the same pixels at 8 bits
    drawn = np.asarray(load_image(path))
    assert np.array_equal(drawn, (reference * 255).round().byte().permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------------

# orientation -> how the stored pixels are turned to display them (independent of Pillow's tables)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # 180 degrees
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, k=-1),  # 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, k=1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_png(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / "e.png")
    Image.fromarray(RGB).save(path, exif=exif.tobytes())
    expected = np.ascontiguousarray(UPRIGHT[orientation](RGB))
    assert torch.equal(read_image(path), _as_tensor(expected))
    (size,) = check_images([path], progress=False).values()
    assert size == expected.shape[:2]  # (h, w) after orientation, what annotations are compared with


def test_exif_orientation_jpeg_size_after_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "e.jpg")
    Image.fromarray(RGB).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))  # raw pixels, 20 x 30
    image = read_image(path)
    assert image.shape == (3, 30, 20)
    assert torch.equal(image, _as_tensor(np.rot90(stored, k=-1)))


def test_malformed_or_out_of_range_orientation_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 9
    path = str(tmp_path / "e.png")
    Image.fromarray(RGB).save(path, exif=exif.tobytes())
    assert torch.equal(read_image(path), _as_tensor(RGB))


# --------------------------------------------------------------------------------------------------
# Broken files: one error type, naming the file
# --------------------------------------------------------------------------------------------------


def _truncated_jpeg(path) -> str:
    Image.fromarray(RNG.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(path, quality=95)
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])  # header intact, pixels cut
    return str(path)


def test_broken_files_raise_image_read_error_naming_the_file(tmp_path):
    truncated = _truncated_jpeg(tmp_path / "t.jpg")
    with Image.open(truncated) as im:
        assert im.size == (80, 64)  # the header alone looks fine
    garbage = tmp_path / "g.png"
    garbage.write_bytes(b"not an image at all" * 20)
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    png = tmp_path / "cut.png"
    Image.fromarray(RGB).save(png)
    png.write_bytes(png.read_bytes()[:-40])
    for path in (truncated, garbage, empty, png, tmp_path / "missing.jpg"):
        with pytest.raises(ImageReadError) as info:
            read_image(str(path))
        assert isinstance(info.value, ValueError)
        assert str(info.value).startswith(f"{path}: ") and info.value.path == str(path)
        with pytest.raises(ImageReadError, match=os.path.basename(str(path))):
            load_image(str(path))  # the prediction side too
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_read_error_pickles(tmp_path):
    import pickle

    e = pickle.loads(pickle.dumps(ImageReadError("/a/b.jpg", "cannot decode")))
    assert (
        isinstance(e, ImageReadError) and str(e) == "/a/b.jpg: cannot decode" and e.reason == "cannot decode"
    )


def test_check_warns_when_truncated_images_are_allowed(tmp_path, monkeypatch, caplog):
    path = _truncated_jpeg(tmp_path / "t.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level("WARNING"):
        check_images([path], progress=False)
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text


# --------------------------------------------------------------------------------------------------
# check_images: results, cache
# --------------------------------------------------------------------------------------------------


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = images_mod.decode_image

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(images_mod, "decode_image", counting)
    return calls


def _folder_of_images(folder, n=6) -> list[str]:
    folder.mkdir()
    paths = []
    for i in range(n):
        p = str(folder / f"{i}.png")
        Image.fromarray(RGB[: 10 + i]).save(p)
        paths.append(p)
    return paths


def test_check_images_results(tmp_path):
    paths = _folder_of_images(tmp_path / "data", 3)
    bad = _truncated_jpeg(tmp_path / "data" / "t.jpg")
    out = check_images(paths + [bad, str(tmp_path / "data" / "none.jpg")], workers=2, progress=False)
    assert [out[p] for p in paths] == [(10, 30), (11, 30), (12, 30)]
    assert isinstance(out[bad], ImageReadError) and "cannot decode" in out[bad].reason
    assert out[str(tmp_path / "data" / "none.jpg")].reason == "file not found"
    assert check_images([], progress=False) == {}


def test_check_is_cached_and_rechecks_changed_files(tmp_path, monkeypatch, cache_in_tmp):
    paths = _folder_of_images(tmp_path / "data")
    before = sorted(os.listdir(tmp_path / "data"))
    calls = _count_decodes(monkeypatch)
    first = check_images(paths, workers=2, progress=False)
    assert sorted(calls) == sorted(paths)
    assert sorted(os.listdir(tmp_path / "data")) == before  # nothing written into the data folder
    (cache_file,) = (cache_in_tmp / "checked-images").iterdir()
    assert not [f for f in os.listdir(cache_in_tmp / "checked-images") if ".tmp" in f]

    calls.clear()
    assert check_images(paths, workers=2, progress=False) == first
    assert calls == []  # nothing decoded the second time

    Image.fromarray(RGB[:15]).save(paths[1])  # other content, other size
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime
    out = check_images(paths, workers=2, progress=False)
    assert sorted(calls) == sorted([paths[1], paths[2]])
    assert out[paths[1]] == (15, 30) and out[paths[2]] == first[paths[2]]

    # a failure is not cached: the file is decoded again next time
    _truncated_jpeg(paths[3])
    calls.clear()
    assert isinstance(check_images(paths, progress=False)[paths[3]], ImageReadError)
    assert calls == [paths[3]]
    calls.clear()
    assert isinstance(check_images(paths, progress=False)[paths[3]], ImageReadError)
    assert calls == [paths[3]]

    # a corrupt cache is ignored (and rewritten)
    cache_file.write_text("{not json")
    calls.clear()
    out = check_images(paths, progress=False)
    assert len(calls) == len(paths) and out[paths[0]] == first[paths[0]]
    json.loads(cache_file.read_text())
    calls.clear()
    check_images(paths, progress=False)
    assert calls == [paths[3]]


def test_interrupted_check_stops_decoding_and_keeps_what_it_decoded(tmp_path, monkeypatch, cache_in_tmp):
    """Ctrl-C in the middle: the decodes not yet started are dropped, and the next check decodes only
    what the first did not finish."""
    paths = _folder_of_images(tmp_path / "data", 8)
    calls: list[str] = []
    real = images_mod.decode_image

    def decode(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if Ctrl-C came while the 4th file was decoded
        if len(calls) > 4:
            time.sleep(0.5)  # the later decodes are slow: the check stops before the worker reaches the end
        return real(path)

    monkeypatch.setattr(images_mod, "decode_image", decode)
    with pytest.raises(KeyboardInterrupt):
        check_images(paths, workers=1, progress=False)
    # one worker decodes in order; it goes on until the pool is shut down, not to the last file
    assert calls[:4] == paths[:4] and len(calls) < len(paths)
    monkeypatch.setattr(images_mod, "decode_image", real)
    calls = _count_decodes(monkeypatch)
    out = check_images(paths, workers=2, progress=False)
    assert sorted(calls) == sorted(paths[3:])  # the three decoded before the interruption were cached
    assert [out[p] for p in paths] == [(10 + i, 30) for i in range(8)]


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKRCNN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert images_mod.cache_dir() == str(tmp_path / "xdg" / "maskrcnn")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert images_mod.cache_dir() == str(tmp_path / "home" / ".cache" / "maskrcnn")
    monkeypatch.setenv("MASKRCNN_CACHE_DIR", str(tmp_path / "mine"))
    assert images_mod.cache_dir() == str(tmp_path / "mine")


def test_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MASKRCNN_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    paths = _folder_of_images(tmp_path / "data", 2)
    with caplog.at_level("WARNING"):
        out = check_images(paths, progress=False)
    assert out[paths[0]] == (10, 30) and "could not write the image check cache" in caplog.text


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, caplog, capsys):
    paths = _folder_of_images(tmp_path / "data", 4)
    monkeypatch.setattr(images_mod.time, "perf_counter", iter(range(0, 1000, 40)).__next__)
    with caplog.at_level("INFO", logger="maskrcnn.data.images"):
        check_images(paths, workers=1, progress=True)
    assert "checking images: 1/4 (25%)" in capsys.readouterr().err and "decoded 4 file(s)" in caplog.text
