"""The config tree: presets, YAML and KEY=VALUE overrides, and value validation with the key named."""

import dataclasses

import pytest

from maskrcnn import config as C
from maskrcnn.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    box_head_kind,
    config_from_dict,
    get_config,
    load_config_file,
    make_config,
    validate_config,
)


def test_every_preset_and_default_is_valid():
    for name in PRESETS:
        validate_config(make_config(name))
        validate_config(get_config(name))
    validate_config(Config())


def test_every_key_of_every_config_dataclass_has_a_rule():
    def walk(cls):
        rules = C._RULES[cls]
        for f in dataclasses.fields(cls):
            default = C._default(f)
            if dataclasses.is_dataclass(default):
                walk(type(default))
            else:
                assert f.name in rules, f"{cls.__name__}.{f.name} has no validation rule"

    walk(Config)


@pytest.mark.parametrize(
    "override, named",
    [
        ("solver.base_lr=-0.1", "solver.base_lr=-0.1: expected a positive number"),
        ("solver.base_lr=0", "solver.base_lr=0.0: expected a positive number"),
        ("solver.ims_per_batch=0", "solver.ims_per_batch=0: expected a positive integer"),
        ("solver.reference_batch=-16", "solver.reference_batch"),
        ("solver.max_iter=-1", "solver.max_iter=-1"),
        ("solver.steps=(-5,)", "solver.steps"),
        ("solver.warmup_iters=-1", "solver.warmup_iters"),
        ("solver.warmup_factor=2", "solver.warmup_factor"),
        ("solver.momentum=1.5", "solver.momentum"),
        ("solver.weight_decay=-1e-4", "solver.weight_decay"),
        ("solver.gamma=0", "solver.gamma"),
        ("solver.clip_grad_norm=-1", "solver.clip_grad_norm"),
        ("solver.schedule=linear", "solver.schedule='linear': expected one of 'step', 'cosine'"),
        ("solver.amp=fp16", "solver.amp='fp16'"),
        ("model.input.min_size=[-5]", "model.input.min_size=(-5,): expected a non-empty tuple of positive"),
        ("model.input.min_size=()", "model.input.min_size=()"),
        ("model.input.min_size=(800.5,)", "model.input.min_size"),
        ("model.input.max_size=0", "model.input.max_size=0"),
        ("model.input.size_divisible=0", "model.input.size_divisible"),
        ("model.input.pixel_mean=[0.5]", "model.input.pixel_mean=(0.5,): expected 3 numbers"),
        ("model.input.pixel_std=(0.2, 0.2, 0)", "model.input.pixel_std"),
        ("model.num_classes=1", "model.num_classes=1: expected an integer >= 2"),
        ("model.backbone.name=resnet51", "model.backbone.name='resnet51'"),
        ("model.backbone.kind=c5", "model.backbone.kind"),
        ("model.backbone.norm=gn", "model.backbone.norm"),
        ("model.backbone.frozen_stages=6", "model.backbone.frozen_stages"),
        ("model.backbone.fpn_channels=0", "model.backbone.fpn_channels"),
        ("model.backbone.base_channels=12", "model.backbone.base_channels=12: expected a positive multiple"),
        ("model.rpn.nms_thresh=1.5", "model.rpn.nms_thresh=1.5: expected a number in [0, 1]"),
        ("model.rpn.fg_iou_thresh=-0.1", "model.rpn.fg_iou_thresh"),
        ("model.rpn.bg_iou_thresh=0.8", "model.rpn.bg_iou_thresh=0.8: expected a number <= model.rpn"),
        ("model.rpn.positive_fraction=2", "model.rpn.positive_fraction"),
        ("model.rpn.pre_nms_topk_test=0", "model.rpn.pre_nms_topk_test"),
        ("model.rpn.batch_size_per_image=0", "model.rpn.batch_size_per_image"),
        ("model.rpn.aspect_ratios=(0,)", "model.rpn.aspect_ratios"),
        ("model.rpn.anchor_sizes=((32,),)", "model.rpn.anchor_sizes"),
        ("model.rpn.anchor_stride_rule=tv", "model.rpn.anchor_stride_rule"),
        ("model.roi_heads.score_thresh=5", "model.roi_heads.score_thresh=5.0: expected a number in [0, 1]"),
        ("model.roi_heads.nms_thresh=-1", "model.roi_heads.nms_thresh"),
        ("model.roi_heads.pooler=roi", "model.roi_heads.pooler='roi'"),
        ("model.roi_heads.box_loss=l2", "model.roi_heads.box_loss"),
        ("model.roi_heads.mask_loss=dice", "model.roi_heads.mask_loss"),
        ("model.roi_heads.mask_head=unet", "model.roi_heads.mask_head"),
        ("model.roi_heads.detections_per_img=0", "model.roi_heads.detections_per_img"),
        ("model.roi_heads.box_reg_weights=(1, 1)", "model.roi_heads.box_reg_weights"),
        ("model.roi_heads.smooth_l1_beta=-1", "model.roi_heads.smooth_l1_beta"),
        ("model.roi_heads.box_pool_size=0", "model.roi_heads.box_pool_size"),
        ("data.horizontal_flip=1.5", "data.horizontal_flip"),
        ("data.num_workers=-1", "data.num_workers"),
        ("log_period=0", "log_period=0"),
        ("checkpoint_period=-1", "checkpoint_period"),
        ("eval_period=-1", "eval_period"),
        ("output_dir=", "output_dir=''"),
        ("device=gpu", "device='gpu': expected 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_expected(override, named):
    with pytest.raises(ConfigError) as err:
        apply_overrides(make_config("R-50-FPN"), [override])
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)


def test_keys_that_depend_on_each_other():
    cfg = make_config("R-50-FPN")
    with pytest.raises(ConfigError, match="model.rpn.anchor_sizes.*1 level"):
        apply_overrides(cfg, ["model.backbone.kind=c4"])
    c4 = apply_overrides(make_config("R-50-C4"), ["model.backbone.kind=c4"])
    with pytest.raises(ConfigError, match="model.roi_heads.mask_head='mlp'"):
        apply_overrides(c4, ["model.roi_heads.mask_head=mlp"])
    with pytest.raises(ConfigError, match="model.roi_heads.box_head='res5'.*backbone.kind='fpn'"):
        apply_overrides(cfg, ["model.roi_heads.box_head=res5"])
    # the C4 body with the MLP box head pools res4 for the mask head too: any mask head
    c4_mlp = apply_overrides(c4, ["model.roi_heads.box_head=mlp", "model.roi_heads.mask_head=mlp"])
    assert (box_head_kind(c4_mlp.model), box_head_kind(c4.model), box_head_kind(cfg.model)) == (
        "mlp",
        "res5",
        "mlp",
    )
    with pytest.raises(ConfigError, match="class_agnostic_mask"):
        apply_overrides(cfg, ["model.roi_heads.mask_loss=softmax", "model.roi_heads.class_agnostic_mask=1"])
    with pytest.raises(ConfigError, match="solver.max_iter=0.*cosine"):
        apply_overrides(cfg, ["solver.schedule=cosine", "solver.max_iter=0"])
    # checked on the result, not after each override: a consistent change in two steps is fine
    ok = apply_overrides(
        make_config("R-50-FPN"), ["model.backbone.kind=c4", "model.rpn.anchor_sizes=((32, 64),)"]
    )
    assert ok.model.backbone.kind == "c4"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.input.min_size=[224,", "model.input.min_size=[224,: cannot read the value"),
        ("solver.steps=(a,)", "solver.steps=(a,): cannot read the value"),
        ("solver.base_lr=fast", "solver.base_lr=fast: cannot read the value: expected a number"),
        ("solver.max_iter=1.5", "solver.max_iter=1.5: expected an integer"),
        ("model.roi_heads.aligned=maybe", "model.roi_heads.aligned=maybe: expected a boolean"),
        ("solver.base_lr", "override 'solver.base_lr' must look like KEY=VALUE"),
        ("model=3", "model is a section"),
        ("model.num_classes.x=3", "model.num_classes is a value, not a section"),
    ],
)
def test_malformed_overrides_name_the_key_and_the_text(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(make_config("R-50-FPN"), [override])
    assert message in str(err.value)


def test_unknown_keys_are_key_errors_with_a_hint():
    with pytest.raises(KeyError) as err:
        apply_overrides(make_config("R-50-FPN"), ["model.pixel_mean=(0, 0, 0)"])
    assert isinstance(err.value, ConfigError)
    assert "unknown config key 'model.pixel_mean'; did you mean model.input.pixel_mean?" in str(err.value)
    with pytest.raises(KeyError, match="unknown configuration 'R-77'"):
        make_config("R-77")
    with pytest.raises(KeyError, match="unknown config key 'nope'"):
        make_config("R-50-FPN", nope=1)


def test_make_config_and_config_from_dict_validate():
    with pytest.raises(ConfigError, match="log_period=0"):
        make_config("R-50-FPN", log_period=0)
    with pytest.raises(ConfigError, match="num_classes=1"):
        config_from_dict({"num_classes": 1})  # a ModelConfig: keys relative to it
    with pytest.raises(ConfigError, match="solver.base_lr='0.1'"):
        cfg = make_config("R-50-FPN")
        cfg.solver.base_lr = "0.1"  # set in Python with the wrong type
        validate_config(cfg)


def test_overrides_keep_types():
    cfg = apply_overrides(
        make_config("R-50-FPN"),
        ["model.input.min_size=640", "solver.steps=()", "solver.base_lr=1", "model.roi_heads.aligned=true"],
    )
    assert cfg.model.input.min_size == (640,) and cfg.solver.steps == ()
    assert isinstance(cfg.solver.base_lr, float) and cfg.model.roi_heads.aligned is True
    # an emptied tuple still converts by the declared default's item type
    with pytest.raises(ConfigError, match="solver.steps"):
        apply_overrides(cfg, ["solver.steps=(1.5,)"])


def test_yaml_errors_name_the_file_and_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*missing.yaml"):
        load_config_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: R-18-FPN-small\nsolver:\n  base_lr: -0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: solver.base_lr=-0.1: expected a positive number"):
        load_config_file(str(bad))
    bad.write_text("model:\n  input:\n    min_size: [224, -1]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.input.min_size=\(224, -1\)"):
        load_config_file(str(bad))
    bad.write_text("solver:\n  base_lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML") as err:
        load_config_file(str(bad))
    assert "\n" not in str(err.value)
    bad.write_text("preset: R-77\n")
    with pytest.raises(KeyError, match="bad.yaml: unknown configuration 'R-77'"):
        load_config_file(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("preset: R-18-FPN-small\nmodel:\n  num_classes: 4\nsolver:\n  steps: [10, 20]\n")
    cfg = load_config_file(str(good))
    assert cfg.model.num_classes == 4 and cfg.solver.steps == (10, 20)
