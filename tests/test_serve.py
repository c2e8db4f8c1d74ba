"""``maskrcnn serve``: the JSON API over HTTP (Starlette's TestClient) with every bad request, the lock, the
command line; and the page in a real headless Chromium (Playwright for Python, Debian's ``chromium``):
upload, drawing, slider, class toggle, downloads, the JavaScript RLE decoder against pycocotools.
``MASKRCNN_SERVE_SCREENSHOT=page.png`` saves a screenshot of the page with its result.

Skipped when the ``serve`` extra is not installed; the browser test also skips without Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
try:
    from starlette.testclient import TestClient
except RuntimeError as e:  # neither httpx2 nor httpx
    pytest.skip(f"Starlette's TestClient needs httpx: {e}", allow_module_level=True)

from maskrcnn.cli import main  # noqa: E402
from maskrcnn.config import get_config  # noqa: E402
from maskrcnn.data.images import read_image  # noqa: E402
from maskrcnn.modeling.build import build_model  # noqa: E402
from maskrcnn.serve import bind_socket, create_app  # noqa: E402
from maskrcnn.serve.page import PAGE  # noqa: E402
from maskrcnn.visualize import to_pil_image  # noqa: E402
from maskrcnn.weights import save_checkpoint  # noqa: E402
from tests.common import tiny_model  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools, numpy 2
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["background", "circle", "square"]
MAX_UPLOAD = 200_000  # bytes
MAX_PIXELS = 100_000


def image_bytes(h: int = 48, w: int = 64, fmt: str = "PNG", seed: int | None = 0, **save) -> bytes:
    """An image file of random pixels (``seed`` None: grey, a few hundred bytes as a PNG)."""
    if seed is None:
        pixels = np.full((h, w, 3), 128, dtype=np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds almost no data: a decompression bomb's
    header, refused before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def detecting_model():
    """tests.common's tiny model with every detection kept (score threshold 0): random weights still give
    detections (10, of mixed scores)."""
    model = tiny_model(num_classes=len(CLASSES))
    model.config.roi_heads.score_thresh = 0.0  # also in a checkpoint of it
    model.roi_heads.box_branch.score_thresh = 0.0
    return model


def keypoint_model():
    cfg = get_config("R-18-FPN-small")
    cfg.num_classes = 2
    cfg.input.min_size, cfg.input.max_size = (48,), 64
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 100, 50
    cfg.roi_heads.detections_per_img = 5
    cfg.roi_heads.score_thresh = 0.0
    cfg.roi_heads.keypoint = True
    cfg.roi_heads.keypoint_head_channels = (16, 16)
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return detecting_model()


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, class_names=CLASSES, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)
    with TestClient(app) as c:
        yield c


def post(client, data: bytes, name: str = "im.png", query: str = "", **kwargs):
    return client.post(f"/predict{query}", files={"image": (name, data, "image/png")}, **kwargs)


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------


def test_health_describes_the_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    info = r.json()
    assert info["status"] == "ok" and info["class_names"] == CLASSES and info["num_classes"] == 3
    assert info["masks"] is True and info["num_keypoints"] == 0 and info["skeleton"] == []
    assert info["max_upload_bytes"] == MAX_UPLOAD and info["max_pixels"] == MAX_PIXELS
    assert info["score_threshold"] == 0.5 and len(info["palette"]) >= 8


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert r.text == PAGE
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", PAGE, re.I)  # no CDN, no external URL
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", PAGE)  # nothing loaded from anywhere
    for element in ("file", "threshold", "count", "classes", "download-png", "download-json", "canvas"):
        assert f'id="{element}"' in PAGE


def test_predict_returns_the_models_detections_as_coco_results(client, model, tmp_path):
    data = image_bytes()
    r = post(client, data, query="?score_threshold=0")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["file_name"]) == (64, 48, "im.png")
    assert body["inference_ms"] > 0 and body["total_ms"] >= body["inference_ms"]
    found = body["detections"]
    assert len(found) == 10  # detections_per_img: every one kept at threshold 0
    # the same as the model on the same file read by the project's reader
    path = tmp_path / "im.png"
    path.write_bytes(data)
    with torch.no_grad():
        (out,) = model([read_image(str(path))])
    assert [d["score"] for d in found] == pytest.approx(out["scores"].tolist(), abs=1e-6)
    for d, box, label, mask in zip(found, out["boxes"].tolist(), out["labels"].tolist(), out["masks"]):
        assert set(d) == {
            "image_id",
            "category_id",
            "category_name",
            "bbox",
            "score",
            "segmentation",
            "file_name",
        }
        assert d["category_id"] == label and d["category_name"] == CLASSES[label]
        x1, y1, x2, y2 = box
        assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
        rle = d["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [48, 64]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), (mask[0] >= 0.5).numpy())
    # the threshold: scores >= t kept; the default is the server's (0.5)
    scores = sorted(d["score"] for d in found)
    t = (scores[4] + scores[5]) / 2
    kept = post(client, data, query=f"?score_threshold={t}").json()["detections"]
    assert [d["score"] for d in kept] == [d["score"] for d in found if d["score"] >= t] and len(kept) == 5
    assert all(d["score"] >= 0.5 for d in post(client, data).json()["detections"])


def test_predict_reads_images_as_training_does(client, tmp_path):
    """EXIF orientation applied, as read_image does; include_image returns exactly those pixels."""
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed 30 wide, 50 high
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif, quality=95)
    r = post(client, buffer.getvalue(), name="rotated.jpg", query="?include_image=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (30, 50)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    expected = np.asarray(to_pil_image(read_image(str(path))))
    prefix = "data:image/png;base64,"
    assert body["image_png"].startswith(prefix)
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png"][len(prefix) :]))))
    assert np.array_equal(served, expected)
    assert "image_png" not in post(client, image_bytes()).json()


def test_keypoint_model_returns_keypoints():
    app = create_app(keypoint_model(), class_names=["background", "person"])
    with TestClient(app) as c:
        info = c.get("/health").json()
        assert (
            info["num_keypoints"] == 17
            and len(info["skeleton"]) == 19
            and info["keypoint_names"][0] == "nose"
        )
        body = post(c, image_bytes(), query="?score_threshold=0").json()
    assert body["detections"]
    for d in body["detections"]:
        assert len(d["keypoints"]) == 3 * 17 and d["keypoints"][2::3] == [1.0] * 17
        assert len(d["keypoint_scores"]) == 17 and d["category_name"] == "person"
        assert "segmentation" in d


def _truncated(fmt: str) -> bytes:
    data = image_bytes(fmt=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return data[: len(data) // 2]


def _chunks(data: bytes, size: int = 16384):
    for i in range(0, len(data), size):
        yield data[i : i + size]


BAD_REQUESTS = {
    # name: (request kwargs, status, a piece of the error)
    "zero bytes": (
        dict(files={"image": ("empty.png", b"", "image/png")}),
        400,
        "empty.png: the file is empty",
    ),
    "not an image": (
        dict(files={"image": ("notes.png", b"just some text, not pixels", "image/png")}),
        400,
        "notes.png: cannot decode the image",
    ),
    "truncated PNG": (dict(files={"image": ("cut.png", _truncated("PNG"))}), 400, "cut.png: cannot decode"),
    "truncated JPEG": (dict(files={"image": ("cut.jpg", _truncated("JPEG"))}), 400, "cut.jpg: cannot decode"),
    "missing field": (dict(files={"photo": ("im.png", b"x")}), 400, "missing the multipart field 'image'"),
    "field not a file": (
        dict(data={"image": "im.png"}, files={"other": ("x", b"x")}),
        400,
        "must be a file upload",
    ),
    "two files": (
        dict(files=[("image", ("a.png", b"a")), ("image", ("b.png", b"b"))]),
        400,
        "Too many files",
    ),
    "not multipart": (dict(content=b"\x89PNG", headers={"content-type": "image/png"}), 415, "multipart"),
    "over the pixel limit": (
        dict(files={"image": ("big.png", image_bytes(300, 400, seed=None))}),
        413,
        "big.png: 400x300 = 120000 pixels, over this server's limit of 100000",
    ),
    "bomb under Pillow's limit": (
        dict(files={"image": ("bomb.png", png_header_only(5000, 5000))}),
        413,
        "over this server's limit",
    ),
    "bomb over Pillow's limit": (
        dict(files={"image": ("bomb.png", png_header_only(60000, 60000))}),
        413,
        "decompression bomb",
    ),
    "body over the limit": (
        dict(files={"image": ("huge.png", b"\0" * (MAX_UPLOAD + 1))}),
        413,
        f"over this server's limit of {MAX_UPLOAD} bytes",
    ),
    "chunked body over the limit": (
        dict(
            content=lambda: _chunks(b"--b\r\n" + b"\0" * (2 * MAX_UPLOAD)),
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        413,
        f"over this server's limit of {MAX_UPLOAD} bytes",
    ),
    "bad multipart": (
        dict(content=b"garbage", headers={"content-type": "multipart/form-data"}),
        400,
        "boundary",
    ),
    "bad threshold": (dict(params={"score_threshold": "high"}), 400, "score_threshold='high'"),
    "threshold out of range": (dict(params={"score_threshold": "1.5"}), 400, "expected a number in [0, 1]"),
    "threshold nan": (dict(params={"score_threshold": "nan"}), 400, "expected a number in [0, 1]"),
    "bad include_image": (dict(params={"include_image": "perhaps"}), 400, "expected true or false"),
}


def _materialise(kwargs: dict) -> dict:
    """A fresh body (the chunked one is a generator) and, for the query cases, a good image."""
    if callable(kwargs.get("content")):
        return {**kwargs, "content": kwargs["content"]()}
    if "files" not in kwargs and "content" not in kwargs:
        return {**kwargs, "files": {"image": ("im.png", image_bytes())}}
    return kwargs


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_and_the_server_goes_on(client, case):
    kwargs, status, message = BAD_REQUESTS[case]
    kwargs = _materialise(kwargs)
    start = time.perf_counter()
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message.lower() in r.json()["error"].lower()
    assert time.perf_counter() - start < 5  # bombs are refused from the header, not decoded
    assert client.get("/health").status_code == 200


def test_the_server_goes_on_after_every_bad_request(client):
    for kwargs, status, _ in BAD_REQUESTS.values():
        kwargs = _materialise(kwargs)
        assert client.post("/predict", **kwargs).status_code == status
    r = post(client, image_bytes(), query="?score_threshold=0")
    assert r.status_code == 200 and len(r.json()["detections"]) == 10


def test_the_body_limit_counts_without_a_content_length(client):
    """The chunked case above carries no Content-Length: the limit is counted as the bytes arrive."""
    request = client.build_request(
        "POST", "/predict", content=_chunks(b"\0" * (2 * MAX_UPLOAD)), headers={"content-type": "x"}
    )
    assert "content-length" not in request.headers


def test_other_routes_and_methods_get_json_errors(client):
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


class _Watched(torch.nn.Module):
    """A model wrapper that records how many calls run at once, and can hold a call until released."""

    def __init__(self, model, hold: threading.Event | None = None):
        super().__init__()
        self.inner, self.config, self.hold = model, model.config, hold
        self.running = self.most = 0
        self.entered = threading.Event()
        self._count = threading.Lock()

    def forward(self, images):
        with self._count:
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.set()
        try:
            if self.hold is not None:
                assert self.hold.wait(20)
            time.sleep(0.02)
            return self.inner(images)
        finally:
            with self._count:
                self.running -= 1


def test_requests_to_the_model_are_serialised(model):
    watched = _Watched(model)
    data = image_bytes()
    with TestClient(create_app(watched)) as c:
        results = []

        def one():
            results.append(post(c, data, query="?score_threshold=0").status_code)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [200] * 4 and watched.most == 1


def test_health_answers_while_the_model_runs(model):
    """Inference runs in a worker thread: the event loop keeps answering."""
    release = threading.Event()
    watched = _Watched(model, hold=release)
    with TestClient(create_app(watched)) as c:
        outcome = {}
        busy = threading.Thread(target=lambda: outcome.setdefault("r", post(c, image_bytes())))
        busy.start()
        try:
            assert watched.entered.wait(20)
            assert c.get("/health").status_code == 200  # while the model is held
            assert "r" not in outcome
        finally:
            release.set()
            busy.join(60)
    assert outcome["r"].status_code == 200


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model.pt"
    save_checkpoint(path, model)
    return str(path)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: maskrcnn serve" in out
    for words in ("--weights", "--host", "127.0.0.1", "--max-pixels", "--max-upload-mb", "POST /predict"):
        assert words in out


def test_cli_reports_a_busy_port_in_one_line(checkpoint, capsys):
    with bind_socket("127.0.0.1", 0) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--weights", checkpoint, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"maskrcnn serve: error: cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_cli_refuses_bad_options(checkpoint, capsys):
    assert main(["serve", "--weights", checkpoint, "--score-threshold", "2"]) == 2
    assert "--score-threshold" in capsys.readouterr().err
    assert main(["serve", "--weights", os.path.join(os.path.dirname(checkpoint), "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


class Server:
    """``maskrcnn serve`` in a subprocess on a free port, as a user starts it."""

    def __init__(self, checkpoint: str, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", checkpoint, "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.url = found.group(0)
                threading.Thread(target=self._drain, daemon=True).start()
                self._wait_healthy(deadline)
                return
        self.stop()
        raise AssertionError("maskrcnn serve did not start:\n" + "".join(self.lines))

    def _drain(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def _wait_healthy(self, deadline):
        import urllib.request

        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("maskrcnn serve does not answer /health")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down on SIGTERM
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _post_file(url: str, path: str, query: str = "") -> dict:
    """POST /predict with urllib (multipart by hand): what curl -F image=@path does."""
    import urllib.request

    boundary = "maskrcnn-test-boundary"
    with open(path, "rb") as fh:
        data = fh.read()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{os.path.basename(path)}"'
            f"\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "predict" + query,
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


# --------------------------------------------------------------------------------------------------
# The page, in a real browser
# --------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def test_page_in_a_headless_browser(checkpoint, tmp_path):
    """Open the page in Chromium, upload an image, wait for the drawing, move the slider with the keyboard
    and see the number of drawn detections change; a class toggle; both downloads; the JavaScript RLE
    decoder equals pycocotools' on every mask; an unreadable file shows the server's error; the page makes
    no request outside the server."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
    )
    image = tmp_path / "shapes.png"
    image.write_bytes(image_bytes(seed=3))
    server = Server(checkpoint, "--classes", "circle,square", "--score-threshold", "0")
    try:
        expected = _post_file(server.url, str(image), "?score_threshold=0")["detections"]
        scores = [d["score"] for d in expected]
        assert len(expected) == 10
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(accept_downloads=True, viewport={"width": 1100, "height": 900})
                outside = []

                def route(r):
                    if r.request.url.startswith(server.url) or r.request.url.startswith(("blob:", "data:")):
                        return r.continue_()
                    outside.append(r.request.url)
                    return r.abort()

                page.route("**/*", route)
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(server.url)
                page.locator("#model", has_text="class").wait_for()  # /health read
                page.set_input_files("#file", str(image))
                page.locator("body[data-state=drawn]").wait_for(timeout=60_000)
                count = page.locator("#count")
                assert count.get_attribute("data-total") == "10"
                assert count.get_attribute("data-shown") == "10"  # --score-threshold 0: all
                assert float(page.locator("#timing").get_attribute("data-inference-ms")) > 0

                # the slider, moved as a user does: Right arrow steps of 0.01
                steps = next(s for s in range(1, 101) if 0 < sum(x >= s / 100 for x in scores) < 10)
                page.focus("#threshold")
                for _ in range(steps):
                    page.keyboard.press("ArrowRight")
                assert page.input_value("#threshold") == str(steps / 100)
                shown = sum(x >= steps / 100 for x in scores)
                assert count.get_attribute("data-shown") == str(shown) and 0 < shown < 10
                assert page.locator("#threshold-value").text_content() == f"{steps / 100:.2f}"

                # a class toggle hides that class's detections
                first = page.locator("#classes input[type=checkbox]").first
                label = int(first.get_attribute("data-label"))
                first.uncheck()
                hidden = sum(x >= steps / 100 and d["category_id"] == label for x, d in zip(scores, expected))
                assert count.get_attribute("data-shown") == str(shown - hidden)
                first.check()
                page.focus("#threshold")
                page.keyboard.press("Home")  # back to 0: every detection
                assert count.get_attribute("data-shown") == "10"
                for _ in range(steps):
                    page.keyboard.press("ArrowRight")

                # downloads: the drawn PNG at the image's size, and the shown detections as COCO results
                with page.expect_download() as d:
                    page.click("#download-json")
                entries = json.loads(open(d.value.path()).read())
                assert entries == [e for e in expected if e["score"] >= steps / 100]
                with page.expect_download() as d:
                    page.click("#download-png")
                drawn = Image.open(d.value.path())
                assert drawn.size == (64, 48)
                assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(image)))

                # the page's RLE decoder against pycocotools, every mask
                for e in expected:
                    rle = e["segmentation"]
                    js = page.evaluate(
                        "(rle) => { const m = window.maskrcnnPage.decodeRle(rle);"
                        " return {x: m.x, y: m.y, w: m.w, h: m.h, data: Array.from(m.data)}; }",
                        rle,
                    )
                    full = np.zeros(rle["size"], dtype=np.uint8)
                    crop = np.array(js["data"], dtype=np.uint8).reshape(js["h"], js["w"])
                    full[js["y"] : js["y"] + js["h"], js["x"] : js["x"] + js["w"]] = crop
                    ref = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
                    assert np.array_equal(full, ref)

                if os.environ.get("MASKRCNN_SERVE_SCREENSHOT"):
                    page.screenshot(path=os.environ["MASKRCNN_SERVE_SCREENSHOT"], full_page=True)

                # a format the browser cannot display (TIFF): drawn on the server's reading of it
                tiff = tmp_path / "shapes.tif"
                Image.open(image).save(tiff)
                page.set_input_files("#file", str(tiff))
                page.locator("#status", has_text="shapes.tif: 64×48").wait_for(timeout=60_000)
                assert page.evaluate("window.maskrcnnPage.state.result.image_png.length") > 100
                assert count.get_attribute("data-total") == "10"

                # a file the server cannot read: its error on the page, and the server goes on
                bad = tmp_path / "broken.png"
                bad.write_bytes(image_bytes()[:100])
                page.set_input_files("#file", str(bad))
                page.locator("body[data-state=error]").wait_for(timeout=60_000)
                assert "broken.png: cannot decode the image" in page.locator("#status").text_content()
                assert errors == [] and outside == []
            finally:
                browser.close()
        assert _post_file(server.url, str(image))["detections"] is not None  # still serving
    finally:
        server.stop()
