"""MultiLevelPooler: FPN level assignment (hand-computed), order of the outputs, every RoI operator."""

import pytest
import torch

from maskrcnn.modeling.poolers import POOLER_KINDS, MultiLevelPooler, assign_levels
from maskrcnn.ops.roi_align import roi_align, roi_pool, roi_warp

FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def square(cx: float, cy: float, side: float) -> list[float]:
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def level_features(n: int = 1, c: int = 2, size: int = 1024) -> list[torch.Tensor]:
    """One map per FPN level (strides 4..32) holding the constant value k (its level) everywhere."""
    return [torch.full((n, c, size // 2**k, size // 2**k), float(k)) for k in (2, 3, 4, 5)]


def test_assign_levels_hand_computed():
    # k = floor(4 + log2(sqrt(area) / 224) + 1e-6), clamped to [2, 5]
    sides = [112.0, 224.0, 448.0, 1000.0, 56.0, 10.0, 447.0, 223.0]
    expected = [3, 4, 5, 5, 2, 2, 4, 3]  # 1000 -> 6.16 -> clamped to 5; 10 -> -0.49 -> 2; 447 -> 4.997 -> 4
    boxes = torch.tensor([square(500, 500, s) for s in sides])
    assert assign_levels(boxes, 2, 5).tolist() == expected
    # non-square: sqrt(112 * 448) = 224 -> level 4
    assert assign_levels(torch.tensor([[0.0, 0.0, 112.0, 448.0]]), 2, 5).tolist() == [4]
    # unclamped range shows the raw rule; eps makes exact powers of two land on their level
    assert assign_levels(boxes, -10, 10).tolist() == [3, 4, 5, 6, 2, -1, 4, 3]
    # float64 boxes are computed in float64 and give the same levels here; float16 is upcast (no overflow)
    assert assign_levels(boxes.double(), 2, 5).tolist() == expected
    assert assign_levels(boxes.half(), 2, 5).tolist() == expected
    # empty and inverted boxes go to the finest level
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0], [10.0, 10.0, 0.0, 40.0], [0.0, 0.0, 900.0, 0.0]])
    assert assign_levels(degenerate, 2, 5).tolist() == [2, 2, 2]


def test_pooler_levels_through_constant_maps():
    pooler = MultiLevelPooler(output_size=2, scales=FPN_SCALES, sampling_ratio=2)
    sides = [112.0, 224.0, 448.0, 1000.0, 20.0]
    boxes = torch.tensor([square(512, 512, s) for s in sides])
    out = pooler(level_features(), [boxes])
    assert out.shape == (5, 2, 2, 2)
    # every output bin averages samples of one map, whose constant value is the level
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.tensor([3.0, 4.0, 5.0, 5.0, 2.0]))


def test_pooler_order_preserved_across_images_and_levels():
    torch.manual_seed(0)
    n, c, size = 2, 3, 256
    features = [torch.randn(n, c, size // 2**k, size // 2**k) for k in (2, 3, 4, 5)]
    g = torch.Generator().manual_seed(1)
    # sides spread over 5..150 px, shuffled: with canonical_scale 28, levels 2 (< 14 px) .. 5 (>= 56 px)
    sides = torch.tensor([5.0, 9, 13, 15, 20, 27, 29, 40, 55, 57, 90, 150])[torch.randperm(12, generator=g)]
    aspect = torch.rand(12, generator=g) + 0.5
    xy = torch.rand(12, 2, generator=g) * 100
    wh = torch.stack([sides * aspect, sides / aspect], dim=1)
    boxes = list(torch.cat([xy, xy + wh], dim=1).split([7, 5]))
    pooler = MultiLevelPooler(output_size=(3, 4), scales=FPN_SCALES, sampling_ratio=2, canonical_scale=28)
    out = pooler(features, boxes)
    assert out.shape == (12, c, 3, 4)
    levels = torch.cat([assign_levels(b, 2, 5, canonical_scale=28) for b in boxes]) - 2
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the test really mixes levels
    expected = []
    for img, b in enumerate(boxes):
        for box, level in zip(b, assign_levels(b, 2, 5, canonical_scale=28) - 2, strict=True):
            roi = torch.cat([torch.tensor([float(img)]), box])[None]
            expected.append(roi_align(features[level], roi, (3, 4), FPN_SCALES[level], 2))
    torch.testing.assert_close(out, torch.cat(expected), rtol=0, atol=1e-6)


def test_single_level_needs_no_mapping():
    torch.manual_seed(0)
    feature = torch.randn(1, 4, 20, 24)
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.5, 6.0]])
    pooler = MultiLevelPooler(output_size=14, scales=[1 / 16], sampling_ratio=0, aligned=True)
    expected = roi_align(feature, [boxes], 14, 1 / 16, 0, aligned=True)
    torch.testing.assert_close(pooler([feature], [boxes]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_each_kind_matches_its_operator_and_backprops(kind):
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 16, 16, requires_grad=True)
    boxes = [
        torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
        torch.tensor([[0.0, 8.0, 20.0, 60.0], [3.0, 3.0, 9.0, 9.0]]),
    ]
    pooler = MultiLevelPooler(output_size=5, scales=[1 / 4], sampling_ratio=2, kind=kind)
    out = pooler([feature], boxes)
    assert out.shape == (3, 3, 5, 5)
    expected = {
        "align": lambda: roi_align(feature, boxes, 5, 0.25, 2),
        "align_max": lambda: roi_align(feature, boxes, 5, 0.25, 2, mode="max"),
        "pool": lambda: roi_pool(feature, boxes, 5, 0.25),
        "warp_max": lambda: roi_warp(feature, boxes, 5, 0.25, 2, mode="max"),
        "warp_avg": lambda: roi_warp(feature, boxes, 5, 0.25, 2, mode="avg"),
    }[kind]()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert feature.grad is not None and feature.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", POOLER_KINDS)
def test_each_kind_multi_level(kind):
    pooler = MultiLevelPooler(output_size=2, scales=FPN_SCALES, sampling_ratio=2, kind=kind)
    boxes = torch.tensor([square(512, 512, s) for s in (112.0, 224.0, 448.0, 64.0)])
    out = pooler(level_features(), [boxes])
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.tensor([3.0, 4.0, 5.0, 2.0]))


def test_gradient_reaches_every_used_level():
    features = [f.clone().requires_grad_(True) for f in level_features(c=1, size=512)]
    boxes = torch.tensor([square(256, 256, s) for s in (56.0, 112.0, 224.0, 448.0)])
    pooler = MultiLevelPooler(output_size=2, scales=FPN_SCALES)
    pooler(features, [boxes]).sum().backward()
    for f in features:
        assert f.grad is not None
        # each box has 2x2 bins x 4 samples with weights summing to 1 per bin -> total gradient 4
        assert f.grad.sum().item() == pytest.approx(4.0, abs=1e-4)


def test_empty_boxes():
    features = level_features(n=2, c=3, size=64)
    pooler = MultiLevelPooler(output_size=7, scales=FPN_SCALES)
    out = pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, 3, 7, 7)
    out = pooler(features, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 32.0, 32.0]])])
    assert out.shape == (1, 3, 7, 7)
    torch.testing.assert_close(out.mean(), torch.tensor(2.0))  # 32 px -> level 2 (from the second image)


def test_dtype_and_inputs_not_modified():
    features = [f.double() for f in level_features(c=2, size=256)]
    boxes = torch.tensor([square(100, 100, 60.0), square(100, 100, 150.0)], dtype=torch.float64)
    before = boxes.clone()
    out = MultiLevelPooler(output_size=3, scales=FPN_SCALES)(features, [boxes])
    assert out.dtype == torch.float64
    assert torch.equal(boxes, before)


def test_invalid_configuration():
    with pytest.raises(ValueError):
        MultiLevelPooler(output_size=7, scales=FPN_SCALES, kind="bilinear")
    with pytest.raises(ValueError):
        MultiLevelPooler(output_size=7, scales=[1 / 4, 1 / 16])  # not successive levels
    pooler = MultiLevelPooler(output_size=7, scales=FPN_SCALES)
    with pytest.raises(ValueError):
        pooler(level_features()[:3], [torch.zeros(0, 4)])
