"""Anchor generation for the RPN.

Conventions: anchors are ``xyxy`` float boxes in absolute pixels of the padded batch image (no
"+1"); sizes are ``(h, w)``; ``aspect_ratio = h / w``.

Cell anchors (the ``A`` zero-centred anchors of one feature-map location) are built exactly as
torchvision's ``AnchorGenerator`` builds them, in float32 on the CPU, so that torchvision
checkpoints give the same proposals::

    h = size * sqrt(ratio)        w = size / sqrt(ratio)        (w computed as size * (1 / sqrt(ratio)))
    cell anchor = round([-w, -h, w, h] / 2)                     (round half to even)

ordered ratio-major: ``a = ratio_index * len(sizes) + size_index``. The anchors of location
``(y, x)`` are the cell anchors shifted by ``(x * stride_w, y * stride_h)``, and each level's
anchors are listed location by location, row-major (``y`` outer, ``x`` inner), with the ``A``
cell anchors of a location consecutive: anchor ``(y * W + x) * A + a``. This matches the layout
of RPN head outputs permuted ``[A, H, W] -> [H, W, A]`` and flattened.

Strides: torchvision does not know the strides; it derives them per level from the batch as
``image_size // feature_size`` (integer division, per axis). Here strides are explicit. The two
agree when every padded side is a multiple of the level's stride -- for P2-P5 (strides 4..32)
whenever the padded size is a multiple of 32. They do NOT agree for P6 (stride 64, made by a
stride-2 subsampling of P5) when ``padded side / 32`` is odd: for an 800 x 1216 batch, P6 is
13 x 19 and torchvision uses strides ``(800 // 13, 1216 // 19) = (61, 64)``, not ``(64, 64)``.
Pass ``strides=None`` to use torchvision's rule (needed for bit-exact parity with torchvision);
explicit strides are the geometrically right ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "make_cell_anchors"]

_Number = int | float


def make_cell_anchors(sizes: Sequence[_Number], aspect_ratios: Sequence[_Number]) -> Tensor:
    """Zero-centred cell anchors ``[len(aspect_ratios) * len(sizes), 4]``, float32 on the CPU.

    Row ``r * len(sizes) + s`` is ``round([-w, -h, w, h] / 2)`` for ``size = sizes[s]`` and
    ``ratio = aspect_ratios[r]`` (``h = size * sqrt(ratio)``, ``w = size / sqrt(ratio)``).
    Float32 arithmetic on purpose: it decides how values close to ``k + 0.5`` round, and must
    be the same as torchvision's for its weights to produce the same proposals.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    height_factor = torch.sqrt(ratios)  # [R]
    width_factor = 1.0 / height_factor  # [R]
    widths = (width_factor[:, None] * scales[None, :]).reshape(-1)  # [R * S], ratio-major
    heights = (height_factor[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack((-widths, -heights, widths, heights), dim=1) / 2).round()


def _pair(stride: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(stride, (int, float)):
        return int(stride), int(stride)
    sh, sw = stride
    return int(sh), int(sw)


class AnchorGenerator(nn.Module):
    """Anchors for each feature level, identical for every image of a batch.

    Args (keyword only):
        sizes: one tuple of anchor sizes (sqrt of the area, pixels) per level, e.g.
            ``((32,), (64,), (128,), (256,), (512,))`` for FPN P2-P6 or
            ``((32, 64, 128, 256, 512),)`` for a single C4 level.
        aspect_ratios: one tuple of ratios ``h / w`` per level, e.g. ``((0.5, 1.0, 2.0),) * 5``;
            a flat tuple of numbers is used for every level.
        strides: per level, the stride in pixels (an int, or a ``(stride_h, stride_w)`` pair),
            e.g. ``(4, 8, 16, 32, 64)``; ``None`` derives them from each call as torchvision does,
            ``padded_image_size // feature_size`` per axis (see the module docstring).
        device, dtype: where the cell-anchor buffers live and the default device / dtype of the
            anchors (float32 on the CPU unless given); ``forward`` may override both.
        cache_size: how many grids (per level, feature size, strides, device, dtype) to keep;
            0 disables caching.

    ``forward(image_size=(H_img, W_img), feature_sizes=[(H_l, W_l), ...])`` returns one tensor
    ``[H_l * W_l * A_l, 4]`` per level, ``A_l = num_anchors_per_location()[l]``, in the order
    described in the module docstring. Returned tensors may be shared with the cache: treat them
    as read-only.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[Sequence[_Number]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[_Number]] | Sequence[_Number] = ((0.5, 1.0, 2.0),) * 5,
        strides: Sequence[int | Sequence[int]] | None = (4, 8, 16, 32, 64),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_size: int = 32,
    ) -> None:
        super().__init__()
        sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        if len(aspect_ratios) > 0 and isinstance(aspect_ratios[0], (int, float)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        aspect_ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
        if len(sizes) == 0 or len(aspect_ratios) != len(sizes):
            raise ValueError(
                f"need one tuple of sizes and one of aspect ratios per level, got {len(sizes)} and "
                f"{len(aspect_ratios)}"
            )
        if any(len(s) == 0 for s in sizes) or any(len(r) == 0 for r in aspect_ratios):
            raise ValueError("every level needs at least one size and one aspect ratio")
        if strides is not None:
            if len(strides) != len(sizes):
                raise ValueError(f"need one stride per level: {len(sizes)} levels, {len(strides)} strides")
            strides = tuple(_pair(s) for s in strides)
            if any(s <= 0 for pair in strides for s in pair):
                raise ValueError(f"strides must be positive, got {strides}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.strides: tuple[tuple[int, int], ...] | None = strides
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        for level, (s, r) in enumerate(zip(sizes, aspect_ratios, strict=True)):
            cell = make_cell_anchors(s, r).to(device=device, dtype=dtype or torch.float32)
            self.register_buffer(f"cell_anchors_{level}", cell, persistent=False)

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def cell_anchors(self) -> list[Tensor]:
        """Per level, the zero-centred cell anchors ``[A_l, 4]``."""
        return [getattr(self, f"cell_anchors_{level}") for level in range(self.num_levels)]

    def num_anchors_per_location(self) -> list[int]:
        """``A_l = len(sizes[l]) * len(aspect_ratios[l])`` for each level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios, strict=True)]

    def level_strides(
        self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]
    ) -> list[tuple[int, int]]:
        """The ``(stride_h, stride_w)`` used for each level for this image / feature sizes."""
        if self.strides is not None:
            return list(self.strides)
        h, w = int(image_size[0]), int(image_size[1])
        return [(h // int(fh), w // int(fw)) for fh, fw in feature_sizes]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, strides={self.strides}"

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # grids on the old device/dtype would only hold memory
        return super()._apply(fn, *args, **kwargs)

    def _grid(self, level: int, fh: int, fw: int, stride: tuple[int, int], device, dtype) -> Tensor:
        cell = self.cell_anchors[level].to(device=device, dtype=dtype)  # [A, 4]
        sh, sw = stride
        # integer shifts, converted exactly, then one rounding in the add (as torchvision does)
        shift_x = (torch.arange(fw, device=device, dtype=torch.int64) * sw).to(dtype)  # [W]
        shift_y = (torch.arange(fh, device=device, dtype=torch.int64) * sh).to(dtype)  # [H]
        out = torch.empty((fh, fw, cell.shape[0], 4), device=device, dtype=dtype)
        out[..., 0::2] = shift_x[None, :, None, None] + cell[:, 0::2]  # x1, x2: [1, W, A, 2] broadcast over H
        out[..., 1::2] = shift_y[:, None, None, None] + cell[:, 1::2]  # y1, y2: [H, 1, A, 2] broadcast over W
        return out.reshape(-1, 4)

    def forward(
        self,
        *,
        image_size: Sequence[int],
        feature_sizes: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Tensor]:
        """Anchors ``[H_l * W_l * A_l, 4]`` per level for a padded batch of ``image_size = (h, w)``
        whose level-``l`` feature map is ``feature_sizes[l] = (H_l, W_l)``."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature sizes, got {len(feature_sizes)}")
        first = self.cell_anchors[0]
        device = torch.device(device) if device is not None else first.device
        dtype = dtype if dtype is not None else first.dtype
        strides = self.level_strides(image_size, feature_sizes)
        anchors = []
        for level, ((fh, fw), stride) in enumerate(zip(feature_sizes, strides, strict=True)):
            fh, fw = int(fh), int(fw)
            if self.cache_size <= 0:
                anchors.append(self._grid(level, fh, fw, stride, device, dtype))
                continue
            key = (level, fh, fw, stride, device, dtype)
            grid = self._cache.get(key)
            if grid is None:
                grid = self._grid(level, fh, fw, stride, device, dtype)
                self._cache[key] = grid
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            anchors.append(grid)
        return anchors
