"""Box heads: RoI features -> a vector per RoI, and the predictor of class scores and box offsets.

* FPN: :class:`TwoMLPHead` (RoIAlign 7x7 -> flatten -> fc6 1024 -> fc7 1024).
* C4: :class:`Res5Head` (RoIAlign 14x14 on res4 -> res5 with stride 2 -> 7x7 -> average pool -> 2048).
* :class:`FastRCNNPredictor`: ``cls_score`` (``num_classes`` logits, 0 = background) and ``bbox_pred``
  (``4 * num_classes`` class-specific ``(dx, dy, dw, dh)`` deltas).

Parameter names are torchvision's (``fc6``, ``fc7``, ``cls_score``, ``bbox_pred``), so its
``roi_heads.box_head.*`` / ``roi_heads.box_predictor.*`` weights load as they are. Initialisation is
PyTorch's default for the linear layers (as torchvision).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.modeling.backbone import make_res5

__all__ = ["FastRCNNPredictor", "Res5Head", "TwoMLPHead"]


class TwoMLPHead(nn.Module):
    """``[K, C, h, w]`` (or ``[K, C*h*w]``) -> flatten -> ``fc6`` + ReLU -> ``fc7`` + ReLU -> ``[K, D]``.

    ``in_channels`` is the flattened size ``C * h * w`` (256 * 7 * 7 for the FPN box head);
    ``D = representation_size``.
    """

    def __init__(self, *, in_channels: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_channels = representation_size

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        x = F.relu(self.fc6(x))
        return F.relu(self.fc7(x))


class FastRCNNPredictor(nn.Module):
    """``[K, in_channels]`` (or ``[K, in_channels, 1, 1]``) -> ``(class_logits [K, num_classes],
    box_deltas [K, 4 * num_classes])``. ``num_classes`` includes the background (index 0)."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 * num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class Res5Head(nn.Module):
    """The C4 RoI head: ResNet's res5 stage applied per RoI, then global average pooling.

    ``[K, 1024, 14, 14]`` -> :meth:`features` -> ``[K, 2048, 7, 7]`` -> mean over space -> ``[K, 2048]``
    (512 channels for ResNet-18/34 instead of 2048, 256 in instead of 1024). The un-pooled res5 output is
    what the C4 mask predictor consumes; :meth:`forward_with_features` returns both.

    Args (keyword only): ``depth``, ``groups``, ``width_per_group``, ``base_channels``, ``norm`` as
    :class:`maskrcnn.modeling.backbone.ResNet`; ``stride`` of res5's first block (2).
    Parameters live under ``res5.*`` (``res5.0.conv1.weight`` ..., torchvision's ``layer4.*`` keys with the
    prefix renamed; load ImageNet weights with ``load_imagenet_checkpoint(head.res5, sd, prefix="layer4.")``).
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        base_channels: int = 64,
        norm: str = "frozen_bn",
        stride: int = 2,
    ) -> None:
        super().__init__()
        self.res5 = make_res5(
            depth=depth,
            groups=groups,
            width_per_group=width_per_group,
            base_channels=base_channels,
            norm=norm,
            stride=stride,
        )
        last = self.res5[-1]
        self.out_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features

    def features(self, x: Tensor) -> Tensor:
        """res5 on RoI features: ``[K, C4, 14, 14] -> [K, C5, 7, 7]``."""
        return self.res5(x)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled [K, C5], res5 output [K, C5, 7, 7])``."""
        y = self.res5(x)
        return y.mean(dim=(2, 3)), y

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))
