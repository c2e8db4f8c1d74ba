"""Mask heads: RoI features -> per-class mask logits ``[K, num_classes (or 1), M, M]``.

* FPN (paper Fig. 4 right): :class:`MaskRCNNHeads` (four 3x3 convs, 256 channels, ReLU) on RoIAlign 14x14,
  then :class:`MaskRCNNPredictor` (2x2 stride-2 deconv ``conv5_mask`` + ReLU, 1x1 ``mask_fcn_logits``)
  -> 28x28.
* C4 (Fig. 4 left): :class:`C4MaskPredictor` -- the same predictor on res5's 7x7 x 2048 output -> 14x14.
* Ablation (Table 2e): :class:`MLPMaskHead`, fully connected layers instead of convolutions.

Outputs are logits; the loss (:func:`maskrcnn.modeling.losses.mask_loss`) and inference pick the channel of
the RoI's class (or channel 0 when class-agnostic, one output channel).

torchvision key names. The predictor's names are torchvision's (``conv5_mask``, ``mask_fcn_logits``). The
conv tower names its layers ``mask_fcn1 .. mask_fcn4`` (Detectron's and older torchvision's names), whereas
current torchvision stores them as ``{i}.0.weight`` / ``{i}.0.bias`` (a ``Sequential`` of conv blocks):
``roi_heads.mask_head.{i}.0.{weight,bias}`` -> ``roi_heads.mask_head.mask_fcn{i+1}.{weight,bias}``, which
:func:`maskrcnn.weights.torchvision_to_maskrcnn` maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "C4MaskPredictor",
    "MLPMaskHead",
    "MaskRCNNHeads",
    "MaskRCNNPredictor",
]


def _kaiming_init(module: nn.Module) -> None:
    """torchvision's init of the mask branch: He normal (fan_out, ReLU) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskRCNNHeads(nn.Module):
    """The FPN mask tower: ``len(layers)`` 3x3 convs (padding = dilation) + ReLU.

    ``[K, in_channels, 14, 14] -> [K, layers[-1], 14, 14]``. Layers are ``mask_fcn1 .. mask_fcnN``
    (module docstring: torchvision's names).
    """

    def __init__(
        self, *, in_channels: int, layers: Sequence[int] = (256, 256, 256, 256), dilation: int = 1
    ) -> None:
        super().__init__()
        self.num_layers = len(layers)
        prev = in_channels
        for i, ch in enumerate(layers, start=1):
            conv = nn.Conv2d(prev, ch, kernel_size=3, stride=1, padding=dilation, dilation=dilation)
            self.add_module(f"mask_fcn{i}", conv)
            prev = ch
        self.out_channels = prev
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_layers + 1):
            x = F.relu(getattr(self, f"mask_fcn{i}")(x))
        return x


class MaskRCNNPredictor(nn.Module):
    """``conv5_mask`` (2x2 deconv, stride 2) + ReLU, then 1x1 ``mask_fcn_logits``.

    ``[K, in_channels, S, S] -> [K, num_classes, 2S, 2S]`` logits (``[K, 1, 2S, 2S]`` when
    ``class_agnostic``). ``num_classes`` includes the background channel 0 (never trained, as in
    torchvision, so its weights load).
    """

    def __init__(
        self, *, in_channels: int, dim_reduced: int = 256, num_classes: int, class_agnostic: bool = False
    ) -> None:
        super().__init__()
        self.class_agnostic = class_agnostic
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, kernel_size=2, stride=2, padding=0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, 1 if class_agnostic else num_classes, kernel_size=1)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


class C4MaskPredictor(MaskRCNNPredictor):
    """The C4 mask head (paper Fig. 4 left): on res5's ``[K, 2048, 7, 7]`` output, a 2x2 stride-2 deconv to
    256 channels + ReLU, then a 1x1 conv to the classes: ``[K, num_classes, 14, 14]`` logits (m = 14)."""

    def __init__(
        self,
        *,
        in_channels: int = 2048,
        dim_reduced: int = 256,
        num_classes: int,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            dim_reduced=dim_reduced,
            num_classes=num_classes,
            class_agnostic=class_agnostic,
        )


class MLPMaskHead(nn.Module):
    """The MLP mask branch of the paper's Table 2e ablation (a ``mask_predictor``, with no ``mask_head``).

    ``[K, in_channels, in_size, in_size]`` (RoIAlign 14x14x256) -> flatten -> ``fc1`` (1024) + ReLU ->
    ``fc2`` (1024) + ReLU -> ``fc_logits`` (``num_classes * mask_size**2``) -> ``[K, num_classes, mask_size,
    mask_size]`` logits (one channel when ``class_agnostic``). Unlike the FCN it must encode the mask's
    spatial layout in a vector, which the paper found costs 2.1 mask AP.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        in_size: int = 14,
        representation_size: int = 1024,
        num_classes: int,
        mask_size: int = 28,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.mask_size = mask_size
        self.num_outputs = 1 if class_agnostic else num_classes
        self.fc1 = nn.Linear(in_channels * in_size * in_size, representation_size)
        self.fc2 = nn.Linear(representation_size, representation_size)
        self.fc_logits = nn.Linear(representation_size, self.num_outputs * mask_size * mask_size)
        nn.init.normal_(self.fc_logits.weight, std=0.001)
        nn.init.zeros_(self.fc_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(x.flatten(start_dim=1)))
        x = F.relu(self.fc2(x))
        return self.fc_logits(x).view(-1, self.num_outputs, self.mask_size, self.mask_size)
