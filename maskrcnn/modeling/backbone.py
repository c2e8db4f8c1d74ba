"""ResNet / ResNeXt backbones with frozen BatchNorm, laid out like torchvision's classification models.

Module names follow torchvision's ``resnet*`` / ``resnext*`` classifiers (``conv1``, ``bn1``, ``layer1`` ..
``layer4``, blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/1``), so their ImageNet checkpoints
load with :func:`load_imagenet_checkpoint` (which drops ``fc.*`` and ``num_batches_tracked``). Blocks are
"ResNet v1.5": a bottleneck's stride sits on its 3x3 conv.

Feature maps (input ``N x 3 x H x W``; sizes are ``ceil`` divisions for odd inputs):

====== ======= ================================ ============================
name   stride  channels (bottleneck / basic)    module
====== ======= ================================ ============================
``c2`` 4       256 / 64                         ``layer1`` (res2)
``c3`` 8       512 / 128                        ``layer2`` (res3)
``c4`` 16      1024 / 256                       ``layer3`` (res4)
``c5`` 32      2048 / 512                       ``layer4`` (res5)
====== ======= ================================ ============================

C4 models: ``ResNet(..., return_stages=("c4",))`` builds only the stem and ``layer1..layer3``; the RoI head's
res5 comes from :func:`make_res5` (or :func:`make_stage`) and loads the checkpoint's ``layer4.*`` keys with
``load_imagenet_checkpoint(res5, sd, prefix="layer4.")``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "STAGE_NAMES",
    "BasicBlock",
    "Bottleneck",
    "FrozenBatchNorm2d",
    "ResNet",
    "load_imagenet_checkpoint",
    "make_norm",
    "make_res5",
    "make_stage",
    "resnet_spec",
]

STAGE_NAMES = ("c2", "c3", "c4", "c5")
_STAGE_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
_NORMS = ("frozen_bn", "bn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters: ``y = x * scale + shift`` per channel.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``. ``weight``,
    ``bias``, ``running_mean`` and ``running_var`` are buffers (never trained, not counted as parameters).
    ``forward`` hands the buffers to the eval-mode batch-norm kernel (the one ``BatchNorm2d`` calls), which
    computes exactly this scale and shift and applies them in one pass, so the output equals
    ``BatchNorm2d(...).eval()`` bit for bit (a hand-written ``x * scale + shift`` differs in the last bits:
    the CPU kernel uses ``rsqrt`` and fused multiply-adds). When the input requires grad, the kernel runs in
    an autograd function whose backward keeps only the scales (see ``_FrozenNorm``), not the input as
    autograd's batch-norm node would. ``num_batches_tracked`` in a loaded state dict is
    ignored, so checkpoints saved from a model with plain ``BatchNorm2d`` load. Input ``N x C x ...``
    (any memory format), output the same shape and format.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.fold = True  # fold into the preceding conv when autograd is off (see conv_norm)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)``, each of shape ``(C,)`` (e.g. to fold into a preceding conv)."""
        invstd = torch.rsqrt(self.running_var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        args = (x, self.running_mean, self.running_var, self.weight, self.bias)
        if x.requires_grad and torch.is_grad_enabled() and not _exporting():
            return _FrozenNorm.apply(*args, self.eps, self.scale_and_shift()[0])
        return F.batch_norm(*args, training=False, eps=self.eps)

    def folded_into(self, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` of a conv equal to ``self(conv(x))``; cached until either module changes."""
        tensors = (conv.weight, self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((t.data_ptr(), t._version) for t in tensors) + (conv.weight.dtype, conv.weight.device)
        cached = getattr(self, "_folded", None)
        if cached is None or cached[0] != key:
            scale, shift = self.scale_and_shift()
            weight = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            self._folded = cached = (key, weight.detach(), bias.detach().to(conv.weight.dtype))
        return cached[1], cached[2]


class _FrozenNorm(torch.autograd.Function):
    """The eval-mode batch-norm kernel forward (the same bits as ``BatchNorm2d.eval()``); backward
    ``grad * scale`` (:meth:`FrozenBatchNorm2d.scale_and_shift`'s scale). Autograd's own batch-norm node
    keeps the input for a weight gradient that frozen statistics never need: one activation per frozen
    norm, 0.8 GiB of a batch of two at 800 px (R-50-FPN, benchmarks/RESULTS.md). This one keeps the ``C``
    scales only."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, scale):
        ctx.save_for_backward(scale)
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        return grad * scale.to(grad.dtype).view(shape), None, None, None, None, None, None


def _exporting() -> bool:
    """Tracing or ONNX export: record the plain batch-norm op, not a Python autograd function."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. Without autograd a :class:`FrozenBatchNorm2d` with ``fold`` set is folded into the
    conv's weights (one pass instead of two; equal up to float rounding)."""
    if isinstance(norm, FrozenBatchNorm2d) and norm.fold and not torch.is_grad_enabled():
        weight, bias = norm.folded_into(conv)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return norm(conv(x))


def _shortcut(downsample: nn.Sequential | None, x: Tensor) -> Tensor:
    return x if downsample is None else conv_norm(downsample[0], downsample[1], x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(norm: str, num_channels: int) -> nn.Module:
    """``"frozen_bn"`` -> :class:`FrozenBatchNorm2d`, ``"bn"`` -> ``nn.BatchNorm2d``."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(num_channels)
    if norm == "bn":
        return nn.BatchNorm2d(num_channels)
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, groups=groups, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride), make_norm(norm, out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34): ``in_channels -> out_channels``, stride on ``conv1``."""

    expansion = 1

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = make_norm(norm, out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> 1x1 bottleneck (ResNet-50+ and ResNeXt), "v1.5" stride placement.

    The inner width is ``out_channels / 4 * width_per_group / 64 * groups`` (torchvision's rule), e.g. 64
    for ResNet-50's ``layer1`` and 256 for ResNeXt-101 32x8d's.
    """

    expansion = 4

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        width = int(out_channels // self.expansion * (width_per_group / 64.0)) * groups
        self.conv1 = _conv(in_channels, width, 1)
        self.bn1 = make_norm(norm, width)
        self.conv2 = _conv(width, width, 3, stride, groups)
        self.bn2 = make_norm(norm, width)
        self.conv3 = _conv(width, out_channels, 1)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = _shortcut(self.downsample, x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        out += identity
        return self.relu(out)


def make_stage(
    *,
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    out_channels: int,
    num_blocks: int,
    stride: int,
    groups: int = 1,
    width_per_group: int = 64,
    norm: str = "frozen_bn",
) -> nn.Sequential:
    """A ResNet stage: ``num_blocks`` blocks, the first with ``stride`` (and a projection shortcut).

    Its state-dict keys are ``{i}.conv1.weight`` ..., like one of torchvision's ``layerN`` modules.
    """
    blocks = []
    for i in range(num_blocks):
        blocks.append(
            block(
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                stride=stride if i == 0 else 1,
                groups=groups,
                width_per_group=width_per_group,
                norm=norm,
            )
        )
    return nn.Sequential(*blocks)


_DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

_SPECS: dict[str, dict[str, int]] = {
    "resnet18": {"depth": 18},
    "resnet34": {"depth": 34},
    "resnet50": {"depth": 50},
    "resnet101": {"depth": 101},
    "resnet152": {"depth": 152},
    "resnext50_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4},
    "resnext101_32x8d": {"depth": 101, "groups": 32, "width_per_group": 8},
    "resnext101_64x4d": {"depth": 101, "groups": 64, "width_per_group": 4},
}


def resnet_spec(name: str) -> dict[str, int]:
    """Constructor arguments for a named torchvision architecture: ``ResNet(**resnet_spec("resnet50"))``.

    Names: ``resnet18/34/50/101/152``, ``resnext50_32x4d``, ``resnext101_32x8d``, ``resnext101_64x4d``.
    Returns ``{"depth": ..., "groups": ..., "width_per_group": ...}``.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown ResNet {name!r}; known: {sorted(_SPECS)}")
    return {"groups": 1, "width_per_group": 64, **_SPECS[name]}


def _stage_channels(block: type[nn.Module], base_channels: int = 64) -> tuple[int, int, int, int]:
    """Output channels of res2..res5: ``base_channels * 2**i * expansion`` (64, 128, 256, 512 for R-18)."""
    e = block.expansion
    return tuple(base_channels * 2**i * e for i in range(4))  # type: ignore[return-value]


def _check_base_channels(base_channels: int) -> None:
    if not (isinstance(base_channels, int) and base_channels >= 8 and base_channels % 8 == 0):
        raise ValueError(f"base_channels must be a positive multiple of 8, got {base_channels!r}")


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ResNet/ResNeXt detection backbone (no ``avgpool``/``fc``).

    Args (keyword only):
        depth: 18, 34, 50, 101 or 152.
        groups, width_per_group: ResNeXt cardinality and per-group width (1 and 64 for plain ResNet).
        base_channels: the stem's output channels; stage ``i`` (0 = res2) outputs ``base_channels * 2**i *
            expansion`` and a bottleneck's inner width scales with it. 64 is every torchvision/ImageNet
            ResNet; 32 gives a half-width network (a quarter of the FLOPs) for training from scratch
            (detectron2's ``STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` set together).
        norm: ``"frozen_bn"`` (:class:`FrozenBatchNorm2d`, the detection default) or ``"bn"``.
        frozen_stages: 0 = nothing frozen; 1 = stem (``conv1``+``bn1``); 2 = stem + ``layer1`` (detectron2
            ``FREEZE_AT=2``, torchvision ``trainable_layers=3``); ... 5 = everything. Frozen parameters get
            ``requires_grad=False``; with ``norm="bn"`` their BatchNorms also stay in eval mode.
        return_stages: which of ``"c2".."c5"`` ``forward`` returns; stages past the last one requested are
            not built (``("c4",)`` gives the C4 backbone: stem + ``layer1..layer3``).

    ``forward(x)``: ``x`` is ``N x 3 x H x W``; returns an ``OrderedDict`` name -> ``N x C x H/s x W/s`` with
    ``C = out_channels[name]`` and ``s = strides[name]`` (sizes rounded up).
    """

    def __init__(
        self,
        *,
        depth: int,
        groups: int = 1,
        width_per_group: int = 64,
        base_channels: int = 64,
        norm: str = "frozen_bn",
        frozen_stages: int = 1,
        return_stages: Sequence[str] = STAGE_NAMES,
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        _check_base_channels(base_channels)
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in [0, 5], got {frozen_stages}")
        return_stages = tuple(return_stages)
        if not return_stages or any(s not in STAGE_NAMES for s in return_stages):
            raise ValueError(f"return_stages must be a non-empty subset of {STAGE_NAMES}: {return_stages}")
        self.return_stages = tuple(s for s in STAGE_NAMES if s in return_stages)
        self.depth, self.groups, self.width_per_group, self.norm = depth, groups, width_per_group, norm
        self.base_channels, self.frozen_stages = base_channels, frozen_stages

        block, num_blocks = _DEPTHS[depth]
        self.block = block
        self.conv1 = nn.Conv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        channels = _stage_channels(block, base_channels)
        self.num_stages = STAGE_NAMES.index(self.return_stages[-1]) + 1
        in_ch = base_channels
        for i in range(self.num_stages):
            stage = make_stage(
                block=block,
                in_channels=in_ch,
                out_channels=channels[i],
                num_blocks=num_blocks[i],
                stride=1 if i == 0 else 2,
                groups=groups,
                width_per_group=width_per_group,
                norm=norm,
            )
            self.add_module(f"layer{i + 1}", stage)
            in_ch = channels[i]

        self.out_channels: dict[str, int] = {s: channels[STAGE_NAMES.index(s)] for s in self.return_stages}
        self.strides: dict[str, int] = {s: _STAGE_STRIDES[s] for s in self.return_stages}

        _init_weights(self)
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 1:
            mods += [self.conv1, self.bn1]
        for i in range(1, min(self.frozen_stages, self.num_stages + 1)):
            mods.append(getattr(self, f"layer{i}"))
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Like ``nn.Module.train``, but BatchNorms of frozen stages stay in eval mode."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            name = STAGE_NAMES[i]
            if name in self.strides:
                out[name] = x
        return out


def make_res5(
    *,
    depth: int,
    groups: int = 1,
    width_per_group: int = 64,
    base_channels: int = 64,
    norm: str = "frozen_bn",
    stride: int = 2,
) -> nn.Sequential:
    """res5 (torchvision's ``layer4``) as a stand-alone stage for the C4 RoI head.

    Input ``R x C4 x 14 x 14`` RoI features (C4 = 1024, or 256 for ResNet-18/34); output
    ``R x C5 x 7 x 7`` with the default ``stride=2`` (C5 = 2048 or 512; both scale with
    ``base_channels / 64``, see :class:`ResNet`). Keys are ``{i}.conv1.weight`` ...;
    load ImageNet weights with ``load_imagenet_checkpoint(res5, sd, prefix="layer4.")``.
    """
    if depth not in _DEPTHS:
        raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth}")
    _check_base_channels(base_channels)
    block, num_blocks = _DEPTHS[depth]
    channels = _stage_channels(block, base_channels)
    res5 = make_stage(
        block=block,
        in_channels=channels[2],
        out_channels=channels[3],
        num_blocks=num_blocks[3],
        stride=stride,
        groups=groups,
        width_per_group=width_per_group,
        norm=norm,
    )
    _init_weights(res5)
    return res5


def load_imagenet_checkpoint(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    prefix: str = "",
    ignore: Iterable[str] = ("fc.",),
) -> None:
    """Load a torchvision ImageNet classifier checkpoint into a :class:`ResNet` (or a res5 stage), strictly.

    Keys starting with ``prefix`` are used with the prefix removed (others are ignored when a prefix is
    given); keys starting with any of ``ignore`` (default: the classifier's ``fc.*``) and all
    ``num_batches_tracked`` counters are dropped. Every other key must match the module's state dict in name
    and shape: otherwise a ``CheckpointError`` (a ``ValueError``) lists the missing, unexpected and
    wrongly-shaped keys and nothing is loaded. For a C4 backbone pass ``ignore=("fc.", "layer4.")`` and
    load res5 separately with ``prefix="layer4."``.
    """
    from maskrcnn.weights import load_state_dict_strict

    ignore = tuple(ignore)
    sd = {}
    for k, v in state_dict.items():
        if k.startswith(prefix) and not (ignore and k[len(prefix) :].startswith(ignore)):
            sd[k[len(prefix) :]] = v
    load_state_dict_strict(module, sd, source="ImageNet checkpoint")
