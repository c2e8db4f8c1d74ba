"""torchvision weight parity without torchvision: committed reference outputs of torchvision's
maskrcnn_resnet50_fpn with seeded weights (tests/data/make_tv_reference.py regenerates them)."""

import os

import pytest
import torch

from maskrcnn.modeling.build import build_model
from maskrcnn.weights import CheckpointError, load_model
from tests.common import SHARED
from tests.tv_parity import (
    IMAGES,
    KEYPOINT_IMAGES,
    PARITY_PRESETS,
    parity_weights,
    read_image,
    to_torchvision,
)

COCO_VAL = os.path.join(SHARED, "data", "coco-mini", "val2017")
KEYS_JSON = os.path.join(SHARED, "tools", "tvref", "maskrcnn_resnet50_fpn_keys.json")
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tv_reference.pt")
KEYPOINT_REFERENCE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "data", "tv_keypoint_reference.pt"
)


def test_parameter_count_equals_torchvision():
    model = build_model("tv-R-50-FPN")
    assert sum(p.numel() for p in model.parameters()) == 44_401_393


@pytest.mark.skipif(not os.path.exists(KEYS_JSON), reason="needs ../shared/tools/tvref")
def test_state_dict_layout_maps_onto_torchvision():
    import json

    layout = json.load(open(KEYS_JSON))["pretrained_layout"]["state_dict"]
    ours = to_torchvision(build_model("tv-R-50-FPN").state_dict())
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(v) for k, v in layout.items()}


def test_incompatible_checkpoint_is_refused_with_the_keys_named():
    sd = to_torchvision(parity_weights())
    sd.pop("roi_heads.box_head.fc6.bias")
    sd["roi_heads.box_head.fc7.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model(sd)
    msg = str(err.value)
    assert "roi_heads.box_head.fc6.bias" in msg and "extra.weight" in msg and "fc7.weight" in msg


# Tolerances of the float64 comparison below. In float32 the random-weight model amplifies rounding by
# ~1e4 (between two CPUs' kernels boxes moved by 0.1 px, scores by 6e-4 at 2**-24 relative rounding); in
# float64 (2**-53) the same amplification gives up to ~1e-9 px and ~1e-11 (observed: 1.4e-12 px, 5e-15 on
# scores, 6e-14 on masks on an AMD EPYC; 1.5e-11 on masks with ATen's scalar kernels,
# ATEN_CPU_CAPABILITY=default). The bounds sit well above that and far below any real difference (a wrong
# operation moves boxes by pixels and scores or mask probabilities by percents).
BOX_TOL, SCORE_TOL, MASK_TOL = 1e-6, 1e-9, 1e-9


def _match(ref, out, score_tol=SCORE_TOL):
    """Indices j (into ours) for each reference detection, allowing swaps only between near-tied scores."""
    order = []
    for i in range(len(ref["scores"])):
        close = ((out["scores"] - ref["scores"][i]).abs() < score_tol) & (out["labels"] == ref["labels"][i])
        candidates = close.nonzero()[:, 0]
        assert len(candidates), f"detection {i} of the reference has no counterpart"
        dist = (out["boxes"][candidates] - ref["boxes"][i]).abs().amax(dim=1)
        order.append(int(candidates[dist.argmin()]))
    return torch.tensor(order)


def _same_detections(ref, out) -> torch.Tensor:
    """Assert the same detections as the reference (count; order up to swaps of near-tied scores; boxes,
    scores, labels); returns the order (indices into ``out``) of the reference's detections."""
    assert len(out["boxes"]) == len(ref["boxes"])
    order = _match(ref, out)
    misplaced = (order != torch.arange(len(order))).nonzero()[:, 0]
    for i in misplaced.tolist():  # only ties (scores within SCORE_TOL) may trade places
        assert abs(float(ref["scores"][i] - out["scores"][order[i]])) < SCORE_TOL
    assert order.unique().numel() == len(order)
    torch.testing.assert_close(out["boxes"][order], ref["boxes"], atol=BOX_TOL, rtol=0)
    torch.testing.assert_close(out["scores"][order], ref["scores"], atol=SCORE_TOL, rtol=0)
    assert torch.equal(out["labels"][order], ref["labels"])
    return order


@pytest.mark.skipif(not os.path.isdir(COCO_VAL), reason="needs ../shared/data/coco-mini")
def test_same_detections_as_torchvision_with_the_same_weights():
    """Both models in float64 (the reference too: tests/data/make_tv_reference.py), so that what is compared
    is the arithmetic of the two models, not how one CPU's float32 kernels round: a random-weight model is
    sensitive enough that float32 rounding alone moves boxes by 0.1 px and flips near-tied detections."""
    reference = torch.load(REFERENCE, weights_only=True)
    assert reference["dtype"] == "float64"
    # exact arithmetic (NCHW, unfolded BatchNorm); test_fast_inference_stays_close covers the fast path
    model = load_model(to_torchvision(parity_weights(reference["seed"]))).set_fast_inference(False).double()
    assert model.config.rpn.anchor_stride_rule == "torchvision"
    for ref in reference["outputs"]:
        image = read_image(os.path.join(COCO_VAL, ref["file"])).double()
        with torch.no_grad():
            (out,) = model([image])
        order = _same_detections(ref, out)
        masks = out["masks"][order][:, 0].flatten(1)
        torch.testing.assert_close(
            torch.gather(masks, 1, ref["mask_probe"]), ref["mask_values"], atol=MASK_TOL, rtol=0
        )
    assert IMAGES == tuple(r["file"] for r in reference["outputs"])


@pytest.mark.skipif(not os.path.isdir(COCO_VAL), reason="needs ../shared/data/coco-mini")
def test_same_keypoints_as_torchvision_with_the_same_weights():
    """keypointrcnn_resnet50_fpn with seeded weights, both in float64, one image per call: same detections
    (count, order up to near-ties, boxes, scores, labels) and the same keypoints and keypoint scores.

    The keypoints are argmax cells of upsampled heatmaps: they would move by a whole cell only if a rounding
    difference swapped two cells' order, which in float64 needs two logits within ~1e-12 of each other.
    torchvision's decoding stores them in float32 tensors and, its cell index being float32, computes
    ``(ix + 0.5) * w / ceil(w) + x1`` in float32 even for a float64 model: three float32 roundings (the
    scale, the product, the sum) of half an ulp each, so ours (float64, rounded once to float32) may differ
    by up to 2 ulps, 2**-13 px below 1024 px (observed: 2 ulps); the bound is 4 ulps. Scores are the logit
    at the cell, float64 rounded to float32 by both: equal up to one rounding, 2**-23 relative."""
    reference = torch.load(KEYPOINT_REFERENCE, weights_only=True)
    assert reference["dtype"] == "float64" and reference["model"] == "keypoint"
    weights = to_torchvision(parity_weights(reference["seed"], preset=PARITY_PRESETS["keypoint"]))
    model = load_model(weights).set_fast_inference(False).double()
    assert model.config.roi_heads.keypoint and not model.config.roi_heads.mask
    for ref in reference["outputs"]:
        image = read_image(os.path.join(COCO_VAL, ref["file"])).double()
        with torch.no_grad():
            (out,) = model([image])
        order = _same_detections(ref, out)
        assert ref["keypoints"].dtype == ref["keypoints_scores"].dtype == torch.float32
        assert float(ref["keypoints"][..., :2].max()) < 1024
        kps = out["keypoints"][order].float()
        torch.testing.assert_close(kps, ref["keypoints"], atol=4 * 2**-14, rtol=0)
        scores = out["keypoints_scores"][order].float()
        torch.testing.assert_close(scores, ref["keypoints_scores"], atol=0, rtol=2**-23)
        print(
            f"{ref['file']}: keypoints max |diff| {float((kps - ref['keypoints']).abs().max()):.2e} px, "
            f"scores {float((scores - ref['keypoints_scores']).abs().max()):.2e}"
        )
    assert KEYPOINT_IMAGES == tuple(r["file"] for r in reference["outputs"])


@pytest.mark.skipif(not os.path.isdir(COCO_VAL), reason="needs ../shared/data/coco-mini")
def test_fast_inference_stays_close():
    """The default fast path (channels-last, folded BatchNorm) changes only float rounding: the FPN features
    agree with the exact path up to rounding.

    Compared in float64: the two paths run other convolution kernels (and oneDNN picks other ones again
    on AVX2, AVX-512 and AMX CPUs), so in float32 they differ by up to n * 2**-24 * sum|terms| per layer,
    amplified through the 50 random layers: a float32 tolerance would be a guess about the CPU. In float64
    the same bound is ~1e-13 of each level's largest entry; 1e-9 sits far above it and far below a real
    fault (a wrong fold or layout changes entries by a large fraction of the largest one). A 256 x 320 crop
    of the normalised batch keeps the float64 convolutions fast; every layer and weight still takes part."""
    model = load_model(to_torchvision(parity_weights())).double()
    image = read_image(os.path.join(COCO_VAL, IMAGES[0])).double()
    batch, _ = model.transform([image])
    x = batch.tensor[..., :256, :320].contiguous()
    with torch.no_grad():
        fast = model.backbone(x.contiguous(memory_format=torch.channels_last))
        model.set_fast_inference(False)
        exact = model.backbone(x)
    for k in exact:
        assert fast[k].dtype == torch.float64
        scale = exact[k].abs().max()
        torch.testing.assert_close(fast[k] / scale, exact[k] / scale, rtol=0, atol=1e-9)
