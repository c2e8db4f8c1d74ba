"""``build_model(config)``: the one place where a :class:`maskrcnn.config.ModelConfig` becomes modules."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from maskrcnn.config import ModelConfig, box_head_kind, get_config
from maskrcnn.modeling.backbone import ResNet, resnet_spec
from maskrcnn.modeling.box_branch import BoxBranch
from maskrcnn.modeling.box_head import FastRCNNPredictor, Res5Head, TwoMLPHead
from maskrcnn.modeling.fpn import FPN, BackboneWithFPN
from maskrcnn.modeling.keypoint_branch import KeypointBranch
from maskrcnn.modeling.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor
from maskrcnn.modeling.mask_branch import MaskBranch
from maskrcnn.modeling.mask_head import C4MaskPredictor, MaskRCNNHeads, MaskRCNNPredictor, MLPMaskHead
from maskrcnn.modeling.poolers import MultiLevelPooler
from maskrcnn.modeling.rcnn import MaskRCNN
from maskrcnn.modeling.roi_heads import RoIHeads
from maskrcnn.modeling.rpn import RPN, RPNHead
from maskrcnn.modeling.transform import ImageTransform
from maskrcnn.ops.anchors import AnchorGenerator

__all__ = ["build_model"]

_FPN_LEVELS = ("p2", "p3", "p4", "p5")


def build_model(config: ModelConfig | str) -> MaskRCNN:
    """Mask R-CNN (Faster R-CNN if ``config.roi_heads.mask`` is False) from a config or a preset name."""
    cfg = get_config(config) if isinstance(config, str) else config
    bb, rc, hc = cfg.backbone, cfg.rpn, cfg.roi_heads
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {cfg.num_classes}")
    spec = resnet_spec(bb.name)

    if bb.kind == "fpn":
        body = ResNet(**spec, base_channels=bb.base_channels, norm=bb.norm, frozen_stages=bb.frozen_stages)
        fpn = FPN(in_channels=body.out_channels, out_channels=bb.fpn_channels, extra_pool=True)
        backbone = BackboneWithFPN(body=body, fpn=fpn)
        rpn_features = ("p2", "p3", "p4", "p5", "p6")
        roi_features = _FPN_LEVELS
        channels = bb.fpn_channels
        rpn_strides = tuple(backbone.strides[k] for k in rpn_features)
        roi_scales = [1.0 / backbone.strides[k] for k in roi_features]
    elif bb.kind in ("c4", "c5"):
        # C4: res4 features, res5 runs per RoI as the box head (or the MLP head: roi_heads.box_head). C5 (the
        # paper's R-50-C5 of Table 2d): the whole ResNet, one stride-32 map for the RPN and the RoI heads (the
        # MLP box head, the FCN mask head)
        level = bb.kind
        backbone = ResNet(
            **spec,
            base_channels=bb.base_channels,
            norm=bb.norm,
            frozen_stages=bb.frozen_stages,
            return_stages=(level,),
        )
        rpn_features = roi_features = (level,)
        channels = backbone.out_channels[level]
        rpn_strides = (backbone.strides[level],)
        roi_scales = [1.0 / backbone.strides[level]]
    else:
        raise ValueError(f"backbone.kind must be 'fpn', 'c4' or 'c5', got {bb.kind!r}")

    if len(rc.anchor_sizes) != len(rpn_features):
        raise ValueError(
            f"rpn.anchor_sizes has {len(rc.anchor_sizes)} levels but the {bb.kind} backbone gives "
            f"{len(rpn_features)} ({', '.join(rpn_features)})"
        )
    if rc.anchor_stride_rule not in ("exact", "torchvision"):
        raise ValueError(
            f"rpn.anchor_stride_rule must be 'exact' or 'torchvision', got {rc.anchor_stride_rule!r}"
        )
    anchors = AnchorGenerator(
        sizes=rc.anchor_sizes,
        aspect_ratios=(tuple(rc.aspect_ratios),) * len(rc.anchor_sizes),
        strides=rpn_strides if rc.anchor_stride_rule == "exact" else None,
    )
    rpn = RPN(
        head=RPNHead(in_channels=channels, num_anchors=anchors.num_anchors_per_location()[0]),
        anchor_generator=anchors,
        pre_nms_topk={True: rc.pre_nms_topk_train, False: rc.pre_nms_topk_test},
        post_nms_topk={True: rc.post_nms_topk_train, False: rc.post_nms_topk_test},
        nms_thresh=rc.nms_thresh,
        fg_iou_thresh=rc.fg_iou_thresh,
        bg_iou_thresh=rc.bg_iou_thresh,
        batch_size_per_image=rc.batch_size_per_image,
        positive_fraction=rc.positive_fraction,
    )

    def pooler(size: int) -> MultiLevelPooler:
        return MultiLevelPooler(
            output_size=size,
            scales=roi_scales,
            sampling_ratio=hc.sampling_ratio,
            aligned=hc.aligned,
            kind=hc.pooler,
        )

    res5_head = box_head_kind(cfg) == "res5"
    if res5_head and bb.kind != "c4":
        raise ValueError(f"roi_heads.box_head='res5' needs backbone.kind='c4', got {bb.kind!r}")
    if not res5_head:
        box_head = TwoMLPHead(
            in_channels=channels * hc.box_pool_size**2, representation_size=hc.representation_size
        )
    else:
        box_head = Res5Head(
            depth=spec["depth"],
            groups=spec.get("groups", 1),
            width_per_group=spec.get("width_per_group", 64),
            base_channels=bb.base_channels,
            norm=bb.norm,
        )
    branches = []  # run after the box branch, in this order
    if hc.mask:
        branches.append(_mask_branch(cfg, channels=channels, pooler=pooler, box_head=box_head))
    if hc.keypoint:
        branches.append(_keypoint_branch(cfg, channels=channels, pooler=pooler))
    box_branch = BoxBranch(
        box_pooler=pooler(hc.box_pool_size),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(in_channels=box_head.out_channels, num_classes=cfg.num_classes),
        box_coder_weights=hc.box_reg_weights,
        score_thresh=hc.score_thresh,
        nms_thresh=hc.nms_thresh,
        detections_per_img=hc.detections_per_img,
        box_loss=hc.box_loss,
        smooth_l1_beta=hc.smooth_l1_beta,
    )
    roi_heads = RoIHeads(
        box_branch=box_branch,
        branches=branches,
        fg_iou_thresh=hc.fg_iou_thresh,
        bg_iou_thresh=hc.bg_iou_thresh,
        batch_size_per_image=hc.batch_size_per_image,
        positive_fraction=hc.positive_fraction,
    )
    transform = ImageTransform(
        min_size=cfg.input.min_size,
        max_size=cfg.input.max_size,
        size_divisible=cfg.input.size_divisible,
        pixel_mean=cfg.input.pixel_mean,
        pixel_std=cfg.input.pixel_std,
    )
    model = MaskRCNN(
        transform=transform,
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
        rpn_features=rpn_features,
        roi_features=roi_features,
        config=cfg,
    )
    return model


def _mask_branch(
    cfg: ModelConfig, *, channels: int, pooler: Callable[[int], MultiLevelPooler], box_head: nn.Module
) -> MaskBranch:
    """Its own pooler, the FCN (or MLP) head and predictor; with the res5 box head (C4) no pooler, the
    deconvolution predictor on the box head's res5 output."""
    hc = cfg.roi_heads
    options = dict(mask_loss=hc.mask_loss, class_agnostic=hc.class_agnostic_mask)
    if box_head_kind(cfg) == "res5":
        if hc.mask_head != "fcn":
            raise ValueError(
                "the C4 model's mask head is the res5 deconvolution; roi_heads.mask_head must be 'fcn'"
            )
        predictor = C4MaskPredictor(
            in_channels=box_head.out_channels,
            num_classes=cfg.num_classes,
            class_agnostic=hc.class_agnostic_mask,
        )
        return MaskBranch(mask_predictor=predictor, **options)
    mask_pooler = pooler(hc.mask_pool_size)
    if hc.mask_head == "fcn":
        head = MaskRCNNHeads(in_channels=channels, layers=(hc.mask_head_channels,) * 4)
        predictor = MaskRCNNPredictor(
            in_channels=head.out_channels,
            dim_reduced=hc.mask_head_channels,
            num_classes=cfg.num_classes,
            class_agnostic=hc.class_agnostic_mask,
        )
        return MaskBranch(mask_pooler=mask_pooler, mask_head=head, mask_predictor=predictor, **options)
    if hc.mask_head == "mlp":
        predictor = MLPMaskHead(
            in_channels=channels,
            in_size=hc.mask_pool_size,
            num_classes=cfg.num_classes,
            class_agnostic=hc.class_agnostic_mask,
        )
        return MaskBranch(mask_pooler=mask_pooler, mask_predictor=predictor, **options)
    raise ValueError(f"roi_heads.mask_head must be 'fcn' or 'mlp', got {hc.mask_head!r}")


def _keypoint_branch(cfg: ModelConfig, *, channels: int, pooler) -> KeypointBranch:
    """torchvision's keypoint head: its own 14x14 pooler, the conv tower, deconvolution + x2 upsampling."""
    hc = cfg.roi_heads
    if cfg.backbone.kind != "fpn":
        raise ValueError("the keypoint branch needs an FPN backbone (backbone.kind='fpn')")
    head = KeypointRCNNHeads(in_channels=channels, layers=hc.keypoint_head_channels)
    return KeypointBranch(
        keypoint_pooler=pooler(hc.keypoint_pool_size),
        keypoint_head=head,
        keypoint_predictor=KeypointRCNNPredictor(
            in_channels=head.out_channels, num_keypoints=hc.num_keypoints
        ),
    )
