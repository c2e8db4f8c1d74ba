"""What a training run tells people while it runs, besides ``metrics.jsonl``: a plain log line every
``cfg.log_period`` iterations (:func:`log_line`, written on stderr when it is not a terminal) and
TensorBoard event files (:class:`EventWriter`).

A log line reads::

    train: 120/1300 (9%), loss 1.234 (box 0.301, cls 0.412, mask 0.368, rpn_box 0.051, rpn_cls 0.102),
    lr 0.02, 1.05 s/it (data 0.0100), eta 20m39s, peak memory 1843 MiB (CUDA allocated)

(one line): the window's mean losses and seconds per iteration (and the part spent waiting for data), the
learning rate of the last iteration, the time left at the window's speed, and the process's peak memory:
``torch.cuda.max_memory_allocated`` on a CUDA device, otherwise the peak resident set size of the process
(``resource.getrusage``; ``CPU RSS``). Under DDP, rank 0 writes it with its own memory.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import torch

from maskrcnn.progress import format_duration, format_seconds

__all__ = ["EventWriter", "log_line", "peak_memory"]

logger = logging.getLogger(__name__)


def peak_memory(device: torch.device) -> tuple[float, str] | None:
    """The peak memory of this process in MiB and what it measures: ``(mib, "CUDA allocated")`` on a CUDA
    device, ``(mib, "CPU RSS")`` (peak resident set size) otherwise; ``None`` where neither is known."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "CPU RSS"


def log_line(record: dict, max_iter: int, device: torch.device) -> str:
    """The log line of a ``metrics.jsonl`` training record (``iteration``, ``lr``, ``loss``, ``loss_*``,
    ``time``, ``data_time``), the run's ``max_iter`` and its ``device`` (for the peak memory)."""
    it = record["iteration"]
    parts = [f"train: {it}/{max_iter} ({100 * it // max(max_iter, 1)}%)"]
    named = ", ".join(
        f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_")
    )
    parts.append(f"loss {record['loss']:.3f}" + (f" ({named})" if named else ""))
    parts.append(f"lr {record['lr']:.4g}")
    per = record.get("time", 0.0)
    parts.append(f"{format_seconds(per)} s/it (data {format_seconds(record.get('data_time', 0.0))})")
    parts.append(f"eta {format_duration(per * max(max_iter - it, 0))}")
    memory = peak_memory(device)
    if memory is not None:
        parts.append(f"peak memory {memory[0]:.0f} MiB ({memory[1]})")
    return ", ".join(parts)


class EventWriter:
    """TensorBoard event files in ``log_dir`` (``tensorboard --logdir runs/``), or nothing.

    ``enabled=False`` (the ``tensorboard`` config key off, or a DDP rank other than 0) writes nothing; so
    does a missing ``tensorboard`` package, with one info line saying how to get it. A resumed run
    (``purge_step``: its first iteration) hides the steps from there on that an earlier run logged, as it
    truncates ``metrics.jsonl``; each run appends its own event file.

    Tags: ``train/loss``, ``train/loss_*``, ``train/lr``, ``train/time``, ``train/data_time`` and
    ``eval/<bbox|segm|keypoints>/<AP|AP50|...>``.
    """

    def __init__(self, log_dir: str, *, enabled: bool = True, purge_step: int | None = None) -> None:
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info(
                "no TensorBoard event files: the tensorboard package is not installed (pip install "
                "tensorboard, or pip install -e '.[tensorboard]'); set tensorboard=false to not be told"
            )
            return
        os.makedirs(log_dir, exist_ok=True)
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Write every finite number of ``values`` (nested dicts give ``a/b`` tags; other entries, such
        as text, and COCO's ``-1`` for "undefined" are left out) under ``prefix/``, at ``step``."""
        if self._writer is None:
            return
        for tag, value in _flatten(values, prefix):
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(values: dict, prefix: str):
    for k, v in values.items():
        tag = f"{prefix}/{k}"
        if isinstance(v, dict):
            yield from _flatten(v, tag)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            if prefix.startswith("eval") and v < 0:
                continue
            yield tag, float(v)
