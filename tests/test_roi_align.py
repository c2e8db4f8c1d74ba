"""RoIAlign / RoIPool / RoIWarp against hand-computed values, a naive loop reference, and invariances."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.ops.roi_align import (
    RoIAlign,
    RoIPool,
    RoIWarp,
    boxes_to_rois,
    roi_align,
    roi_align_levels,
    roi_pool,
    roi_warp,
)
from tests.reference.roi_ref import roi_align_ref, roi_pool_grad_ref, roi_pool_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_rois(k, n, h, w, scale, generator, spill=0.3, max_size=None):
    """[K, 5] rois in image pixels: some partly or wholly outside the map, some empty."""
    max_size = max_size or max(h, w)
    xy = (
        torch.rand(k, 2, generator=generator, dtype=torch.float64) * (1 + 2 * spill) - spill
    ) * torch.tensor([w, h], dtype=torch.float64)
    wh = torch.rand(k, 2, generator=generator, dtype=torch.float64) * max_size
    wh[: k // 6] = 0  # empty boxes
    idx = torch.randint(0, n, (k, 1), generator=generator).double()
    return torch.cat([idx, xy / scale, (xy + wh) / scale], dim=1)


def test_arange_hand_computed():
    # 1 x 1 x 4 x 4 map with value 4y + x; a linear map, so bilinear samples are exact.
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    out = roi_align(x, rois, (2, 2), 1.0, 2, aligned=False)
    # bin (0,0) covers [0,1]^2, samples at .25/.75: mean y = .5, mean x = .5 -> 4*.5 + .5 = 2.5
    expected = torch.tensor([[2.5, 3.5], [6.5, 7.5]], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)
    # aligned=True shifts by half a cell: bin (0,0) covers [-.5, .5]^2 -> samples -.25 (clamped to 0), .25
    out = roi_align(x, rois, (2, 2), 1.0, 2, aligned=True)
    # y samples -.25 -> 0 and .25 -> mean .125; same for x: 4*.125 + .125 = .625
    assert out[0, 0, 0, 0].item() == pytest.approx(0.625, abs=1e-12)
    assert out[0, 0, 1, 1].item() == pytest.approx(4 * 1 + 1, abs=1e-12)  # samples .75 and 1.25 -> mean 1
    # RoIPool on the same map: box [0, 0, 2, 2] -> cells 0..2 inclusive, bins [0,2) and [1,3) -> max 4y+x
    pooled = roi_pool(x, rois, (2, 2), 1.0)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([[5.0, 6.0], [9.0, 10.0]], dtype=torch.float64))


def test_adaptive_sampling_hand_computed():
    x = torch.arange(64, dtype=torch.float64).view(1, 1, 8, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 6.0, 6.0]], dtype=torch.float64)
    # 6 cells / 2 bins -> ceil(3) = 3 samples per axis at .5, 1.5, 2.5 -> mean 1.5 in bin 0, 4.5 in bin 1
    out = roi_align(x, rois, 2, 1.0, -1, aligned=False)
    expected = torch.tensor(
        [[8 * 1.5 + 1.5, 8 * 1.5 + 4.5], [8 * 4.5 + 1.5, 8 * 4.5 + 4.5]], dtype=torch.float64
    )
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_linear_map_is_exact(aligned, sampling_ratio):
    """Bilinear interpolation of a linear map is exact: a bin is the map at its samples' mean point."""
    g = torch.Generator().manual_seed(1)
    h, w = 20, 24
    a, b, c0 = 0.7, -1.3, 2.0
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    feat = (a * ys + b * xs + c0).view(1, 1, h, w)
    # boxes well inside the map, so no sample is clamped
    xy = 2 + torch.rand(30, 2, generator=g, dtype=torch.float64) * 8
    wh = 1 + torch.rand(30, 2, generator=g, dtype=torch.float64) * 8
    rois = torch.cat([torch.zeros(30, 1, dtype=torch.float64), xy, xy + wh], 1)
    out = roi_align(feat, rois, (3, 4), 1.0, sampling_ratio, aligned)
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] - off for i in range(1, 5))
    bin_h = ((y2 - y1) / 3).view(-1, 1, 1)
    bin_w = ((x2 - x1) / 4).view(-1, 1, 1)
    cy = y1.view(-1, 1, 1) + (torch.arange(3, dtype=torch.float64).view(1, 3, 1) + 0.5) * bin_h
    cx = x1.view(-1, 1, 1) + (torch.arange(4, dtype=torch.float64).view(1, 1, 4) + 0.5) * bin_w
    torch.testing.assert_close(out[:, 0], a * cy + b * cx + c0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_matches_naive_reference(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 11, 13, generator=g, dtype=torch.float64)
    rois = random_rois(25, 2, 11, 13, 0.5, g)
    out = roi_align(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    ref = roi_align_ref(x.numpy(), rois.numpy(), (3, 4), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_max_mode_matches_naive_reference(sampling_ratio):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 10, generator=g, dtype=torch.float64)
    rois = random_rois(20, 2, 9, 10, 1.0, g)
    out = roi_align(x, rois, 3, 1.0, sampling_ratio, True, mode="max")
    ref = roi_align_ref(x.numpy(), rois.numpy(), (3, 3), 1.0, sampling_ratio, True, mode="max")
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-12)


def test_roi_pool_matches_naive_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 12, 9, generator=g, dtype=torch.float64)
    rois = random_rois(30, 2, 12, 9, 0.25, g)
    out = roi_pool(x, rois, (4, 3), 0.25)
    ref = roi_pool_ref(x.numpy(), rois.numpy(), (4, 3), 0.25)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=0)


def test_roi_pool_on_a_coarse_map_with_shared_bins_and_ties_matches_the_naive_gradient(monkeypatch):
    """Many RoIs on a 5 x 6 map (bins of different RoIs cover the same cells, reduced once and their
    gradients summed), small integer features (ties everywhere): output and gradient exactly the naive
    ones, on a chunk size that splits every group."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 3, (2, 3, 5, 6), generator=g).double().requires_grad_()
    rois = random_rois(40, 2, 5, 6, 1.0 / 32, g)
    rois = torch.cat([rois, torch.tensor([[1, -90.0, -90.0, -40.0, -40.0]])])  # a RoI off the map: all empty
    grad_out = torch.randint(-4, 5, (41, 3, 4, 3), generator=g).double()
    mod = importlib.import_module("maskrcnn.ops.roi_align")
    for chunk in (mod._POOL_GATHER_VALUES, 7):
        monkeypatch.setattr(mod, "_POOL_GATHER_VALUES", chunk)
        out = roi_pool(x, rois, (4, 3), 1.0 / 32)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        ref = roi_pool_ref(x.detach().numpy(), rois.numpy(), (4, 3), 1.0 / 32)
        torch.testing.assert_close(out.detach(), torch.from_numpy(ref), rtol=0, atol=0)
        expected = roi_pool_grad_ref(x.detach().numpy(), rois.numpy(), (4, 3), 1.0 / 32, grad_out.numpy())
        torch.testing.assert_close(grad, torch.from_numpy(expected), rtol=0, atol=0)
    assert (out[-1] == 0).all()


def test_roi_pool_ties_go_to_the_first_cell_and_empty_bins_are_zero():
    """torchvision's rules: among equal maxima the first cell in row-major order takes the gradient; a bin
    wholly outside the map is 0 and takes none."""
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(roi_pool(x, torch.tensor([[0, 0, 0, 5.0, 5.0]]), 3, 1.0).sum(), x)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[0::2, 0::2] = 1  # bins of 2 x 2 cells: each one's top-left cell
    torch.testing.assert_close(grad[0, 0], expected, rtol=0, atol=0)

    y = (torch.arange(36, dtype=torch.float64).view(1, 1, 6, 6) + 1).requires_grad_()
    out = roi_pool(y, torch.tensor([[0, 4.0, 4.0, 11.0, 11.0]]), 2, 1.0)  # 8 x 8 cells from (4, 4)
    assert out[0, 0, 0, 0] == y[0, 0, 5, 5] and out[0, 0, 1, 1] == 0 and out[0, 0, 0, 1] == 0
    (grad,) = torch.autograd.grad(out.sum(), y)
    assert grad.sum() == 1 and grad[0, 0, 5, 5] == 1


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_roi_warp_is_align_on_quantized_box(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 10, 10, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 3.3, 5.6, 27.1, 30.4]], dtype=torch.float64)  # scale .25 -> 0.825 .. 7.6
    out = roi_warp(x, rois, 2, 0.25, 2, mode=mode)
    quantized = torch.tensor([[0, 1.0, 1.0, 7.0, 8.0]], dtype=torch.float64)  # rounded, halves away from 0
    ref = roi_align_ref(x.numpy(), quantized.numpy(), (2, 2), 1.0, 2, False, mode=mode)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_halving_map_and_scale_together(aligned):
    """A linear map sampled at stride 4 and at stride 8 gives the same bins (same image points)."""
    a, b, c0 = 0.3, 0.45, -1.0
    off = 0.5 if aligned else 0.0

    def linear_map(stride, h, w):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
        )
        return (a * (ys + off) * stride + b * (xs + off) * stride + c0).view(1, 1, h, w)

    rois = torch.tensor([[0, 40.0, 36.0, 120.0, 100.0], [0, 20.0, 60.0, 52.0, 140.0]], dtype=torch.float64)
    fine = roi_align(linear_map(4, 50, 50), rois, 5, 1 / 4, 2, aligned)
    coarse = roi_align(linear_map(8, 25, 25), rois, 5, 1 / 8, 2, aligned)
    torch.testing.assert_close(fine, coarse, rtol=0, atol=1e-10)


def test_box_list_equals_tensor_form_and_batches_are_independent():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 8, 9, generator=g)
    boxes = [
        torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 7.5, 6.0]]),
        torch.zeros(0, 4),
        torch.tensor([[2.0, 1.0, 4.0, 8.0]]),
    ]
    rois = boxes_to_rois(boxes)
    assert rois[:, 0].tolist() == [0, 0, 2]
    torch.testing.assert_close(roi_align(x, boxes, 2, 1.0, 2), roi_align(x, rois, 2, 1.0, 2))
    # the third roi only sees image 2
    single = roi_align(x[2:], torch.tensor([[0, 2.0, 1.0, 4.0, 8.0]]), 2, 1.0, 2)
    torch.testing.assert_close(roi_align(x, rois, 2, 1.0, 2)[2:], single)


def test_zero_rois_and_empty_boxes():
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 7, 1.0, 2)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    pooled = roi_pool(x, torch.zeros(0, 5), 7, 1.0)
    assert pooled.shape == (0, 3, 7, 7)
    # an empty box with aligned=True has no samples under adaptive sampling: all zeros
    out = roi_align(x, torch.tensor([[0, 2.0, 2.0, 2.0, 2.0]]), 3, 1.0, -1, aligned=True)
    assert torch.equal(out, torch.zeros_like(out))
    # ... and with aligned=False it is enlarged to one cell: a constant map gives the constant
    ones = torch.ones(1, 2, 5, 5)
    out = roi_align(ones, torch.tensor([[0, 2.0, 2.0, 2.0, 2.0]]), 3, 1.0, -1, aligned=False)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_wholly_outside_box_is_zero():
    x = torch.randn(1, 2, 6, 6)
    out = roi_align(x, torch.tensor([[0, 20.0, 20.0, 30.0, 30.0]]), 2, 1.0, 2)
    assert torch.equal(out, torch.zeros_like(out))


def test_non_contiguous_and_channels_last_inputs():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 6, 10, 12, generator=g, dtype=torch.float64)
    rois = random_rois(12, 2, 10, 12, 1.0, g)
    ref = roi_align(base, rois, 3, 1.0, 2, True)
    strided = torch.randn(2, 12, 10, 12, dtype=torch.float64)[:, ::2]
    strided.copy_(base)
    assert not strided.is_contiguous()
    torch.testing.assert_close(roi_align(strided, rois, 3, 1.0, 2, True), ref, rtol=0, atol=0)
    cl = base.to(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align(cl, rois, 3, 1.0, 2, True), ref, rtol=0, atol=0)
    # gradients keep the input's layout and agree
    g1 = base.clone().requires_grad_()
    roi_align(g1, rois, 3, 1.0, 2, True).square().sum().backward()
    g2 = cl.clone().requires_grad_()
    roi_align(g2, rois, 3, 1.0, 2, True).square().sum().backward()
    assert g2.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g1.grad, g2.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradcheck_roi_align(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(6, 2, 6, 7, 1.0, g, max_size=6)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, sampling_ratio, aligned), (x,))


def test_gradcheck_roi_align_max_pool_and_warp():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(6, 2, 6, 7, 1.0, g, max_size=6)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, 2, True, mode="max"), (x,))
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, 3, 1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: roi_warp(t, rois, 3, 1.0, 2, mode="max"), (x,))
    assert torch.autograd.gradcheck(lambda t: roi_warp(t, rois, 3, 1.0, 2, mode="avg"), (x,))


def test_backward_matches_reference_adjoint():
    """<roi_align(x), g> is linear in x: its gradient is the reference operator's transpose applied to g."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(10, 2, 7, 8, 1.0, g)
    grad_out = torch.randn(10, 3, 2, 2, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(roi_align(x, rois, 2, 1.0, -1, False), x, grad_out)
    # column j of the reference operator = reference applied to the j-th unit map
    expected = torch.zeros_like(x)
    base = torch.zeros_like(x).numpy()
    for idx in range(base.size):
        base.flat[idx] = 1.0
        col = roi_align_ref(base, rois.numpy(), (2, 2), 1.0, -1, False)
        expected.view(-1)[idx] = float((torch.from_numpy(col) * grad_out).sum())
        base.flat[idx] = 0.0
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_half_precision_computes_in_float32():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g)
    rois = random_rois(5, 1, 8, 8, 1.0, g).float()
    for dtype in (torch.float16, torch.bfloat16):
        out = roi_align(x.to(dtype), rois, 2, 1.0, 2)
        assert out.dtype == dtype
        torch.testing.assert_close(out, roi_align(x.to(dtype).float(), rois, 2, 1.0, 2).to(dtype))


def test_modules_and_bad_arguments():
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])
    m = RoIAlign(output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(m(x, rois), roi_align(x, rois, 2, 1.0, 2, True))
    torch.testing.assert_close(RoIPool(output_size=2, spatial_scale=1.0)(x, rois), roi_pool(x, rois, 2, 1.0))
    torch.testing.assert_close(RoIWarp(output_size=2, spatial_scale=1.0)(x, rois), roi_warp(x, rois, 2, 1.0))
    assert "aligned=True" in repr(m)
    with pytest.raises(ValueError, match="Tensor\\[K, 5\\]"):
        roi_align(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="mode"):
        roi_align(x, rois, 2, mode="median")
    with pytest.raises(ValueError, match="N, C, H, W"):
        roi_align(x[0], rois, 2)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    coords=st.lists(st.floats(-6, 16, allow_nan=False), min_size=4, max_size=4),
    sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(),
    scale=st.sampled_from([1.0, 0.5, 0.25]),
)
def test_property_matches_reference(h, w, coords, sampling_ratio, aligned, scale):
    x = torch.arange(2 * h * w, dtype=torch.float64).view(1, 2, h, w).sin()
    x1, x2 = sorted(coords[:2])
    y1, y2 = sorted(coords[2:])
    rois = torch.tensor([[0, x1, y1, x2, y2]], dtype=torch.float64) / torch.tensor(
        [1, scale, scale, scale, scale]
    )
    out = roi_align(x, rois, (2, 3), scale, sampling_ratio, aligned)
    ref = roi_align_ref(x.numpy(), rois.numpy(), (2, 3), scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, torch.from_numpy(ref), rtol=0, atol=1e-12)
    pooled = roi_pool(x, rois, (2, 3), scale)
    torch.testing.assert_close(pooled, torch.from_numpy(roi_pool_ref(x.numpy(), rois.numpy(), (2, 3), scale)))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_matches_cpu(aligned):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 8, 20, 24, generator=g, dtype=torch.float64)
    rois = random_rois(40, 2, 20, 24, 0.5, g)
    grad_out = torch.randn(40, 8, 7, 7, dtype=torch.float64)
    outs = []
    for dev in ("cpu", "cuda"):
        xi = x.to(dev).requires_grad_()
        out = roi_align(xi, rois.to(dev), 7, 0.5, -1, aligned)
        out.backward(grad_out.to(dev))
        outs.append((out.cpu(), xi.grad.cpu()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    x = torch.randn(1, 8, 20, 20, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 15.0, 17.0]], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = roi_align(x.to(dtype), rois, 7, 1.0, 2)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), roi_align(x.detach(), rois, 7, 1.0, 2), atol=1e-2, rtol=1e-2)


def test_channel_blocks_and_cell_chunks_give_the_same_numbers(monkeypatch):
    """Memory bounds must not change the numbers: NCHW input is copied in channel blocks in the forward,
    and the backward sums gradients over ranges of cells; any split gives identical results."""
    mod = importlib.import_module("maskrcnn.ops.roi_align")
    whole_chunks = mod._cell_chunks

    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 5, 9, 11, generator=g, dtype=torch.float64)
    rois = random_rois(15, 2, 9, 11, 1.0, g)
    grad_out = torch.randn(15, 5, 3, 3, generator=g, dtype=torch.float64)
    results = []
    cases = [
        (None, None, False),
        (None, None, True),
        ([(0, 2), (2, 3), (3, 5)], 7, False),
        ([(0, 1), (1, 5)], 1, True),
        (None, 40, False),
    ]
    for blocks, cells, channels_last in cases:
        if blocks is not None:
            monkeypatch.setattr(mod, "_channel_blocks", lambda *a, b=blocks: b)
        if cells is not None:
            monkeypatch.setattr(mod, "_cell_chunks", lambda n, hw, _m, k=cells: whole_chunks(n, hw, k))
        xi = x.clone()
        if channels_last:  # channels-last input is read in place: blocks do not apply to it
            xi = xi.to(memory_format=torch.channels_last)
        xi.requires_grad_()
        out = roi_align(xi, rois, 3, 1.0, -1, True)
        out.backward(grad_out)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert xi.grad.is_contiguous(memory_format=layout)
        results.append((out.detach(), xi.grad))
        monkeypatch.undo()
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)


def test_cell_chunks_cover_each_image_once():
    mod = importlib.import_module("maskrcnn.ops.roi_align")
    assert mod._cell_chunks(3, 10, 4) == [(b, b * 10 + s) for b in range(3) for s in (0, 4, 8)]
    assert mod._cell_chunks(2, 5, 100) == [(0, 0), (1, 5)]
    assert mod._cell_chunks(1, 3, 0) == [(0, 0), (0, 1), (0, 2)]


def _per_map(features, rois, levels, scales, **kw):
    """roi_align on each map's RoIs, put back in RoI order: what roi_align_levels must equal."""
    out = None
    for m, (f, s) in enumerate(zip(features, scales)):
        idx = torch.nonzero(levels == m).squeeze(1)
        if idx.numel():
            pooled = roi_align(f, rois[idx], 7, s, **kw)
            out = pooled.new_zeros((len(rois),) + pooled.shape[1:]) if out is None else out
            out = out.index_copy(0, idx, pooled)
    return out


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    "sides",
    [((8, 40),) * 3, ((8, 20), (200, 400), (8, 40)), ((200, 400),) * 3],
    ids=["merged", "mixed", "raw"],
)
def test_levels_in_one_pass_equal_one_call_per_map_bit_for_bit(sampling_ratio, aligned, sides):
    """Same (cell, weight) pairs in the same order, so the same sums: forward and input gradients are
    equal, not close. RoI sides (px, per map) choose whether a map's taps are merged (its widest window
    narrower than the taps): 8-40 px RoIs on every map (all merged); 200-400 px ones on the second map
    (raw there, merged on the others); 200-400 px everywhere (raw on all). The coarsest map gets no RoI."""
    g = torch.Generator().manual_seed(3)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    features = [torch.randn(2, 5, 128 // int(1 / s) * 4, 96 // int(1 / s) * 4, generator=g) for s in scales]
    features = [f.double().requires_grad_() for f in features]
    k = 40
    levels = torch.arange(k) % 3
    lo, hi = torch.tensor(sides, dtype=torch.float64)[levels].unbind(1)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 300
    wh = lo[:, None] + torch.rand(k, 2, generator=g, dtype=torch.float64) * (hi - lo)[:, None]
    rois = torch.cat([torch.randint(0, 2, (k, 1), generator=g).double(), xy, xy + wh], dim=1)
    kw = dict(sampling_ratio=sampling_ratio, aligned=aligned)
    out = roi_align_levels(features, rois, levels, 7, scales, **kw)
    expected = _per_map(features, rois, levels, scales, **kw)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    got = torch.autograd.grad(out, features, grad)
    want = torch.autograd.grad(expected, features, grad, allow_unused=True)  # no RoI on the coarsest
    assert all(torch.equal(a, torch.zeros_like(a) if b is None else b) for a, b in zip(got, want))


def test_maps_of_different_batch_sizes_in_one_pass():
    """Maps may hold different numbers of images (each image's ground-truth masks as one map): each RoI's
    batch index counts within its own map; the result is one call per map's, bit for bit."""
    g = torch.Generator().manual_seed(5)
    features = [
        torch.rand(n, 1, h, w, generator=g, dtype=torch.float64)
        for n, h, w in ((3, 40, 56), (1, 64, 48), (5, 24, 24))
    ]
    k = 30
    levels = torch.arange(k) % 3
    count = torch.tensor([3, 1, 5])[levels]
    index = (torch.rand(k, generator=g) * count).floor().double()
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 20
    rois = torch.cat(
        [index[:, None], xy, xy + 2 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 20], 1
    )
    for kw in (dict(sampling_ratio=0, aligned=True), dict(sampling_ratio=-1, aligned=False)):
        out = roi_align_levels(features, rois, levels, 7, [1.0] * 3, **kw)
        assert torch.equal(out, _per_map(features, rois, levels, [1.0] * 3, **kw))
    with pytest.raises(ValueError, match="channels"):
        roi_align_levels([features[0], features[1].expand(-1, 2, -1, -1)], rois, levels % 2, 7, [1.0] * 2)


def test_levels_in_one_pass_layouts_dtypes_and_no_rois():
    g = torch.Generator().manual_seed(4)
    scales = [1 / 4, 1 / 8]
    features = [torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 16, 16, generator=g)]
    rois = torch.tensor([[0, 2.0, 3, 40, 50], [0, 10, 10, 120, 90], [0, 0, 0, 20, 20]])
    levels = torch.tensor([0, 1, 0])
    out = roi_align_levels(features, rois, levels, 7, scales, sampling_ratio=2)
    assert out.shape == (3, 3, 7, 7) and out.is_contiguous(memory_format=torch.channels_last)
    last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    assert torch.equal(roi_align_levels(last, rois, levels, 7, scales, sampling_ratio=2), out)
    half = roi_align_levels([f.bfloat16() for f in features], rois, levels, 7, scales, sampling_ratio=2)
    assert half.dtype == torch.bfloat16
    assert roi_align_levels(features, rois[:0], levels[:0], 7, scales).shape == (0, 3, 7, 7)
    with pytest.raises(ValueError, match="one scale per feature map"):
        roi_align_levels(features, rois, levels, 7, scales[:1])
