"""Samplers and data loaders with a reproducible, resumable order.

Training: an infinite stream of indices (a fresh permutation per epoch, seeded by ``seed + epoch``), sharded
across processes, cut into batches (optionally grouping landscape and portrait images), each sample
transformed under a torch seed derived from ``(seed, rank, world_size, position in the stream)``. The
batches therefore depend only on ``(seed, rank, world_size, batch_size)``, not on the number of workers or
their RNG, and a run resumed at iteration ``k`` sees exactly the batches ``k, k + 1, ...`` of an
uninterrupted run. Batches are ``(list of images, list of targets)``, the model's input format.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "GroupedBatchSampler",
    "InferenceSampler",
    "TrainingSampler",
    "aspect_ratio_groups",
    "build_test_loader",
    "build_train_loader",
    "collate",
]


def collate(batch: Sequence[tuple]) -> tuple[list, list]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])`` (no stacking: sizes differ)."""
    return [b[0] for b in batch], [b[1] for b in batch]


class TrainingSampler(Sampler[int]):
    """An infinite stream of dataset indices for one process.

    Epoch ``e`` is ``torch.randperm(size, generator=torch.Generator().manual_seed(seed + e))`` (or
    ``arange`` when ``shuffle=False``); process ``rank`` takes every ``world_size``-th element of it starting
    at ``rank``, so the shards are disjoint and together cover each epoch once. ``start_index`` skips the
    first ``start_index`` indices of this process's stream (without computing the skipped epochs).
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
        shuffle: bool = True,
    ):
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.size, self.seed, self.rank, self.world_size = int(size), int(seed), int(rank), int(world_size)
        self.start_index = int(start_index)
        self.shuffle = shuffle
        # indices per epoch for this rank (constant across epochs)
        self.per_epoch = len(range(self.rank, self.size, self.world_size))

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's indices for one epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.arange(self.size)
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        if self.per_epoch == 0:  # more processes than images
            raise ValueError(f"rank {self.rank} of {self.world_size} gets no images out of {self.size}")
        epoch, skip = divmod(self.start_index, self.per_epoch)
        for e in itertools.count(epoch):
            yield from self.epoch_indices(e)[skip:]
            skip = 0


class InferenceSampler(Sampler[int]):
    """Each index once, sharded: process ``rank`` takes ``rank, rank + world_size, ...``."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _group_batches(items: Iterable, group_of: Callable[[object], int], batch_size: int) -> Iterator[list]:
    """Buffer ``items`` per group and yield a batch as soon as a group holds ``batch_size`` of them."""
    buckets: dict[int, list] = {}
    for item in items:
        bucket = buckets.setdefault(group_of(item), [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield bucket[:]
            bucket.clear()


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices from ``sampler`` in which all images share a group id
    (e.g. :func:`aspect_ratio_groups`: 0 for ``h >= w``, 1 for ``h < w``). Each batch is emitted as soon as
    its group has ``batch_size`` indices buffered, in stream order (detectron2's aspect-ratio grouping); with
    a finite ``sampler`` the incomplete batches left at its end are dropped."""

    def __init__(self, sampler: Iterable[int], group_ids: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return _group_batches(iter(self.sampler), self.group_ids.__getitem__, self.batch_size)


def aspect_ratio_groups(dataset) -> list[int]:
    """Per image: 0 when ``height >= width`` (portrait or square), 1 otherwise, from the image records
    (``dataset.image_info(i)``; no decoding)."""
    if not hasattr(dataset, "image_info"):
        raise TypeError(
            f"aspect-ratio grouping needs dataset.image_info(i) with 'height' and 'width'; "
            f"{type(dataset).__name__} has none (pass aspect_ratio_grouping=False)"
        )
    groups = []
    for i in range(len(dataset)):
        info = dataset.image_info(i)
        groups.append(0 if info["height"] >= info["width"] else 1)
    return groups


def sample_seed(seed: int, rank: int, world_size: int, position: int) -> int:
    """The torch seed for the transforms of the sample at ``position`` of a process's stream."""
    return int(np.random.SeedSequence([seed, rank, world_size, position]).generate_state(1, np.uint64)[0])


class _SeededSamples(Dataset):
    """``ds[(index, position)]`` = ``dataset[index]`` under a torch seed derived from the position (the
    caller's RNG state is restored), so that random transforms do not depend on workers."""

    def __init__(self, dataset, *, seed: int, rank: int, world_size: int):
        self.dataset = dataset
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.rank, self.world_size, position))
            return self.dataset[index]


class _TrainBatches(Sampler[list]):
    """The infinite batch stream of ``(index, position)`` pairs, from batch ``start_iter`` on."""

    def __init__(self, sampler_args: dict, batch_size: int, group_ids: list[int] | None, start_iter: int):
        self.sampler_args = sampler_args
        self.batch_size = batch_size
        self.group_ids = group_ids
        self.start_iter = start_iter

    def __iter__(self) -> Iterator[list]:
        bs = self.batch_size
        if self.group_ids is None:  # batch k holds stream positions [k * bs, (k + 1) * bs): jump there
            start = self.start_iter * bs
            sampler = TrainingSampler(**self.sampler_args, start_index=start)
            stream = zip(sampler, itertools.count(start))
            while True:
                yield list(itertools.islice(stream, bs))
        else:  # grouping buffers indices, so replay the (cheap) index stream from its beginning
            stream = zip(TrainingSampler(**self.sampler_args), itertools.count())
            groups = self.group_ids
            batches = _group_batches(stream, lambda item: groups[item[0]], bs)
            yield from itertools.islice(batches, self.start_iter, None)


def build_train_loader(
    dataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    aspect_ratio_grouping: bool = True,
) -> DataLoader:
    """An endless iterable of ``(images, targets)`` training batches of ``batch_size`` (per process).

    The order depends only on ``(seed, rank, world_size, batch_size)``; iterating from ``start_iter`` gives
    the batches ``start_iter, start_iter + 1, ...`` of an uninterrupted run, transforms included.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_iter < 0:
        raise ValueError(f"start_iter must be >= 0, got {start_iter}")
    if len(dataset) == 0:
        raise ValueError(f"the training dataset has no images: {dataset!r}")
    sampler_args = {"size": len(dataset), "seed": seed, "rank": rank, "world_size": world_size}
    TrainingSampler(**sampler_args)  # validate the arguments now
    group_ids = aspect_ratio_groups(dataset) if aspect_ratio_grouping else None
    return DataLoader(
        _SeededSamples(dataset, seed=seed, rank=rank, world_size=world_size),
        batch_sampler=_TrainBatches(sampler_args, batch_size, group_ids, start_iter),
        num_workers=num_workers,
        collate_fn=collate,
        # worker base seeds come from this generator, not from (and without advancing) torch's global RNG
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_defer_stop_signals,
    )


WORKER_SIGTERM_GRACE = 120  # seconds a worker outlives a SIGTERM, unless the loader stops it first


def _defer_stop_signals(worker_id: int) -> None:
    """Ctrl-C and a scheduler's SIGTERM reach the whole process group. A worker killed by one would make
    the loader raise inside the training process's iteration, so workers leave them to the training
    process, which finishes its iteration, checkpoints and shuts them down (:mod:`maskrcnn.engine.interrupt`):
    SIGINT is ignored; SIGTERM ends the worker only after WORKER_SIGTERM_GRACE seconds (SIGALRM), so a
    stuck worker that the loader terminates still goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(WORKER_SIGTERM_GRACE))


class _Indexed(Dataset):
    """``dataset[i]`` with ``target["index"] = i`` added."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, {**target, "index": int(index)}


def build_test_loader(
    dataset, *, batch_size: int = 1, num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Each image of this process's shard (``rank, rank + world_size, ...``) once, in order, as
    ``(images, targets)`` batches; ``target["index"]`` is the dataset index (next to ``image_id``)."""
    return DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset), rank=rank, world_size=world_size),
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_defer_stop_signals,  # an evaluation inside training survives its stop signal
        generator=torch.Generator().manual_seed(0),
    )
