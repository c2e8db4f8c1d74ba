import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.ops.boxes import (
    BoxCoder,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
    remove_small_boxes,
)
from tests.reference.boxes_ref import decode_ref, encode_ref, iou_ref


def random_boxes(n, generator, dtype=torch.float64, max_xy=1000.0, max_wh=300.0, min_wh=1.0):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_xy
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


# --------------------------------------------------------------------------- box_area / iou


def test_box_area_values():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [1.5, 2.0, 2.5, 4.0], [3.0, 3.0, 3.0, 9.0]])
    assert torch.equal(box_area(boxes), torch.tensor([50.0, 2.0, 0.0]))
    assert box_area(boxes.view(1, 3, 4)).shape == (1, 3)


def test_box_area_half_is_upcast():
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 800.0]], dtype=torch.float16)
    area = box_area(boxes)
    assert area.dtype == torch.float32
    assert area.item() == 800000.0  # overflows float16


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [10.0, 0.0, 20.0, 10.0], [2.0, 2.0, 4.0, 4.0]]
    )
    expected = torch.tensor([[1.0, 50.0 / 150.0, 0.0, 4.0 / 100.0]])
    torch.testing.assert_close(box_iou(a, b), expected)


@pytest.mark.parametrize("seed", range(3))
def test_box_iou_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    a = random_boxes(37, g, max_xy=200.0, max_wh=100.0)
    b = random_boxes(23, g, max_xy=200.0, max_wh=100.0)
    b[:5] = a[:5]  # some identical boxes
    got = box_iou(a, b)
    assert got.shape == (37, 23) and got.dtype == torch.float64
    expected = torch.tensor(iou_ref(a.tolist(), b.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert ((got > 0) & (got < 1)).any()
    torch.testing.assert_close(got[:5].diagonal(), torch.ones(5, dtype=torch.float64))


def test_box_iou_zero_area_boxes_give_zero_not_nan():
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 4.0]], requires_grad=True)
    normal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(degenerate, torch.cat([degenerate.detach(), normal]))
    assert torch.equal(iou, torch.zeros(2, 3))
    iou.sum().backward()
    assert torch.isfinite(degenerate.grad).all()
    expected = torch.tensor(iou_ref(degenerate.tolist(), degenerate.tolist() + normal.tolist()))
    assert torch.equal(iou.detach(), expected)


def test_box_iou_empty_and_half():
    a = torch.zeros(0, 4)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert box_iou(a, b).shape == (0, 1)
    assert box_iou(b, a).shape == (1, 0)
    big = torch.tensor([[0.0, 0.0, 1000.0, 1000.0], [0.0, 0.0, 500.0, 1000.0]], dtype=torch.float16)
    iou = box_iou(big, big)
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou, torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


# --------------------------------------------------------------------------- clip / remove_small


def test_clip_boxes_values_and_leading_dims():
    boxes = torch.tensor(
        [[-5.0, -1.0, 700.0, 300.0], [10.0, 20.0, 30.0, 40.0], [900.0, 500.0, 1000.0, 600.0]]
    )
    clipped = clip_boxes(boxes, (400, 640))  # (h, w)
    expected = torch.tensor(
        [[0.0, 0.0, 640.0, 300.0], [10.0, 20.0, 30.0, 40.0], [640.0, 400.0, 640.0, 400.0]]
    )
    assert torch.equal(clipped, expected)
    assert boxes[0, 0] == -5.0  # not in place
    stacked = torch.stack([boxes, boxes * 2]).view(2, 1, 3, 4)
    out = clip_boxes(stacked, (400, 640))
    assert out.shape == (2, 1, 3, 4)
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out[1, 0], clip_boxes(boxes * 2, (400, 640)))


def test_clip_boxes_class_specific_layout():
    g = torch.Generator().manual_seed(0)
    boxes = torch.randn(10, 12, generator=g) * 500  # [N, 4 * K], K = 3
    out = clip_boxes(boxes, (300, 200))
    per_class = clip_boxes(boxes.view(10, 3, 4), (300, 200)).view(10, 12)
    assert torch.equal(out, per_class)
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= 200).all()
    assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] <= 300).all()


def test_remove_small_boxes():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # exactly min_size: kept
            [0.0, 0.0, 0.999, 5.0],  # too narrow
            [0.0, 0.0, 5.0, 0.5],  # too short
            [10.0, 10.0, 20.0, 30.0],
            [5.0, 5.0, 4.0, 9.0],  # inverted
        ]
    )
    keep = remove_small_boxes(boxes, 1.0)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [0, 3]
    assert remove_small_boxes(boxes, 0.0).tolist() == [0, 1, 2, 3]
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).shape == (0,)


def test_cxcywh_round_trip():
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(50, g).view(5, 10, 4)
    cxcywh = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(cxcywh[..., 2], boxes[..., 2] - boxes[..., 0])
    torch.testing.assert_close(cxcywh[..., 0], (boxes[..., 0] + boxes[..., 2]) / 2)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), boxes, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- BoxCoder


def test_encode_hand_values():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # w 10, h 20, centre (5, 10)
    target = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # w 20, h 20, centre (12, 14)
    deltas = coder.encode(reference_boxes=target, proposals=proposal)
    expected = torch.tensor([[10.0 * 7 / 10, 10.0 * 4 / 20, 5.0 * math.log(2.0), 0.0]])
    torch.testing.assert_close(deltas, expected)
    back = coder.decode(deltas, proposal)
    torch.testing.assert_close(back, target)


def test_encode_decode_match_naive_reference():
    g = torch.Generator().manual_seed(2)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    proposals = random_boxes(40, g)
    targets = random_boxes(40, g)
    enc = coder.encode(reference_boxes=targets, proposals=proposals)
    expected = [encode_ref(t, p, weights) for t, p in zip(targets.tolist(), proposals.tolist(), strict=True)]
    torch.testing.assert_close(enc, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    deltas = torch.randn(40, 4, generator=g, dtype=torch.float64) * 8  # some beyond the clamp
    dec = coder.decode(deltas, proposals)
    clip = coder.bbox_xform_clip
    expected = [
        decode_ref(d, p, weights, clip) for d, p in zip(deltas.tolist(), proposals.tolist(), strict=True)
    ]
    torch.testing.assert_close(dec, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-9)


# proposals and targets with bounded aspect/scale changes so that dw, dh stay below the clamp
_coord = st.floats(min_value=-2000.0, max_value=2000.0, allow_nan=False, allow_infinity=False)
_size = st.floats(min_value=0.5, max_value=800.0, allow_nan=False, allow_infinity=False)
_scale = st.floats(min_value=1 / 50.0, max_value=50.0, allow_nan=False, allow_infinity=False)


@st.composite
def _box_pair(draw):
    x, y, w, h = draw(_coord), draw(_coord), draw(_size), draw(_size)
    tx, ty = draw(_coord), draw(_coord)
    tw, th = w * draw(_scale), h * draw(_scale)
    return [x, y, x + w, y + h], [tx, ty, tx + tw, ty + th]


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(_box_pair(), min_size=1, max_size=8),
    weights=st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0)]),
)
def test_round_trip_float64(pairs, weights):
    proposals = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    targets = torch.tensor([t for _, t in pairs], dtype=torch.float64)
    coder = BoxCoder(weights=weights)
    deltas = coder.encode(reference_boxes=targets, proposals=proposals)
    assert deltas.dtype == torch.float64
    decoded = coder.decode(deltas, proposals)
    scale = targets.abs().max().item() + 1.0
    torch.testing.assert_close(decoded, targets, rtol=0, atol=1e-9 * scale)


def test_round_trip_float32():
    g = torch.Generator().manual_seed(3)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    # sides in [10, 300]: size ratios stay below exp(bbox_xform_clip) = 62.5, no clamping
    proposals = random_boxes(1000, g, dtype=torch.float32, min_wh=10.0)
    targets = random_boxes(1000, g, dtype=torch.float32, min_wh=10.0)
    decoded = coder.decode(coder.encode(reference_boxes=targets, proposals=proposals), proposals)
    torch.testing.assert_close(decoded, targets, rtol=0, atol=2e-3)


def test_decode_clamps_dw_dh_from_above_only():
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 1e6]], dtype=torch.float64), box)
    # clamped: width = height = 16 * 1000 / 16 = 1000 around the centre (8, 8)
    torch.testing.assert_close(
        out, torch.tensor([[8.0 - 500.0, 8.0 - 500.0, 8.0 + 500.0, 8.0 + 500.0]], dtype=torch.float64)
    )
    assert torch.isfinite(coder.decode(torch.tensor([[0.0, 0.0, 1e30, float("inf")]]), box.float())).all()
    small = coder.decode(torch.tensor([[0.0, 0.0, -10.0, -10.0]], dtype=torch.float64), box)
    expected_half = 8.0 * math.exp(-10.0)
    torch.testing.assert_close(
        small,
        torch.tensor(
            [[8 - expected_half, 8 - expected_half, 8 + expected_half, 8 + expected_half]],
            dtype=torch.float64,
        ),
    )
    # the clamp applies after dividing by the weights
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=1.0)
    out = weighted.decode(torch.tensor([[0.0, 0.0, 5.0, 50.0]], dtype=torch.float64), box)
    half = 8.0 * math.e
    torch.testing.assert_close(
        out, torch.tensor([[8 - half, 8 - half, 8 + half, 8 + half]], dtype=torch.float64)
    )


def test_decode_class_specific_deltas():
    g = torch.Generator().manual_seed(4)
    coder = BoxCoder()
    boxes = random_boxes(20, g, dtype=torch.float32)
    num_classes = 5
    deltas = torch.randn(20, 4 * num_classes, generator=g)
    out = coder.decode(deltas, boxes)
    assert out.shape == (20, 4 * num_classes)
    for k in range(num_classes):
        per_class = coder.decode(deltas[:, 4 * k : 4 * k + 4], boxes)
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], per_class, rtol=0, atol=0)
    with pytest.raises(ValueError):
        coder.decode(torch.zeros(3, 6), boxes[:3])


def test_zero_deltas_give_back_the_boxes_and_leading_dims():
    g = torch.Generator().manual_seed(5)
    coder = BoxCoder()
    boxes = random_boxes(12, g).view(3, 4, 4)
    out = coder.decode(torch.zeros(3, 4, 4, dtype=torch.float64), boxes)
    torch.testing.assert_close(out, boxes, rtol=0, atol=1e-12)
    enc = coder.encode(reference_boxes=boxes, proposals=boxes)
    assert enc.shape == (3, 4, 4)
    torch.testing.assert_close(enc, torch.zeros_like(enc), rtol=0, atol=1e-12)
    assert coder.decode(torch.zeros(0, 8), torch.zeros(0, 4)).shape == (0, 8)
    assert coder.encode(reference_boxes=torch.zeros(0, 4), proposals=torch.zeros(0, 4)).shape == (0, 4)


def test_half_inputs_are_upcast():
    coder = BoxCoder()
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 600.0]], dtype=torch.float16)
    deltas = torch.tensor([[1.0, -1.0, 2.0, 0.5]], dtype=torch.float16)
    out = coder.decode(deltas, boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, coder.decode(deltas.float(), boxes.float()))
    enc = coder.encode(reference_boxes=boxes, proposals=boxes.float())
    assert enc.dtype == torch.float32


def test_gradients_flow_through_decode():
    coder = BoxCoder()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.zeros(1, 8, requires_grad=True)
    coder.decode(deltas, boxes).sum().backward()
    assert torch.isfinite(deltas.grad).all() and deltas.grad.abs().sum() > 0
