"""RoI heads: hand-computed losses, training and inference of the FPN and C4 variants, a naive reference
for the detection post-processing, and torchvision key names."""

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.config import PRESETS
from maskrcnn.modeling.box_branch import BoxBranch
from maskrcnn.modeling.box_head import FastRCNNPredictor, Res5Head, TwoMLPHead
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.losses import fast_rcnn_loss, mask_loss
from maskrcnn.modeling.mask_branch import MaskBranch
from maskrcnn.modeling.mask_head import (
    C4MaskPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    MLPMaskHead,
)
from maskrcnn.modeling.poolers import MultiLevelPooler
from maskrcnn.modeling.roi_heads import RoIBranch, RoIHeads
from maskrcnn.ops.boxes import BoxCoder

C, K = 8, 3  # feature channels, classes (with the background)
H, W = 96, 128  # padded image
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]

# ----------------------------------------------------------------------------------------------- losses


def test_fast_rcnn_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]], requires_grad=True)
    deltas = torch.full((2, 12), 7.0)  # entries of other classes / the negative RoI must be ignored
    deltas[1, 8:12] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    deltas.requires_grad_(True)
    labels = torch.tensor([0, 2])
    targets = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.5]])
    loss_cls, loss_box = fast_rcnn_loss(logits, deltas, labels, targets)
    # RoI 0: uniform over 3 -> ln 3; RoI 1: p(2) = 2 / 4 -> ln 2
    assert loss_cls.item() == pytest.approx((math.log(3) + math.log(2)) / 2, rel=1e-6)
    # smooth-L1 (beta 1/9): |0.1| < beta -> 0.5 * 0.01 / beta; |0.5| -> 0.5 - beta / 2; divided by R = 2
    beta = 1 / 9
    assert loss_box.item() == pytest.approx((0.5 * 0.01 / beta + 0.5 - beta / 2) / 2, rel=1e-6)
    _, l1 = fast_rcnn_loss(logits, deltas, labels, targets, kind="l1")
    assert l1.item() == pytest.approx((0.1 + 0.5) / 2, rel=1e-6)
    loss_box.backward()
    assert deltas.grad[0].abs().sum() == 0 and deltas.grad[1, :8].abs().sum() == 0
    assert deltas.grad[1, 8:].abs().sum() > 0


def test_fast_rcnn_loss_negatives_only_and_empty():
    logits = torch.randn(4, K, requires_grad=True)
    deltas = torch.randn(4, 4 * K, requires_grad=True)
    targets = torch.full((4, 4), float("nan"))  # never read for negatives
    loss_cls, loss_box = fast_rcnn_loss(logits, deltas, torch.zeros(4, dtype=torch.int64), targets)
    assert loss_box.item() == 0 and torch.isfinite(loss_cls)
    (loss_cls + loss_box).backward()
    assert torch.equal(deltas.grad, torch.zeros_like(deltas))
    e_logits = torch.zeros(0, K, requires_grad=True)
    e_deltas = torch.zeros(0, 4 * K, requires_grad=True)
    loss_cls, loss_box = fast_rcnn_loss(
        e_logits, e_deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)
    )
    assert loss_cls.item() == 0 and loss_box.item() == 0
    (loss_cls + loss_box).backward()


def test_mask_loss_sigmoid_hand_computed_and_gt_channel_only():
    logits = torch.zeros(2, K, 2, 2)
    logits[0, 1] = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    logits.requires_grad_(True)
    labels = torch.tensor([1, 2])
    targets = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    loss = mask_loss(logits, labels, targets)

    def bce(x, t):  # -t log s(x) - (1 - t) log(1 - s(x)) = softplus(x) - t x
        return math.log1p(math.exp(x)) - t * x

    expected = [bce(2.0, 1), bce(-1.0, 0), bce(0.0, 0.5), bce(3.0, 0)] + [
        math.log(2.0)
    ] * 4  # RoI 1: logits 0
    assert loss.item() == pytest.approx(sum(expected) / 8, rel=1e-6)
    loss.backward()
    grad = logits.grad
    assert grad[0, 1].abs().sum() > 0 and grad[1, 2].abs().sum() > 0
    grad_other = grad.clone()
    grad_other[0, 1] = 0
    grad_other[1, 2] = 0
    assert torch.equal(grad_other, torch.zeros_like(grad))  # no competition between classes


def test_mask_loss_class_agnostic():
    logits = torch.randn(3, 1, 4, 4, requires_grad=True)
    targets = (torch.rand(3, 4, 4) > 0.5).float()
    loss = mask_loss(logits, torch.tensor([1, 2, 2]), targets)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 0], targets))
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_mask_loss_softmax_hand_computed():
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]]).view(2, 3, 1, 1).requires_grad_(True)
    labels = torch.tensor([2, 1])
    targets = torch.tensor([0.7, 0.3]).view(2, 1, 1)  # RoI 0 -> its class 2; RoI 1 below 0.5 -> background 0
    loss = mask_loss(logits, labels, targets, kind="softmax")
    lse0 = math.log(math.e + 1 + math.e**2)
    lse1 = math.log(math.exp(0.5) + math.exp(-1.0) + 1)
    assert loss.item() == pytest.approx(((lse0 - 2.0) + (lse1 - 0.5)) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[:, 1].abs().sum() > 0  # all classes compete
    with pytest.raises(ValueError):
        mask_loss(torch.zeros(1, 1, 2, 2), torch.tensor([1]), torch.zeros(1, 2, 2), kind="softmax")


def test_mask_loss_softmax_equals_naive_per_pixel_cross_entropy():
    from tests.reference.masks_ref import softmax_mask_loss_ref

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([1, 3, 2, 2, 1])
    targets = torch.rand(5, 6, 6, generator=g, dtype=torch.float64)
    loss = mask_loss(logits, labels, targets, kind="softmax")
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(softmax_mask_loss_ref(logits, labels, targets), rel=1e-12)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_mask_loss_empty(kind):
    logits = torch.zeros(0, K, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28), kind=kind)
    assert loss.item() == 0 and not torch.isnan(loss)
    loss.backward()


# ------------------------------------------------------------------------------------------ the heads


# options of the helpers -> (branch, its keyword)
_BOX_OPTIONS = ("box_coder_weights", "score_thresh", "nms_thresh", "detections_per_img", "box_loss")
_MASK_OPTIONS = {
    "mask_loss": "mask_loss",
    "class_agnostic_mask": "class_agnostic",
    "mask_target_aligned": "target_aligned",
    "mask_target_threshold": "target_threshold",
}


def split_options(kw):
    """``(box branch options, mask branch options, RoIHeads options)``."""
    kw = dict(kw)
    box = {k: kw.pop(k) for k in _BOX_OPTIONS if k in kw}
    mask = {new: kw.pop(old) for old, new in _MASK_OPTIONS.items() if old in kw}
    return box, mask, kw


def fpn_heads(*, mask="fcn", extra=(), **kw) -> RoIHeads:
    box_kw, mask_kw, kw = split_options(kw)
    agnostic = mask_kw.get("class_agnostic", False)
    branches = []
    if mask == "fcn":
        branches.append(
            MaskBranch(
                mask_pooler=MultiLevelPooler(output_size=14, scales=SCALES),
                mask_head=MaskRCNNHeads(in_channels=C, layers=(8, 8)),
                mask_predictor=MaskRCNNPredictor(
                    in_channels=8, dim_reduced=8, num_classes=K, class_agnostic=agnostic
                ),
                **mask_kw,
            )
        )
    elif mask == "mlp":
        branches.append(
            MaskBranch(
                mask_pooler=MultiLevelPooler(output_size=14, scales=SCALES),
                mask_predictor=MLPMaskHead(
                    in_channels=C, representation_size=16, num_classes=K, class_agnostic=agnostic
                ),
                **mask_kw,
            )
        )
    kw.setdefault("batch_size_per_image", 32)
    box = BoxBranch(
        box_pooler=MultiLevelPooler(output_size=7, scales=SCALES),
        box_head=TwoMLPHead(in_channels=C * 49, representation_size=16),
        box_predictor=FastRCNNPredictor(in_channels=16, num_classes=K),
        **box_kw,
    )
    return RoIHeads(box_branch=box, branches=[*branches, *extra], **kw)


def c4_heads(*, extra=(), **kw) -> RoIHeads:
    box_kw, mask_kw, kw = split_options(kw)
    box = BoxBranch(
        box_pooler=MultiLevelPooler(output_size=14, scales=[1 / 16], sampling_ratio=0, aligned=True),
        box_head=Res5Head(depth=18),  # 256 -> 512 channels, the smallest res5
        box_predictor=FastRCNNPredictor(in_channels=512, num_classes=K),
        **box_kw,
    )
    mask = MaskBranch(  # no pooler: reads the box head's res5 output
        mask_predictor=C4MaskPredictor(in_channels=512, dim_reduced=8, num_classes=K), **mask_kw
    )
    return RoIHeads(box_branch=box, branches=[mask, *extra], batch_size_per_image=8, **kw)


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W - 10.0, H - 10.0])
    wh = torch.rand(n, 2, generator=g) * 60 + 4
    return torch.cat([xy, xy + wh], dim=1)  # some spill past the image


def make_inputs(num_images=2, num_props=12, num_gt=2, channels=C, c4=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if c4:
        features = [torch.randn(num_images, channels, H // 16, W // 16, generator=g)]
    else:
        features = [torch.randn(num_images, channels, H // s, W // s, generator=g) for s in (4, 8, 16, 32)]
    proposals = [random_boxes(num_props, g) for _ in range(num_images)]
    targets = []
    for _ in range(num_images):
        boxes = random_boxes(num_gt, g).clamp(max=min(H, W) - 1)
        masks = torch.zeros(num_gt, H, W, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[j, y1:y2, x1 : (x1 + x2) // 2 + 1] = 1  # left half of the box
        labels = torch.randint(1, K, (num_gt,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return features, proposals, targets


def clone_all(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_all(v) for k, v in x.items()}
    return [clone_all(v) for v in x]


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        for k in a:
            assert_same(a[k], b[k])
    else:
        for u, v in zip(a, b, strict=True):
            assert_same(u, v)


def check_train_step(heads: RoIHeads, features, proposals, targets, expect_mask=True):
    heads.train()
    inputs = clone_all([features, proposals, targets])
    detections, losses = heads(
        features=features, proposals=proposals, image_sizes=[(H, W)] * 2, targets=targets
    )
    assert detections == []
    expected = {"loss_cls", "loss_box", "loss_mask"} if expect_mask else {"loss_cls", "loss_box"}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in heads.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert_same(inputs, [features, proposals, targets])
    return losses


def check_eval(heads: RoIHeads, features, proposals, mask_size=28, expect_mask=True):
    heads.eval()
    with torch.no_grad():
        detections, losses = heads(features=features, proposals=proposals, image_sizes=[(H, W), (80, 100)])
    assert losses == {} and len(detections) == len(proposals)
    for d, (h, w) in zip(detections, [(H, W), (80, 100)], strict=True):
        n = d["boxes"].shape[0]
        assert n <= heads.box_branch.detections_per_img
        assert d["labels"].shape == (n,) and d["scores"].shape == (n,) and d["labels"].dtype == torch.int64
        assert ((d["labels"] >= 1) & (d["labels"] < K)).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        b = d["boxes"]
        assert (b >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        if expect_mask:
            assert d["masks"].shape == (n, 1, mask_size, mask_size)
            assert ((d["masks"] >= 0) & (d["masks"] <= 1)).all()
        else:
            assert "masks" not in d
    return detections


def test_fpn_train_and_eval():
    torch.manual_seed(0)
    features, proposals, targets = make_inputs()
    heads = fpn_heads(score_thresh=0.0, detections_per_img=7)
    check_train_step(heads, features, proposals, targets)
    detections = check_eval(heads, features, proposals)
    assert all(len(d["boxes"]) == 7 for d in detections)  # score 0 keeps everything up to the cap


def test_sampling_and_targets():
    torch.manual_seed(0)
    features, proposals, targets = make_inputs(num_props=40)
    heads = fpn_heads(batch_size_per_image=16, positive_fraction=0.25)
    rois, labels, matched = heads._sample(proposals, targets)
    reg = heads.box_branch.regression_targets(rois, labels, matched, targets)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    for r, lab, idx, t, tgt, props in zip(rois, labels, matched, reg, targets, proposals, strict=True):
        assert r.shape[0] == lab.shape[0] == idx.shape[0] == t.shape[0] <= 16
        pos = lab > 0
        assert 1 <= pos.sum() <= 4  # the gt boxes themselves are always candidates
        assert (lab >= 0).all()  # thresholds 0.5 / 0.5: nothing is ignored
        assert torch.equal(lab[pos], tgt["labels"][idx[pos]])
        torch.testing.assert_close(t[pos], coder.encode(tgt["boxes"][idx[pos]], r[pos]))
        assert (t[~pos] == 0).all()
        # every sampled RoI is a proposal or a gt box
        pool = torch.cat([props, tgt["boxes"]])
        assert ((r[:, None, :] == pool[None]).all(-1)).any(1).all()


def test_negative_only_image_gives_zero_box_and_mask_loss():
    torch.manual_seed(0)
    features, proposals, targets = make_inputs()
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, H, W, dtype=torch.uint8),
        }
        for _ in range(2)
    ]
    losses = check_train_step(fpn_heads(), features, proposals, empty)
    assert losses["loss_box"].item() == 0 and losses["loss_mask"].item() == 0
    assert losses["loss_cls"].item() > 0
    # one image with objects, one without
    losses = check_train_step(fpn_heads(), features, proposals, [targets[0], empty[1]])
    assert losses["loss_mask"].item() > 0


def test_empty_proposals():
    torch.manual_seed(0)
    features, _, targets = make_inputs()
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    check_train_step(fpn_heads(), features, empty, targets)  # the gt boxes are still sampled
    detections = check_eval(fpn_heads(), features, empty)
    assert all(len(d["boxes"]) == 0 for d in detections)


@pytest.mark.parametrize(
    "options",
    [
        dict(mask="mlp"),
        dict(class_agnostic_mask=True),
        dict(mask_loss="softmax"),
        dict(box_loss="l1", mask_target_aligned=True, mask_target_threshold=0.5),
        dict(mask=None),
    ],
    ids=["mlp", "agnostic", "softmax", "l1-d2targets", "faster"],
)
def test_fpn_variants(options):
    torch.manual_seed(0)
    features, proposals, targets = make_inputs()
    has_mask = options.get("mask", "fcn") is not None
    heads = fpn_heads(**options)
    check_train_step(heads, features, proposals, targets, expect_mask=has_mask)
    check_eval(heads, features, proposals, expect_mask=has_mask)


def test_c4_train_and_eval():
    torch.manual_seed(0)
    features, proposals, targets = make_inputs(num_props=6, channels=256, c4=True)
    heads = c4_heads(score_thresh=0.0, detections_per_img=3)
    check_train_step(heads, features, proposals, targets)
    assert next(iter(heads.box_head.res5.parameters())).grad is not None
    detections = check_eval(heads, features, proposals, mask_size=14)
    assert all(len(d["boxes"]) == 3 for d in detections)


def test_c4_masks_reuse_res5_of_the_detections():
    torch.manual_seed(0)
    features, proposals, _ = make_inputs(num_images=1, num_props=5, channels=256, c4=True)
    heads = c4_heads(score_thresh=0.0, detections_per_img=4).eval()
    with torch.no_grad():
        (det,), _ = heads(features=features, proposals=proposals, image_sizes=[(H, W)])
        res5 = heads.box_head.features(heads.box_pooler(features, [det["boxes"]]))
        logits = heads.mask_predictor(res5)
    expected = logits[torch.arange(len(det["labels"])), det["labels"]].sigmoid()[:, None]
    torch.testing.assert_close(det["masks"], expected)


def test_invalid_configurations():
    with pytest.raises(ValueError):
        fpn_heads(class_agnostic_mask=True, mask_loss="softmax")
    with pytest.raises(TypeError):  # a mask branch without a pooler reads res5, which TwoMLPHead lacks
        RoIHeads(
            box_branch=BoxBranch(
                box_pooler=MultiLevelPooler(output_size=7, scales=SCALES),
                box_head=TwoMLPHead(in_channels=C * 49),
                box_predictor=FastRCNNPredictor(in_channels=1024, num_classes=K),
            ),
            branches=[MaskBranch(mask_predictor=MaskRCNNPredictor(in_channels=C, num_classes=K))],
        )
    heads = fpn_heads()
    features, proposals, targets = make_inputs()
    heads.train()
    with pytest.raises(ValueError):
        heads(features=features, proposals=proposals, image_sizes=[(H, W)] * 2)  # no targets
    no_masks = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    with pytest.raises(ValueError):
        heads(features=features, proposals=proposals, image_sizes=[(H, W)] * 2, targets=no_masks)


# ------------------------------------------------------------------------- branches as plug-ins


class ProbeBranch(RoIBranch):
    """A branch that records what it is given (a stand-in for the keypoint branch); its own module only."""

    name = "probe"
    required_fields = ("probe",)

    def __init__(self, *, uses_box_features: bool = False) -> None:
        super().__init__()
        self.probe_head = nn.Linear(4, 1)
        self.uses_box_features = uses_box_features
        self.seen = {}

    def forward_train(self, *, features, rois, labels, matched, targets, box_features):
        self.seen["train"] = dict(
            features=features,
            rois=rois,
            labels=labels,
            matched=matched,
            targets=targets,
            box_features=box_features,
            training=self.training,
        )
        positive = torch.cat(rois)[torch.cat(labels) > 0]
        return {"loss_probe": self.probe_head(positive / 100).sum()}

    def forward_test(self, *, features, detections, box_features):
        self.seen["test"] = dict(
            detections=[dict(d) for d in detections], box_features=box_features, training=self.training
        )
        for d in detections:
            d["probe"] = self.probe_head(d["boxes"] / 100)[:, 0]


@pytest.mark.parametrize("c4", [False, True], ids=["fpn", "c4"])
def test_an_extra_branch_plugs_in_and_gets_the_right_inputs(c4):
    torch.manual_seed(0)
    features, proposals, targets = make_inputs(**(dict(num_props=6, channels=256, c4=True) if c4 else {}))
    targets = [dict(t, probe=torch.zeros(1)) for t in targets]
    make = c4_heads if c4 else fpn_heads
    probe = ProbeBranch(uses_box_features=c4)
    heads = make(score_thresh=0.0, detections_per_img=3, extra=[probe])
    plain = make(score_thresh=0.0, detections_per_img=3)
    plain.load_state_dict({k: v for k, v in heads.state_dict().items() if not k.startswith("probe_head.")})
    assert heads.branches[-1] is probe and heads.probe_head is probe.probe_head
    assert "probe_head.weight" in heads.state_dict()

    # training: the sampler's RoIs, labels and matched objects; the box and mask losses are unchanged
    heads.train()
    plain.train()
    image_sizes = [(H, W)] * 2
    torch.manual_seed(2)
    _, losses = heads(features=features, proposals=proposals, image_sizes=image_sizes, targets=targets)
    torch.manual_seed(2)
    _, expected = plain(features=features, proposals=proposals, image_sizes=image_sizes, targets=targets)
    assert list(losses) == ["loss_cls", "loss_box", "loss_mask", "loss_probe"]
    assert_same(expected, losses)
    torch.manual_seed(2)
    rois, labels, matched = heads._sample(proposals, targets)
    seen = probe.seen["train"]
    assert_same([seen["rois"], seen["labels"], seen["matched"]], [rois, labels, matched])
    assert all(a is b for a, b in zip(seen["features"], features, strict=True))
    assert all(a is b for a, b in zip(seen["targets"], targets, strict=True))
    assert seen["training"] is True
    if c4:  # res5 of every sampled RoI, in the order of torch.cat(rois)
        res5 = heads.box_head.features(heads.box_pooler(features, rois))
        torch.testing.assert_close(seen["box_features"], res5)
    else:
        assert seen["box_features"] is None
    losses["loss_probe"].backward()
    assert probe.probe_head.weight.grad is not None

    # inference: the detections (masks already added), the same box and mask outputs as without the probe
    heads.eval()
    plain.eval()
    with torch.no_grad():
        detections, _ = heads(features=features, proposals=proposals, image_sizes=[(H, W), (80, 100)])
        reference, _ = plain(features=features, proposals=proposals, image_sizes=[(H, W), (80, 100)])
    seen = probe.seen["test"]
    assert seen["training"] is False
    for d, ref, s in zip(detections, reference, seen["detections"], strict=True):
        assert set(d) == {"boxes", "labels", "scores", "masks", "probe"} and d["probe"].shape == (3,)
        assert set(s) == {"boxes", "labels", "scores", "masks"}
        assert_same(ref, d)
    if c4:  # res5 recomputed on the detections
        with torch.no_grad():
            res5 = heads.box_head.features(heads.box_pooler(features, [d["boxes"] for d in detections]))
        torch.testing.assert_close(seen["box_features"], res5)
    else:
        assert seen["box_features"] is None

    # a missing target field is named
    heads.train()
    no_probe = [{k: v for k, v in t.items() if k != "probe"} for t in targets]
    with pytest.raises(ValueError, match="probe branch needs 'probe'"):
        heads(features=features, proposals=proposals, image_sizes=image_sizes, targets=no_probe)
    no_masks = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    with pytest.raises(ValueError, match="mask branch needs 'masks'"):
        heads(features=features, proposals=proposals, image_sizes=image_sizes, targets=no_masks)


@pytest.mark.parametrize("c4", [False, True], ids=["fpn", "c4"])
def test_branch_modules_are_registered_flat(c4):
    torch.manual_seed(0)
    heads = c4_heads() if c4 else fpn_heads()
    branches = (heads.box_branch, *heads.branches)
    expected = ["box_pooler", "box_head", "box_predictor"]
    expected += ["mask_predictor"] if c4 else ["mask_pooler", "mask_head", "mask_predictor"]
    assert [n for n, _ in heads.named_children()] == expected
    for b in branches:
        for name, child in b.named_children():
            assert getattr(heads, name) is child
    if c4:
        assert heads.mask_pooler is None and heads.mask_head is None
    params = list(heads.parameters())
    assert len({id(p) for p in params}) == len(params) == sum(len(list(b.parameters())) for b in branches)

    heads.eval()
    assert not any(m.training for m in heads.modules()) and not any(b.training for b in branches)
    heads.train()
    assert all(m.training for m in heads.modules()) and all(b.training for b in branches)
    nn.Sequential(heads).eval()  # a parent's eval() reaches the branches
    assert not any(b.training for b in branches)

    heads.to(torch.float64)
    assert all(p.dtype == torch.float64 for b in branches for p in b.parameters())
    heads.to(torch.float32)

    twin = copy.deepcopy(heads)  # its branches hold its own modules
    for b in (twin.box_branch, *twin.branches):
        for name, child in b.named_children():
            assert getattr(twin, name) is child and child is not getattr(heads, name)

    replaced = FastRCNNPredictor(in_channels=heads.box_predictor.cls_score.in_features, num_classes=K + 2)
    twin.box_predictor = replaced  # the fine-tuning idiom: the branch uses the new predictor
    assert twin.box_branch.box_predictor is replaced and "box_predictor.cls_score.weight" in twin.state_dict()

    torch.manual_seed(1)
    fresh = c4_heads() if c4 else fpn_heads()
    fresh.load_state_dict(heads.state_dict())
    assert torch.equal(fresh.box_branch.box_predictor.cls_score.weight, heads.box_predictor.cls_score.weight)
    features, proposals, _ = make_inputs(**(dict(num_props=6, channels=256, c4=True) if c4 else {}))
    with torch.no_grad():
        a, _ = heads.eval()(features=features, proposals=proposals, image_sizes=[(H, W)] * 2)
        b, _ = fresh.eval()(features=features, proposals=proposals, image_sizes=[(H, W)] * 2)
    assert_same(a, b)


def test_invalid_branches():
    class Owning(ProbeBranch):  # a parameter of the branch itself would be lost by the flat registration
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    class Clashing(ProbeBranch):
        name = "clash"

        def __init__(self):
            super().__init__()
            self.mask_head = nn.Linear(1, 1)

    with pytest.raises(TypeError, match="parameters or buffers"):
        fpn_heads(extra=[Owning()])
    with pytest.raises(ValueError, match="unique"):
        fpn_heads(extra=[ProbeBranch(), ProbeBranch()])
    with pytest.raises(ValueError, match="'mask_head'"):
        fpn_heads(extra=[Clashing()])
    with pytest.raises(TypeError, match="TwoMLPHead shares none"):
        fpn_heads(extra=[ProbeBranch(uses_box_features=True)])


# ------------------------------------------------------------------- inference against a naive reference


def naive_nms(boxes, scores, thresh):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(xx2 - xx1, 0) * max(yy2 - yy1, 0)
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thresh:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def naive_postprocess(class_logits, box_deltas, proposals, size, score_thresh, nms_thresh, topk):
    """Loop over RoIs and classes: softmax, decode, clip, threshold, drop tiny boxes, NMS per class, top-k."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    h, w = size
    scores = F.softmax(class_logits.double(), -1)
    cands = []  # (score, class, box)
    for r in range(class_logits.shape[0]):
        for c in range(1, class_logits.shape[1]):
            x1, y1, x2, y2 = coder.decode(box_deltas[r : r + 1, 4 * c : 4 * c + 4], proposals[r : r + 1])[
                0
            ].tolist()
            box = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
            s = scores[r, c].item()
            if s > score_thresh and box[2] - box[0] >= 1e-2 and box[3] - box[1] >= 1e-2:
                cands.append((s, c, box))
    kept = []
    for c in range(1, class_logits.shape[1]):
        mine = [x for x in cands if x[1] == c]
        kept += [mine[i] for i in naive_nms([x[2] for x in mine], [x[0] for x in mine], nms_thresh)]
    kept.sort(key=lambda x: -x[0])
    return kept[:topk]


def test_postprocess_matches_naive_reference():
    torch.manual_seed(0)
    heads = fpn_heads(score_thresh=0.2, nms_thresh=0.4, detections_per_img=9)
    g = torch.Generator().manual_seed(3)
    props = [random_boxes(30, g), random_boxes(25, g)]
    # clustered proposals so that NMS has work to do
    props = [torch.cat([p, p[:10] + torch.randn(10, 4, generator=g) * 3]) for p in props]
    sizes = [(H, W), (70, 90)]
    logits = torch.randn(sum(len(p) for p in props), K, generator=g) * 2
    deltas = torch.randn(logits.shape[0], 4 * K, generator=g)
    detections = heads.box_branch.postprocess(logits, deltas, props, sizes)
    offsets = [0, len(props[0])]
    for d, p, size, o in zip(detections, props, sizes, offsets, strict=True):
        ref = naive_postprocess(logits[o : o + len(p)], deltas[o : o + len(p)], p, size, 0.2, 0.4, 9)
        assert len(d["scores"]) == len(ref) > 3
        torch.testing.assert_close(d["scores"], torch.tensor([x[0] for x in ref], dtype=torch.float32))
        assert d["labels"].tolist() == [x[1] for x in ref]
        torch.testing.assert_close(d["boxes"], torch.tensor([x[2] for x in ref]))


# ------------------------------------------------------------------------------------------- key names


def test_torchvision_key_names():
    heads = fpn_heads()
    keys = set(heads.state_dict())
    for k in (
        "box_head.fc6.weight",
        "box_head.fc7.bias",
        "box_predictor.cls_score.weight",
        "box_predictor.bbox_pred.bias",
        "mask_predictor.conv5_mask.weight",
        "mask_predictor.mask_fcn_logits.bias",
        "mask_head.mask_fcn1.weight",
        "mask_head.mask_fcn2.bias",
    ):
        assert k in keys


# State-dict keys of every preset, recorded before the RoI heads were split into branches: (number, first 16
# hex digits of the SHA-256 of the keys joined by newlines, in order). Keys of the keypoint branch
# (``roi_heads.keypoint_head.*``, ``roi_heads.keypoint_predictor.*``) are left out: it was added later.
PRESET_KEYS = {
    "R-50-C4": (279, "a91d22995ea40a30"),
    "R-101-C4": (534, "63b2bcd72342b8ab"),
    "R-50-FPN": (307, "4d4c6a178bd2819a"),
    "R-101-FPN": (562, "1113f8e6658bc089"),
    "X-101-FPN": (562, "1113f8e6658bc089"),
    "faster-R-50-FPN": (295, "4fc8d0c22aa6e5fa"),
    "tv-R-50-FPN": (307, "4d4c6a178bd2819a"),
    "R-18-FPN-small": (142, "9134cd5f8bfd7269"),
    "keypoint-R-50-FPN": (295, "4fc8d0c22aa6e5fa"),
    "keypoint-mask-R-50-FPN": (307, "4d4c6a178bd2819a"),
    "tv-keypoint-R-50-FPN": (295, "4fc8d0c22aa6e5fa"),
}


@pytest.mark.parametrize("name", sorted(set(PRESET_KEYS) & set(PRESETS)))
def test_state_dict_keys_of_every_preset_are_unchanged(name):
    with torch.device("meta"):  # no memory, no initialisation cost
        keys = list(build_model(name).state_dict())
    keypoint = [k for k in keys if k.startswith("roi_heads.keypoint_")]
    assert all(k.startswith(("roi_heads.keypoint_head.", "roi_heads.keypoint_predictor.")) for k in keypoint)
    kept = [k for k in keys if k not in keypoint]
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]
    heads = [k for k in kept if k.startswith("roi_heads.") and ".res5." not in k]
    assert (len(kept), digest) == PRESET_KEYS[name], f"the RoI heads' keys (res5 left out) are now {heads}"
