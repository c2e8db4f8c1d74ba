"""RoI feature extraction: RoIAlign (the paper's operator), and RoIPool / RoIWarp for its ablations.

Conventions
-----------
- ``input`` is a feature map ``[N, C, H, W]``; ``boxes`` is a ``Tensor[K, 5]`` of rows
  ``(batch_index, x1, y1, x2, y2)`` or a list of ``Tensor[L_i, 4]`` (one per image), in the image's
  absolute pixel coordinates; ``spatial_scale`` maps them to the feature map (1 / stride).
- Outputs are ``[K, C, oh, ow]`` (``output_size = (oh, ow)``), laid out channels-last in memory (the
  natural layout of the computation; every torch op accepts it, call ``.contiguous()`` if you need NCHW).
- Gradients flow to ``input`` only; box coordinates are treated as constants (as in torchvision).

RoIAlign ``aligned`` semantics
------------------------------
A feature cell ``(i, j)`` holds the value at continuous coordinate ``(i, j)``. With ``aligned=False``
(legacy, torchvision's Mask R-CNN) the box is scaled as is and its size is clamped to at least one
cell; with ``aligned=True`` (detectron2's ROIAlignV2) the scaled box is shifted by -0.5 so that pixel
centres line up with cell centres, and degenerate boxes are not enlarged. Each output bin averages
(or takes the max of) ``sampling_ratio x sampling_ratio`` bilinearly interpolated samples placed at
the centres of a regular sub-grid of the bin; ``sampling_ratio <= 0`` uses ``ceil(roi size / output
size)`` samples per bin along each axis, per RoI. Samples more than one cell outside the map read 0;
others are clamped to the border. These are torchvision's numbers, to the last few bits.

Implementation
--------------
Bilinear weights are separable and so are the validity tests, so a bin is ``sum_y sum_x wy[y] wx[x]
F[y, x]`` with per-row and per-column weight lists. We build, for every bin, the (cell, weight) pairs
with nonzero weight (at most ``(2s)^2``, fewer once coinciding rows/columns are merged) and apply them
with ``embedding_bag`` (a bag-sum), on the ``[N*H*W, C]`` channels-last view of the features. Backward
is the transposed map: the pairs sorted by cell, and a bag-sum of the output gradient per touched cell,
over ranges of cells (see ``_BagSum``). Memory stays at the size of the output plus the pairs.
:func:`roi_align_levels` does the same for RoIs on several maps at once (FPN levels), from one table of
all maps' cells: two host reads in all instead of two per map (what a GPU waits for), for a copy of the
maps (what a CPU pays more for).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops import device as _device

__all__ = [
    "roi_align",
    "roi_align_levels",
    "roi_pool",
    "roi_warp",
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
    "boxes_to_rois",
]


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    oh, ow = output_size
    return int(oh), int(ow)


def boxes_to_rois(boxes: Tensor | list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """``[K, 5]`` rois (batch_index, x1, y1, x2, y2) from a ``[K, 5]`` tensor or a list of ``[L_i, 4]``."""
    if isinstance(boxes, (list, tuple)):
        for b in boxes:
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"each element of the boxes list must be [L, 4], got {tuple(b.shape)}")
        if len(boxes) == 0:
            return torch.zeros(0, 5)
        cat = torch.cat(list(boxes), dim=0)
        idx = torch.cat(
            [torch.full((len(b), 1), i, dtype=cat.dtype, device=cat.device) for i, b in enumerate(boxes)]
        )
        return torch.cat([idx, cat], dim=1)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {tuple(boxes.shape)}")
    return boxes


def _prepare(input: Tensor, boxes) -> tuple[Tensor, Tensor, torch.dtype]:
    """Check shapes; return (input in compute dtype, rois in compute dtype, dtype to return)."""
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got {tuple(input.shape)}")
    out_dtype = input.dtype
    if input.dtype in (torch.float16, torch.bfloat16):  # as torchvision under autocast: compute in fp32
        input = input.float()
    rois = boxes_to_rois(boxes).detach().to(device=input.device, dtype=input.dtype)
    return input, rois, out_dtype


def _channels_last_rows(input: Tensor) -> Tensor:
    """``[N*H*W, C]`` view (or copy) of an ``[N, C, H, W]`` map: row ``(n*H + y)*W + x`` holds one cell."""
    n, c, h, w = input.shape
    return input.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _grid_sizes(gy: Tensor, gx: Tensor, sampling_ratio: int) -> tuple[int, int]:
    """The most samples per bin along y and x over all RoIs: ``sampling_ratio``, or (adaptive) read back
    from the device, both axes at once (at least 1)."""
    if sampling_ratio > 0:
        return int(sampling_ratio), int(sampling_ratio)
    if gy.numel() == 0:
        return 1, 1
    g_y, g_x = torch.stack([gy.max(), gx.max()]).clamp(min=1).tolist()
    return g_y, g_x


def _axis_samples(start: Tensor, length: Tensor, bins: int, grid: Tensor, size: int | Tensor, g_max: int):
    """Bilinear sample taps along one axis.

    start, length, grid: ``[K]`` (grid = samples per bin, per RoI); size: the map's length along the
    axis, an int or per RoI ``[K]`` (each RoI's own map); g_max: the largest grid (:func:`_grid_sizes`).
    Returns, for ``[K, bins, g_max]`` samples: ``lo, hi`` cell indices (int64) and ``w_lo, w_hi`` weights,
    zero for samples that are past the RoI's grid or more than one cell outside ``[0, size]``.
    """
    dtype = start.dtype
    if isinstance(size, Tensor):
        size = size.view(-1, 1, 1)
    b = torch.arange(bins, device=start.device, dtype=dtype).view(1, bins, 1)
    i = torch.arange(g_max, device=start.device, dtype=dtype).view(1, 1, g_max)
    bin_size = (length / bins).view(-1, 1, 1)
    gridf = grid.to(dtype).clamp(min=1).view(-1, 1, 1)
    # same operation order as torchvision's kernel: start + p * bin + (i + .5) * bin / grid
    pos = start.view(-1, 1, 1) + b * bin_size + (i + 0.5) * bin_size / gridf
    valid = (pos >= -1.0) & (pos <= size) & (i < grid.view(-1, 1, 1))
    pos = pos.clamp(min=0)
    lo = pos.floor().long()  # pos >= 0 so floor == truncation
    at_edge = lo >= size - 1
    lo = torch.where(at_edge, size - 1, lo)
    hi = torch.where(at_edge, lo, lo + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - lo.to(dtype))
    zero = torch.zeros_like(frac)
    w_lo = torch.where(valid, 1.0 - frac, zero)
    w_hi = torch.where(valid, frac, zero)
    lo = torch.where(valid, lo, torch.zeros_like(lo))
    hi = torch.where(valid, hi, torch.zeros_like(hi))
    return lo, hi, w_lo, w_hi


def _taps(lo: Tensor, hi: Tensor, w_lo: Tensor, w_hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The raw taps of each bin along one axis, ``[K, bins, 2G]`` (index, weight), the first tapped cell
    of each bin ``[K, bins, 1]`` and each RoI's widest window of tapped cells ``[K]`` (>= 1)."""
    taps_idx = torch.cat([lo, hi], dim=2)
    taps_w = torch.cat([w_lo, w_hi], dim=2)
    if taps_idx.numel() == 0:
        return (
            taps_idx,
            taps_w,
            taps_idx[..., :1],
            torch.ones(lo.shape[0], dtype=torch.int64, device=lo.device),
        )
    big = torch.iinfo(torch.int64).max
    used = taps_w != 0
    first = torch.where(used, taps_idx, torch.full_like(taps_idx, big)).amin(dim=2, keepdim=True)
    last = torch.where(used, taps_idx, torch.full_like(taps_idx, -1)).amax(dim=2, keepdim=True)
    first = torch.where(first == big, torch.zeros_like(first), first)
    return taps_idx, taps_w, first, (last - first + 1).clamp(min=1).amax(dim=(1, 2))


def _merge_taps(
    taps_idx: Tensor, taps_w: Tensor, first: Tensor, span: int, raw: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-bin weight lists ``[K, bins, R]`` (index, weight) summing all samples of a bin along one axis,
    from :func:`_taps` (``span``, the window, read back on the host).

    Consecutive samples mostly share cells, so the taps are merged into a window of ``span`` rows starting
    at the first tapped cell when that window is shorter than the raw taps; otherwise the raw taps are kept
    (duplicates are fine: the bag-sum adds them). ``raw`` (bool ``[K]``, with ``span`` = the taps) keeps
    the raw taps of some RoIs only (those of a map whose window is not shorter).
    """
    k, bins, taps = taps_idx.shape
    if taps_idx.numel() == 0 or (span >= taps and raw is None):
        return taps_idx, taps_w
    rel = (taps_idx - first).clamp(0, span - 1)
    merged_w = torch.zeros(k, bins, span, dtype=taps_w.dtype, device=taps_w.device)
    merged_w.scatter_add_(2, rel, taps_w)
    merged_idx = first + torch.arange(span, device=taps_idx.device)
    if raw is not None:
        keep = raw.view(-1, 1, 1)
        merged_idx, merged_w = torch.where(keep, taps_idx, merged_idx), torch.where(keep, taps_w, merged_w)
    return merged_idx, merged_w


def _roi_geometry(rois: Tensor, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool):
    """Per-RoI start, size and samples-per-bin along y and x, in the input dtype (as torchvision)."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    rw = rois[:, 3] * spatial_scale - offset - x1
    rh = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gy = torch.full_like(rh, sampling_ratio, dtype=torch.int64)
        gx = torch.full_like(rw, sampling_ratio, dtype=torch.int64)
    else:
        gy = torch.ceil(rh / oh).long().clamp(min=0)
        gx = torch.ceil(rw / ow).long().clamp(min=0)
    return y1, rh, gy, x1, rw, gx


def _bin_pairs(rois, output_size, spatial_scale, sampling_ratio, aligned, height, width, maps=None):
    """(cell index, weight, offsets) of the sparse bin <- cell map, bins ordered (k, oh, ow).

    One map: ``spatial_scale``, ``height``, ``width`` numbers, cell ``(n*H + y)*W + x``. Several maps
    (``maps = (map of each RoI [K], first row of each map [M])``): those three are per
    RoI ``[K]`` (its map's), and cells are numbered across the maps, map after map. The taps are merged
    (:func:`_merge_taps`) or not per map, by that map's widest window, as one call per map would."""
    oh, ow = output_size
    y1, rh, gy, x1, rw, gx = _roi_geometry(rois, output_size, spatial_scale, sampling_ratio, aligned)
    g_y, g_x = _grid_sizes(gy, gx, sampling_ratio)
    ty = _taps(*_axis_samples(y1, rh, oh, gy, height, g_y))
    tx = _taps(*_axis_samples(x1, rw, ow, gx, width, g_x))
    if maps is None:
        span_y, span_x = torch.stack([ty[3].max(), tx[3].max()]).tolist()  # both windows in one read back
        ry, wy = _merge_taps(*ty[:3], span_y)
        rx, wx = _merge_taps(*tx[:3], span_x)
    else:
        roi_map, map_rows = maps
        widest = torch.zeros(2, len(map_rows), dtype=torch.int64, device=rois.device)
        widest.scatter_reduce_(1, roi_map.expand(2, -1), torch.stack([ty[3], tx[3]]), "amax")
        (ry, wy), (rx, wx) = (
            _merge_per_map(t, spans, roi_map)
            for t, spans in zip((ty, tx), widest.tolist())  # one read
        )
        first_row = map_rows[roi_map].view(-1, 1, 1, 1, 1)
    count = (gy * gx).clamp(min=1).to(wy.dtype).view(-1, 1, 1, 1, 1)
    if isinstance(height, Tensor):
        height, width = height.view(-1, 1, 1, 1, 1), width.view(-1, 1, 1, 1, 1)
    base = rois[:, 0].long().view(-1, 1, 1, 1, 1) * (height * width)
    if maps is not None:
        base = base + first_row
    # [K, oh, ow, Ry, Rx]
    index = base + ry[:, :, None, :, None] * width + rx[:, None, :, None, :]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :] / count
    k = rois.shape[0]
    weight = weight.reshape(k * oh * ow, -1)
    index = index.expand(k, oh, ow, ry.shape[-1], rx.shape[-1]).reshape(k * oh * ow, -1)
    keep = weight != 0
    pairs = torch.nonzero(keep.reshape(-1)).squeeze(1)  # one read back for both lists
    return index.reshape(-1)[pairs], weight.reshape(-1)[pairs], _offsets(keep.sum(dim=1))


def _merge_per_map(taps, spans: list[int], roi_map: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_merge_taps` with each map's own choice: ``spans`` the widest window of each map's RoIs."""
    num_taps = taps[0].shape[-1]
    raw_maps = [s >= num_taps for s in spans]
    if not any(raw_maps):
        return _merge_taps(*taps[:3], max(spans))
    raw = None if all(raw_maps) else torch.tensor(raw_maps, device=roi_map.device)[roi_map]
    return _merge_taps(*taps[:3], num_taps, raw)


def _offsets(counts: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """Start of each bag in a flat list of pairs: exclusive cumulative sum of the per-bag ``counts``."""
    offsets = torch.zeros_like(counts, dtype=dtype)
    offsets[1:] = counts.cumsum(0)[:-1]
    return offsets


def _sample_pairs(rois, output_size, spatial_scale, sampling_ratio, aligned, height, width):
    """Per-sample 4-tap (cell, weight) bags for max aggregation; bags ordered (k, oh, ow, gy, gx)."""
    oh, ow = output_size
    y1, rh, gy, x1, rw, gx = _roi_geometry(rois, output_size, spatial_scale, sampling_ratio, aligned)
    g_y, g_x = _grid_sizes(gy, gx, sampling_ratio)
    ylo, yhi, wylo, wyhi = _axis_samples(y1, rh, oh, gy, height, g_y)  # [K, oh, Gy]
    xlo, xhi, wxlo, wxhi = _axis_samples(x1, rw, ow, gx, width, g_x)  # [K, ow, Gx]
    ys = torch.stack([ylo, ylo, yhi, yhi], dim=-1)[:, :, None, :, None, :]  # [K, oh, 1, Gy, 1, 4]
    xs = torch.stack([xlo, xhi, xlo, xhi], dim=-1)[:, None, :, None, :, :]  # [K, 1, ow, 1, Gx, 4]
    wys = torch.stack([wylo, wylo, wyhi, wyhi], dim=-1)[:, :, None, :, None, :]
    wxs = torch.stack([wxlo, wxhi, wxlo, wxhi], dim=-1)[:, None, :, None, :, :]
    base = rois[:, 0].long().view(-1, 1, 1, 1, 1, 1) * (height * width)
    index = base + ys * width + xs  # [K, oh, ow, Gy, Gx, 4]
    weight = wys * wxs
    iy = torch.arange(ylo.shape[-1], device=rois.device).view(1, 1, 1, -1, 1)
    ix = torch.arange(xlo.shape[-1], device=rois.device).view(1, 1, 1, 1, -1)
    in_grid = (iy < gy.view(-1, 1, 1, 1, 1)) & (ix < gx.view(-1, 1, 1, 1, 1))  # [K, 1, 1, Gy, Gx]
    return index.reshape(-1), weight.reshape(-1), in_grid


def _channel_blocks(channels: int, cells: int, bags: int, channels_last: bool) -> list[tuple[int, int]]:
    """Channel ranges to process at a time.

    Channels-last input is used in place (one block). NCHW input must be copied to channels-last rows;
    copying it in channel blocks keeps that temporary (and the per-block results) at about a quarter of
    the output, or 1M elements for small outputs.
    """
    if channels_last:
        return [(0, channels)]
    budget = max(bags * channels // 4, 1 << 20)  # elements
    per_block = max(1, min(channels, budget // max(cells, 1)))
    return [(c0, min(c0 + per_block, channels)) for c0 in range(0, channels, per_block)]


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _cell_chunks(n: int, cells_per_image: int, max_cells: int) -> list[tuple[int, int]]:
    """``(image, first cell)`` of consecutive ranges of at most ``max_cells`` cells, never across images;
    each range ends where the next begins (the last at ``n * cells_per_image``)."""
    step = max(1, min(max_cells, cells_per_image))
    return [(b, b * cells_per_image + s) for b in range(n) for s in range(0, cells_per_image, step)]


class _BagSum(torch.autograd.Function):
    """``out[b] = sum_j weight[j] * cell(index[j])`` over the pairs ``j`` of bag ``b`` (bags by offsets).

    ``input`` is ``[N, C, H, W]``; cell ``(n*H + y)*W + x`` is the channel vector ``input[n, :, y, x]``.
    ``index`` and ``offsets`` share one integer dtype (int32 when the cells fit). Forward is
    ``embedding_bag`` on channels-last rows (a free view for channels-last input; NCHW input is copied in
    channel blocks). Backward sorts the pairs by cell once (the sorted cells and the permutation are its
    only per-pair temporaries), then walks ranges of cells: per range, the bag-sum of the output gradient
    into each touched cell is ``[cells, C]`` at most an eighth of the output (the output's size where
    host reads stall: fewer ranges, fewer kernels), and is copied straight into the input gradient (no
    atomics, no ``pairs x C`` tensor). The input gradient has the input's layout.
    """

    @staticmethod
    def forward(ctx, input: Tensor, index: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        n, c, h, w = input.shape
        channels_last = _is_channels_last(input)
        blocks = _channel_blocks(c, n * h * w, offsets.numel(), channels_last)
        if len(blocks) == 1:  # no copy of the result
            out = F.embedding_bag(
                index, _channels_last_rows(input), offsets, mode="sum", per_sample_weights=weight
            )
        else:
            out = input.new_empty(offsets.numel(), c)
            for c0, c1 in blocks:
                rows = _channels_last_rows(input[:, c0:c1])
                out[:, c0:c1] = F.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weight)
        ctx.save_for_backward(index, weight, offsets)
        ctx.input_shape = input.shape
        ctx.channels_last = channels_last
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        index, weight, offsets = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        if ctx.channels_last:
            grad = grad_out.new_zeros((n, h, w, c)).permute(0, 3, 1, 2)
            grad_rows = grad.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
        else:
            grad = grad_out.new_zeros((n, c, h, w))
        if index.numel() == 0:
            return grad, None, None, None
        grad_out = grad_out.contiguous()  # [bags, C]; the autograd view/permute backward already is
        num_bags = grad_out.shape[0]
        cells, order = torch.sort(index, stable=True)
        touched_all, counts_all = torch.unique_consecutive(cells, return_counts=True)
        # cells per range: the [cells, C] sum at most an eighth of the output (cache-sized on a CPU); where
        # reads stall, as large as the output, so that the ranges (7 kernels each) are few
        share = 1 if _device.host_reads_stall(grad_out.device) else 8
        max_cells = max(num_bags * c // share, 1 << 18) // c
        chunks = _cell_chunks(n, h * w, max_cells)
        starts = cells.new_tensor([first for _, first in chunks] + [n * h * w])
        # each range's pairs in the sorted order and its touched cells, in one read back
        bounds = torch.stack([torch.searchsorted(cells, starts), torch.searchsorted(touched_all, starts)])
        (p_bounds, t_bounds) = bounds.tolist()
        for (b, _), p0, p1, t0, t1 in zip(chunks, p_bounds, p_bounds[1:], t_bounds, t_bounds[1:]):
            if p1 == p0:
                continue
            pairs = order[p0:p1]
            small = offsets.dtype == torch.int32
            bag = torch.searchsorted(offsets, pairs.to(offsets.dtype), right=True, out_int32=small) - 1
            touched = touched_all[t0:t1]
            summed = F.embedding_bag(
                bag,
                grad_out,
                _offsets(counts_all[t0:t1], offsets.dtype),
                mode="sum",
                per_sample_weights=weight[pairs],
            )  # [touched, C]
            if ctx.channels_last:
                grad_rows.index_copy_(0, touched.long(), summed)
            else:  # write the [touched, C] rows straight into this image's NCHW gradient
                grad[b].reshape(c, h * w).index_copy_(1, touched.long() - b * h * w, summed.t())
        return grad, None, None, None


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    mode: str = "avg",
) -> Tensor:
    """RoIAlign (see the module docstring for conventions and the ``aligned`` semantics).

    Args:
        input: ``[N, C, H, W]`` features (float32/64; float16/bfloat16 are computed in float32).
        boxes: ``Tensor[K, 5]`` (batch_index, x1, y1, x2, y2) or a list of ``Tensor[L_i, 4]``.
        output_size: ``oh`` or ``(oh, ow)``.
        spatial_scale: feature-map cells per input pixel (1 / stride).
        sampling_ratio: samples per bin along each axis; ``<= 0``: adaptive, ``ceil(roi size / output size)``.
        aligned: shift boxes by -0.5 cell (pixel-centre alignment); see the module docstring.
        mode: ``"avg"`` (the paper's default, torchvision's numbers) or ``"max"`` over the samples
            (samples outside the map count as 0; a bin with no samples is 0).
    Returns:
        ``[K, C, oh, ow]`` in the input's dtype (channels-last memory layout).
    """
    if mode not in ("avg", "max"):
        raise ValueError(f"mode must be 'avg' or 'max', got {mode!r}")
    output_size = _pair(output_size)
    x, rois, out_dtype = _prepare(input, boxes)
    n, c, h, w = x.shape
    k = rois.shape[0]
    oh, ow = output_size
    if k == 0 or h == 0 or w == 0:
        return (x.sum() * 0 + x.new_zeros(k, oh, ow, c)).permute(0, 3, 1, 2).to(out_dtype)
    with torch.no_grad():
        if mode == "avg":
            index, weight, offsets = _bin_pairs(
                rois, output_size, spatial_scale, sampling_ratio, aligned, h, w
            )
        else:
            index, weight, in_grid = _sample_pairs(
                rois, output_size, spatial_scale, sampling_ratio, aligned, h, w
            )
            offsets = torch.arange(0, index.numel(), 4, device=index.device)
        if max(n * h * w, index.numel()) < 2**31:  # int32 pairs: a third less memory, faster sorts
            index, offsets = index.int(), offsets.int()
    out = _BagSum.apply(x, index, weight, offsets)
    if mode == "max":
        gy, gx = in_grid.shape[-2:]
        samples = out.view(k, oh, ow, gy * gx, c)
        missing = ~in_grid.reshape(k, 1, 1, gy * gx, 1)
        samples = samples.masked_fill(missing, -math.inf)
        out = samples.max(dim=3).values
        out = out.masked_fill(missing.all(dim=3), 0.0)
    return out.view(k, oh, ow, c).permute(0, 3, 1, 2).to(out_dtype)


def roi_align_levels(
    features: list[Tensor] | tuple[Tensor, ...],
    rois: Tensor,
    levels: Tensor,
    output_size: int | tuple[int, int],
    scales: list[float] | tuple[float, ...],
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (average) of each RoI from its own feature map, all maps in one pass.

    Args:
        features: ``M`` maps ``[N_m, C, H_m, W_m]`` (same ``C`` and dtype; ``N_m`` may differ, e.g. the
            ground-truth masks of each image of a batch as one map each).
        rois: ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image pixels; the batch index within the RoI's map.
        levels: ``[K]`` int64, the map of each RoI (``0 .. M-1``).
        output_size, sampling_ratio, aligned: as :func:`roi_align`; scales: ``spatial_scale`` of each map.
    Returns:
        ``[K, C, oh, ow]`` (channels-last memory), equal to ``roi_align(features[m], rois[levels == m],
        ...)`` for every ``m``, bit for bit, gradients too: the same (cell, weight) pairs in the same order.
        The maps' channels-last rows are concatenated into one table (a copy), and every RoI's bins are
        summed from it by one bag-sum: two host reads in all (the windows and the pair count; three with
        an adaptive ``sampling_ratio``), not two per map.
    """
    output_size = _pair(output_size)
    if len(features) != len(scales) or not features:
        raise ValueError(f"one scale per feature map: {len(features)} maps, {len(scales)} scales")
    ref, rois, out_dtype = _prepare(features[0], rois)
    # every map's shape checked, half precision computed in float32 (as roi_align)
    maps = [ref] + [_prepare(f, rois[:0])[0] for f in features[1:]]
    c = ref.shape[1]
    k = rois.shape[0]
    oh, ow = output_size
    if any(m.shape[1] != c for m in maps):
        raise ValueError(f"every map needs {c} channels, got {[m.shape[1] for m in maps]}")
    if k == 0 or all(m.shape[2] * m.shape[3] == 0 for m in maps):  # zeros, connected to the inputs
        zero = sum(m.sum() for m in maps) * 0
        return (zero + ref.new_zeros(k, oh, ow, c)).permute(0, 3, 1, 2).to(out_dtype)
    table = torch.cat([_channels_last_rows(m) for m in maps])  # [sum N*H_m*W_m, C]
    with torch.no_grad():
        levels = levels.to(device=ref.device, dtype=torch.int64)
        sizes = torch.tensor([m.shape[2:] for m in maps], device=ref.device)  # [M, 2]
        rows = torch.tensor([m.shape[0] * m.shape[2] * m.shape[3] for m in maps], device=ref.device)
        map_rows = torch.cumsum(rows, 0) - rows  # first row of each map in the table
        scale = torch.tensor(scales, dtype=rois.dtype, device=ref.device)[levels]
        height, width = sizes[levels, 0], sizes[levels, 1]
        index, weight, offsets = _bin_pairs(
            rois,
            output_size,
            scale,
            sampling_ratio,
            aligned,
            height,
            width,
            maps=(levels, map_rows),
        )
        if max(table.shape[0], index.numel()) < 2**31:
            index, offsets = index.int(), offsets.int()
    # the table as a channels-last [1, C, rows, 1] map: its rows are the table's, no copy
    out = _BagSum.apply(table.t()[None, :, :, None], index, weight, offsets)
    return out.view(k, oh, ow, c).permute(0, 3, 1, 2).to(out_dtype)


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


#: RoIPool gathers at most this many feature values at once (a bin's cells for a chunk of bins).
_POOL_GATHER_VALUES = 1 << 22


def _max_over_slots(
    feats: Tensor, index: Tensor, inside: Tensor, num_cells: int, best: Tensor, arg: Tensor
) -> None:
    """Per bin (row of ``index``/``inside`` ``[B, S]``) and channel: fills ``best [B, C]`` with the maximum
    over the bin's cells and ``arg [B, C]`` (int64) with the first cell (in slot order) holding it;
    0 and ``num_cells`` (no cell) for a bin with no cell.

    Gathers the cells of a chunk of bins (``[b, S, C]``, at most :data:`_POOL_GATHER_VALUES` values) and
    reduces them with ``max``, which returns the first slot of a tie. Slots outside a bin read the bin's
    first cell, which changes neither."""
    b, s = index.shape
    idx = torch.where(inside, index, index[:, :1])
    rows = max(1, _POOL_GATHER_VALUES // max(1, s * feats.shape[1]))
    slot = torch.empty(min(rows, b), feats.shape[1], dtype=torch.int64, device=feats.device)
    for start in range(0, b, rows):
        stop = min(start + rows, b)
        part = idx[start:stop]
        cells = feats.index_select(0, part.reshape(-1)).view(stop - start, s, -1)
        torch.max(cells, dim=1, out=(best[start:stop], slot[: stop - start]))
        torch.gather(part, 1, slot[: stop - start], out=arg[start:stop])
    empty = ~inside.any(dim=1, keepdim=True)
    best.masked_fill_(empty, 0.0)
    arg.masked_fill_(empty, num_cells)


class _RoIPoolFunction(torch.autograd.Function):
    """Max over integer cell ranges; backward routes each gradient to its argmax cell (torchvision's tie
    rule: the first cell in row-major order of the bin).

    ``groups``: ``(index, inside)`` per group of distinct cell rectangles, each padded to the group's own
    largest (``[G, S]``: the cells of each rectangle, slot ``y * sx + x``); their results are laid out one
    group after the other. ``row [B]``: for each output bin, the row of its rectangle in that layout (bins
    of different RoIs that cover the same cells share one rectangle)."""

    @staticmethod
    def forward(ctx, feats: Tensor, groups: list, row: Tensor, num_cells: int):
        # feats [N*H*W, C]
        num_rects = sum(index.shape[0] for index, _ in groups)
        best = feats.new_empty(num_rects, feats.shape[1])
        arg = torch.empty(best.shape, dtype=torch.int64, device=feats.device)
        start = 0
        for index, inside in groups:
            stop = start + index.shape[0]
            _max_over_slots(feats, index, inside, num_cells, best[start:stop], arg[start:stop])
            start = stop
        ctx.save_for_backward(arg, row)
        ctx.num_cells = num_cells
        return best.index_select(0, row)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        arg, row = ctx.saved_tensors
        per_rect = grad_out.new_zeros(arg.shape).index_add_(0, row, grad_out)  # bins sharing a rectangle
        grad = grad_out.new_zeros(ctx.num_cells + 1, grad_out.shape[1])  # + a row for the empty bins
        grad.scatter_add_(0, arg, per_rect)  # grad[arg[r, c], c] += per_rect[r, c]
        return grad[:-1], None, None, None


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoIPool (Fast R-CNN): quantized RoI and bins, max pooling. torchvision's numbers.

    The RoI corners are rounded to cells (``round(x * spatial_scale)``, halves away from zero) and the
    end cell is inclusive; bin ``p`` covers cells ``[floor(p * s), ceil((p + 1) * s))`` with ``s = roi
    cells / output size``, clipped to the map. Empty bins are 0. Returns ``[K, C, oh, ow]``.

    Each distinct cell rectangle is reduced once (on a coarse map many bins of different RoIs cover the
    same cells), and its gradient is the sum of those bins' before it reaches the argmax cell.
    """
    oh, ow = _pair(output_size)
    x, rois, out_dtype = _prepare(input, boxes)
    n, c, h, w = x.shape
    k = rois.shape[0]
    feats = _channels_last_rows(x)
    if k == 0:
        return (feats.sum() * 0 + feats.new_zeros(0, oh, ow, c)).permute(0, 3, 1, 2).to(out_dtype)
    with torch.no_grad():
        x1 = _round_half_away(rois[:, 1] * spatial_scale)
        y1 = _round_half_away(rois[:, 2] * spatial_scale)
        x2 = _round_half_away(rois[:, 3] * spatial_scale)
        y2 = _round_half_away(rois[:, 4] * spatial_scale)
        rw = (x2 - x1 + 1).clamp(min=1)
        rh = (y2 - y1 + 1).clamp(min=1)

        def ranges(start, length, bins, size):
            p = torch.arange(bins, device=x.device, dtype=x.dtype).view(1, -1)
            bin_size = (length / bins).view(-1, 1)
            lo = torch.floor(p * bin_size) + start.view(-1, 1)
            hi = torch.ceil((p + 1) * bin_size) + start.view(-1, 1)
            return lo.clamp(0, size).long(), hi.clamp(0, size).long()  # [K, bins]

        ylo, yhi = ranges(y1, rh, oh, h)
        xlo, xhi = ranges(x1, rw, ow, w)
        # every bin's rectangle (image, ylo, yhi, xlo, xhi) as one integer; the distinct ones, in key order
        image = rois[:, 0].long().view(-1, 1, 1)
        y_key = (image * (h + 1) + ylo[:, :, None]) * (h + 1) + yhi[:, :, None]  # [K, oh, 1]
        key = (y_key * (w + 1) + xlo[:, None, :]) * (w + 1) + xhi[:, None, :]  # [K, oh, ow]
        keys, rect_of_bin = torch.unique(key.reshape(-1), return_inverse=True)
        keys, r_xhi = keys.div(w + 1, rounding_mode="floor"), keys % (w + 1)
        keys, r_xlo = keys.div(w + 1, rounding_mode="floor"), keys % (w + 1)
        keys, r_yhi = keys.div(h + 1, rounding_mode="floor"), keys % (h + 1)
        r_image, r_ylo = keys.div(h + 1, rounding_mode="floor"), keys % (h + 1)
        # rectangles grouped by their area (powers of two), each group padded to its own largest: one large
        # rectangle must not pad every small one
        span_y, span_x = (r_yhi - r_ylo).clamp(min=1), (r_xhi - r_xlo).clamp(min=1)
        group_of = torch.log2((span_y * span_x).float()).ceil().long()  # exact at powers of two
        groups, members = [], []
        for g in torch.unique(group_of).tolist():
            r = torch.nonzero(group_of == g).flatten()
            sy, sx = int(span_y[r].max().item()), int(span_x[r].max().item())
            ys = r_ylo[r, None] + torch.arange(sy, device=x.device)  # [R, sy]
            xs = r_xlo[r, None] + torch.arange(sx, device=x.device)  # [R, sx]
            inside = (ys < r_yhi[r, None])[:, :, None] & (xs < r_xhi[r, None])[:, None, :]
            index = (
                r_image[r, None, None] * (h * w)
                + ys.clamp(max=h - 1)[:, :, None] * w
                + xs.clamp(max=w - 1)[:, None, :]
            )
            groups.append((index.reshape(-1, sy * sx), inside.reshape(-1, sy * sx)))
            members.append(r)
        members = torch.cat(members)  # the rectangles in the groups' layout
        position = torch.empty_like(members)
        position[members] = torch.arange(members.numel(), device=x.device)
        row = position[rect_of_bin]  # [K * oh * ow]
    out = _RoIPoolFunction.apply(feats, groups, row, n * h * w)
    return out.view(k, oh, ow, c).permute(0, 3, 1, 2).to(out_dtype)


def roi_warp(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    *,
    mode: str = "max",
) -> Tensor:
    """RoIWarp (the paper's Table 2c): the RoI is quantized to cells as in RoIPool, then sampled bilinearly.

    The RoI corners are rounded to the feature grid (``round(x * spatial_scale)``, halves away from zero);
    the bins are not quantized: the quantized RoI goes through :func:`roi_align` (``aligned=False``) with
    ``sampling_ratio`` samples per bin and ``mode`` (``"max"`` or ``"avg"``) aggregation.
    Returns ``[K, C, oh, ow]``.
    """
    x, rois, out_dtype = _prepare(input, boxes)
    quantized = torch.cat([rois[:, :1], _round_half_away(rois[:, 1:] * spatial_scale)], dim=1)
    out = roi_align(x, quantized, output_size, 1.0, sampling_ratio, False, mode=mode)
    return out.to(out_dtype)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (keyword-only configuration)."""

    def __init__(
        self,
        *,
        output_size,
        spatial_scale: float,
        sampling_ratio: int = -1,
        aligned: bool = False,
        mode: str = "avg",
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
            mode=self.mode,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mode={self.mode}"
        )


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, *, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIWarp(nn.Module):
    """Module form of :func:`roi_warp`."""

    def __init__(self, *, output_size, spatial_scale: float, sampling_ratio: int = 2, mode: str = "max"):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.mode = mode

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_warp(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, mode=self.mode
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, mode={self.mode}"
        )
