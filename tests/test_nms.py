import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.ops.nms import batched_nms, nms
from tests.reference.nms_ref import batched_nms_ref, iou_ref, nms_ref

nms_module = importlib.import_module("maskrcnn.ops.nms")  # the package exports a function of that name

BACKENDS = ["numpy", "torch"]


def run_nms(boxes, scores, t, backend, idxs=None):
    return nms_module._nms(boxes, scores, idxs, t, backend)


def random_boxes(n, generator, dtype=torch.float32, size=200.0, max_wh=80.0):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def clustered_boxes(n, generator, dtype=torch.float32, centers=4):
    """Many jittered copies of a few boxes: long runs of suppression, many exact ties after rounding."""
    base = random_boxes(centers, generator, torch.float64, size=100.0, max_wh=60.0)
    base[:, 2:] += 5
    pick = torch.randint(0, centers, (n,), generator=generator)
    jitter = torch.randn(n, 4, generator=generator, dtype=torch.float64) * 3
    return (base[pick] + jitter).round().to(dtype)


def ref_nms(boxes, scores, t):
    dtype = np.float64 if boxes.dtype == torch.float64 else np.float32
    return nms_ref(boxes.double().tolist(), scores.double().tolist(), t, dtype)


def ref_batched(boxes, scores, idxs, t):
    dtype = np.float64 if boxes.dtype == torch.float64 else np.float32
    return batched_nms_ref(boxes.double().tolist(), scores.double().tolist(), idxs.tolist(), t, dtype)


@pytest.fixture(params=["default", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Also run with tiny blocks and tiles so that small inputs go through every multi-block code path."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(nms_module, "_CPU_BLOCK", 8)
        monkeypatch.setattr(nms_module, "_CPU_TILE_ELEMS", 64)
        monkeypatch.setattr(nms_module, "_MAX_ROUNDS", 2)
    return request.param


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_random_matches_reference(backend, dtype, threshold, blocks):
    g = torch.Generator().manual_seed(int(threshold * 10) + 100 * (dtype == torch.float64))
    boxes = random_boxes(150, g, dtype)
    scores = torch.rand(150, generator=g, dtype=dtype)
    keep = run_nms(boxes, scores, threshold, backend)
    assert keep.dtype == torch.int64
    assert keep.tolist() == ref_nms(boxes, scores, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8])
def test_clustered_with_tied_scores_matches_reference(backend, threshold, blocks):
    g = torch.Generator().manual_seed(7)
    boxes = clustered_boxes(160, g)
    scores = torch.randint(0, 5, (160,), generator=g).float()  # many equal scores: stable order matters
    assert run_nms(boxes, scores, threshold, backend).tolist() == ref_nms(boxes, scores, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_of_overlaps(backend, blocks):
    # Box k overlaps boxes k-1 and k+1 only (IoU 9/11), scores decreasing: greedy keeps 0, 2, 4, ...
    # Long chains need many fixed-point rounds (2 with tiny blocks) and exercise the sequential fallback.
    n = 60
    x = torch.arange(n, dtype=torch.float32) * 1.0
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1, 0, n)
    keep = run_nms(boxes, scores, 0.8, backend)
    assert keep.tolist() == ref_nms(boxes, scores, 0.8)
    assert keep.tolist() == list(range(0, n, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_boxes_and_equal_scores(backend, blocks):
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(20, 1)
    scores = torch.ones(20)
    assert run_nms(boxes, scores, 0.5, backend).tolist() == [0]  # the lowest index wins the tie
    assert run_nms(boxes, scores, 1.0, backend).tolist() == list(range(20))  # IoU 1 is not > 1
    scores[13] = 2.0
    assert run_nms(boxes, scores, 0.99, backend).tolist() == [13]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_area_boxes_never_suppress_each_other(backend):
    # Points and segments: IoU between two of them is 0/0 = NaN, which is not > threshold.
    point, segment_x, segment_y = [5.0, 5.0, 5.0, 5.0], [0.0, 5.0, 10.0, 5.0], [5.0, 0.0, 5.0, 10.0]
    boxes = torch.tensor([point, point, segment_x, segment_y, [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    for t in (-0.5, 0.0, 0.5):
        keep = run_nms(boxes, scores, t, backend)
        assert keep.tolist() == ref_nms(boxes, scores, t)
    assert run_nms(boxes, scores, 0.0, backend).tolist() == [0, 1, 2, 3, 4]  # IoU with the square is 0
    assert run_nms(boxes, scores, -0.5, backend).tolist() == [0, 1, 2, 3]  # 0 > -0.5 suppresses the square


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_boxes(backend):
    # IoU of nested boxes = area ratio: 0.25 and 0.5 here.
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert run_nms(boxes, scores, 0.2, backend).tolist() == [0]
    assert run_nms(boxes, scores, 0.3, backend).tolist() == [0, 1]  # 0.5 > 0.3 removes box 2
    assert run_nms(boxes, scores, 0.5, backend).tolist() == [0, 1, 2]  # strict: 0.5 is not > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_is_compared_in_double_precision(backend):
    # IoU = 1/10. In float32 it rounds to 0.100000001..., which is > 0.1 (as torchvision's C++ compares
    # float with double); in float64 it is exactly 0.1, which is not.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 10.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert iou_ref(boxes[0].tolist(), boxes[1].tolist(), np.float32) > 0.1
    assert run_nms(boxes, scores, 0.1, backend).tolist() == [0]
    assert run_nms(boxes.double(), scores, 0.1, backend).tolist() == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_thresholds(backend):
    g = torch.Generator().manual_seed(3)
    boxes = clustered_boxes(40, g)
    scores = torch.rand(40, generator=g)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    assert run_nms(boxes, scores, float("nan"), backend).tolist() == order
    assert run_nms(boxes, scores, float("inf"), backend).tolist() == order
    assert run_nms(boxes, scores, 1.5, backend).tolist() == order
    for t in (-1.0, -1e-30, 1e-30, 1 / 3):
        assert run_nms(boxes, scores, t, backend).tolist() == ref_nms(boxes, scores, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_boxes_match_reference(backend):
    # x2 < x1 or y2 < y1: negative or positive "areas"; the formula is applied as is, like torchvision.
    g = torch.Generator().manual_seed(5)
    boxes = (torch.rand(60, 4, generator=g) * 20).round()
    scores = torch.rand(60, generator=g)
    for t in (-0.2, 0.0, 0.4):
        assert run_nms(boxes, scores, t, backend).tolist() == ref_nms(boxes, scores, t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_low_precision_and_integer_boxes_use_float32(dtype):
    g = torch.Generator().manual_seed(11)
    boxes = clustered_boxes(80, g).to(dtype)
    scores = torch.rand(80, generator=g).to(dtype if dtype.is_floating_point else torch.float32)
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == ref_nms(boxes.float(), scores.float(), 0.5)
    assert torch.equal(keep, nms(boxes.float(), scores.float(), 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single(backend):
    empty = run_nms(torch.zeros(0, 4), torch.zeros(0), 0.5, backend)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    empty = run_nms(torch.zeros(0, 4), torch.zeros(0), 0.5, backend, idxs=torch.zeros(0, dtype=torch.int64))
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    one = run_nms(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.3]), 0.5, backend)
    assert one.dtype == torch.int64 and one.tolist() == [0]


def test_inputs_are_not_modified_and_grad_is_ignored():
    g = torch.Generator().manual_seed(2)
    boxes = random_boxes(50, g).requires_grad_()
    scores = torch.rand(50, generator=g).requires_grad_()
    before = boxes.detach().clone(), scores.detach().clone()
    keep = nms(boxes, scores, 0.3)
    assert keep.tolist() == ref_nms(boxes.detach(), scores.detach(), 0.3)
    assert torch.equal(boxes.detach(), before[0]) and torch.equal(scores.detach(), before[1])
    # Non-contiguous inputs.
    wide_boxes = torch.cat([boxes.detach(), boxes.detach()], 1)[:, :4]
    wide_scores = torch.stack([scores.detach(), scores.detach()], 1)[:, 0]
    assert not wide_boxes.is_contiguous() and not wide_scores.is_contiguous()
    assert torch.equal(nms(wide_boxes, wide_scores, 0.3), keep)


def test_bad_shapes():
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 4, device="meta"), torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.int64, device="meta"), 0.5)
    with pytest.raises(ValueError):
        nms_module._nms(torch.rand(3, 4), torch.rand(3), None, 0.5, backend="cuda-kernel")


# --------------------------------------------------------------------------- batched_nms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7])
def test_batched_matches_reference(backend, threshold, blocks):
    g = torch.Generator().manual_seed(21)
    # Category sizes: one big (> a block of 128), a spread of small ones, singletons; arbitrary labels.
    sizes = [140, 40, 17, 9, 5, 3, 2, 2, 1, 1]
    labels = torch.tensor([-7, 3, 1000, 0, 12, 5, 6, 99, 42, 8])
    idxs = torch.repeat_interleave(labels, torch.tensor(sizes))
    idxs = idxs[torch.randperm(idxs.numel(), generator=g)]
    n = idxs.numel()
    boxes = clustered_boxes(n, g, centers=6)
    scores = torch.randint(0, 20, (n,), generator=g).float()
    keep = run_nms(boxes, scores, threshold, backend, idxs=idxs)
    assert keep.dtype == torch.int64
    assert keep.tolist() == ref_batched(boxes, scores, idxs, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_categories_never_interact(backend):
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(6, 1)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.8])
    idxs = torch.tensor([0, 1, 2, 2, 3, 1])
    # Per category the best box survives; ties (category 2) go to the lower index.
    assert run_nms(boxes, scores, 0.5, backend, idxs=idxs).tolist() == [1, 2, 4, 0]
    # Negative threshold: each category keeps exactly one box (the offset trick would keep only one overall).
    assert run_nms(boxes, scores, -1.0, backend, idxs=idxs).tolist() == [1, 2, 4, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_chains(backend, blocks):
    # Two interleaved categories, each a chain (see test_chain_of_overlaps): long fixed-point runs.
    n = 100
    x = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack([x // 2, torch.zeros(n), x // 2 + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1, 0, n)
    idxs = torch.arange(n) % 2
    keep = run_nms(boxes, scores, 0.8, backend, idxs=idxs)
    assert keep.tolist() == ref_batched(boxes, scores, idxs, 0.8)
    assert keep.tolist() == [i for i in range(n) if i % 4 < 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_single_category_equals_nms(backend):
    g = torch.Generator().manual_seed(4)
    boxes = clustered_boxes(200, g)
    scores = torch.rand(200, generator=g)
    idxs = torch.full((200,), 3)
    assert torch.equal(run_nms(boxes, scores, 0.5, backend, idxs=idxs), run_nms(boxes, scores, 0.5, backend))


# --------------------------------------------------------------------------- properties


box_lists = st.integers(0, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.tuples(*[st.integers(0, 12)] * 4), min_size=n, max_size=n),
        st.lists(st.integers(0, 4), min_size=n, max_size=n),  # coarse scores: many ties
        st.lists(st.integers(0, 2), min_size=n, max_size=n),
    )
)
thresholds = st.sampled_from([-0.1, 0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.9, 1.0])


def as_boxes(raw, dtype=torch.float32):
    # Integer corners on a small grid: exact IoU ties with the thresholds, empty and degenerate boxes.
    b = torch.tensor(raw, dtype=torch.float64).reshape(-1, 4)
    x1, x2 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
    y1, y2 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
    return torch.stack([x1, y1, x2, y2], 1).to(dtype)


@settings(max_examples=60, deadline=None)
@given(data=box_lists, t=thresholds, backend=st.sampled_from(BACKENDS), f64=st.booleans())
def test_property_equals_reference(data, t, backend, f64):
    raw, raw_scores, raw_idxs = data
    dtype = torch.float64 if f64 else torch.float32
    boxes = as_boxes(raw, dtype)
    scores = torch.tensor(raw_scores, dtype=torch.float32)
    idxs = torch.tensor(raw_idxs, dtype=torch.int64)
    assert run_nms(boxes, scores, t, backend).tolist() == ref_nms(boxes, scores, t)
    assert run_nms(boxes, scores, t, backend, idxs=idxs).tolist() == ref_batched(boxes, scores, idxs, t)


@settings(max_examples=40, deadline=None)
@given(data=box_lists, t=thresholds)
def test_property_greedy_characterisation(data, t):
    # Kept boxes are sorted by score and pairwise not above the threshold; every removed box has a kept
    # box before it (in visiting order) with IoU above the threshold.
    raw, raw_scores, _ = data
    boxes = as_boxes(raw)
    scores = torch.tensor(raw_scores, dtype=torch.float32)
    keep = nms(boxes, scores, t).tolist()
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    rank = {i: r for r, i in enumerate(order)}
    assert keep == sorted(keep, key=rank.get)
    b = boxes.tolist()
    for a_pos, a in enumerate(keep):
        for c in keep[a_pos + 1 :]:
            assert not iou_ref(b[a], b[c]) > t
    kept = set(keep)
    for i in set(range(len(b))) - kept:
        assert any(rank[k] < rank[i] and iou_ref(b[k], b[i]) > t for k in kept)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    for n, t in [(0, 0.5), (1, 0.5), (300, 0.5), (3000, 0.7), (2500, 0.3)]:
        boxes = torch.cat([random_boxes(n - n // 2, g, size=800.0, max_wh=200.0), clustered_boxes(n // 2, g)])
        boxes = boxes.to(dtype)
        scores = torch.rand(n, generator=g).to(dtype)
        idxs = torch.randint(0, 7, (n,), generator=g)
        cpu = nms(boxes, scores, t)
        cuda = nms(boxes.cuda(), scores.cuda(), t)
        assert cuda.device.type == "cuda" and cuda.dtype == torch.int64
        assert torch.equal(cuda.cpu(), cpu)
        cpu_b = batched_nms(boxes, scores, idxs, t)
        cuda_b = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), t)
        assert torch.equal(cuda_b.cpu(), cpu_b)
    x = torch.arange(3000.0)
    chain = torch.stack([x, torch.zeros(3000), x + 10, torch.full((3000,), 10.0)], 1)
    scores = torch.linspace(1, 0, 3000)
    assert nms(chain.cuda(), scores.cuda(), 0.8).cpu().tolist() == list(range(0, 3000, 2))
