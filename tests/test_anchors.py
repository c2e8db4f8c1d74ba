import math

import pytest
import torch

from maskrcnn.ops.anchors import AnchorGenerator, make_cell_anchors
from tests.reference.anchors_ref import cell_anchors_ref, grid_anchors_ref

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
FPN_STRIDES = (4, 8, 16, 32, 64)


def fpn_feature_sizes(h, w):
    """Feature sizes of a ResNet-FPN on a padded (h, w) input: ceil(side / s) for P2-P5,
    P6 = stride-2 subsampling of P5 (kernel 1), i.e. ceil(P5 / 2)."""
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]
    p5h, p5w = sizes[-1]
    return [*sizes, ((p5h - 1) // 2 + 1, (p5w - 1) // 2 + 1)]


def fpn_generator(**kwargs):
    kwargs.setdefault("strides", FPN_STRIDES)
    return AnchorGenerator(sizes=FPN_SIZES, aspect_ratios=FPN_RATIOS, **kwargs)


# Worked out by hand: size 32, ratio 0.5 -> h = 32 * sqrt(0.5) = 22.63, w = 45.25; halves
# 11.31 and 22.63 -> round -> 11, 23. Ratio 2 swaps them, ratio 1 gives 16. The same for
# the larger sizes (x2 each level; 45.25 -> 45, 90.51 -> 91, 181.02 -> 181, 362.04 -> 362).
FPN_CELL_ANCHORS = [
    [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
    [[-45, -23, 45, 23], [-32, -32, 32, 32], [-23, -45, 23, 45]],
    [[-91, -45, 91, 45], [-64, -64, 64, 64], [-45, -91, 45, 91]],
    [[-181, -91, 181, 91], [-128, -128, 128, 128], [-91, -181, 91, 181]],
    [[-362, -181, 362, 181], [-256, -256, 256, 256], [-181, -362, 181, 362]],
]


def test_fpn_cell_anchors_by_hand():
    gen = fpn_generator()
    assert gen.num_anchors_per_location() == [3] * 5
    for cell, expected in zip(gen.cell_anchors, FPN_CELL_ANCHORS, strict=True):
        assert cell.dtype == torch.float32 and cell.device.type == "cpu"
        assert torch.equal(cell, torch.tensor(expected, dtype=torch.float32))


def test_cell_anchor_order_is_ratio_major_and_ties_round_to_even():
    # C4 style: one level, 5 sizes x 3 ratios; anchor a = ratio_index * 5 + size_index
    cell = make_cell_anchors((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))
    assert cell.shape == (15, 4)
    for r in range(3):
        for s in range(5):
            assert cell[r * 5 + s].tolist() == [float(v) for v in FPN_CELL_ANCHORS[s][r]]
    # ratio 1: halves 0.5, 1.5, 2.5 -> 0, 2, 2 (half to even, as torch.round)
    ties = make_cell_anchors((1, 3, 5), (1.0,))
    assert ties.abs().tolist() == [[0.0] * 4, [2.0] * 4, [2.0] * 4]


@pytest.mark.parametrize(
    "sizes, ratios",
    [
        ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0)),
        ((1, 3, 5, 7, 33, 45.5), (0.25, 0.5, 1.0, 1.7, 2.0, 3.0)),
        (tuple(range(1, 300, 7)), (0.5, 1.0, 2.0)),
    ],
)
def test_cell_anchors_match_float32_reference(sizes, ratios):
    assert make_cell_anchors(sizes, ratios).tolist() == cell_anchors_ref(sizes, ratios)


def test_grid_order_by_hand():
    gen = fpn_generator()
    anchors = gen(image_size=(64, 96), feature_sizes=fpn_feature_sizes(64, 96))
    p2 = anchors[0]
    W = 24  # 96 / 4
    # location (y=1, x=2) of P2 is shifted by (x * 4, y * 4) = (8, 4)
    first = (1 * W + 2) * 3
    assert p2[first : first + 3].tolist() == [
        [-15.0, -7.0, 31.0, 15.0],
        [-8.0, -12.0, 24.0, 20.0],
        [-3.0, -19.0, 19.0, 27.0],
    ]
    # the last anchor of P3 (8 x 12 grid, stride 8): (x, y) = (11, 7) -> shift (88, 56), ratio 2
    assert anchors[1][-1].tolist() == [88.0 - 23, 56.0 - 45, 88.0 + 23, 56.0 + 45]
    assert anchors[0][:3].tolist() == [[float(v) for v in row] for row in FPN_CELL_ANCHORS[0]]


def test_shapes_for_800x1216():
    gen = fpn_generator()
    feature_sizes = fpn_feature_sizes(800, 1216)
    assert feature_sizes == [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    anchors = gen(image_size=(800, 1216), feature_sizes=feature_sizes)
    assert [a.shape for a in anchors] == [(h * w * 3, 4) for h, w in feature_sizes]
    assert all(a.dtype == torch.float32 for a in anchors)


@pytest.mark.parametrize(
    "sizes, ratios, strides, image_size, feature_sizes",
    [
        (FPN_SIZES, FPN_RATIOS, FPN_STRIDES, (96, 128), fpn_feature_sizes(96, 128)),
        (((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),), (16,), (80, 112), [(5, 7)]),
        (((20, 40), (80,)), ((0.5, 1.0), (1.0, 2.0, 4.0)), ((4, 8), 16), (40, 64), [(10, 8), (3, 4)]),
    ],
)
def test_grid_matches_naive_loop(sizes, ratios, strides, image_size, feature_sizes):
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=strides)
    anchors = gen(image_size=image_size, feature_sizes=feature_sizes)
    for level, (a, fs, st) in enumerate(zip(anchors, feature_sizes, gen.strides, strict=True)):
        expected = grid_anchors_ref(sizes[level], ratios[level], fs, st)
        assert a.tolist() == expected


def test_torchvision_stride_rule():
    """torchvision derives the stride as padded_size // feature_size per axis. It agrees with the
    explicit strides when each padded side is a multiple of the stride: for P2-P5 whenever the
    padded size is a multiple of 32, for P6 only when it is a multiple of 64."""
    explicit = fpn_generator()
    derived = fpn_generator(strides=None)
    for image_size in [(800, 1216), (832, 1216), (1216, 800), (512, 640)]:
        fs = fpn_feature_sizes(*image_size)
        got = derived.level_strides(image_size, fs)
        assert got[:4] == [(4, 4), (8, 8), (16, 16), (32, 32)]
        assert got[:4] == explicit.level_strides(image_size, fs)[:4]
        expected_p6 = tuple(64 if side % 64 == 0 else side // math.ceil(side / 64) for side in image_size)
        assert got[4] == expected_p6
    # 800 = 25 * 32: P6 is 13 high and torchvision's stride is 800 // 13 = 61, not 64
    fs = fpn_feature_sizes(800, 1216)
    assert derived.level_strides((800, 1216), fs)[4] == (61, 64)
    a_tv = derived(image_size=(800, 1216), feature_sizes=fs)
    a_ex = explicit(image_size=(800, 1216), feature_sizes=fs)
    for level in range(4):
        assert torch.equal(a_tv[level], a_ex[level])
    p6 = a_tv[4].view(13, 19, 3, 4)
    assert p6[12, 0, 1].tolist() == [-256.0, 12 * 61 - 256.0, 256.0, 12 * 61 + 256.0]
    assert a_ex[4].view(13, 19, 3, 4)[12, 0, 1].tolist() == [-256.0, 12 * 64 - 256.0, 256.0, 12 * 64 + 256.0]
    # multiples of 64: identical everywhere
    fs = fpn_feature_sizes(832, 1216)
    for a, b in zip(
        derived(image_size=(832, 1216), feature_sizes=fs),
        explicit(image_size=(832, 1216), feature_sizes=fs),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_dtype_device_and_buffers():
    gen = fpn_generator()
    assert gen.state_dict() == {}  # non-persistent buffers
    fs = fpn_feature_sizes(64, 64)
    a64 = gen(image_size=(64, 64), feature_sizes=fs, dtype=torch.float64)
    a32 = gen(image_size=(64, 64), feature_sizes=fs)
    assert all(a.dtype == torch.float64 for a in a64)
    assert all(torch.equal(x.float(), y) for x, y in zip(a64, a32, strict=True))
    gen64 = fpn_generator(dtype=torch.float64, device="cpu")
    assert gen64.cell_anchors[0].dtype == torch.float64
    assert gen64(image_size=(64, 64), feature_sizes=fs)[0].dtype == torch.float64
    gen.to(torch.float64)
    assert gen.cell_anchors[0].dtype == torch.float64
    assert gen(image_size=(64, 64), feature_sizes=fs)[0].dtype == torch.float64
    assert torch.equal(gen.cell_anchors[4], torch.tensor(FPN_CELL_ANCHORS[4], dtype=torch.float64))


def test_cache():
    gen = fpn_generator(cache_size=6)
    fs = fpn_feature_sizes(64, 96)
    first = gen(image_size=(64, 96), feature_sizes=fs)
    second = gen(image_size=(64, 96), feature_sizes=fs)
    assert all(a is b for a, b in zip(first, second, strict=True))
    other = gen(image_size=(64, 96), feature_sizes=fs, dtype=torch.float64)
    assert all(a is not b for a, b in zip(first, other, strict=True))
    assert len(gen._cache) <= 6
    uncached = fpn_generator(cache_size=0)
    fresh = uncached(image_size=(64, 96), feature_sizes=fs)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh, strict=True))
    assert len(uncached._cache) == 0
    gen.to(torch.float64)
    assert len(gen._cache) == 0


def test_flat_aspect_ratios_and_validation():
    gen = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=(0.5, 1.0, 2.0, 4.0), strides=(4, 8))
    assert gen.num_anchors_per_location() == [4, 4]
    assert AnchorGenerator(
        sizes=((8, 16, 32),), aspect_ratios=((1.0, 2.0),), strides=(8,)
    ).num_anchors_per_location() == [6]
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((1.0,),) * 3, strides=(4, 8))
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((1.0,),) * 2, strides=(4,))
    with pytest.raises(ValueError):
        AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),), strides=(0,))
    with pytest.raises(ValueError):
        gen(image_size=(32, 32), feature_sizes=[(8, 8)])


def test_empty_feature_map():
    gen = AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),), strides=(4,))
    assert gen(image_size=(0, 0), feature_sizes=[(0, 5)])[0].shape == (0, 4)
