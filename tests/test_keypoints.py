"""Tests of the keypoint branch's pure parts: targets, decoding, loss, flip map, head and predictor.

References: hand-computed cases and the naive loops of tests/reference/keypoints_ref.py; when
/tmp/tvref-venv and ../shared/tools/tvref exist, torchvision's own functions too (optional).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import maskrcnn.ops.keypoints as kp_ops
from maskrcnn.data.keypoints import COCO_PERSON_KEYPOINT_NAMES
from maskrcnn.modeling.keypoint_head import KeypointRCNNHeads, KeypointRCNNPredictor
from maskrcnn.modeling.losses import keypoint_loss
from maskrcnn.ops.keypoints import heatmaps_to_keypoints, keypoint_flip_map, keypoints_to_heatmap_targets
from tests.common import SHARED
from tests.reference.keypoints_ref import (
    heatmaps_to_keypoints_ref,
    keypoint_loss_ref,
    keypoints_to_heatmap_targets_ref,
)

COCO_KEYPOINTS = list(COCO_PERSON_KEYPOINT_NAMES)
TVREF = os.path.join(SHARED, "tools", "tvref")
TVREF_PYTHON = "/tmp/tvref-venv/bin/python"
KEYS_JSON = os.path.join(TVREF, "keypointrcnn_resnet50_fpn_keys.json")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Results independent of the thread count; the machine is shared."""


# --------------------------------------------------------------------------------------------------
# keypoints_to_heatmap_targets
# --------------------------------------------------------------------------------------------------


def test_targets_hand_computed():
    # RoI 0 is 56 x 56 px (one pixel per cell); RoI 1 is 112 x 28 (cells 2 px wide, 0.5 px high).
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0], [0.0, 0.0, 112.0, 28.0]])
    kps = torch.tensor(
        [
            [
                [66.0, 76.0, 2.0],  # bottom-right corner: the closed right / bottom edge -> (55, 55)
                [10.0, 20.0, 1.0],  # top-left corner -> cell 0, valid
                [67.0, 30.0, 2.0],  # right of the RoI -> invalid
                [30.0, 30.0, 0.0],  # not labelled -> invalid
                [9.99, 30.0, 2.0],  # just left of the RoI: floor(-0.01) = -1 -> invalid
                [30.5, 41.2, 2.0],  # x = floor(20.5) = 20, y = floor(21.2) = 21
                [66.0, 30.0, 2.0],  # right edge only: x = 55, y = 10
            ],
            [
                [111.9, 27.9, 2.0],  # floor(55.95), floor(55.8) -> (55, 55)
                [57.0, 14.2, 2.0],  # x = floor(28.5) = 28, y = floor(28.4) = 28
                [112.0, 14.2, 1.0],  # right edge -> x = 55, y = 28
                [50.0, 28.5, 2.0],  # below the RoI -> invalid
                [-0.5, 3.0, 2.0],  # left of the RoI -> invalid
                [0.0, 0.0, 2.0],  # top-left corner -> 0
                [2.0, 0.6, 2.0],  # x = floor(1.0) = 1 (a cell border), y = floor(1.2) = 1
            ],
        ]
    )
    indices, valid = keypoints_to_heatmap_targets(kps, rois, heatmap_size=56)
    assert indices.dtype == torch.int64 and valid.dtype == torch.bool
    assert valid.tolist() == [
        [True, True, False, False, False, True, True],
        [True, True, True, False, False, True, True],
    ]
    assert indices.tolist() == [
        [55 * 56 + 55, 0, 0, 0, 0, 21 * 56 + 20, 10 * 56 + 55],
        [55 * 56 + 55, 28 * 56 + 28, 28 * 56 + 55, 0, 0, 0, 1 * 56 + 1],
    ]


def _random_keypoints(g, r, k, dtype):
    """RoIs of 1 - 200 px and keypoints spread 20% beyond them, some on the right / bottom edges."""
    xy = torch.rand(r, 2, generator=g, dtype=dtype) * 300
    wh = 1 + torch.rand(r, 2, generator=g, dtype=dtype) * 199
    rois = torch.cat([xy, xy + wh], 1)
    rel = torch.rand(r, k, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    pts = xy[:, None] + rel * wh[:, None]
    edge = torch.rand(r, k, 2, generator=g) < 0.1
    pts = torch.where(edge, (xy + wh)[:, None].expand_as(pts), pts)
    vis = torch.randint(0, 3, (r, k, 1), generator=g).to(dtype)
    return torch.cat([pts, vis], 2), rois


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_match_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    for size in (56, 7):
        kps, rois = _random_keypoints(g, 30, 17, dtype)
        kps_in, rois_in = kps.clone(), rois.clone()
        indices, valid = keypoints_to_heatmap_targets(kps, rois, heatmap_size=size)
        ref_indices, ref_valid = keypoints_to_heatmap_targets_ref(kps, rois, size)
        # exact: same rounding, integer outputs
        assert torch.equal(valid, ref_valid) and torch.equal(indices, ref_indices)
        assert 0.2 < valid.float().mean() < 0.9  # the cases are mixed
        assert torch.equal(kps, kps_in) and torch.equal(rois, rois_in)  # inputs untouched


def test_targets_degenerate_and_empty():
    # zero-width RoI: only a point on its (single) column is inside; NaN keypoints are invalid
    rois = torch.tensor([[5.0, 5.0, 5.0, 61.0]])
    kps = torch.tensor([[[5.0, 6.5, 2.0], [5.5, 6.5, 2.0], [float("nan"), 6.0, 2.0]]])
    indices, valid = keypoints_to_heatmap_targets(kps, rois)
    assert valid.tolist() == [[True, False, False]] and indices.tolist() == [[1 * 56 + 55, 0, 0]]
    indices, valid = keypoints_to_heatmap_targets(torch.zeros(0, 17, 3), torch.zeros(0, 4))
    assert indices.shape == valid.shape == (0, 17)


# --------------------------------------------------------------------------------------------------
# heatmaps_to_keypoints
# --------------------------------------------------------------------------------------------------


def test_decode_one_hot_at_heatmap_size():
    # a 56 x 56 box: the bicubic resize to (56, 56) is the identity, so the peak cell is found exactly
    # and decodes to its centre: x = ix + 0.5 + x1.
    boxes = torch.tensor([[10.0, 20.0, 66.0, 76.0]])
    logits = torch.zeros(1, 3, 56, 56)
    for j, (iy, ix) in enumerate([(3, 7), (0, 0), (55, 55)]):
        logits[0, j, iy, ix] = 10.0
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    assert keypoints.tolist() == [[[17.5, 23.5, 1.0], [10.5, 20.5, 1.0], [65.5, 75.5, 1.0]]]
    assert scores.tolist() == [[10.0, 10.0, 10.0]]


@pytest.mark.parametrize("scale", [2, 3])
def test_decode_one_hot_upsampled_lands_in_the_cell(scale):
    # a box scale x the heatmap: the peak is within half an image pixel of the cell centre
    # (with a 2x box the two nearest pixels tie and the first wins: 0.5 px left of the centre).
    x1, y1 = 4.0, 9.0
    boxes = torch.tensor([[x1, y1, x1 + 56 * scale, y1 + 56 * scale]])
    logits = torch.zeros(1, 1, 56, 56)
    logits[0, 0, 30, 12] = 5.0
    keypoints, _ = heatmaps_to_keypoints(logits, boxes)
    centre = torch.tensor([x1 + (12 + 0.5) * scale, y1 + (30 + 0.5) * scale])
    assert (keypoints[0, 0, :2] - centre).abs().max() <= 0.5


def test_decode_tiny_and_empty():
    # boxes under 1 px are widened to 1 px: a single cell, at the box's corner + 0.5
    boxes = torch.tensor([[5.0, 7.0, 5.3, 7.0]])
    logits = torch.randn(1, 2, 56, 56, generator=torch.Generator().manual_seed(0))
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    assert keypoints.tolist() == [[[5.5, 7.5, 1.0], [5.5, 7.5, 1.0]]]
    torch.testing.assert_close(scores, F.interpolate(logits, size=(1, 1), mode="bicubic")[..., 0, 0])
    keypoints, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert keypoints.shape == (0, 17, 3) and scores.shape == (0, 17) and keypoints.dtype == torch.float32


def _random_detections(g, n, k, s, dtype):
    """Smooth-ish random heatmaps and boxes of 0.2 - 150 px, a few sharing one size (grouped decoding)."""
    logits = F.avg_pool2d(torch.randn(n, k, s + 2, s + 2, generator=g, dtype=dtype) * 6, 3, stride=1)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 400
    wh = 0.2 + torch.rand(n, 2, generator=g, dtype=dtype) * 150
    wh[: n // 3] = wh[0]
    return logits, torch.cat([xy, xy + wh], 1)


# Tolerance of the decoded coordinates. Scores and argmax cells are exact: both sides run the same
# bicubic kernel on the same map in the same dtype. Coordinates: ours is (ix + 0.5) * (w / W) + x1 with
# three roundings in the dtype, the reference (ix + 0.5) * w / W + x1 in float64; coordinates are below
# ~600 px, so |difference| <= 3 * eps * 600 + float64 rounding: 2e-4 for float32 (eps = 2**-23 covers
# the float32 -> float64 and back), 1e-12 for float64 (eps = 2**-52). A wrong cell moves a point by
# >= w / W >= 0.2 px.
COORD_TOL = {torch.float32: 2e-4, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_matches_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits, boxes = _random_detections(g, 7, 5, 56, dtype)
    logits_in, boxes_in = logits.clone(), boxes.clone()
    keypoints, scores = heatmaps_to_keypoints(logits, boxes)
    ref_keypoints, ref_scores = heatmaps_to_keypoints_ref(logits, boxes)
    assert keypoints.dtype == scores.dtype == dtype
    torch.testing.assert_close(scores, ref_scores.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(keypoints.double(), ref_keypoints, atol=COORD_TOL[dtype], rtol=0)
    assert torch.equal(logits, logits_in) and torch.equal(boxes, boxes_in)


def test_decode_chunks_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits, boxes = _random_detections(g, 9, 4, 14, torch.float32)
    boxes[:, 2:] = boxes[:, :2] + torch.tensor([40.0, 30.0])  # one size: one group
    whole = heatmaps_to_keypoints(logits, boxes)
    monkeypatch.setattr(kp_ops, "_MAX_UPSAMPLED_ELEMENTS", 2 * 4 * 40 * 30)  # chunks of 2 detections
    chunked = heatmaps_to_keypoints(logits, boxes)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_encode_then_decode_round_trip():
    # a keypoint's target cell, as a one-hot heatmap on a 56 px box, decodes to within half a cell
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([[30.0, 40.0, 86.0, 96.0]])
    pts = boxes[:, None, :2] + torch.rand(1, 17, 2, generator=g) * 56
    indices, valid = keypoints_to_heatmap_targets(torch.cat([pts, torch.ones(1, 17, 1)], 2), boxes)
    assert valid.all()
    logits = F.one_hot(indices, 56 * 56).float().view(1, 17, 56, 56)
    keypoints, _ = heatmaps_to_keypoints(logits, boxes)
    assert (keypoints[..., :2] - pts).abs().max() <= 0.5


# --------------------------------------------------------------------------------------------------
# keypoint_loss
# --------------------------------------------------------------------------------------------------


def _loss_case(g, r, k, s, dtype):
    logits = torch.randn(r, k, s, s, generator=g, dtype=dtype) * 3
    indices = torch.randint(0, s * s, (r, k), generator=g)
    valid = torch.rand(r, k, generator=g) < 0.6
    return logits, torch.where(valid, indices, 0), valid


# float64: our cross-entropy and the fsum reference differ by a few ulps of the ~10 loss (<< 1e-12).
# float32: log-sum-exp of 3136 logits in float32 is off by <= ~log2(3136) * 2**-24 * 8 ~ 1e-6 per
# keypoint (accumulation in the sum of exponentials plus the rounding of values ~8); the mean keeps that
# bound, so 1e-5 leaves a 10x margin while a wrong normalisation (e.g. over all keypoints) is off by >1.
LOSS_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits, indices, valid = _loss_case(g, 6, 17, 56, dtype)
    loss = keypoint_loss(logits, indices, valid)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert abs(float(loss) - keypoint_loss_ref(logits, indices, valid)) <= LOSS_TOL[dtype]


def test_loss_of_half_logits_is_float32():
    g = torch.Generator().manual_seed(5)
    logits, indices, valid = _loss_case(g, 2, 3, 8, torch.float32)
    loss = keypoint_loss(logits.bfloat16(), indices, valid)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - keypoint_loss_ref(logits.bfloat16(), indices, valid)) <= 1e-5


def test_loss_with_nothing_valid_is_zero_with_a_graph():
    logits = torch.randn(3, 17, 56, 56, requires_grad=True)
    loss = keypoint_loss(logits, torch.zeros(3, 17, dtype=torch.int64), torch.zeros(3, 17, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    empty = torch.zeros(0, 17, 56, 56, requires_grad=True)
    loss = keypoint_loss(empty, torch.zeros(0, 17, dtype=torch.int64), torch.zeros(0, 17, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_loss_gradcheck():
    g = torch.Generator().manual_seed(6)
    logits, indices, valid = _loss_case(g, 2, 3, 4, torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: keypoint_loss(x, indices, valid), (logits,))


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        keypoint_loss(
            torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        keypoint_loss(
            torch.zeros(1, 2, 4, 4), torch.zeros(2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bool)
        )


# --------------------------------------------------------------------------------------------------
# keypoint_flip_map
# --------------------------------------------------------------------------------------------------


def test_flip_map_on_coco():
    perm = keypoint_flip_map(COCO_KEYPOINTS)
    flipped = [COCO_KEYPOINTS[i] for i in perm]
    assert flipped[0] == "nose"
    assert flipped[1:3] == ["right_eye", "left_eye"] and flipped[15:17] == ["right_ankle", "left_ankle"]
    for name, other in zip(COCO_KEYPOINTS, flipped, strict=True):
        assert other == name.replace("left_", "@").replace("right_", "left_").replace("@", "right_")
    assert [perm[i] for i in perm] == list(range(17))  # an involution
    assert keypoint_flip_map([]) == []


def test_flip_map_errors():
    with pytest.raises(ValueError, match="'left_eye' has no 'right_eye'"):
        keypoint_flip_map(["nose", "left_eye"])
    with pytest.raises(ValueError, match="'right_hand' has no 'left_hand'"):
        keypoint_flip_map(["right_hand", "left_eye", "right_eye"])
    with pytest.raises(ValueError, match="duplicate"):
        keypoint_flip_map(["nose", "nose"])


# --------------------------------------------------------------------------------------------------
# KeypointRCNNHeads / KeypointRCNNPredictor
# --------------------------------------------------------------------------------------------------


def test_head_and_predictor_shapes():
    torch.manual_seed(0)
    head = KeypointRCNNHeads(in_channels=256)
    predictor = KeypointRCNNPredictor(in_channels=head.out_channels, num_keypoints=17)
    for r in (2, 0):
        with torch.no_grad():
            features = head(torch.randn(r, 256, 14, 14))
            logits = predictor(features)
        assert features.shape == (r, 512, 14, 14) and logits.shape == (r, 17, 56, 56)


def test_predictor_is_deconv_then_bilinear_x2():
    torch.manual_seed(1)
    predictor = KeypointRCNNPredictor(in_channels=8, num_keypoints=3)
    x = torch.randn(2, 8, 14, 14)
    low = F.conv_transpose2d(x, predictor.kps_score_lowres.weight, predictor.kps_score_lowres.bias, 2, 1)
    assert low.shape == (2, 3, 28, 28)
    expected = F.interpolate(low, size=(56, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predictor(x), expected, atol=1e-6, rtol=0)


def test_state_dict_keys_and_init_as_torchvision():
    torch.manual_seed(2)
    head = KeypointRCNNHeads(in_channels=256)
    predictor = KeypointRCNNPredictor(num_keypoints=17)
    shapes = {f"roi_heads.keypoint_head.{k}": list(v.shape) for k, v in head.state_dict().items()}
    shapes |= {f"roi_heads.keypoint_predictor.{k}": list(v.shape) for k, v in predictor.state_dict().items()}
    expected = {}
    for i in range(8):
        expected[f"roi_heads.keypoint_head.{2 * i}.weight"] = [512, 256 if i == 0 else 512, 3, 3]
        expected[f"roi_heads.keypoint_head.{2 * i}.bias"] = [512]
    expected["roi_heads.keypoint_predictor.kps_score_lowres.weight"] = [512, 17, 4, 4]
    expected["roi_heads.keypoint_predictor.kps_score_lowres.bias"] = [17]
    assert shapes == expected
    # He normal, fan_out: std sqrt(2 / (dim 0 * 9)) for the convs, sqrt(2 / (512 * 16)) for the deconv
    # (PyTorch takes a ConvTranspose2d weight's dim 0 as fan_out); ~1e5 - 2e6 samples: std within 2%.
    for conv in (head[0], head[14]):
        assert abs(float(conv.weight.detach().std()) / (2 / (512 * 9)) ** 0.5 - 1) < 0.02
        assert not conv.bias.any()
    deconv = predictor.kps_score_lowres
    assert (
        abs(float(deconv.weight.detach().std()) / (2 / (512 * 16)) ** 0.5 - 1) < 0.02
        and not deconv.bias.any()
    )


@pytest.mark.skipif(not os.path.exists(KEYS_JSON), reason="needs ../shared/tools/tvref")
def test_state_dict_keys_equal_the_torchvision_listing():
    layout = json.load(open(KEYS_JSON))["pretrained_layout"]["state_dict"]
    theirs = {
        k: v
        for k, v in layout.items()
        if k.startswith(("roi_heads.keypoint_head.", "roi_heads.keypoint_predictor."))
    }
    head = KeypointRCNNHeads(in_channels=256)
    predictor = KeypointRCNNPredictor(num_keypoints=17)
    ours = {f"roi_heads.keypoint_head.{k}": list(v.shape) for k, v in head.state_dict().items()}
    ours |= {f"roi_heads.keypoint_predictor.{k}": list(v.shape) for k, v in predictor.state_dict().items()}
    assert ours == theirs


# --------------------------------------------------------------------------------------------------
# optional: torchvision's own functions (a separate venv with torchvision, run in a subprocess)
# --------------------------------------------------------------------------------------------------

_TV_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import tvref
tvref.install()
import torch
from torchvision.models.detection import roi_heads as rh
torch.set_num_threads(1)
case = torch.load(sys.argv[2])
heatmaps, valid = rh.keypoints_to_heatmap(case["keypoints"], case["rois"], 56)
matched = [torch.arange(len(case["rois"]))]
loss = rh.keypointrcnn_loss(case["logits"], [case["rois"]], [case["keypoints"]], matched)
decoded, scores = rh.heatmaps_to_keypoints(case["maps"], case["boxes"])
out = {"heatmaps": heatmaps, "valid": valid, "loss": loss, "decoded": decoded, "scores": scores}
out["torch"] = str(torch.__version__)
torch.save(out, sys.argv[3])
"""


@pytest.mark.skipif(
    not (os.path.exists(TVREF_PYTHON) and os.path.exists(os.path.join(TVREF, "tvref.py"))),
    reason="needs /tmp/tvref-venv and ../shared/tools/tvref",
)
def test_bitwise_equal_to_torchvision(tmp_path):
    g = torch.Generator().manual_seed(7)
    keypoints, rois = _random_keypoints(g, 40, 17, torch.float32)
    logits = torch.randn(40, 17, 56, 56, generator=g)
    maps, boxes = _random_detections(g, 12, 17, 56, torch.float32)
    torch.save(
        {"keypoints": keypoints, "rois": rois, "logits": logits, "maps": maps, "boxes": boxes},
        tmp_path / "in.pt",
    )
    subprocess.run(
        [TVREF_PYTHON, "-c", _TV_SCRIPT, TVREF, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
        stdout=sys.stderr,
    )
    tv = torch.load(tmp_path / "out.pt", weights_only=True)
    indices, valid = keypoints_to_heatmap_targets(keypoints, rois)
    assert torch.equal(valid, tv["valid"].bool()) and torch.equal(indices, tv["heatmaps"])
    assert torch.equal(keypoint_loss(logits, indices, valid), tv["loss"])
    decoded, scores = heatmaps_to_keypoints(maps, boxes)
    if tv["torch"] == torch.__version__:
        assert torch.equal(decoded, tv["decoded"]) and torch.equal(scores, tv["scores"])
    else:  # bicubic upsampling's float32 bits differ between torch versions (2.4 vs 2.13: by ~2 ulp)
        _assert_same_decoding_up_to_rounding(maps, boxes, (decoded, scores), (tv["decoded"], tv["scores"]))


def _assert_same_decoding_up_to_rounding(maps, boxes, ours, theirs):
    """Two float32 decodings of the same maps by different bicubic kernels: equal up to their rounding.

    An upsampled value is a sum of 16 products ``wy * wx * v`` with float32 cubic weights (a few operations
    each); either kernel is within about 29 unit roundoffs of ``sum |wy wx v|``, which is at most
    ``1.375 ** 2 * max |v|`` (the largest sum of |weights| of the cubic with A = -0.75 is 1.375 per axis).
    Scores may differ by twice that; a keypoint may move only to a cell whose value ties ours within it.
    """
    (decoded, scores), (tv_decoded, tv_scores) = ours, theirs
    tol = 2 * 29 * 2.0**-24 * 1.375**2 * maps.abs().amax(dim=(2, 3))  # [N, K]
    assert ((scores - tv_scores).abs() <= tol).all()
    moved = (decoded != tv_decoded).any(dim=2)
    for i, j in moved.nonzero().tolist():  # a near-tie: torchvision's cell must hold our maximum too
        x1, y1, x2, y2 = boxes[i].tolist()
        w, h = max(x2 - x1, 1), max(y2 - y1, 1)
        wc, hc = math.ceil(w), math.ceil(h)
        up = F.interpolate(maps[i, j][None, None], size=(hc, wc), mode="bicubic", align_corners=False)[0, 0]
        ix = round((float(tv_decoded[i, j, 0]) - x1) / (w / wc) - 0.5)
        iy = round((float(tv_decoded[i, j, 1]) - y1) / (h / hc) - 0.5)
        assert float(scores[i, j] - up[iy, ix]) <= 2 * float(tol[i, j])
