"""Host-device synchronisations counted on a CPU: the ops that, on CUDA, make the host wait for the device.

A CPU never waits, so the count is taken from what is dispatched: reading a value on the host (``item``,
``bool``, ``int``: ``aten._local_scalar_dense``; ``tolist`` and ``numpy``, which CUDA tensors copy to the
host first), and the ops whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), which CUDA
sizes by reading a count back. :func:`device_paths` makes the CPU take the code paths that other devices
take (NMS's torch backend with the device block sizes), so that the count is the one a GPU run would see.

    with device_paths(), count_syncs() as syncs:
        model(images)
    syncs.total, syncs.by_site  # {(op, "maskrcnn/...py:LINE function"): count}
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "maskrcnn") + os.sep

# Ops whose CUDA implementation reads a value back to the host.
_ALWAYS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.unique_dim_consecutive",
    "aten.bincount",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


# Ops that allocate or relabel memory without running a kernel on a device.
_NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.detach", "aten.lift_fresh"}


def _site(roots: dict[str, str]) -> str:
    """The innermost frame in one of ``roots`` (name -> folder): ``<name>/<file>:<line> <function>``."""
    for frame in reversed(traceback.extract_stack()):
        for name, root in roots.items():
            if frame.filename.startswith(root):
                return f"{name}/{frame.filename[len(root) :]}:{frame.lineno} {frame.name}"
    return "outside " + " and ".join(roots)


def _blocks(name: str, args, kwargs, extra: frozenset) -> bool:
    if name in _ALWAYS or name in extra:
        return True
    if name in _INDEXING:
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)
    if name == "aten.repeat_interleave":
        return isinstance(args[0], torch.Tensor) and (kwargs or {}).get("output_size") is None
    return False


class SyncCounter(TorchDispatchMode):
    """Counts the blocking ops dispatched inside it, by op and call site (the innermost frame in
    ``roots``; default: this package). ``extra_ops``: more op names to count, e.g. ``"torchvision.nms"``
    (its CUDA kernel copies its suppression mask to the host)."""

    def __init__(self, roots: dict[str, str] | None = None, extra_ops=(), launches: bool = False):
        super().__init__()
        self.by_site: collections.Counter = collections.Counter()
        self.roots = roots or {"maskrcnn": PACKAGE}
        self.extra = frozenset(extra_ops)
        self.count_launches = launches
        self.launches: collections.Counter = collections.Counter()  # {"<root name>/<file>": ops}

    def site(self) -> str:
        return _site(self.roots)

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def in_file(self, name: str) -> int:
        """The count at sites in ``<root name>/<name>``, e.g. ``maskrcnn/ops/nms.py``."""
        return sum(n for (_, site), n in self.by_site.items() if site.startswith(f"{name}:"))

    def report(self) -> str:
        return "\n".join(f"{n:5d}  {op:28s} {site}" for (op, site), n in sorted(self.by_site.items()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if _blocks(name, args, kwargs, self.extra):
            self.by_site[(name, self.site())] += 1
        if self.count_launches and not func.is_view and name not in _NO_KERNEL:
            self.launches[self.site().split(":")[0]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs(roots: dict[str, str] | None = None, extra_ops=(), launches: bool = False):
    """A :class:`SyncCounter` active in the block (``tolist`` and ``numpy`` counted too). ``launches``:
    also count, by file, the dispatched ops that run a kernel (not views, not bare allocations): on a GPU
    each is at least one kernel launch, the host's cost of a call when the device waits on it."""
    counter = SyncCounter(roots, extra_ops, launches)
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name, original):
        def method(self, *args, **kwargs):
            counter.by_site[(name, counter.site())] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def device_paths():
    """CPU tensors take the code paths of other devices (``maskrcnn.ops.device.host_reads_stall`` is true:
    NMS's torch backend with the device block sizes, ...)."""
    device_module = importlib.import_module("maskrcnn.ops.device")
    original = device_module.host_reads_stall
    try:
        device_module.host_reads_stall = lambda device: True
        yield
    finally:
        device_module.host_reads_stall = original
