"""The keypoint branch in the model: presets, training targets and loss, inference, torchvision's layout."""

import copy

import pytest
import torch

from maskrcnn.config import get_config
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.keypoint_branch import KeypointBranch
from maskrcnn.modeling.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor
from maskrcnn.modeling.poolers import MultiLevelPooler
from tests.reference.keypoints_ref import (
    heatmaps_to_keypoints_ref,
    keypoint_loss_ref,
    keypoints_to_heatmap_targets_ref,
)

K = 5
KEYPOINT_PRESETS = ("keypoint-R-50-FPN", "keypoint-mask-R-50-FPN", "tv-keypoint-R-50-FPN")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, *, num_keypoints: int = K):
    cfg = copy.deepcopy(get_config(name))
    cfg.backbone.name = "resnet18"
    cfg.backbone.fpn_channels = 32
    cfg.input.min_size, cfg.input.max_size = (96, 128), 160
    cfg.rpn.pre_nms_topk_train = cfg.rpn.pre_nms_topk_test = 100
    cfg.rpn.post_nms_topk_train = cfg.rpn.post_nms_topk_test = 50
    cfg.roi_heads.batch_size_per_image = 32
    cfg.roi_heads.representation_size = 64
    cfg.roi_heads.score_thresh = 0.0
    cfg.roi_heads.detections_per_img = 6
    cfg.roi_heads.num_keypoints = num_keypoints
    cfg.roi_heads.keypoint_head_channels = (16, 16)
    cfg.roi_heads.mask_head_channels = 16
    return cfg


def person_sample(seed=0, h=96, w=128):
    """Two bright rectangles ("people") with K keypoints each: some inside, one unlabelled."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) * 0.2
    boxes = torch.tensor([[10.0, 8.0, 60.0, 80.0], [70.0, 20.0, 120.0, 90.0]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    kps = torch.zeros(2, K, 3)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        image[:, int(y1) : int(y2), int(x1) : int(x2)] = 0.8
        masks[i, int(y1) : int(y2), int(x1) : int(x2)] = 1
        kps[i, :, 0] = x1 + torch.rand(K, generator=g) * (x2 - x1)
        kps[i, :, 1] = y1 + torch.rand(K, generator=g) * (y2 - y1)
        kps[i, :, 2] = 2
    kps[1, 0] = 0  # unlabelled
    target = {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "masks": masks, "keypoints": kps}
    return image, target


@pytest.mark.parametrize("name", KEYPOINT_PRESETS)
def test_keypoint_presets_train_and_infer(name):
    torch.manual_seed(0)
    cfg = tiny(name)
    model = build_model(cfg)
    assert isinstance(model.roi_heads.branches[-1], KeypointBranch)
    image, target = person_sample()
    losses = model.train()([image], [target])
    expected = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_keypoint"}
    assert set(losses) == expected | ({"loss_mask"} if cfg.roi_heads.mask else set())
    assert losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("roi_heads.keypoint")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        (out,) = model.eval()([image])
    n = out["boxes"].shape[0]
    assert n > 0
    assert out["keypoints"].shape == (n, K, 3) and out["keypoints_scores"].shape == (n, K)
    assert torch.equal(out["keypoints"][..., 2], torch.ones(n, K))
    # in the original image's frame (the model resized it to 128 x 171 internally)
    b = out["boxes"]
    x, y = out["keypoints"][..., 0], out["keypoints"][..., 1]
    assert ((x >= b[:, None, 0] - 1e-3) & (x <= b[:, None, 2] + 1e-3)).all()
    assert ((y >= b[:, None, 1] - 1e-3) & (y <= b[:, None, 3] + 1e-3)).all()
    assert ("masks" in out) == cfg.roi_heads.mask


def test_keypoint_training_needs_keypoints_in_every_target():
    model = build_model(tiny("keypoint-R-50-FPN")).train()
    image, target = person_sample()
    del target["keypoints"]
    with pytest.raises(ValueError, match="keypoint.*'keypoints'"):
        model([image], [target])


def test_torchvision_layout_and_parameter_count():
    """torchvision's keypointrcnn_resnet50_fpn: 59,137,258 parameters (its documentation; FrozenBatchNorm
    statistics are buffers) and its roi_heads.keypoint_* keys."""
    model = build_model("tv-keypoint-R-50-FPN")
    assert sum(p.numel() for p in model.parameters()) == 59_137_258
    sd = model.state_dict()
    assert sd["roi_heads.keypoint_head.0.weight"].shape == (512, 256, 3, 3)
    assert sd["roi_heads.keypoint_head.14.weight"].shape == (512, 512, 3, 3)
    assert sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape == (512, 17, 4, 4)
    assert not any(k.startswith("roi_heads.mask") for k in sd)


def _branch(seed=0):
    torch.manual_seed(seed)
    pooler = MultiLevelPooler(output_size=14, scales=[1 / 4, 1 / 8], sampling_ratio=2, kind="align")
    head = KeypointRCNNHeads(in_channels=8, layers=(16, 16))
    predictor = KeypointRCNNPredictor(in_channels=16, num_keypoints=K)
    return KeypointBranch(keypoint_pooler=pooler, keypoint_head=head, keypoint_predictor=predictor)


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 32, 40, generator=g), torch.randn(2, 8, 16, 20, generator=g)]


def test_branch_loss_equals_the_reference_on_foreground_rois_only():
    """Targets come from each foreground RoI's matched object; background RoIs take no part."""
    branch = _branch()
    features = _features()
    _, t0 = person_sample(0)
    _, t1 = person_sample(1)
    rois = [
        torch.tensor([[8.0, 6.0, 62.0, 82.0], [72.0, 22.0, 118.0, 88.0], [0.0, 0.0, 20.0, 20.0]]),
        torch.tensor([[11.0, 9.0, 40.0, 50.0], [60.0, 10.0, 125.0, 95.0]]),
    ]
    labels = [torch.tensor([1, 1, 0]), torch.tensor([0, 1])]
    matched = [torch.tensor([0, 1, 0]), torch.tensor([0, 1])]
    losses = branch.forward_train(
        features=features, rois=rois, labels=labels, matched=matched, targets=[t0, t1], box_features=None
    )
    pos_rois = [rois[0][:2], rois[1][1:]]
    logits = branch.logits(features, pos_rois)
    gt = torch.cat([t0["keypoints"][[0, 1]], t1["keypoints"][[1]]])
    idx, valid = keypoints_to_heatmap_targets_ref(gt, torch.cat(pos_rois))
    assert valid.sum() >= 10 and not valid.all()  # the unlabelled keypoint is left out
    expected = keypoint_loss_ref(logits.detach().double(), idx, valid)
    assert abs(losses["loss_keypoint"].item() - expected) < 1e-5 * max(1.0, expected)


def test_branch_loss_without_labelled_keypoints_is_zero_with_a_graph():
    branch = _branch()
    _, t0 = person_sample(0)
    t0["keypoints"][..., 2] = 0
    losses = branch.forward_train(
        features=_features(),
        rois=[t0["boxes"].clone()],
        labels=[torch.tensor([1, 1])],
        matched=[torch.tensor([0, 1])],
        targets=[t0],
        box_features=None,
    )
    assert losses["loss_keypoint"].item() == 0.0
    losses["loss_keypoint"].backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in branch.parameters())


def test_branch_inference_decodes_each_detection():
    branch = _branch().eval()
    features = _features()
    detections = [
        {
            "boxes": torch.tensor([[5.0, 5.0, 50.5, 70.2]]),
            "labels": torch.tensor([1]),
            "scores": torch.ones(1),
        },
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 25.0], [0.0, 0.0, 100.0, 100.0]]),
            "labels": torch.tensor([1, 1]),
            "scores": torch.ones(2),
        },
    ]
    with torch.no_grad():
        branch.forward_test(features=features, detections=detections, box_features=None)
        logits = branch.logits(features, [d["boxes"] for d in detections])
    ref_kps, ref_scores = heatmaps_to_keypoints_ref(logits, torch.cat([d["boxes"] for d in detections]))
    kps = torch.cat([d["keypoints"] for d in detections])
    scores = torch.cat([d["keypoints_scores"] for d in detections])
    assert kps.shape == (3, K, 3) and scores.shape == (3, K)
    # float32 decoding vs the float64 reference of the same argmax: the coordinates differ by the rounding
    # of (ix + 0.5) * w / ceil(w) + x1 (~1e-5 px at 100 px); the scores are the same upsampled float32 logit
    torch.testing.assert_close(kps.double(), ref_kps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-6, rtol=0)


def test_empty_detections_give_empty_keypoints():
    branch = _branch().eval()
    detections = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    ]
    with torch.no_grad():
        branch.forward_test(features=_features(), detections=detections, box_features=None)
    assert detections[0]["keypoints"].shape == (0, K, 3)
    assert detections[0]["keypoints_scores"].shape == (0, K)


def test_keypoints_need_an_fpn():
    from maskrcnn.config import ConfigError, validate_config

    cfg = get_config("R-50-C4")
    cfg.roi_heads.keypoint = True
    with pytest.raises(ConfigError, match="roi_heads.keypoint"):
        validate_config(cfg)
