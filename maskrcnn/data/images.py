"""Image files -> pixels: the one decoding path of training, evaluation and prediction, and the up-front check
that decodes every image of a data set once (in parallel, cached).

Conventions: :func:`read_image` gives a float32 RGB ``[3, H, W]`` tensor in [0, 1], ``(H, W)`` the size as
displayed, i.e. after the EXIF orientation is applied (as detectron2's ``read_image`` and photo viewers do;
annotation tools label the upright image). Modes, all decoded by Pillow:

- 8-bit RGB, grayscale ``L``, 1-bit, palette ``P`` (transparency dropped), ``RGBA``/``LA``/``PA`` (alpha
  dropped, not composited, as torchvision's ``ImageReadMode.RGB`` and PIL's ``convert("RGB")``), CMYK and
  YCbCr (Pillow's conversion): byte value ``k`` -> ``k / 255``;
- 16-bit grayscale (``I;16*``, and ``I`` holding values in 0 .. 65535): ``v -> v / 65535``, gray copied to the
  3 channels (torchvision's uint16 -> float scaling). ``I`` values outside 0 .. 65535 and float ``F`` images
  have no known range and are errors, not guesses;
- 16-bit colour PNGs: Pillow reads them as 8-bit RGB(A), keeping the high byte of each sample, so they get
  8-bit precision (the same in every path).

Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its default; nothing here sets it): when other
code sets it, truncated files decode silently with grey pixels, and :func:`check_images` warns about it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL
import torch
from PIL import Image, ImageFile
from torch import Tensor

from maskrcnn.atomic import atomic_write
from maskrcnn.progress import iterate_with_progress

__all__ = [
    "ImageReadError",
    "cache_dir",
    "check_images",
    "decode_image",
    "read_image",
]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transposition that makes the image upright (Pillow's exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_CACHE_FORMAT = 1


class ImageReadError(ValueError):
    """An image file that cannot be decoded (missing, corrupt, truncated, unsupported mode). The message is
    ``"<path>: <what is wrong>"``; ``path`` and ``reason`` hold the two parts."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # picklable, so that it crosses DataLoader worker processes intact
        return type(self), (self.path, self.reason)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation 1..8 (1 when absent, malformed or out of range)."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: treated as absent, as viewers do
        return 1
    return value if value in _TRANSPOSE else 1


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8, or uint16 for 16-bit grayscale (see the module docstring for each mode)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16"):  # "I;16", "I;16L", "I;16B", "I;16N"
        gray = np.asarray(im).astype(np.uint16)
    elif mode == "I":  # 32-bit integer; Pillow < 10 opens 16-bit grayscale PNGs in this mode
        arr = np.asarray(im)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"32-bit integer pixels in [{lo}, {hi}] have no known range (only 0 .. 65535, 16-bit, is "
                "supported); convert the image to 8 or 16 bits"
            )
        gray = arr.astype(np.uint16)
    elif mode == "F":
        raise ValueError("32-bit float pixels have no known range; convert the image to 8 or 16 bits")
    else:  # "1", "L", "P", "LA", "PA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", ...: alpha dropped
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def decode_image(path: str) -> np.ndarray:
    """Decode a whole image file: ``[H, W, 3]`` uint8 (uint16 for 16-bit grayscale), C-contiguous, upright
    (EXIF orientation applied). Raises :class:`ImageReadError` naming the file on any failure."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()  # the whole file: a truncated or corrupt one fails here
            orientation = _orientation(im)
            arr = _to_rgb_array(im if orientation == 1 else im.transpose(_TRANSPOSE[orientation]))
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        reason = str(e) or type(e).__name__
        raise ImageReadError(path, f"cannot decode the image ({reason})") from e
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()  # PIL's array view is read-only


def read_image(path: str) -> Tensor:
    """The image file at ``path`` as a float32 RGB ``[3, H, W]`` tensor in [0, 1] (``k / 255`` for 8-bit
    samples, ``v / 65535`` for 16-bit), upright. Raises :class:`ImageReadError` naming the file."""
    arr = decode_image(path)
    scale = 255.0
    if arr.dtype == np.uint16:  # (torch's uint16 support is recent and partial)
        arr, scale = arr.astype(np.float32), 65535.0
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    return torch.empty(chw.shape, dtype=torch.float32).copy_(chw).div_(scale)  # contiguous [3, H, W]


# --------------------------------------------------------------------------------------------------
# The up-front check: decode every file once, cached by (absolute path, size, mtime)
# --------------------------------------------------------------------------------------------------


def cache_dir() -> str:
    """Where maskrcnn caches things: ``$MASKRCNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/maskrcnn``, else
    ``~/.cache/maskrcnn``. Never inside a data folder."""
    if os.environ.get("MASKRCNN_CACHE_DIR"):
        return os.environ["MASKRCNN_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "maskrcnn")


def _cache_file(paths: Sequence[str]) -> str:
    """One cache file per folder of images (the common folder of ``paths``), named by its path's hash."""
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    digest = hashlib.sha256(root.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return os.path.join(cache_dir(), "checked-images", f"{digest}.json")


def _cache_version() -> str:
    return f"{_CACHE_FORMAT}/pillow-{PIL.__version__}"  # a Pillow upgrade may decode differently


def _load_cache(file: str) -> dict:
    """``{abs path: [size, mtime_ns, h, w]}``; empty when the file is missing, corrupt or of another
    version."""
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("version") != _cache_version():
            return {}
        entries = data["entries"]
        return {
            p: e
            for p, e in entries.items()
            if isinstance(e, list) and len(e) == 4 and all(isinstance(v, int) for v in e)
        }
    except FileNotFoundError:
        return {}
    except Exception as e:  # unreadable or corrupt: ignored (rebuilt by this check)
        logger.debug("ignoring the image check cache %s: %s", file, e)
        return {}


def _save_cache(file: str, new: dict, dropped: set) -> None:
    """Merge ``new`` entries into the cache file (re-read now: another process may have added some), drop
    ``dropped`` paths, and replace the file atomically. Failures only log a warning."""
    try:
        entries = _load_cache(file)
        entries.update(new)
        for p in dropped:
            entries.pop(p, None)
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with atomic_write(file) as fh:
            json.dump({"version": _cache_version(), "entries": entries}, fh)
    except OSError as e:
        logger.warning("could not write the image check cache %s: %s", file, e)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _decoded_size(path: str) -> tuple[int, int]:
    arr = decode_image(path)
    return int(arr.shape[0]), int(arr.shape[1])


def check_images(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[int, int] | ImageReadError]:
    """Decode every file of ``paths`` completely, in a thread pool of ``workers`` (default: the usable CPU
    cores, at most 16), and return ``{path: (h, w) upright}`` or ``{path: ImageReadError}``.

    Successes are cached in :func:`cache_dir` ``/checked-images/`` keyed by (absolute path, file size,
    mtime), so that a second check of unchanged files decodes nothing; a changed file is decoded again.
    An interrupted check (Ctrl-C) starts no more decodes and caches the ones it finished. A tqdm bar
    shows on a terminal, INFO log lines every 30 s otherwise (``progress=False``: neither).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated image files are "
            "decoded with grey pixels and cannot be detected"
        )
    results: dict[str, tuple[int, int] | ImageReadError] = {}
    if not paths:
        return results
    abspaths = {p: os.path.abspath(p) for p in paths}
    cache_file = _cache_file(list(abspaths.values()))
    cached = _load_cache(cache_file)
    todo: list[tuple[str, list[int]]] = []  # (path, [size, mtime_ns])
    from_cache = 0
    for p in dict.fromkeys(paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            results[p] = ImageReadError(p, "file not found")
            continue
        except OSError as e:
            results[p] = ImageReadError(p, f"cannot read the file ({e})")
            continue
        key = [st.st_size, st.st_mtime_ns]
        entry = cached.get(abspaths[p])
        if entry is not None and entry[:2] == key:
            results[p] = (entry[2], entry[3])
            from_cache += 1
        else:
            todo.append((p, key))
    if not todo:
        logger.info(
            "image check: %d file(s) decoded before and unchanged since%s",
            from_cache,
            f", {len(results) - from_cache} missing or unreadable" if len(results) > from_cache else "",
        )
        return results

    def run(item: tuple[str, list[int]]) -> tuple[int, int] | ImageReadError:
        try:
            return _decoded_size(item[0])
        except ImageReadError as e:
            return e

    if workers is None:
        workers = min(16, usable_cores())
    workers = max(1, min(int(workers), len(todo)))
    start = time.perf_counter()
    new: dict[str, list[int]] = {}
    dropped: set[str] = set()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check")
    try:
        outcomes = pool.map(run, todo)
        if progress:
            outcomes = iterate_with_progress(outcomes, total=len(todo), desc="checking images")
        for (p, key), outcome in zip(todo, outcomes):
            results[p] = outcome
            if isinstance(outcome, ImageReadError):
                dropped.add(abspaths[p])
            else:
                new[abspaths[p]] = [*key, int(outcome[0]), int(outcome[1])]
    finally:  # also on Ctrl-C: the decodes not yet started are dropped, the ones done are cached
        pool.shutdown(wait=True, cancel_futures=True)
        _save_cache(cache_file, new, dropped)
    failed = len(results) - from_cache - len(new)
    logger.info(
        "image check: decoded %d file(s) in %.1fs (%d worker thread(s))%s%s",
        len(todo),
        time.perf_counter() - start,
        workers,
        f", {from_cache} decoded before and unchanged" if from_cache else "",
        f", {failed} unreadable" if failed else "",
    )
    return results
