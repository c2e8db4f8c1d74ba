"""The server of ``maskrcnn serve``: one model, one page, a JSON API.

Endpoints:

- ``GET /``: the page (:mod:`maskrcnn.serve.page`), self-contained; its Content-Security-Policy lets it
  talk to this server only.
- ``GET /health``: ``{"status": "ok", ...}`` and what the page needs to know about the model (class names,
  keypoint names and skeleton, colours, limits). It answers while a prediction runs.
- ``POST /predict``: a ``multipart/form-data`` body with a file field ``image``; query parameters
  ``score_threshold`` (in [0, 1], default the server's ``--score-threshold``) and ``include_image``
  (``true``: the response also holds the image as the model saw it, ``image_png``, a data URL; the page
  asks for it when the browser cannot display the file). The response::

      {"file_name": ..., "width": W, "height": H, "score_threshold": t,
       "inference_ms": ..., "total_ms": ..., "detections": [COCO results entries]}

  Each detection is a COCO results entry, ``image_id`` 0: ``category_id`` (the training data's category
  id where the checkpoint recorded them, else the model's label),
  ``category_name``, ``bbox`` ``[x, y, w, h]`` (pixels of the upright image), ``score``, ``segmentation``
  (compressed RLE of mask >= 0.5, ``counts`` a string) for mask models, ``keypoints`` (COCO's flat
  ``[x, y, 1] * K``) and ``keypoint_scores`` (``K``) for keypoint models, and ``file_name``; as in
  ``maskrcnn predict`` (:func:`maskrcnn.engine.evaluate.detections_to_coco` makes both).
  ``inference_ms`` is the model's forward pass; ``total_ms`` the whole request in the worker thread
  (waiting for the model, decoding, inference, encoding).

Bad requests get a JSON error ``{"error": "..."}`` and the server goes on serving: 400 for a missing or
non-file ``image`` field, zero bytes, a file that is not an image or is truncated (decoded by
:func:`maskrcnn.data.images.read_image`, the reader of training and prediction, so the same files are
accepted everywhere), a bad query parameter; 413 for a body over ``max_upload_bytes`` (by its
Content-Length, or counted as it arrives) or an image over ``max_pixels`` (read from the header before
decoding: a decompression bomb is refused without being decoded); 415 for a body that is not multipart.

Requests are served one at a time by the model: decoding, inference and encoding run in a worker thread
(the event loop keeps answering) under one lock, so that memory holds one image's tensors at a time.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence

import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from torch import nn

from maskrcnn.data.images import ImageReadError, read_image
from maskrcnn.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
from maskrcnn.engine.evaluate import _model_device, detections_to_coco
from maskrcnn.serve.page import PAGE
from maskrcnn.visualize import KEYPOINT_THRESHOLD, PALETTE, to_pil_image
from maskrcnn.weights import recorded_labels

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "Predictor",
    "RequestError",
    "bind_socket",
    "create_app",
    "serve",
]

logger = logging.getLogger(__name__)

#: Largest request body (the multipart upload): 25 MiB, a large phone photo.
DEFAULT_MAX_UPLOAD_BYTES = 25 * 2**20
#: Largest image, width * height: 20 megapixels. Masks are pasted at full size (``[N, 1, H, W]`` floats),
#: so memory grows with both the pixels and the detections.
DEFAULT_MAX_PIXELS = 20_000_000

#: The page may talk to this server only: no request leaves the machine.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Predictor:
    """One model behind a lock: image bytes in, COCO results entries out (see the module docstring).

    ``class_names[label]`` names label ``label`` (``class_names[0]`` is the background), else the label's
    number is its name. Names, category ids, keypoint names and skeleton default to the model's
    ``metadata`` (what its checkpoint recorded of the training data); without it, labels are the category
    ids and keypoint models with COCO's 17 keypoints get COCO's person names and skeleton. ``class_names``
    and ``skeleton`` (1-based pairs) override them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: Sequence[str] | None = None,
        skeleton: Sequence[Sequence[int]] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        score_threshold: float = 0.5,
    ):
        self.model = model.eval()
        self.device = _model_device(model)
        meta = getattr(model, "metadata", None) or {}
        recorded_names, self.to_category = recorded_labels(model)
        class_names = recorded_names if class_names is None else class_names
        self.class_names = list(class_names) if class_names is not None else None
        self.max_pixels = int(max_pixels)
        self.score_threshold = float(score_threshold)
        config = getattr(model, "config", None)
        heads = getattr(config, "roi_heads", None)
        self.num_classes = getattr(config, "num_classes", None)
        self.has_masks = bool(getattr(heads, "mask", True))
        self.num_keypoints = int(heads.num_keypoints) if getattr(heads, "keypoint", False) else 0
        coco_person = self.num_keypoints == len(COCO_PERSON_KEYPOINT_NAMES)
        self.keypoint_names = meta.get("keypoint_names") or (
            list(COCO_PERSON_KEYPOINT_NAMES) if coco_person else None
        )
        if skeleton is None:
            skeleton = meta.get("skeleton", COCO_PERSON_SKELETON if coco_person else ())
        self.skeleton = [[int(a), int(b)] for a, b in skeleton]
        self._lock = threading.Lock()

    def class_name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    def info(self) -> dict:
        """What ``GET /health`` tells about the model."""
        return {
            "device": str(self.device),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "masks": self.has_masks,
            "num_keypoints": self.num_keypoints,
            "keypoint_names": self.keypoint_names,
            "skeleton": self.skeleton,
            "keypoint_threshold": KEYPOINT_THRESHOLD,
            "score_threshold": self.score_threshold,
            "palette": [list(c) for c in PALETTE],
            "max_pixels": self.max_pixels,
        }

    def _check_size(self, path: str, name: str) -> None:
        """Refuse an image over ``max_pixels`` by its header, before decoding anything."""
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Image.DecompressionBombError as e:  # over twice Pillow's own MAX_IMAGE_PIXELS
            raise RequestError(413, f"{name}: {e}") from None
        except Exception:  # not an image Pillow recognises: read_image names what is wrong
            return
        if width * height > self.max_pixels:
            raise RequestError(
                413,
                f"{name}: {width}x{height} = {width * height} pixels, over this server's limit of "
                f"{self.max_pixels} (maskrcnn serve --max-pixels)",
            )

    def _read(self, data: bytes, name: str) -> torch.Tensor:
        # read_image (the one reader of training and prediction) takes a path: the bytes go to a file
        fd, path = tempfile.mkstemp(prefix="maskrcnn-serve-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self._check_size(path, name)
            try:
                return read_image(path)
            except ImageReadError as e:
                status = 413 if isinstance(e.__cause__, Image.DecompressionBombError) else 400
                raise RequestError(status, f"{name}: {e.reason.replace(repr(path), repr(name))}") from None
        finally:
            os.unlink(path)

    def predict(
        self,
        data: bytes,
        *,
        file_name: str = "image",
        score_threshold: float | None = None,
        include_image: bool = False,
    ) -> dict:
        """The response of ``POST /predict`` for the image file ``data`` (blocking; thread-safe)."""
        start = time.perf_counter()
        if not data:
            raise RequestError(400, f"{file_name}: the file is empty (0 bytes)")
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        with self._lock:
            image = self._read(data, file_name)
            height, width = image.shape[1:]
            began = time.perf_counter()
            with torch.no_grad():
                (out,) = self.model([image.to(self.device)])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            inference_ms = 1000 * (time.perf_counter() - began)
            keep = out["scores"] >= threshold
            out = {k: v[keep] for k, v in out.items()}
            detections = detections_to_coco([out], [0], label_to_category_id=self.to_category)
            kp_scores = out["keypoints_scores"].float().cpu().tolist() if "keypoints_scores" in out else None
            for i, (entry, label) in enumerate(zip(detections, out["labels"].tolist())):
                entry["category_name"] = self.class_name(label)
                if kp_scores is not None:
                    entry["keypoint_scores"] = kp_scores[i]
                entry["file_name"] = file_name
            result = {
                "file_name": file_name,
                "width": int(width),
                "height": int(height),
                "score_threshold": threshold,
                "inference_ms": round(inference_ms, 2),
                "detections": detections,
            }
            if include_image:
                buffer = io.BytesIO()
                to_pil_image(image).save(buffer, format="PNG", compress_level=1)
                result["image_png"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        result["total_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return result


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


class _LimitBody:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length before anything
    is read, or (chunked, or a lying header) as soon as the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    def _error(self) -> RequestError:
        return RequestError(
            413, f"the request body is over this server's limit of {self.max_bytes} bytes (--max-upload-mb)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"error": self._error().message}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # inside the endpoint: answered by the RequestError handler
            return message

        await self.app(scope, limited_receive, send)


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error_response(exc.status, exc.message)


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    return _error_response(exc.status_code, str(exc.detail))


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("maskrcnn serve: %s %s failed", request.method, request.url.path)
    return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def _threshold_param(request: Request, default: float) -> float:
    raw = request.query_params.get("score_threshold")
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise RequestError(400, f"score_threshold={raw!r}: expected a number in [0, 1]")
    return value


def _bool_param(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise RequestError(400, f"{name}={raw!r}: expected true or false")


def create_app(
    model: nn.Module,
    *,
    class_names: Sequence[str] | None = None,
    skeleton: Sequence[Sequence[int]] | None = None,
    score_threshold: float = 0.5,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Starlette:
    """The Starlette app serving ``model`` (in eval mode, on its device): see the module docstring.
    ``app.state.predictor`` is its :class:`Predictor`."""
    predictor = Predictor(
        model,
        class_names=class_names,
        skeleton=skeleton,
        max_pixels=max_pixels,
        score_threshold=score_threshold,
    )

    async def page(request: Request) -> HTMLResponse:
        headers = {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-store"}
        return HTMLResponse(PAGE, headers=headers)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **predictor.info(), "max_upload_bytes": int(max_upload_bytes)})

    async def predict(request: Request) -> JSONResponse:
        threshold = _threshold_param(request, predictor.score_threshold)
        include_image = _bool_param(request, "include_image")
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise RequestError(
                415, "POST /predict takes multipart/form-data with a file field 'image' (curl -F image=@FILE)"
            )
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("image")
            if upload is None:
                raise RequestError(400, "missing the multipart field 'image' (curl -F image=@FILE)")
            if isinstance(upload, str):
                raise RequestError(400, "the field 'image' must be a file upload (curl -F image=@FILE)")
            data = await upload.read()
            name = os.path.basename(upload.filename or "") or "image"
        result = await run_in_threadpool(
            predictor.predict, data, file_name=name, score_threshold=threshold, include_image=include_image
        )
        return JSONResponse(result)

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
        ],
        middleware=[Middleware(_LimitBody, max_bytes=max_upload_bytes)],
        exception_handlers={
            RequestError: _on_request_error,
            HTTPException: _on_http_exception,
            Exception: _on_bug,
        },
    )
    app.state.predictor = predictor
    return app


# --------------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one, ``sock.getsockname()[1]``), for
    ``uvicorn.Server.run(sockets=[sock])``. Raises ``OSError`` naming the address when it is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(e.errno, e.strerror, f"cannot listen on {host}:{port}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, e.strerror, f"cannot listen on {host}:{port}") from None
    return sock


def serve(
    model: nn.Module,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **app_options,
) -> None:
    """Serve ``model`` at ``http://host:port/`` until interrupted (Ctrl-C). ``app_options`` go to
    :func:`create_app`. Binds to the loopback interface unless ``host`` says otherwise."""
    import uvicorn

    app = create_app(model, **app_options)
    sock = bind_socket(host, port)
    if not _is_loopback(host):
        logger.warning(
            "maskrcnn serve: listening on %s: anyone who can reach this machine can use the model "
            "(there is no authentication)",
            host,
        )
    shown = f"[{host}]" if ":" in host else host
    print(f"maskrcnn serve: http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
