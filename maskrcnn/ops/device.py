"""Which code path a device takes.

On a CPU, reading a tensor's value on the host (``item``, ``tolist``, the size of ``nonzero``) costs
nothing more than the read. On an accelerator it is a host-device synchronisation: the host waits until
every queued kernel has run, and the device then idles until the host queues more. Operators with two
paths ask :func:`host_reads_stall` and, where it is true, take the one that reads less back (bigger blocks,
fewer data-dependent sizes), at the price of more arithmetic. Tests patch this function to run those paths
on a CPU (tests/syncs.py).
"""

from __future__ import annotations

import torch


def host_reads_stall(device: torch.device) -> bool:
    """True where a read of a tensor's value on the host waits for queued work (every device but the CPU)."""
    return device.type != "cpu"
