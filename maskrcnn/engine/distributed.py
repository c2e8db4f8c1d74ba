"""Multi-process training helpers over ``torch.distributed``, all no-ops in a single process.

Launch with ``torchrun --nproc_per_node N ...``: it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, which :func:`init_distributed` reads. Each process drives one device
(``cuda:LOCAL_RANK``, backend NCCL) or the CPU (backend gloo).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The one resolver of the ``device`` setting (training, evaluation, prediction).

    ``"auto"``: ``cuda:local_rank`` when CUDA is available, else the CPU; ``"cpu"``; ``"cuda"``:
    ``cuda:local_rank``; ``"cuda:K"``: that GPU (in a single process). A device this machine lacks, or a
    name torch does not know, raises :class:`~maskrcnn.config.ConfigError` naming the setting."""
    from maskrcnn.config import ConfigError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device={device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:K' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device} but MPS is not available on this machine")
    return dev


def init_distributed(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """``(rank, world_size, local_rank, device)``; joins the process group when launched by torchrun.

    Without torchrun's variables (and no process group already joined) this is a no-op returning
    ``(0, 1, 0, device)``. With them, every process uses ``cuda:LOCAL_RANK`` (``device`` ``"auto"`` or
    ``"cuda"``; an explicit ``"cuda:K"`` is an error there) with the NCCL backend, or the CPU with gloo.
    Calling it again, or after the caller joined a group itself, returns that group's values.
    """
    if is_distributed():  # joined already (by an earlier call or by the caller)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif all(k in os.environ for k in _ENV):
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
    else:
        return 0, 1, 0, resolve_device(device, 0)
    if world_size > 1 and device.startswith("cuda:"):
        raise ValueError(
            f"device {device!r}: in a multi-process run each process uses cuda:LOCAL_RANK; "
            "pass device='cuda' or 'auto' and select GPUs with CUDA_VISIBLE_DEVICES"
        )
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
        )
    return rank, world_size, local_rank, dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True in rank 0 (and in a single process): the one that logs and writes files."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The mean over all processes of each scalar (tensor or number), as Python floats on every process.

    One collective for the whole dict (every process must pass the same keys). Used for logging and for
    the non-finite-loss check, which then agrees on every process: a NaN on any rank makes the mean NaN.
    """
    if not values:
        return {}
    keys = sorted(values)
    world_size = get_world_size()
    if world_size > 1:
        device = _collective_device()
    else:  # stack where the values are: one device-to-host copy
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    stacked = torch.stack(
        [torch.as_tensor(values[k], device=device).detach().reshape(()).double() for k in keys]
    )
    if world_size > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked = stacked / world_size
    return dict(zip(keys, stacked.cpu().tolist()))


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in a single process)."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (no-op if none)."""
    if is_distributed():
        dist.destroy_process_group()
