"""Training checkpoints: save atomically, keep the last few, resume exactly.

A training checkpoint is a project checkpoint (:func:`maskrcnn.weights.save_checkpoint`: format, version,
model config and weights, so :func:`maskrcnn.weights.load_model` reads it) with the training state added::

    {"iteration": int,                      # iterations done; training resumes with the next one
     "optimizer": ..., "scheduler": ..., "scaler": ... or None,   # their state_dicts
     "rng": [state of rank 0, state of rank 1, ...],              # see capture_rng_state
     "extra": {...}}                        # the caller's (plain data)

Everything in it is a tensor or plain Python data, so it loads with ``torch.load(weights_only=True)``.
Files in ``output_dir``: ``model_{iteration:07d}.pt`` (periodic; the newest ``keep`` are kept),
``model_final.pt``, and ``last_checkpoint``, a one-line text file naming the newest checkpoint. Each is
written to a temporary file and renamed over the old one (``os.replace`` is atomic on POSIX), so a crash
at any moment leaves either the old or the new file, never a truncated one.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re

import numpy as np
import torch
from torch import nn

from maskrcnn.atomic import atomic_write
from maskrcnn.config import config_to_dict
from maskrcnn.weights import CheckpointError, load_state_dict_strict, read_checkpoint, save_checkpoint

__all__ = ["Checkpointer", "capture_rng_state", "config_differences", "restore_rng_state", "unwrap"]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pt$")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def capture_rng_state() -> dict:
    """This process's random number generator states, as tensors and plain data.

    Torch CPU (and every CUDA device's, if CUDA is initialised), NumPy's global ``RandomState`` and
    Python's ``random``. NumPy's and Python's states are converted (key arrays to int64 tensors) so the
    checkpoint loads with ``weights_only=True``.
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`: every generator continues where it was captured."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))


def config_differences(old: dict, new: dict, *, prefix: str = "") -> list[str]:
    """``["key: old -> new", ...]`` for every dotted key whose value differs between two nested dicts
    (a key only in one of them shows ``<absent>`` on the other side)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{key}: {_plain(a)!r} -> {_plain(b)!r}")
    return out


def _plain(x):
    """Tuples as lists (a YAML or checkpoint round trip turns one into the other)."""
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


class Checkpointer:
    """Saves and finds the training checkpoints of one run directory.

    ``keep``: how many periodic checkpoints (``model_{iteration:07d}.pt``) to keep, newest first; older
    ones are deleted after each save (``keep <= 0`` keeps all). Other checkpoint names (``model_final``)
    are never deleted. Only one process (rank 0) should call :meth:`save`.
    """

    def __init__(self, output_dir: str | os.PathLike, *, keep: int) -> None:
        self.output_dir = os.fspath(output_dir)
        self.keep = int(keep)

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name if name.endswith(".pt") else f"{name}.pt")

    @staticmethod
    def periodic_name(iteration: int) -> str:
        return f"model_{iteration:07d}"

    def save(
        self,
        name: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        scaler=None,
        iteration: int,
        extra: dict | None = None,
        rng_states: list[dict] | None = None,
    ) -> str:
        """Write ``{output_dir}/{name}.pt`` atomically, point ``last_checkpoint`` at it, prune old ones.

        ``rng_states``: one :func:`capture_rng_state` per rank (in a multi-process run, gather them on
        every rank with :func:`maskrcnn.engine.distributed.all_gather_objects`); default: this process's.
        Returns the file's path.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        path = self.path(name)
        try:
            save_checkpoint(
                path,
                unwrap(model),
                iteration=int(iteration),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict() if scaler is not None else None,
                rng=rng_states if rng_states is not None else [capture_rng_state()],
                extra=dict(extra or {}),
            )
        except BaseException:
            # save_checkpoint writes "{path}.tmp.{pid}.{thread}" then renames it; never leave a partial file
            for tmp in glob.glob(glob.escape(path) + f".tmp.{os.getpid()}.*"):
                os.remove(tmp)
            raise
        with atomic_write(os.path.join(self.output_dir, LAST_CHECKPOINT)) as fh:
            fh.write(os.path.basename(path) + "\n")
        self._prune(keep_path=path)
        return path

    def _periodic(self) -> list[tuple[int, str]]:
        """``(iteration, path)`` of the periodic checkpoints on disk, oldest first."""
        found = []
        for entry in os.listdir(self.output_dir):
            m = _PERIODIC.match(entry)
            if m:
                found.append((int(m.group(1)), os.path.join(self.output_dir, entry)))
        return sorted(found)

    def _prune(self, keep_path: str) -> None:
        if self.keep <= 0:
            return
        periodic = self._periodic()
        for _, path in periodic[: max(len(periodic) - self.keep, 0)]:
            if os.path.abspath(path) != os.path.abspath(keep_path):
                os.remove(path)

    def latest(self) -> str | None:
        """The checkpoint ``last_checkpoint`` names, or None when there is no ``last_checkpoint``.

        Raises ``FileNotFoundError`` if it names a file that is gone (rather than silently starting over).
        """
        pointer = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as fh:
            name = fh.read().strip()
        path = os.path.join(self.output_dir, name)
        if not name or not os.path.isfile(path):
            raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist in {self.output_dir}")
        return path

    def load_for_resume(
        self,
        path: str | os.PathLike,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        scaler=None,
        rank: int = 0,
    ) -> tuple[int, dict]:
        """Restore model, optimizer, scheduler, scaler and this ``rank``'s RNG states from ``path``.

        Returns ``(iteration, extra)``: the number of iterations done and the ``extra`` dict given to
        :meth:`save`. Weights must fit the model exactly (:func:`maskrcnn.weights.load_state_dict_strict`).
        """
        path = os.fspath(path)
        data = read_checkpoint(path)
        if "iteration" not in data or "optimizer" not in data:
            raise CheckpointError(f"{path} is not a training checkpoint (no iteration/optimizer state)")
        net = unwrap(model)
        if getattr(net, "config", None) is not None:
            saved = data.get("config") or {}
            changed = config_differences(saved, config_to_dict(net.config), prefix="model.")
            if changed:
                raise CheckpointError(
                    f"{path}: cannot resume with a different model; the run's config changes "
                    + "; ".join(changed[:8])
                    + (f" (and {len(changed) - 8} more)" if len(changed) > 8 else "")
                    + ". Undo these changes to resume, or start a new run in another output_dir"
                )
        load_state_dict_strict(net, data["model"], source=path)
        optimizer.load_state_dict(data["optimizer"])
        if scheduler is not None and data.get("scheduler") is not None:
            scheduler.load_state_dict(data["scheduler"])
        if scaler is not None:
            if data.get("scaler") is not None:
                scaler.load_state_dict(data["scaler"])
            else:
                logger.warning("%s has no gradient-scaler state; the scaler starts afresh", path)
        rng = data.get("rng") or []
        if rank < len(rng):
            restore_rng_state(rng[rank])
        else:
            logger.warning(
                "%s holds RNG states for %d process(es), not for rank %d: random streams are not resumed "
                "exactly (the run was started with a different number of processes)",
                path,
                len(rng),
                rank,
            )
        return int(data["iteration"]), dict(data.get("extra") or {})
