"""Exact greedy non-maximum suppression without compiled extensions (CPU and CUDA).

Conventions: boxes are ``[N, 4]`` ``(x1, y1, x2, y2)`` in absolute pixels (no "+1" width). The IoU of two
boxes is computed as torchvision's kernels do, in the boxes' dtype (float32 for float16, bfloat16 and
integer boxes)::

    area = (x2 - x1) * (y2 - y1)
    inter = max(min(x2_a, x2_b) - max(x1_a, x1_b), 0) * max(min(y2_a, y2_b) - max(y1_a, y1_b), 0)
    iou = inter / (area_a + area_b - inter)

Boxes are visited by decreasing score, ties broken by lower index (a stable sort); a visited box that is
still alive is kept and suppresses every later box whose IoU with it is *strictly* greater than the
threshold (the comparison is done in double precision, like torchvision's C++ kernel). A NaN IoU (two
empty boxes) suppresses nothing. The result is identical, index for index, to that textbook loop.

Algorithm ("blocked sweep"): the boxes, in visiting order, form a pool of boxes not suppressed by any box
kept so far. Repeatedly take the next block of ``B`` boxes from the pool, run the greedy pass inside the
block (``B x B`` IoU matrix, then a scan), and remove from the rest of the pool every box whose IoU with
one of the block's kept boxes is above the threshold (``kept x rest`` IoU, vectorised). Each box thus
meets only the kept boxes before it, like the scalar loop, so heavily suppressed inputs (dense clusters)
are cheap, and the work is done by vectorised numpy ufuncs on CPU (single-threaded, tiny call overhead)
or torch ops on other devices. Memory is ``O(N)`` plus one bounded tile of IoU values.

:func:`batched_nms` works per category on CPU (a sweep for each category larger than a block, all smaller
categories batched together), and as one sweep over the boxes ordered by category on other devices (a
block holds whole categories and meets only the rest of its last one; few host synchronisations).
Coordinates must be finite; otherwise the result is unspecified.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from maskrcnn.ops import device as _device

__all__ = ["nms", "batched_nms"]

# Block size of the sweep and the largest number of IoU values computed at once: on CPU (numpy backend,
# and torch backend on CPU tensors) and on accelerators (torch backend).
_CPU_BLOCK = 128
_CPU_TILE_ELEMS = 1 << 16
_DEVICE_BLOCK = 4096
# IoU values computed at once on a device: 16M (64 MiB per float32 tile, ~200 MiB transient), a block's own
# 4096 x 4096 in one tile. Counted on the CPU by benchmarks/syncs.py --train-batch 8 [--nms-block 1024]
# (R-18-FPN, a batch of 8 at 512 px: the RPN's NMS over 40 image x level categories, swept category after
# category): blocks of 4096 instead of 1024 take 38 reads instead of 107 and 1,492 kernels instead of
# 4,954, for 297M IoU values instead of 113M (the score-ordered sweep of blocks of 1024 before: 58 reads,
# 5,166 kernels, 831M values). Which is the faster on a GPU is for benchmarks/gpu.py's ops part.
_DEVICE_TILE_ELEMS = 1 << 24
# Fixed-point rounds of the greedy passes on suppression graphs (torch in-block pass, numpy small categories)
# before they finish with a sequential scan; the torch pass reads back whether it is done every
# _ROUNDS_PER_READ rounds (a detector's blocks settle in a few).
_MAX_ROUNDS = 16
_ROUNDS_PER_READ = 2


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` in absolute pixels, finite.
        scores: ``[N]`` scores.
        iou_threshold: a box is suppressed by a kept box when their IoU is strictly greater than this.

    Returns:
        ``int64[K]`` indices of the kept boxes by decreasing score (equal scores: lower index first), on
        the device of ``boxes``; the same indices, in the same order, as torchvision's ``nms``.
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS done independently per category: boxes with different ``idxs`` never suppress each
    other (exactly; no coordinate-offset trick).

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` in absolute pixels, finite.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: suppression when IoU is strictly greater than this.

    Returns:
        ``int64[K]`` indices of the kept boxes of all categories by decreasing score (equal scores: lower
        index first).
    """
    return _nms(boxes, scores, idxs, iou_threshold)


# --------------------------------------------------------------------------- driver


def _check(boxes: Tensor, scores: Tensor, idxs: Tensor | None) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape [{n}], got {tuple(scores.shape)}")
    if scores.device != boxes.device:
        raise ValueError(f"boxes ({boxes.device}) and scores ({scores.device}) must be on one device")
    if idxs is not None:
        if idxs.shape != (n,):
            raise ValueError(f"idxs must have shape [{n}], got {tuple(idxs.shape)}")
        if idxs.device != boxes.device:
            raise ValueError(f"boxes ({boxes.device}) and idxs ({idxs.device}) must be on one device")


def _nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, backend: str | None = None
) -> Tensor:
    """Shared implementation. ``backend``: "numpy" (CPU tensors only; the CPU default) or "torch" (any
    device; the default elsewhere). Both give identical results."""
    _check(boxes, scores, idxs)
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    t = float(iou_threshold)
    # Visiting order: decreasing score, ties by lower index.
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    if n == 1 or math.isnan(t):  # IoU > NaN is never true: nothing is suppressed
        return order
    cdtype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    thr = t if cdtype == torch.float64 else _float32_floor(t)
    boxes = boxes.detach().to(cdtype)
    if backend is None:
        backend = "torch" if _device.host_reads_stall(device) else "numpy"
    if backend == "numpy":
        if device.type != "cpu":
            raise ValueError("the numpy backend needs CPU tensors")
        order_np = order.numpy()
        pool = _pool_numpy(boxes.numpy()[order_np])
        bufs = _workspace(pool.dtype)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 for empty boxes: NaN, never > thr
            if idxs is None:
                ranks = _sweep_numpy(pool, thr, bufs)
            else:
                ranks = _per_category_numpy(pool, idxs.detach().numpy()[order_np], thr, bufs)
        return torch.from_numpy(order_np[ranks])
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}")
    if idxs is None:
        return order[_sweep_torch(boxes[order], thr)]
    return order[_sweep_torch_by_category(boxes[order], idxs.detach()[order], thr)]


def _float32_floor(t: float) -> float:
    """Largest float32 <= t: for float32 x, ``x > t`` (in double) equals ``x > _float32_floor(t)``."""
    f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _scan_block(m: np.ndarray) -> list[int]:
    """Greedy pass over one block: ``m[a, c]`` is True when box ``a`` would suppress box ``c`` (only
    ``c > a`` is used). Returns the kept positions, ascending. One big-int OR per kept box."""
    s = m.shape[0]
    nbytes = (s + 7) // 8
    packed = np.packbits(m, axis=1, bitorder="little").tobytes()
    removed = 0
    kept = []
    for a in range(s):
        if not (removed >> a) & 1:
            kept.append(a)
            # Bits c <= a may be set too (IoU is symmetric); they are never read again.
            removed |= int.from_bytes(packed[a * nbytes : (a + 1) * nbytes], "little")
    return kept


# --------------------------------------------------------------------------- numpy backend (CPU)


def _pool_numpy(bx: np.ndarray) -> np.ndarray:
    """``[5, N]`` rows x1, y1, x2, y2, area of boxes ``bx`` ``[N, 4]``."""
    pool = np.empty((5, bx.shape[0]), dtype=bx.dtype)
    pool[:4] = bx.T
    np.multiply(pool[2] - pool[0], pool[3] - pool[1], out=pool[4])
    return pool


def _iou_gt_numpy(a: np.ndarray, b: np.ndarray, thr: float, bufs: list[np.ndarray]) -> np.ndarray:
    """bool ``[R, C]``: IoU(a_r, b_c) > thr for pools ``a`` ``[5, R]``, ``b`` ``[5, C]``. Written into
    the preallocated ``bufs`` (three float buffers and one bool buffer of at least ``R * C`` elements)."""
    ax1, ay1, ax2, ay2, aa = (v[:, None] for v in a)
    bx1, by1, bx2, by2, ba = b
    size = a.shape[1] * b.shape[1]
    shape = (a.shape[1], b.shape[1])
    w, h, u, m = (buf[:size].reshape(shape) for buf in bufs)
    np.minimum(ax2, bx2, out=w)
    np.maximum(ax1, bx1, out=u)
    np.subtract(w, u, out=w)
    np.maximum(w, 0, out=w)
    np.minimum(ay2, by2, out=h)
    np.maximum(ay1, by1, out=u)
    np.subtract(h, u, out=h)
    np.maximum(h, 0, out=h)
    np.multiply(w, h, out=w)  # intersection
    np.add(aa, ba, out=u)
    np.subtract(u, w, out=u)  # union
    np.divide(w, u, out=w)
    return np.greater(w, thr, out=m)


def _workspace(dtype: np.dtype) -> list[np.ndarray]:
    """Buffers for :func:`_iou_gt_numpy`: three float buffers and one bool buffer."""
    size = max(_CPU_TILE_ELEMS, _CPU_BLOCK * _CPU_BLOCK)
    return [np.empty(size, dtype=dtype) for _ in range(3)] + [np.empty(size, dtype=bool)]


def _sweep_numpy(pool: np.ndarray, thr: float, bufs: list[np.ndarray]) -> np.ndarray:
    """Kept positions (ascending) of greedy NMS on ``pool`` ``[5, N]`` (boxes in visiting order)."""
    n = pool.shape[1]
    block, elems = _CPU_BLOCK, _CPU_TILE_ELEMS
    pos = np.arange(n)
    kept = []
    while pos.size:
        s = min(block, pos.size)
        blk = pool[:, :s]
        keep = _scan_block(_iou_gt_numpy(blk, blk, thr, bufs))
        kept.append(pos[keep])
        rest = pool[:, s:]
        p = rest.shape[1]
        if p == 0:
            break
        # Remove from the rest every box that a kept box of this block suppresses.
        winners = blk[:, keep]
        suppressed = np.empty(p, dtype=bool)
        step = max(1, elems // len(keep))
        for c0 in range(0, p, step):
            c1 = min(p, c0 + step)
            m = _iou_gt_numpy(winners, rest[:, c0:c1], thr, bufs)
            np.logical_or.reduce(m, axis=0, out=suppressed[c0:c1])
        alive = ~suppressed
        pool = rest[:, alive]
        pos = pos[s:][alive]
    return np.concatenate(kept)


def _per_category_numpy(pool: np.ndarray, cat: np.ndarray, thr: float, bufs: list[np.ndarray]) -> np.ndarray:
    """Kept positions (ascending) of greedy NMS done separately for each value of ``cat``.

    A category with more than ``_CPU_BLOCK`` boxes gets its own sweep. Smaller ones are batched by size
    class ``(L/2, L]``: padded with NaN boxes (whose IoU is NaN, never above the threshold) to ``[C, L]``,
    all their ``L x L`` IoU matrices are computed at once, and :func:`_greedy_edges` resolves the result."""
    n = cat.shape[0]
    by_cat = np.argsort(cat, kind="stable")  # groups categories, visiting order inside each
    cs = cat[by_cat]
    starts = np.flatnonzero(np.concatenate(([True], cs[1:] != cs[:-1])))
    sizes = np.diff(np.append(starts, n))
    parts = [by_cat[starts[sizes == 1]]]  # a box alone in its category is kept
    for s, size in zip(starts[sizes > _CPU_BLOCK].tolist(), sizes[sizes > _CPU_BLOCK].tolist()):
        members = by_cat[s : s + size]
        parts.append(members[_sweep_numpy(pool[:, members], thr, bufs)])
    length = 2
    while length <= _CPU_BLOCK:
        sel = (sizes > length // 2) & (sizes <= length)
        group = max(1, _CPU_TILE_ELEMS // (length * length))  # categories per batch
        for g0 in range(0, int(sel.sum()), group):
            st, sz = starts[sel][g0 : g0 + group], sizes[sel][g0 : g0 + group]
            within = np.arange(sz.sum()) - np.repeat(np.cumsum(sz) - sz, sz)
            src = by_cat[np.repeat(st, sz) + within]  # pool positions, category by category
            dst = np.repeat(np.arange(sz.size) * length, sz) + within  # their slots in the padded batch
            padded = np.full((5, sz.size * length), np.nan, dtype=pool.dtype)
            padded[:, dst] = pool[:, src]
            padded = padded.reshape(5, sz.size, length)
            m = _iou_gt_bcast_numpy(padded[:, :, :, None], padded[:, :, None, :], thr)
            m &= np.triu(np.ones((length, length), dtype=bool), 1)
            c, i, j = np.nonzero(m)  # sorted by (c, i): by the suppressing slot
            kept = _greedy_edges(c * length + i, c * length + j, sz.size * length)
            slot_to_src = np.full(sz.size * length, -1)
            slot_to_src[dst] = src
            kept = slot_to_src[kept]
            parts.append(kept[kept >= 0])
        length *= 2
    return np.sort(np.concatenate(parts))


def _iou_gt_bcast_numpy(a: np.ndarray, b: np.ndarray, thr: float) -> np.ndarray:
    """bool: IoU(a, b) > thr for broadcastable pools ``a``, ``b`` ``[5, ...]`` (same formula as above)."""
    w = np.minimum(a[2], b[2])
    w -= np.maximum(a[0], b[0])
    np.maximum(w, 0, out=w)
    h = np.minimum(a[3], b[3])
    h -= np.maximum(a[1], b[1])
    np.maximum(h, 0, out=h)
    w *= h  # intersection
    u = a[4] + b[4]
    u -= w  # union
    w /= u
    return w > thr


def _greedy_edges(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Kept positions (ascending) of greedy NMS given all suppression edges ``lo[e] -> hi[e]``
    (``lo < hi``, sorted by ``lo``) among ``n`` boxes in visiting order.

    Fixed-point rounds: a box is kept once all its suppressors are removed, removed once one of them is
    kept; each round settles at least the first undecided box. Long chains finish with a sequential scan."""
    alive = np.ones(n, dtype=bool)
    pending = np.zeros(n, dtype=bool)  # undecided
    pending[hi] = True
    for _ in range(_MAX_ROUNDS):
        if lo.size == 0:
            return np.flatnonzero(alive)
        killed = hi[(alive & ~pending)[lo]]  # targets of kept boxes
        alive[killed] = False
        pending[killed] = False
        sel = alive[lo] & pending[hi]  # edges that still matter: alive (undecided) -> undecided
        lo, hi = lo[sel], hi[sel]
        blocked = np.zeros(n, dtype=bool)
        blocked[hi] = True
        pending &= blocked
    removed: set[int] = set()
    for a, c in zip(lo.tolist(), hi.tolist()):
        if a not in removed:
            removed.add(c)
    alive[list(removed)] = False
    return np.flatnonzero(alive)


# --------------------------------------------------------------------------- torch backend (any device)


def _iou_gt_torch(a: Tensor, b: Tensor, thr: float) -> Tensor:
    """bool ``[R, C]``: IoU(a_r, b_c) > thr for pools ``a`` ``[5, R]``, ``b`` ``[5, C]``."""
    ax1, ay1, ax2, ay2, aa = (v[:, None] for v in a)
    bx1, by1, bx2, by2, ba = b
    w = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    h = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(aa, ba).sub_(inter)
    return inter.div_(union) > thr


def _greedy_block_torch(m: Tensor, alive: Tensor | None = None) -> Tensor:
    """Kept boxes (bool ``[s]``) of the greedy pass over one block, ``m`` as in :func:`_scan_block`;
    ``alive`` (bool ``[s]``, default all): the boxes not suppressed before the block.

    Fixed-point iteration on the device: a box is kept once all its suppressors are removed and removed
    once one of them is kept; every round settles at least the first undecided box, and a settled state
    is a fixed point (extra rounds change nothing: no kept box has an edge to a box still alive). One
    host read every ``_ROUNDS_PER_READ`` rounds tells whether any box is undecided. Long chains fall back
    to :func:`_scan_block` on the host after ``_MAX_ROUNDS`` rounds."""
    s = m.shape[0]
    edges = torch.triu(m, diagonal=1)  # a -> c for a < c
    if alive is None:
        alive = torch.ones(s, dtype=torch.bool, device=m.device)
    else:  # boxes already suppressed: never kept, suppress nothing
        edges &= alive[:, None]
        alive = alive.clone()
    pending = edges.any(0) & alive  # undecided: some earlier box may suppress it
    for _ in range(_MAX_ROUNDS // _ROUNDS_PER_READ):
        for _ in range(_ROUNDS_PER_READ):
            kept = alive & ~pending
            spared = ~(edges & kept[:, None]).any(0)  # no kept box suppresses it
            alive &= spared
            pending &= spared
            pending &= (edges & (alive & pending)[:, None]).any(0)
        if not bool(pending.any()):
            return alive
    kept = torch.zeros(s, dtype=torch.bool)
    kept[_scan_block((m & alive[:, None]).cpu().numpy())] = True  # the suppressed suppress nothing
    return kept.to(m.device) & alive


def _block_sizes(device: torch.device) -> tuple[int, int]:
    """(boxes per block, IoU values per tile) of the torch backend on ``device``."""
    if _device.host_reads_stall(device):
        return _DEVICE_BLOCK, _DEVICE_TILE_ELEMS
    return _CPU_BLOCK, _CPU_TILE_ELEMS


def _sweep_torch_by_category(boxes: Tensor, cat: Tensor, thr: float) -> Tensor:
    """Kept positions (ascending, int64) of greedy NMS per category on ``boxes`` ``[N, 4]`` in visiting
    order, ``cat`` ``[N]`` their categories.

    Categories never interact, so the boxes are swept category after category (a stable sort keeps each
    category's visiting order, so each is decided as alone), in fixed blocks of positions: a block's
    kept boxes suppress only in the rest of the category the block ends inside, and the suppressed are
    marked dead for the blocks that hold them (no compaction, so no read for it). The IoU values computed
    are about N x block plus the categories' own sizes, not N^2 / 2 (the RPN's NMS of a batch of 8 images
    has 40 categories). Host reads: one for the category sizes, the rounds of each block's pass, one to
    gather the kept positions."""
    n = boxes.shape[0]
    device = boxes.device
    by_category = torch.sort(cat, stable=True)
    cs, pos = by_category.values, by_category.indices  # categories in sweep order, visiting positions
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = cs[1:] != cs[:-1]
    ends = np.append(np.flatnonzero(starts.cpu().numpy())[1:], n)  # one read: each category's end
    x1, y1, x2, y2 = boxes[pos].t()
    pool = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)])
    block, elems = _block_sizes(device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    kept = []
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        blk, cblk = pool[:, b0:b1], cs[b0:b1]
        m = _iou_gt_torch(blk, blk, thr)
        m &= cblk[:, None] == cblk[None, :]
        keep = _greedy_block_torch(m, ~dead[b0:b1])
        kept.append(keep)
        end = int(ends[np.searchsorted(ends, b1 - 1, side="right")])  # the last category's end
        if end > b1:  # it goes on after the block: suppress there
            suppressor = keep & (cblk == cs[b1])
            dead[b1:end] |= _suppressed_by(blk, suppressor, pool[:, b1:end], thr, elems)
    return pos[torch.nonzero(torch.cat(kept)).squeeze(1)].sort().values


def _sweep_torch(boxes: Tensor, thr: float) -> Tensor:
    """Kept positions (ascending, int64) of greedy NMS on ``boxes`` ``[N, 4]`` in visiting order.

    Host reads per block: the rounds of :func:`_greedy_block_torch`, and one ``nonzero`` that shrinks the
    pool to the boxes still alive; the kept positions are gathered with one more at the end."""
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes.t()
    pool = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)])
    pos = torch.arange(n, device=boxes.device)
    block, elems = _block_sizes(boxes.device)
    kept_pos, kept_mask = [], []
    while pos.numel():
        s = min(block, pos.numel())
        blk = pool[:, :s]
        keep = _greedy_block_torch(_iou_gt_torch(blk, blk, thr))
        kept_pos.append(pos[:s])
        kept_mask.append(keep)
        if pos.numel() == s:
            break
        alive = torch.nonzero(~_suppressed_by(blk, keep, pool[:, s:], thr, elems)).squeeze(1)
        pool = pool[:, s:].index_select(1, alive)
        pos = pos[s:].index_select(0, alive)
    return torch.cat(kept_pos)[torch.nonzero(torch.cat(kept_mask)).squeeze(1)]


def _suppressed_by(blk: Tensor, suppressor: Tensor, rest: Tensor, thr: float, elems: int) -> Tensor:
    """bool ``[R]``: the boxes of the pool ``rest`` ``[5, R]`` with IoU above ``thr`` with a box of the block
    ``blk`` ``[5, S]`` where ``suppressor`` (bool ``[S]``), in tiles of about ``elems`` values. The kept
    boxes are selected by a mask, not gathered (which would need their count on the host)."""
    s, r = blk.shape[1], rest.shape[1]
    suppressed = torch.empty(r, dtype=torch.bool, device=rest.device)
    step = max(1, elems // s)
    for c0 in range(0, r, step):
        c1 = min(r, c0 + step)
        suppressed[c0:c1] = (_iou_gt_torch(blk, rest[:, c0:c1], thr) & suppressor[:, None]).any(0)
    return suppressed
