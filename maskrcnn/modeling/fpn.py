"""Feature Pyramid Network (Lin et al. 2017) on top of a ResNet, and the combined backbone.

``FPN`` turns ``{"c2".."c5"}`` (strides 4..32) into ``{"p2".."p5"}`` with ``out_channels`` (256) channels
each, plus ``"p6"`` (stride 64, a stride-2 subsampling of P5 used only by the RPN) when ``extra_pool`` is set.

Parameters are ``inner_blocks.{i}`` (1x1 laterals) and ``layer_blocks.{i}`` (3x3 outputs), plain convs;
torchvision's checkpoints nest them one level deeper (``inner_blocks.{i}.0``), which
:func:`maskrcnn.weights.torchvision_to_maskrcnn` maps.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.backbone import ResNet, resnet_spec

__all__ = ["FPN", "BackboneWithFPN", "resnet_fpn"]


class FPN(nn.Module):
    """Top-down feature pyramid with lateral connections.

    Args (keyword only):
        in_channels: ordered (fine to coarse) ``{"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}``; an input
            named ``cK`` gives the output ``pK``.
        out_channels: channels of every output level (256).
        extra_pool: add ``p{K+1}`` = ``max_pool2d(pK, kernel_size=1, stride=2)`` after the coarsest level.
        in_strides: strides of the inputs; by default ``2**K`` for ``cK``.

    Each level: ``lateral = inner_blocks[i](c)`` (1x1 conv), ``top_down = nearest-upsample(coarser merged
    map, size=lateral's H x W)``, ``merged = lateral + top_down``, ``p = layer_blocks[i](merged)`` (3x3 conv,
    padding 1). Output: ``OrderedDict`` ``{"p2": N x 256 x H/4 x W/4, ..., "p6": N x 256 x H/64 x W/64}``
    (sizes as the inputs', P6 = ceil(P5 / 2)); ``strides`` = ``{"p2": 4, ..., "p6": 64}``.
    """

    def __init__(
        self,
        *,
        in_channels: Mapping[str, int],
        out_channels: int = 256,
        extra_pool: bool = True,
        in_strides: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must name at least one input level")
        self.in_features = list(in_channels)
        for name in self.in_features:
            if not re.fullmatch(r"c\d+", name):
                raise ValueError(f"FPN input names must look like 'c<level>', got {name!r}")
        if in_strides is None:
            in_strides = {name: 2 ** int(name[1:]) for name in self.in_features}
        self.inner_blocks = nn.ModuleList(
            nn.Conv2d(in_channels[n], out_channels, 1) for n in self.in_features
        )
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_features
        )
        self.extra_pool = extra_pool
        self.out_channels = out_channels
        self.strides: dict[str, int] = {"p" + n[1:]: in_strides[n] for n in self.in_features}
        if extra_pool:
            last = self.in_features[-1]
            self.strides[f"p{int(last[1:]) + 1}"] = in_strides[last] * 2
        self.out_features = list(self.strides)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        xs = [features[n] for n in self.in_features]
        merged = self.inner_blocks[-1](xs[-1])
        outs = [self.layer_blocks[-1](merged)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[i](xs[i])
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral.add_(top_down)  # in place is safe: conv does not save its output for backward
            outs.append(self.layer_blocks[i](merged))
        outs.reverse()
        if self.extra_pool:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.out_features, outs, strict=True))


class BackboneWithFPN(nn.Module):
    """``body`` (a :class:`ResNet` returning ``c2..c5``) followed by ``fpn``.

    ``forward(x)``: ``N x 3 x H x W`` -> ``OrderedDict`` ``{"p2".."p6"}`` of ``N x out_channels x H/s x W/s``.
    Attributes ``out_channels`` (int, 256) and ``strides`` (``{"p2": 4, ..., "p6": 64}``). State-dict keys
    are ``body.*`` and ``fpn.*``.
    """

    def __init__(self, *, body: ResNet, fpn: FPN) -> None:
        super().__init__()
        missing = [n for n in fpn.in_features if n not in body.out_channels]
        if missing:
            raise ValueError(f"FPN inputs {missing} are not returned by the body ({list(body.out_channels)})")
        self.body = body
        self.fpn = fpn
        self.out_channels: int = fpn.out_channels
        self.strides: dict[str, int] = dict(fpn.strides)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def resnet_fpn(
    name: str = "resnet50",
    *,
    norm: str = "frozen_bn",
    frozen_stages: int = 2,
    out_channels: int = 256,
    extra_pool: bool = True,
) -> BackboneWithFPN:
    """A ResNet/ResNeXt-FPN backbone by architecture name (see ``resnet_spec``), e.g. R-50-FPN with the stem
    and res2 frozen (torchvision's ``trainable_layers=3``, detectron2's ``FREEZE_AT=2``)."""
    body = ResNet(**resnet_spec(name), norm=norm, frozen_stages=frozen_stages)
    fpn = FPN(in_channels=body.out_channels, out_channels=out_channels, extra_pool=extra_pool)
    return BackboneWithFPN(body=body, fpn=fpn)
