"""Keypoint heads (paper Sec. 5, "Mask R-CNN for Human Pose Estimation"), torchvision's layout.

RoIAlign ``[R, in_channels, 14, 14]`` -> :class:`KeypointRCNNHeads` (eight 3x3 convs of 512 channels,
ReLU) -> :class:`KeypointRCNNPredictor` (4x4 stride-2 deconv ``kps_score_lowres`` to 28x28, then x2
bilinear upsampling) -> logits ``[R, K, 56, 56]``, one 56x56 heatmap per keypoint. The targets, the
loss and the decoding are in :mod:`maskrcnn.ops.keypoints` and
:func:`maskrcnn.modeling.losses.keypoint_loss`.

State-dict keys are torchvision's ``roi_heads.keypoint_head.*`` and ``roi_heads.keypoint_predictor.*``:
the tower is an ``nn.Sequential`` of (Conv2d, ReLU) pairs, so its convs are ``0, 2, ..., 14``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KeypointRCNNHeads", "KeypointRCNNPredictor"]


def _kaiming_init(module: nn.Module) -> None:
    """torchvision's init of the keypoint branch: He normal (fan_out, ReLU) weights, zero biases."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(module.bias)


class KeypointRCNNHeads(nn.Sequential):
    """The keypoint conv tower: ``len(layers)`` x (3x3 conv, padding 1, ReLU).

    ``[R, in_channels, S, S] -> [R, layers[-1], S, S]``. Children ``2i`` are the convs, ``2i + 1`` the
    ReLUs (torchvision's keys ``0.weight, 0.bias, 2.weight, ...``).
    """

    def __init__(self, *, in_channels: int, layers: Sequence[int] = (512,) * 8) -> None:
        blocks: list[nn.Module] = []
        prev = in_channels
        for ch in layers:
            blocks += [nn.Conv2d(prev, ch, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True)]
            prev = ch
        super().__init__(*blocks)
        self.out_channels = prev
        for m in self.children():
            if isinstance(m, nn.Conv2d):
                _kaiming_init(m)


class KeypointRCNNPredictor(nn.Module):
    """``kps_score_lowres`` (4x4 deconv, stride 2, padding 1), then x2 bilinear upsampling.

    ``[R, in_channels, S, S] -> [R, num_keypoints, 4S, 4S]`` logits (14 -> 28 -> 56). The upsampling is
    torchvision's ``interpolate(scale_factor=2.0, mode="bilinear", align_corners=False,
    recompute_scale_factor=False)``.
    """

    def __init__(self, *, in_channels: int = 512, num_keypoints: int) -> None:
        super().__init__()
        self.kps_score_lowres = nn.ConvTranspose2d(
            in_channels, num_keypoints, kernel_size=4, stride=2, padding=1
        )
        _kaiming_init(self.kps_score_lowres)
        self.up_scale = 2.0
        self.out_channels = num_keypoints

    def forward(self, x: Tensor) -> Tensor:
        x = self.kps_score_lowres(x)
        return F.interpolate(
            x, scale_factor=self.up_scale, mode="bilinear", align_corners=False, recompute_scale_factor=False
        )
