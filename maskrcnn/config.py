"""Configuration: one dataclass tree, named presets for the paper's variants, and ``KEY=VALUE`` overrides.

The config is read in one place, :func:`maskrcnn.modeling.build.build_model`; modules take explicit keyword
arguments. Label convention: ``num_classes`` counts the background, label 0 is background and labels
``1 .. num_classes - 1`` are object classes (torchvision's convention, so its 91-slot COCO weights load
as they are; the data loader maps dataset category ids to contiguous labels and back).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from dataclasses import dataclass, field

__all__ = [
    "ModelConfig",
    "BackboneConfig",
    "InputConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "DataConfig",
    "SolverConfig",
    "Config",
    "PRESETS",
    "get_config",
    "make_config",
    "load_config_file",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d
    kind: str = "fpn"  # "fpn" (P2-P6) or "c4" (res4 features, res5 as the RoI head)
    norm: str = "frozen_bn"  # "frozen_bn" or "bn"
    frozen_stages: int = 2  # 0: none, 1: stem, 2: stem + res2 (detectron2 FREEZE_AT=2), ... 5
    fpn_channels: int = 256


@dataclass
class InputConfig:
    min_size: tuple[int, ...] = (800,)  # training draws one per image; evaluation uses the last
    max_size: int = 1333
    size_divisible: int = 32
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB in [0, 1]
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class RPNConfig:
    anchor_sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    # "exact": strides from the backbone (4, 8, ..., 64); "torchvision": image_size // feature_size per
    # level as torchvision does (differs on P6 when the padded side / 32 is odd; needed for parity)
    anchor_stride_rule: str = "exact"
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 2000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class RoIHeadsConfig:
    pooler: str = "align"  # "align", "align_max", "pool", "warp_max", "warp_avg" (paper Table 2c)
    sampling_ratio: int = 2  # RoIAlign samples per bin and axis; <= 0: adaptive
    aligned: bool = False  # RoIAlign half-pixel alignment (see maskrcnn.ops.roi_align)
    box_pool_size: int = 7
    mask_pool_size: int = 14
    representation_size: int = 1024
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_loss: str = "smooth_l1"  # "smooth_l1" (beta below) or "l1"
    smooth_l1_beta: float = 1.0 / 9.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask: bool = True  # False: Faster R-CNN
    mask_head: str = "fcn"  # "fcn" (four 3x3 convs + deconv) or "mlp" (paper Table 2e)
    mask_head_channels: int = 256  # width of the FCN mask head's convs and deconv
    mask_loss: str = "sigmoid"  # "sigmoid" (per-class binary) or "softmax" (multinomial, Table 2b)
    class_agnostic_mask: bool = False


@dataclass
class ModelConfig:
    num_classes: int = 91  # including the background (label 0)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input: InputConfig = field(default_factory=InputConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)


@dataclass
class DataConfig:
    """COCO-format data: an images folder and an instances JSON per split."""

    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    filter_empty: bool = True  # drop training images that have no (non-crowd) annotation
    skip_bad_records: bool = False  # False: stop before training on the first broken record (listing all)
    horizontal_flip: float = 0.5  # probability, training only
    num_workers: int = 2


@dataclass
class SolverConfig:
    """SGD schedule. The learning rate is ``base_lr * ims_per_batch / reference_batch`` (linear scaling rule:
    ``base_lr`` is the rate for a batch of ``reference_batch`` images, 0.02 for 16 as in the paper)."""

    ims_per_batch: int = 16  # total over all processes
    base_lr: float = 0.02
    reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 90000
    schedule: str = "step"  # "step" (gamma at each of steps) or "cosine" (to 0 at max_iter)
    steps: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001  # linear warmup from base_lr * warmup_factor
    clip_grad_norm: float = 0.0  # 0: no clipping
    amp: str = "off"  # "off", "bfloat16" or "float16" (CUDA only)

    @property
    def lr(self) -> float:
        return self.base_lr * self.ims_per_batch / self.reference_batch


@dataclass
class Config:
    """Everything a run needs: the model, the data, the solver, and where to write."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    output_dir: str = "runs/default"
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
    seed: int = 0
    checkpoint_period: int = 1000  # iterations
    keep_checkpoints: int = 3  # periodic checkpoints kept (the final one is always kept; <= 0 keeps all)
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate at the end only
    init_backbone: str = ""  # torchvision ImageNet classification checkpoint file for the backbone
    init_weights: str = ""  # a COCO-trained checkpoint (ours or torchvision's) to fine-tune from


def _fpn(name: str, **roi) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name=name, kind="fpn"), roi_heads=RoIHeadsConfig(**roi))


def _c4(name: str) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name=name, kind="c4"),
        rpn=RPNConfig(
            anchor_sizes=((32, 64, 128, 256, 512),),
            pre_nms_topk_train=12000,
            pre_nms_topk_test=6000,
            post_nms_topk_train=2000,
            post_nms_topk_test=1000,
        ),
        roi_heads=RoIHeadsConfig(box_pool_size=14, mask_pool_size=14, batch_size_per_image=64),
    )


def _small() -> ModelConfig:
    cfg = _fpn("resnet18")
    cfg.backbone.fpn_channels = 128
    cfg.input.min_size = (320, 352, 384, 416)
    cfg.input.max_size = 512
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 1000, 500
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 500, 300
    cfg.roi_heads.batch_size_per_image = 128
    cfg.roi_heads.representation_size = 256
    return cfg


def _torchvision() -> ModelConfig:
    cfg = _fpn("resnet50")
    cfg.backbone.frozen_stages = 2  # torchvision's trainable_backbone_layers=3
    cfg.rpn.anchor_stride_rule = "torchvision"
    return cfg


def _faster() -> ModelConfig:
    cfg = _fpn("resnet50")
    cfg.roi_heads.mask = False
    return cfg


PRESETS = {
    "R-50-C4": lambda: _c4("resnet50"),
    "R-101-C4": lambda: _c4("resnet101"),
    "R-50-FPN": lambda: _fpn("resnet50"),
    "R-101-FPN": lambda: _fpn("resnet101"),
    "X-101-FPN": lambda: _fpn("resnext101_32x8d"),
    "faster-R-50-FPN": _faster,
    "tv-R-50-FPN": _torchvision,  # torchvision's maskrcnn_resnet50_fpn, weight- and output-compatible
    "R-18-FPN-small": _small,  # trains on a CPU
}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a named model preset."""
    if name not in PRESETS:
        raise KeyError(f"unknown configuration {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def make_config(model: str | ModelConfig = "R-50-FPN", **sections) -> Config:
    """A run :class:`Config` around a model preset (or config); ``sections`` set top-level fields."""
    cfg = Config(model=get_config(model) if isinstance(model, str) else copy.deepcopy(model))
    for key, value in sections.items():
        if not hasattr(cfg, key):
            raise KeyError(f"unknown config key {key!r}")
        setattr(cfg, key, value)
    return cfg


def load_config_file(path: str) -> Config:
    """A YAML run config: an optional ``preset:`` (model preset name), then any nested keys of
    :class:`Config` (``model:``, ``data:``, ``solver:``, ``output_dir:`` ...). Unknown keys raise."""
    import yaml

    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    preset = data.pop("preset", None)
    base = make_config(preset) if preset else Config()
    try:
        return config_from_dict(data, base)
    except (KeyError, ValueError) as e:
        raise type(e)(f"{path}: {e.args[0]}") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value, like, key: str):
    """Convert ``value`` to the type of the default ``like`` (tuples stay tuples, nested too)."""
    if isinstance(like, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{key}: expected a boolean, got {value!r}")
        return bool(value)
    if isinstance(like, tuple):
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if not isinstance(value, (list, tuple)):
            value = (value,)
        inner = like[0] if like else None
        return tuple(_coerce(v, inner, key) if inner is not None else v for v in value)
    if isinstance(like, (int, float)) and isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{key}: expected a number, got {value!r}") from e
    if isinstance(like, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(like, int) and isinstance(value, int):
        return int(value)
    if like is not None and not isinstance(value, type(like)):
        raise ValueError(f"{key}: expected {type(like).__name__}, got {value!r}")
    return value


def config_from_dict(data: dict, base=None, *, prefix: str = ""):
    """Apply a nested dict onto ``base`` (a config dataclass; default ``ModelConfig()``); unknown keys raise
    ``KeyError`` naming the key and the valid ones."""
    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    _apply_dict(cfg, data, prefix)
    return cfg


def _apply_dict(node, data: dict, prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(node)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise KeyError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: expected a mapping of sub-keys, got {value!r}")
            _apply_dict(current, value, path + ".")
        else:
            setattr(node, key, _coerce(value, current, path))


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``KEY=VALUE`` strings (dotted keys, e.g. ``roi_heads.aligned=true``) to a copy of ``cfg``."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict = {}
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value.strip()
        _apply_dict(cfg, nested, "")
    return cfg
