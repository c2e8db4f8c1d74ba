import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.modeling.matcher import Matcher
from maskrcnn.modeling.rpn import (
    RPN,
    RPNHead,
    flatten_head_outputs,
    label_anchors,
    rpn_losses,
    select_proposals,
)
from maskrcnn.ops.anchors import AnchorGenerator
from maskrcnn.ops.boxes import BoxCoder, box_iou

C = 8
IMAGE = (64, 64)
FEATURE_SIZES = [(16, 16), (8, 8)]
NUM_ANCHORS = 3  # per location: 3 aspect ratios, one size per level
P = sum(h * w * NUM_ANCHORS for h, w in FEATURE_SIZES)  # 960


def make_rpn(weight_scale=1.0, **kwargs):
    torch.manual_seed(0)
    head = RPNHead(in_channels=C, num_anchors=NUM_ANCHORS)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(weight_scale)
    gen = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8))
    return RPN(head=head, anchor_generator=gen, **kwargs)


def make_features(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, h, w, generator=g) for h, w in FEATURE_SIZES]


def targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 30.0, 60.0, 50.0]])},
        {"boxes": torch.tensor([[10.0, 10.0, 26.0, 26.0]])},
    ]


def run(rpn, feats=None, image_sizes=(IMAGE, IMAGE), tg=None):
    feats = make_features(len(image_sizes)) if feats is None else feats
    return rpn(features=feats, image_size=IMAGE, image_sizes=list(image_sizes), targets=tg)


# ---------------------------------------------------------------- head


def test_head_shapes_and_init():
    torch.manual_seed(0)
    head = RPNHead(in_channels=C, num_anchors=NUM_ANCHORS)
    assert isinstance(head.conv, nn.Conv2d)
    logits, deltas = head(make_features())
    assert [tuple(t.shape) for t in logits] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert [tuple(t.shape) for t in deltas] == [(2, 12, 16, 16), (2, 12, 8, 8)]
    for conv in (head.conv, head.cls_logits, head.bbox_pred):
        assert conv.bias.abs().max() == 0
        assert 0.005 < conv.weight.std() < 0.015
    deep = RPNHead(in_channels=C, num_anchors=NUM_ANCHORS, num_convs=2)
    assert [tuple(t.shape) for t in deep(make_features())[1]] == [(2, 12, 16, 16), (2, 12, 8, 8)]


def test_flatten_head_outputs_matches_anchor_order():
    n, a, h, w = 2, 3, 4, 5
    logits = torch.randn(n, a, h, w)
    deltas = torch.randn(n, 4 * a, h, w)
    obj, dl = flatten_head_outputs([logits], [deltas])
    assert obj.shape == (n, h * w * a) and dl.shape == (n, h * w * a, 4)
    y, x, k = 2, 3, 1
    idx = (y * w + x) * a + k
    assert obj[1, idx] == logits[1, k, y, x]
    assert torch.equal(dl[1, idx], deltas[1, 4 * k : 4 * k + 4, y, x])


# ---------------------------------------------------------------- proposals


def test_eval_shapes_and_no_losses():
    rpn = make_rpn().eval()
    proposals, losses = run(rpn)
    assert losses == {}
    assert len(proposals) == 2
    for p in proposals:
        assert p.dim() == 2 and p.shape[1] == 4 and 0 < p.shape[0] <= 1000
        assert p.dtype == torch.float32 and not p.requires_grad


def test_train_eval_topk_switch():
    # NMS threshold 1 suppresses nothing: counts are exactly min(post, levels * pre).
    kwargs = dict(pre_nms_topk={True: 40, False: 10}, nms_thresh=1.0)
    rpn = make_rpn(post_nms_topk={True: 1000, False: 1000}, **kwargs)
    assert [len(p) for p in run(rpn.eval())[0]] == [20, 20]
    assert [len(p) for p in run(rpn.train(), tg=targets())[0]] == [80, 80]
    rpn = make_rpn(post_nms_topk={True: 50, False: 15}, **kwargs)
    assert [len(p) for p in run(rpn.eval())[0]] == [15, 15]
    assert [len(p) for p in run(rpn.train(), tg=targets())[0]] == [50, 50]


def test_without_nms_proposals_are_the_top_anchors_decoded():
    # float64: the RPN decodes all images' top anchors in one call and the check decodes them per image;
    # in float32 the two can round exp() differently (vectorised body vs scalar tail of ATen's loop, whose
    # split depends on the CPU's vector width), i.e. by an ulp of a coordinate (~4e-6 at 64 px), the size of
    # a float32 tolerance. In float64 such differences are ~1e-14 px, far below TOL and any real fault.
    rpn = make_rpn(weight_scale=30.0, pre_nms_topk={True: 7, False: 7}, nms_thresh=1.0).eval().double()
    feats = [f.double() for f in make_features()]
    proposals, _ = run(rpn, feats)
    logits, deltas = rpn.head(feats)
    obj, dl = flatten_head_outputs(logits, deltas)
    anchors = torch.cat(rpn.anchor_generator(image_size=IMAGE, feature_sizes=FEATURE_SIZES))
    n0 = FEATURE_SIZES[0][0] * FEATURE_SIZES[0][1] * NUM_ANCHORS
    for i in range(2):
        idx = torch.cat([obj[i, :n0].topk(7).indices, obj[i, n0:].topk(7).indices + n0])
        idx = idx[obj[i, idx].argsort(descending=True)]
        boxes = rpn.box_coder.decode(dl[i, idx], anchors[idx]).clamp(min=0, max=64)
        boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1e-3) & (boxes[:, 3] - boxes[:, 1] >= 1e-3)]
        assert len(boxes) > 7
        assert proposals[i].dtype == torch.float64
        torch.testing.assert_close(proposals[i], boxes.detach(), rtol=0, atol=1e-9)


def select(rpn, feats, image_sizes, num_levels=2, nms_thresh=0.7):
    logits, deltas = rpn.head(feats)
    obj, dl = flatten_head_outputs(logits, deltas)
    anchors = rpn.anchor_generator(image_size=IMAGE, feature_sizes=FEATURE_SIZES)
    per_level = [len(a) for a in anchors] if num_levels == 2 else [P]
    return select_proposals(
        obj, dl, torch.cat(anchors), per_level, image_sizes,
        box_coder=rpn.box_coder, pre_nms_topk=1000, post_nms_topk=1000, nms_thresh=nms_thresh,
        min_size=1e-3, score_thresh=0.0,
    )  # fmt: skip


def test_proposals_inside_image_and_sorted():
    rpn = make_rpn(weight_scale=30.0).eval()  # large deltas: many boxes leave the image
    image_sizes = [(64, 64), (40, 50)]
    boxes, scores = select(rpn, make_features(), image_sizes)
    for b, s, (h, w) in zip(boxes, scores, image_sizes, strict=True):
        assert len(b) == len(s) > 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] - b[:, 0] >= 1e-3).all() and (b[:, 3] - b[:, 1] >= 1e-3).all()
        assert (s[:-1] >= s[1:]).all() and ((s >= 0) & (s <= 1)).all()


def test_nms_within_a_level():
    rpn = make_rpn().eval()
    feats = make_features()
    # all anchors as one level: no two proposals overlap by more than the threshold
    boxes, _ = select(rpn, feats, [IMAGE, IMAGE], num_levels=1, nms_thresh=0.5)
    for b in boxes:
        assert 0 < len(b) < P
        assert (box_iou(b, b) - torch.eye(len(b))).max() <= 0.5
    # two levels: suppression only within a level, so more proposals remain
    two, _ = select(rpn, feats, [IMAGE, IMAGE], num_levels=2, nms_thresh=0.5)
    assert all(len(t) > len(b) for t, b in zip(two, boxes, strict=True))


def test_score_thresh_and_min_size():
    rpn = make_rpn(weight_scale=30.0, score_thresh=0.6, min_size=4.0).eval()
    tight = make_rpn(weight_scale=30.0).eval()
    proposals, _ = run(rpn)
    loose, _ = run(tight)
    for p, q in zip(proposals, loose, strict=True):
        assert len(p) < len(q)
        assert ((p[:, 2] - p[:, 0]) >= 4).all() and ((p[:, 3] - p[:, 1]) >= 4).all()


# ---------------------------------------------------------------- training


def test_label_anchors():
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50, 60, 60]]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    matcher = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    labels, matched = label_anchors(anchors, gt, matcher)
    assert labels.tolist() == [1.0, 1.0, -1.0, 0.0]  # IoU 1, 0.8, 0.5, 0
    assert torch.equal(matched[0], gt[0])
    labels, matched = label_anchors(anchors, torch.zeros(0, 4), matcher)
    assert labels.tolist() == [0.0] * 4 and matched.shape == (4, 4)


def test_rpn_losses_by_hand():
    # Fewer labelled anchors than the sample size: every labelled anchor is used, no randomness.
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0], [5.0, 5.0, 15.0, 25.0]])
    objectness = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]], requires_grad=True)
    deltas = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    gt = torch.tensor([[1.0, 1.0, 11.0, 12.0], [12.0, 9.0, 29.0, 22.0]])
    matched = torch.stack([torch.stack([gt[0], gt[0], gt[0]]), torch.stack([gt[1], gt[1], gt[1]])])
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    loss_cls, loss_box = rpn_losses(objectness, deltas, anchors, labels, matched, box_coder=coder)

    used = labels >= 0
    want_cls = F.binary_cross_entropy_with_logits(objectness[used], labels[used])
    t0 = coder.encode(gt[0], anchors[0])
    t1 = coder.encode(gt[1], anchors[1])
    beta = 1 / 9

    def sl1(x):
        x = x.abs()
        return torch.where(x < beta, 0.5 * x**2 / beta, x - 0.5 * beta).sum()

    want_box = (sl1(deltas[0, 0] - t0) + sl1(deltas[1, 1] - t1)) / used.sum()
    torch.testing.assert_close(loss_cls, want_cls)
    torch.testing.assert_close(loss_box, want_box)


def test_rpn_losses_sample_size():
    # 600 foreground and 600 background anchors: loss over 128 + 128 of them per image.
    n, p = 1, 1200
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(p, 1)
    labels = torch.cat([torch.ones(600), torch.zeros(600)])[None]
    matched = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(n, p, 1)  # targets are exactly 0
    objectness = torch.zeros(n, p)
    deltas = torch.ones(n, p, 4)  # smooth-L1 of 1 = 1 - beta / 2 per coordinate
    loss_cls, loss_box = rpn_losses(
        objectness, deltas, anchors, labels, matched, box_coder=BoxCoder(weights=(1, 1, 1, 1))
    )
    assert loss_cls.item() == pytest.approx(math.log(2))
    assert loss_box.item() == pytest.approx(128 * 4 * (1 - 1 / 18) / 256)


def test_train_losses_finite_and_gradients_reach_head():
    rpn = make_rpn().train()
    feats = make_features()
    tg = targets()
    tg_before = copy.deepcopy(tg)
    proposals, losses = run(rpn, feats, tg=tg)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_rpn_box"] > 0
    assert all(not p.requires_grad for p in proposals)
    sum(losses.values()).backward()
    for name, param in rpn.head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for a, b in zip(tg, tg_before, strict=True):
        assert torch.equal(a["boxes"], b["boxes"])


def test_image_without_boxes():
    rpn = make_rpn().train()
    empty = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    _, losses = run(rpn, tg=empty)
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    assert losses["loss_rpn_box"].item() == 0.0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in rpn.head.parameters())

    mixed = [targets()[0], {"boxes": torch.zeros(0, 4)}]
    _, losses = run(make_rpn().train(), tg=mixed)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_box"] > 0


def test_training_needs_targets():
    with pytest.raises(ValueError):
        run(make_rpn().train())


def test_wrong_number_of_anchors_is_reported():
    gen = AnchorGenerator(sizes=((16, 24), (32, 48)), aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8))
    rpn = RPN(head=RPNHead(in_channels=C, num_anchors=NUM_ANCHORS), anchor_generator=gen).eval()
    with pytest.raises(ValueError, match="num_anchors"):
        run(rpn)
