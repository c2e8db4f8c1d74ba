"""Configuration: one dataclass tree, named presets for the paper's variants, and ``KEY=VALUE`` overrides.

The config is read in one place, :func:`maskrcnn.modeling.build.build_model`; modules take explicit keyword
arguments. Every value is checked in one place too, :func:`validate_config`, which :func:`make_config`,
:func:`load_config_file`, :func:`config_from_dict` and :func:`apply_overrides` run on what they return: a
wrong key or value raises :class:`ConfigError` (a ``ValueError``) naming the dotted key, the value and what
is expected. Label convention: ``num_classes`` counts the background, label 0 is background and labels
``1 .. num_classes - 1`` are object classes (torchvision's convention, so its 91-slot COCO weights load
as they are; the data loader maps dataset category ids to contiguous labels and back).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

__all__ = [
    "ConfigError",
    "ModelConfig",
    "BackboneConfig",
    "InputConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "DataConfig",
    "SolverConfig",
    "Config",
    "PRESETS",
    "TEST_TIME_KEYS",
    "box_head_kind",
    "get_config",
    "make_config",
    "load_config_file",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration key or value that is wrong; the message names the dotted key and what is expected."""


class UnknownKeyError(ConfigError, KeyError):
    """An unknown configuration key or preset name (also a ``KeyError``)."""

    __str__ = ValueError.__str__  # the message as it is, not quoted as KeyError does


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d
    # "fpn" (P2-P6), "c4" (one stride-16 res4 map; res5 as the RoI head unless roi_heads.box_head='mlp') or
    # "c5" (one stride-32 res5 map, Table 2d)
    kind: str = "fpn"
    norm: str = "frozen_bn"  # "frozen_bn" or "bn"
    frozen_stages: int = 2  # 0: none, 1: stem, 2: stem + res2 (detectron2 FREEZE_AT=2), ... 5
    fpn_channels: int = 256
    # the stem's channels; res2..res5 output base_channels * 2**i (x4 for bottlenecks). 64 = every ImageNet
    # ResNet; 32 = half width, a quarter of the FLOPs, for training from scratch (no pretrained weights fit)
    base_channels: int = 64


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
    # the box head after the pooler: "mlp" (two fc layers of representation_size), "res5" (the C4 model's
    # res5 stage on each 14x14 RoI, paper Fig. 4 left; backbone.kind='c4' only) or "auto" (res5 for c4, mlp
    # otherwise). A C4 body with the mlp head pools res4 at stride 16 for every head (Table 2c's ablation)
    box_head: str = "auto"
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
    # the keypoint branch (paper section 5; torchvision's keypointrcnn): one 56x56 heatmap per keypoint,
    # pooled with roi_heads.pooler (RoIAlign, or RoIPool for Table 6's ablation)
    keypoint: bool = False
    num_keypoints: int = 17  # K: COCO person's 17
    keypoint_pool_size: int = 14
    keypoint_head_channels: tuple[int, ...] = (512,) * 8  # the 3x3 convs before the deconvolution


@dataclass
class ModelConfig:
    num_classes: int = 91  # including the background (label 0)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    input: InputConfig = field(default_factory=InputConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)


#: Model keys that change only how a trained model runs, not what its weights mean (detectron2's ``*_TEST``
#: settings): ``maskrcnn eval`` (and predict and serve, after ``--set``) applies them to a checkpoint's own
#: config (``weights.apply_test_settings``); other model keys are refused there. A new key that only affects
#: inference belongs here.
TEST_TIME_KEYS = (
    "model.input.min_size",
    "model.input.max_size",
    "model.rpn.pre_nms_topk_test",
    "model.rpn.post_nms_topk_test",
    "model.rpn.nms_thresh",
    "model.roi_heads.score_thresh",
    "model.roi_heads.nms_thresh",
    "model.roi_heads.detections_per_img",
)


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
    # training images with fewer labelled keypoints in all are dropped (0: keep all; torchvision's keypoint
    # reference uses 10, detectron2 1); only for data that declares keypoints
    min_keypoints_per_image: int = 0
    num_workers: int = 2
    # OKS sigmas of keypoint evaluation, one per keypoint; empty: COCO's (the data set must then have COCO's
    # 17 person keypoints; any other keypoint count without sigmas stops the evaluation, naming this key)
    keypoint_oks_sigmas: tuple[float, ...] = ()


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
    log_period: int = 20  # iterations between metrics.jsonl records (and log lines without a terminal)
    tensorboard: bool = True  # TensorBoard event files in output_dir (when tensorboard is installed)
    eval_period: int = 0  # 0: evaluate at the end only
    init_backbone: str = ""  # torchvision ImageNet classification checkpoint file for the backbone
    init_weights: str = ""  # a COCO-trained checkpoint (ours or torchvision's) to fine-tune from


def _fpn(name: str, **roi) -> ModelConfig:
    return ModelConfig(backbone=BackboneConfig(name=name, kind="fpn"), roi_heads=RoIHeadsConfig(**roi))


def box_head_kind(model: ModelConfig) -> str:
    """The box head ``model`` builds: ``"res5"`` or ``"mlp"`` (``roi_heads.box_head`` with ``"auto"``
    resolved: res5 for the C4 form, mlp otherwise)."""
    head = model.roi_heads.box_head
    if head == "auto":
        return "res5" if model.backbone.kind == "c4" else "mlp"
    return head


def _c4(name: str) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name=name, kind="c4"),
        rpn=_single_level_rpn(),
        roi_heads=RoIHeadsConfig(box_pool_size=14, mask_pool_size=14, batch_size_per_image=64),
    )


def _c5(name: str) -> ModelConfig:
    """The paper's R-50-C5 of Table 2d: RPN and RoI heads on the one stride-32 res5 map; the FPN model's
    MLP box head and FCN mask head (7x7 and 14x14 RoIs), detectron's C5 settings for the RPN."""
    return ModelConfig(backbone=BackboneConfig(name=name, kind="c5"), rpn=_single_level_rpn())


def _single_level_rpn() -> RPNConfig:
    """Detectron's RPN on one feature map: all five anchor sizes at each position, larger top-k."""
    return RPNConfig(
        anchor_sizes=((32, 64, 128, 256, 512),),
        pre_nms_topk_train=12000,
        pre_nms_topk_test=6000,
        post_nms_topk_train=2000,
        post_nms_topk_test=1000,
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


def _keypoint(*, mask: bool, torchvision: bool = False) -> ModelConfig:
    """Person keypoints (background + person), R-50-FPN; training draws the short side from 640-800 as in
    the paper and torchvision (evaluation at 800)."""
    cfg = _torchvision() if torchvision else _fpn("resnet50")
    cfg.num_classes = 2
    cfg.input.min_size = (640, 672, 704, 736, 768, 800)
    cfg.roi_heads.mask = mask
    cfg.roi_heads.keypoint = True
    return cfg


def _faster() -> ModelConfig:
    cfg = _fpn("resnet50")
    cfg.roi_heads.mask = False
    return cfg


PRESETS = {
    "R-50-C4": lambda: _c4("resnet50"),
    "R-101-C4": lambda: _c4("resnet101"),
    "R-50-C5": lambda: _c5("resnet50"),  # paper Table 2d (stride 32, one level)
    "R-50-FPN": lambda: _fpn("resnet50"),
    "R-101-FPN": lambda: _fpn("resnet101"),
    "X-101-FPN": lambda: _fpn("resnext101_32x8d"),
    "faster-R-50-FPN": _faster,
    "tv-R-50-FPN": _torchvision,  # torchvision's maskrcnn_resnet50_fpn, weight- and output-compatible
    "R-18-FPN-small": _small,  # trains on a CPU
    "keypoint-R-50-FPN": lambda: _keypoint(mask=False),  # paper Table 4 (keypoint only)
    "keypoint-mask-R-50-FPN": lambda: _keypoint(mask=True),  # paper Table 5 (keypoint & mask jointly)
    # torchvision's keypointrcnn_resnet50_fpn, weight- and output-compatible
    "tv-keypoint-R-50-FPN": lambda: _keypoint(mask=False, torchvision=True),
}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a named model preset."""
    if name not in PRESETS:
        raise UnknownKeyError(f"unknown configuration {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def make_config(model: str | ModelConfig = "R-50-FPN", **sections) -> Config:
    """A run :class:`Config` around a model preset (or config); ``sections`` set top-level fields."""
    cfg = Config(model=get_config(model) if isinstance(model, str) else copy.deepcopy(model))
    for key, value in sections.items():
        if not hasattr(cfg, key):
            raise UnknownKeyError(f"unknown config key {key!r}")
        setattr(cfg, key, value)
    return validate_config(cfg)


def load_config_file(path: str) -> Config:
    """A YAML run config: an optional ``preset:`` (model preset name), then any nested keys of
    :class:`Config` (``model:``, ``data:``, ``solver:``, ``output_dir:`` ...). Unknown keys and bad values
    raise :class:`ConfigError` naming the file and the key; a missing file ``FileNotFoundError``."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"config {path} is a folder, not a YAML file")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text (YAML) file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    preset = data.pop("preset", None)
    try:
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"preset={preset!r}: expected a preset name ({', '.join(sorted(PRESETS))})")
        base = make_config(preset) if preset else Config()
        return config_from_dict(data, base)
    except ConfigError as e:
        raise type(e)(f"{path}: {e.args[0]}") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _default(f: dataclasses.Field):
    """A field's declared default: the template for converting values (its type, its items' type)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _parse(text: str, key: str, expected: str):
    """A Python literal typed on the command line (``(800,)``, ``[1, 2]``, ``0.01``) or a clear error."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(f"{key}={text}: cannot read the value: expected {expected}") from None


def _coerce(value, like, key: str):
    """Convert ``value`` (a string from the command line, or a YAML / Python value) to the type of the
    default ``like``: tuples stay tuples, nested too; ints stay ints; floats accept ints."""
    if isinstance(like, bool):
        if isinstance(value, str):
            if value.strip().lower() in ("true", "1", "yes"):
                return True
            if value.strip().lower() in ("false", "0", "no"):
                return False
        elif isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ConfigError(f"{key}={value}: expected a boolean (true or false)")
    if isinstance(like, tuple):
        example = repr(like) if like else "(1, 2)"
        if isinstance(value, str):
            value = _parse(value, key, f"a tuple such as {example}")
        if not isinstance(value, (list, tuple)):
            value = (value,)
        inner = like[0] if like else None
        try:
            return tuple(_coerce(v, inner, key) if inner is not None else v for v in value)
        except ConfigError:
            raise ConfigError(f"{key}={value!r}: expected a tuple such as {example}") from None
    if isinstance(like, (int, float)):
        kind = "an integer" if isinstance(like, int) else "a number"
        if isinstance(value, str):
            value = _parse(value, key, kind)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {kind}")
        if isinstance(like, float):
            return float(value)
        if isinstance(value, float):
            raise ConfigError(f"{key}={value!r}: expected {kind}")
        return value
    if isinstance(like, str) and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected a string")
    return value


def config_from_dict(data: dict, base=None, *, prefix: str = ""):
    """Apply a nested dict onto ``base`` (a config dataclass; default ``ModelConfig()``) and validate the
    result; unknown keys raise :class:`UnknownKeyError` (a ``KeyError`` too) naming the key and the valid
    ones, bad values :class:`ConfigError`."""
    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    _apply_dict(cfg, data, prefix)
    return validate_config(cfg, prefix=prefix)


def _apply_dict(node, data: dict, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(node)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            near = [f"{prefix}{k}" for k in _find_key(node, key)]
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            raise UnknownKeyError(
                f"unknown config key {path!r}{hint} (valid keys here: {', '.join(sorted(fields))})"
            )
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{path} is a section, not a value: set its keys ({path}.KEY=VALUE), got {value!r}"
                )
            _apply_dict(current, value, path + ".")
        elif isinstance(value, dict):
            raise ConfigError(f"{path} is a value, not a section: got {value!r}")
        else:
            setattr(node, key, _coerce(value, _default(fields[key]), path))


def _find_key(node, name: str, prefix: str = "") -> list[str]:
    """Dotted paths of the keys called ``name`` below ``node`` (for "did you mean" hints)."""
    found = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found += _find_key(value, name, f"{prefix}{f.name}.")
        elif f.name == name and prefix:
            found.append(prefix + f.name)
    return found


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``KEY=VALUE`` strings (dotted keys, e.g. ``roi_heads.aligned=true``) to a copy of ``cfg`` and
    validate the result. VALUE is a Python literal for numbers and tuples (``(640, 800)``), text otherwise."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. solver.base_lr=0.01)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict = {}
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value.strip()
        _apply_dict(cfg, nested, "")
    return validate_config(cfg)


# ------------------------------------------------------------------------------------------------
# Validation: one rule per key, then the rules that tie keys together
# ------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _seq(v, item, n=None, nonempty=False) -> bool:
    return (
        isinstance(v, (tuple, list))
        and (n is None or len(v) == n)
        and (not nonempty or len(v) > 0)
        and all(item(x) for x in v)
    )


def _one_of(choices):
    def check(v):
        return isinstance(v, str) and v in choices()

    return check, lambda: "one of " + ", ".join(repr(c) for c in choices())


def _backbones():
    from maskrcnn.modeling.backbone import _SPECS

    return tuple(sorted(_SPECS))


def _poolers():
    from maskrcnn.modeling.poolers import POOLER_KINDS

    return POOLER_KINDS


def _box_losses():
    from maskrcnn.modeling.losses import BOX_LOSSES

    return BOX_LOSSES


def _mask_losses():
    from maskrcnn.modeling.losses import MASK_LOSSES

    return MASK_LOSSES


def _amp_modes():
    from maskrcnn.engine.train import AMP_MODES

    return tuple(AMP_MODES)


def _schedules():
    from maskrcnn.engine.schedule import SCHEDULES

    return SCHEDULES


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_POS_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
_NONNEG_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_INT = (_is_int, "an integer")
_POS_NUM = (lambda v: _is_num(v) and v > 0, "a positive number")
_NONNEG_NUM = (lambda v: _is_num(v) and v >= 0, "a number >= 0")
_UNIT = (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_PATH = (lambda v: isinstance(v, str), "a path (text; empty for none)")

# field name -> (check, what is expected); every field of every config dataclass has one
_RULES: dict[type, dict] = {
    BackboneConfig: {
        "name": _one_of(_backbones),
        "kind": _one_of(lambda: ("fpn", "c4", "c5")),
        "norm": _one_of(lambda: ("frozen_bn", "bn")),
        "frozen_stages": (lambda v: _is_int(v) and 0 <= v <= 5, "an integer in [0, 5]"),
        "fpn_channels": _POS_INT,
        "base_channels": (lambda v: _is_int(v) and v >= 8 and v % 8 == 0, "a positive multiple of 8 (64)"),
    },
    InputConfig: {
        "min_size": (
            lambda v: _seq(v, lambda x: _is_int(x) and x > 0, nonempty=True),
            "a non-empty tuple of positive integers, e.g. (800,) or (640, 672, 704)",
        ),
        "max_size": _POS_INT,
        "size_divisible": _POS_INT,
        "pixel_mean": (lambda v: _seq(v, _is_num, n=3), "3 numbers (R, G, B in [0, 1] units)"),
        "pixel_std": (
            lambda v: _seq(v, lambda x: _is_num(x) and x > 0, n=3),
            "3 positive numbers (R, G, B in [0, 1] units)",
        ),
    },
    RPNConfig: {
        "anchor_sizes": (
            lambda v: (
                _seq(v, lambda lv: _seq(lv, lambda x: _is_num(x) and x > 0, nonempty=True), nonempty=True)
                and len({len(lv) for lv in v}) == 1
            ),
            "one non-empty tuple of positive sizes per feature level, all of the same length, "
            "e.g. ((32,), (64,), (128,), (256,), (512,))",
        ),
        "aspect_ratios": (
            lambda v: _seq(v, lambda x: _is_num(x) and x > 0, nonempty=True),
            "a non-empty tuple of positive numbers (h / w)",
        ),
        "anchor_stride_rule": _one_of(lambda: ("exact", "torchvision")),
        "pre_nms_topk_train": _POS_INT,
        "pre_nms_topk_test": _POS_INT,
        "post_nms_topk_train": _POS_INT,
        "post_nms_topk_test": _POS_INT,
        "nms_thresh": _UNIT,
        "fg_iou_thresh": _UNIT,
        "bg_iou_thresh": _UNIT,
        "batch_size_per_image": _POS_INT,
        "positive_fraction": _UNIT,
    },
    RoIHeadsConfig: {
        "pooler": _one_of(_poolers),
        "sampling_ratio": (_is_int, "an integer (<= 0: adaptive)"),
        "aligned": _BOOL,
        "box_pool_size": _POS_INT,
        "mask_pool_size": _POS_INT,
        "representation_size": _POS_INT,
        "batch_size_per_image": _POS_INT,
        "positive_fraction": _UNIT,
        "fg_iou_thresh": _UNIT,
        "bg_iou_thresh": _UNIT,
        "box_reg_weights": (
            lambda v: _seq(v, lambda x: _is_num(x) and x > 0, n=4),
            "4 positive numbers (x, y, w, h)",
        ),
        "box_loss": _one_of(_box_losses),
        "smooth_l1_beta": _NONNEG_NUM,
        "score_thresh": _UNIT,
        "nms_thresh": _UNIT,
        "detections_per_img": _POS_INT,
        "mask": _BOOL,
        "box_head": _one_of(lambda: ("auto", "mlp", "res5")),
        "mask_head": _one_of(lambda: ("fcn", "mlp")),
        "mask_head_channels": _POS_INT,
        "mask_loss": _one_of(_mask_losses),
        "class_agnostic_mask": _BOOL,
        "keypoint": _BOOL,
        "num_keypoints": _POS_INT,
        "keypoint_pool_size": _POS_INT,
        "keypoint_head_channels": (
            lambda v: _seq(v, lambda x: _is_int(x) and x > 0, nonempty=True),
            "a non-empty tuple of positive channel counts, e.g. (512,) * 8",
        ),
    },
    ModelConfig: {
        "num_classes": (
            lambda v: _is_int(v) and v >= 2,
            "an integer >= 2 (it counts the background: object classes + 1)",
        ),
    },
    DataConfig: {
        "train_images": _PATH,
        "train_annotations": _PATH,
        "val_images": _PATH,
        "val_annotations": _PATH,
        "filter_empty": _BOOL,
        "skip_bad_records": _BOOL,
        "horizontal_flip": (lambda v: _is_num(v) and 0 <= v <= 1, "a probability in [0, 1]"),
        "min_keypoints_per_image": _NONNEG_INT,
        "num_workers": _NONNEG_INT,
        "keypoint_oks_sigmas": (
            lambda v: _seq(v, lambda x: _is_num(x) and x > 0),
            "a tuple of positive numbers, one per keypoint, or () for COCO's 17 person keypoints",
        ),
    },
    SolverConfig: {
        "ims_per_batch": _POS_INT,
        "base_lr": _POS_NUM,
        "reference_batch": _POS_INT,
        "momentum": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "weight_decay": _NONNEG_NUM,
        "max_iter": _NONNEG_INT,
        "schedule": _one_of(_schedules),
        "steps": (
            lambda v: _seq(v, lambda x: _is_int(x) and x >= 0),
            "a tuple of iterations >= 0, e.g. (60000, 80000) or ()",
        ),
        "gamma": _POS_NUM,
        "warmup_iters": _NONNEG_INT,
        "warmup_factor": _UNIT,
        "clip_grad_norm": (_NONNEG_NUM[0], "a number >= 0 (0: no clipping)"),
        "amp": _one_of(_amp_modes),
    },
    Config: {
        "output_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a folder path"),
        "device": (
            lambda v: isinstance(v, str) and bool(_DEVICE.match(v)),
            "'auto', 'cpu', 'cuda', 'cuda:K' or 'mps'",
        ),
        "seed": _INT,
        "checkpoint_period": (_NONNEG_INT[0], "an integer >= 0 (iterations; 0: final checkpoint only)"),
        "keep_checkpoints": (_INT[0], "an integer (<= 0 keeps all)"),
        "log_period": _POS_INT,
        "tensorboard": _BOOL,
        "eval_period": (_NONNEG_INT[0], "an integer >= 0 (iterations; 0: at the end only)"),
        "init_backbone": _PATH,
        "init_weights": _PATH,
    },
}


def _fail(key: str, value, expected: str):
    raise ConfigError(f"{key}={value!r}: expected {expected}")


def validate_config(cfg, *, prefix: str = ""):
    """Check every value of ``cfg`` (a :class:`Config`, :class:`ModelConfig` or one of their sections) and
    the rules that tie keys together; returns ``cfg``. Raises :class:`ConfigError` naming the first wrong
    dotted key (``prefix`` + the key's path in ``cfg``), its value and what is expected."""
    _validate_node(cfg, prefix)
    model = cfg.model if isinstance(cfg, Config) else cfg
    mp = prefix + ("model." if isinstance(cfg, Config) else "")
    if isinstance(model, ModelConfig):
        _validate_model(model, mp)
    if isinstance(cfg, (Config, SolverConfig)):
        solver = cfg.solver if isinstance(cfg, Config) else cfg
        sp = prefix + ("solver." if isinstance(cfg, Config) else "")
        if solver.schedule == "cosine" and solver.max_iter == 0:
            _fail(sp + "max_iter", 0, "a positive number of iterations with solver.schedule='cosine'")
    return cfg


def _validate_node(node, prefix: str) -> None:
    rules = _RULES[type(node)]
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(_default(f)):
            if type(value) is not type(_default(f)):
                _fail(key, value, f"a {type(_default(f)).__name__} (set its keys: {key}.KEY=VALUE)")
            _validate_node(value, key + ".")
            continue
        check, expected = rules[f.name]
        if not check(value):
            _fail(key, value, expected() if callable(expected) else expected)


def _validate_model(m: ModelConfig, prefix: str) -> None:
    for section in ("rpn", "roi_heads"):
        node = getattr(m, section)
        if node.bg_iou_thresh > node.fg_iou_thresh:
            _fail(
                f"{prefix}{section}.bg_iou_thresh",
                node.bg_iou_thresh,
                f"a number <= {prefix}{section}.fg_iou_thresh ({node.fg_iou_thresh})",
            )
    levels = {"fpn": 5, "c4": 1, "c5": 1}[m.backbone.kind]
    if len(m.rpn.anchor_sizes) != levels:
        _fail(
            f"{prefix}rpn.anchor_sizes",
            m.rpn.anchor_sizes,
            f"{levels} level(s) for {prefix}backbone.kind={m.backbone.kind!r}",
        )
    hc = m.roi_heads
    if hc.box_head == "res5" and m.backbone.kind != "c4":
        _fail(
            f"{prefix}roi_heads.box_head",
            hc.box_head,
            f"'mlp' or 'auto' with backbone.kind={m.backbone.kind!r}",
        )
    if hc.mask and box_head_kind(m) == "res5" and hc.mask_head != "fcn":
        _fail(f"{prefix}roi_heads.mask_head", hc.mask_head, "'fcn' with the res5 box head (C4)")
    if hc.keypoint and m.backbone.kind != "fpn":
        _fail(
            f"{prefix}roi_heads.keypoint",
            True,
            f"false with backbone.kind={m.backbone.kind!r} (keypoints need an FPN)",
        )
    if hc.mask_loss == "softmax" and hc.class_agnostic_mask:
        _fail(
            f"{prefix}roi_heads.class_agnostic_mask",
            True,
            "false with roi_heads.mask_loss='softmax' (it needs a mask per class)",
        )
