"""The learning-rate schedule: linear warmup, then step decay or a cosine to zero.

The rate of iteration ``i`` (0-based: ``i`` iterations are done before it) is ``lr * lr_factor(i, ...)``.
:func:`build_scheduler` wraps :func:`lr_factor` in a ``LambdaLR`` that the training loop steps once per
iteration, after ``optimizer.step()``.
"""

from __future__ import annotations

import bisect
import math

import torch

from maskrcnn.config import SolverConfig

__all__ = ["SCHEDULES", "build_scheduler", "lr_factor"]

SCHEDULES = ("step", "cosine")


def lr_factor(
    iteration: int,
    *,
    schedule: str,
    max_iter: int,
    steps: tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> float:
    """The multiplier of the base learning rate at ``iteration`` (0-based).

    * ``"step"``: ``gamma ** k``, ``k`` the number of ``steps`` ``<= iteration``.
    * ``"cosine"``: ``0.5 * (1 + cos(pi * iteration / max_iter))``, 1 at 0 and 0 at ``max_iter``.

    During the first ``warmup_iters`` iterations the factor is also multiplied by a linear ramp from
    ``warmup_factor`` (at iteration 0) to 1 (at ``warmup_iters``), as in Goyal et al. and detectron2.
    """
    if schedule == "step":
        factor = gamma ** bisect.bisect_right(sorted(steps), iteration)
    elif schedule == "cosine":
        if max_iter <= 0:
            raise ValueError(f"the cosine schedule needs max_iter > 0, got {max_iter}")
        factor = 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_iter) / max_iter))
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, solver: SolverConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` with ``solver``'s settings to every parameter group.

    The lambda is a plain function (not a picklable object), so the scheduler's ``state_dict`` holds only
    ``last_epoch`` and numbers: it round-trips through ``torch.load(weights_only=True)``.
    """
    if solver.schedule not in SCHEDULES:
        raise ValueError(f"solver.schedule must be one of {SCHEDULES}, got {solver.schedule!r}")
    if solver.warmup_iters < 0 or not 0.0 <= solver.warmup_factor <= 1.0:
        raise ValueError(
            f"solver.warmup_iters must be >= 0 and warmup_factor in [0, 1], got "
            f"{solver.warmup_iters} and {solver.warmup_factor}"
        )
    schedule, max_iter, steps = solver.schedule, solver.max_iter, tuple(solver.steps)
    gamma, warmup_iters, warmup_factor = solver.gamma, solver.warmup_iters, solver.warmup_factor

    def factor(iteration: int) -> float:
        return lr_factor(
            iteration,
            schedule=schedule,
            max_iter=max_iter,
            steps=steps,
            gamma=gamma,
            warmup_iters=warmup_iters,
            warmup_factor=warmup_factor,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
