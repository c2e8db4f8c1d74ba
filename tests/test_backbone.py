"""Tests for maskrcnn.modeling.backbone (ResNet, FrozenBatchNorm2d, checkpoint loading) and .fpn (FPN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from maskrcnn.modeling.backbone import (
    Bottleneck,
    FrozenBatchNorm2d,
    ResNet,
    load_imagenet_checkpoint,
    make_res5,
    make_stage,
    resnet_spec,
)
from maskrcnn.modeling.fpn import FPN, BackboneWithFPN, resnet_fpn
from maskrcnn.weights import torchvision_to_maskrcnn

TVREF = Path("/work/shared/tools/tvref")
# Two code paths for the same function (channels-last vs NCHW convolutions, FrozenBatchNorm folded into the
# conv vs applied after it) round differently, and differently on each CPU: oneDNN picks other kernels, i.e.
# other summation orders, on AVX2, AVX-512 and AMX machines. In float32 they differ by up to
# n * 2**-24 * sum|terms| per layer (n up to 3*3*512 here), ~1e-6 of the outputs' scale and much more on
# entries where terms cancel, so a float32 tolerance is a guess about the CPU. These comparisons therefore
# run in float64, where the same bound is ~1e-15 of the scale (observed 7e-15): TOL64, relative to each
# output's largest entry, sits far above that and far below any real fault (a wrong fold or layout changes
# entries by a large fraction of the largest one).
TOL64 = 1e-9
ALL_SPECS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]
# torchvision classification models' parameter counts (BatchNorm affine and fc included), from its docs.
TV_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _keys_json(name: str) -> dict:
    path = TVREF / f"{name}_keys.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _shapes(sd) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sd.items()}


def _fc(name: str) -> int:
    c5 = 512 if resnet_spec(name)["depth"] < 50 else 2048
    return c5 * 1000 + 1000


# ---------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_bn_has_buffers_not_parameters():
    m = FrozenBatchNorm2d(8)
    assert list(m.parameters()) == []
    assert set(dict(m.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_frozen_bn_equals_batchnorm_eval(memory_format):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32, eps=1e-5)
    _randomize_norms(bn)
    bn.eval()
    fbn = FrozenBatchNorm2d(32)
    fbn.load_state_dict(bn.state_dict())  # includes num_batches_tracked
    x = torch.randn(2, 32, 9, 11).to(memory_format=memory_format).requires_grad_()
    y_ref, y = bn(x), fbn(x)
    assert torch.equal(y, y_ref)
    # the documented formula gives the same up to rounding
    scale, shift = fbn.scale_and_shift()
    torch.testing.assert_close(y, x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    g = torch.randn_like(y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_frozen_bn_keeps_only_its_scales_for_backward():
    """In training the norm's backward needs only the per-channel scale; autograd's batch-norm node would
    keep the whole input (one activation per frozen norm). Forward: the eval kernel's bits; gradients:
    float64 gradcheck, first and second order."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).double()
    _randomize_norms(bn)
    fbn = FrozenBatchNorm2d(8).double()
    fbn.load_state_dict(bn.eval().state_dict())
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)

    def saved_numel(module):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = module(x)
        return y, sum(sizes)

    (y, kept), (y_bn, kept_bn) = saved_numel(fbn), saved_numel(bn)
    assert kept == 8 and kept_bn >= x.numel()
    assert torch.equal(y, y_bn)
    assert torch.autograd.gradcheck(fbn, (x,))
    assert torch.autograd.gradgradcheck(fbn, (x,))


def test_frozen_bn_loads_num_batches_tracked_and_reports_other_keys():
    bn = nn.BatchNorm2d(4)
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd
    FrozenBatchNorm2d(4).load_state_dict(sd, strict=True)
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="bogus"):
        FrozenBatchNorm2d(4).load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- ResNet construction


@pytest.mark.parametrize("name", ALL_SPECS)
def test_spec_parameter_count_matches_torchvision(name):
    with torch.device("meta"):
        model = ResNet(**resnet_spec(name), norm="bn", frozen_stages=0)
    assert sum(p.numel() for p in model.parameters()) + _fc(name) == TV_NUM_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d"])
def test_state_dict_layout_matches_torchvision_json(name):
    ref = _keys_json(name)
    assert ref["num_parameters"] == TV_NUM_PARAMS[name]
    expected = {k: v for k, v in ref["state_dict"].items() if not k.startswith("fc.")}
    with torch.device("meta"):
        bn_model = ResNet(**resnet_spec(name), norm="bn")
        frozen_model = ResNet(**resnet_spec(name))
    assert _shapes(bn_model.state_dict()) == expected
    assert list(bn_model.state_dict()) == list(expected)  # same order too
    no_counters = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert _shapes(frozen_model.state_dict()) == no_counters


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_small_specs_forward_backward(name):
    torch.manual_seed(0)
    model = ResNet(**resnet_spec(name), frozen_stages=0)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_bottleneck_specs_forward_backward(name):
    # The deeper specs (101/152, ResNeXt-101) use the same blocks; they are built on "meta" above.
    torch.manual_seed(0)
    model = ResNet(**resnet_spec(name), frozen_stages=3)
    out = model(torch.randn(1, 3, 32, 32))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 256, 8, 8),
        (1, 512, 4, 4),
        (1, 1024, 2, 2),
        (1, 2048, 1, 1),
    ]
    out["c5"].sum().backward()
    assert all(p.grad is not None for p in model.layer3.parameters())
    assert all(p.grad is None for p in model.layer2.parameters())


def test_keyword_only_and_validation():
    with pytest.raises(TypeError):
        ResNet(50)  # type: ignore[misc]
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match="norm"):
        ResNet(depth=18, norm="gn")
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNet(depth=18, frozen_stages=6)
    with pytest.raises(ValueError, match="return_stages"):
        ResNet(depth=18, return_stages=("c1",))
    with pytest.raises(ValueError, match="unknown"):
        resnet_spec("resnet42")
    with pytest.raises(ValueError, match="BasicBlock"):
        ResNet(depth=18, groups=32, width_per_group=4)


def test_init_kaiming_fan_out():
    torch.manual_seed(0)
    model = ResNet(depth=50)
    w = model.layer3[0].conv2.weight  # 256 out channels, 3x3: fan_out = 2304
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert abs(w.std().item() / expected_std - 1) < 0.02


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("size", [(64, 64), (97, 131)])
def test_output_strides_and_channels_as_declared(depth, size):
    model = ResNet(depth=depth).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    assert model.strides == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    mult = 4 if depth >= 50 else 1
    assert model.out_channels == {"c2": 64 * mult, "c3": 128 * mult, "c4": 256 * mult, "c5": 512 * mult}
    for name, t in out.items():
        s = model.strides[name]
        assert t.shape == (1, model.out_channels[name], -(-h // s), -(-w // s))


@pytest.mark.parametrize("depth", [18, 50])
def test_base_channels_scales_every_width_and_nothing_else(depth):
    """base_channels=32 halves every channel count of the standard network (stem, every block's inner and
    output width, shortcuts, res5), keeps the depth, kernels and strides, and the outputs follow."""
    full, half = ResNet(depth=depth), ResNet(depth=depth, base_channels=32)
    full_sd, half_sd = full.state_dict(), half.state_dict()
    assert list(full_sd) == list(half_sd)
    for key, t in full_sd.items():
        if t.dim() == 0:  # num_batches_tracked
            continue
        expected = [d // 2 for d in t.shape]
        if key == "conv1.weight":
            expected[1] = 3  # the RGB input
        if t.dim() == 4:
            expected[2:] = t.shape[2:]  # kernel size unchanged
        assert list(half_sd[key].shape) == expected, key
    mult = 4 if depth >= 50 else 1
    assert half.out_channels == {"c2": 32 * mult, "c3": 64 * mult, "c4": 128 * mult, "c5": 256 * mult}
    out = half.eval()(torch.randn(1, 3, 64, 96))
    for name, t in out.items():
        s = half.strides[name]
        assert t.shape == (1, half.out_channels[name], 64 // s, 96 // s)
    res5 = make_res5(depth=depth, base_channels=32)
    assert res5(torch.randn(2, 128 * mult, 14, 14)).shape == (2, 256 * mult, 7, 7)
    for bad in (0, 12, 33, 64.0):
        with pytest.raises(ValueError, match="base_channels"):
            ResNet(depth=depth, base_channels=bad)


def test_return_stages_subset():
    model = ResNet(depth=18, return_stages=("c3", "c5"))
    out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["c3", "c5"]
    assert model.out_channels == {"c3": 128, "c5": 512} and model.strides == {"c3": 8, "c5": 32}


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("frozen_stages", range(6))
def test_frozen_stages_get_no_grad(frozen_stages):
    torch.manual_seed(0)
    model = ResNet(depth=18, frozen_stages=frozen_stages, norm="bn")
    model.train()
    groups = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    frozen = [m for g in groups[:frozen_stages] for m in g]
    out = model(torch.randn(2, 3, 64, 64, requires_grad=True))
    sum(v.sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        is_frozen = name.split(".")[0] in frozen
        assert p.requires_grad == (not is_frozen), name
        assert (p.grad is None) == is_frozen, name
    # with plain BatchNorm, frozen stages' BN stay in eval mode (running stats untouched)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (name.split(".")[0] not in frozen), name


def test_frozen_bn_stats_unchanged_by_training():
    model = ResNet(depth=18, frozen_stages=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(2, 3, 32, 32)).popitem()[1].sum().backward()
    for k, v in model.state_dict().items():
        if "bn" in k or "downsample.1" in k:
            assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- checkpoints


def _classifier_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-like classifier checkpoint: plain BN (with counters), randomised stats, and fc."""
    torch.manual_seed(seed)
    src = ResNet(**resnet_spec(name), norm="bn", frozen_stages=0)
    _randomize_norms(src, seed)
    sd = dict(src.state_dict())
    c5 = src.out_channels["c5"]
    sd["fc.weight"] = torch.randn(1000, c5)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_load_imagenet_checkpoint_matches_plain_bn_model():
    sd = _classifier_state_dict("resnet18")
    ref = ResNet(depth=18, norm="bn").eval()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    model = ResNet(depth=18)
    load_imagenet_checkpoint(model, sd)
    x = torch.randn(1, 3, 64, 96)
    # with autograd on FrozenBatchNorm2d is not folded: the same F.batch_norm call as nn.BatchNorm2d's on the
    # same conv outputs, i.e. the same kernels on the same inputs, so bit-identical on any CPU
    a, b = ref(x), model.eval()(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref, model, x = ref.double(), model.double(), x.double()
    a = ref(x)
    with torch.no_grad():  # folded into the convs: another code path, the same up to rounding (TOL64)
        folded = model(x)
    for k in a:
        assert folded[k].dtype == torch.float64
        scale = a[k].abs().max().detach()
        torch.testing.assert_close(folded[k] / scale, a[k].detach() / scale, rtol=0, atol=TOL64)
    # num_batches_tracked also loads through the plain load_state_dict path
    ResNet(depth=18).load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)


def test_load_wrong_checkpoint_names_bad_keys_and_loads_nothing():
    model = ResNet(depth=34)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = _classifier_state_dict("resnet34")
    missing = {k: v for k, v in good.items() if not k.startswith("layer1.2.")}
    with pytest.raises(ValueError, match=r"missing keys: layer1\.2\.bn1\.bias, .*layer1\.2\.conv1\.weight"):
        load_imagenet_checkpoint(model, missing)
    extra = {**good, "layer9.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys: layer9\.weight;"):
        load_imagenet_checkpoint(model, extra)
    bad = {**good, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}
    match = (
        r"wrong shapes \(checkpoint vs model\): "
        r"layer2\.0\.conv1\.weight \(128, 64, 1, 1\) vs \(128, 64, 3, 3\)"
    )
    with pytest.raises(ValueError, match=match):
        load_imagenet_checkpoint(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"
    load_imagenet_checkpoint(model, good)  # and the right one loads


def test_load_resnext_into_resnet_reports_shapes():
    with torch.device("meta"):
        src = ResNet(**resnet_spec("resnext50_32x4d"), norm="bn")
        model = ResNet(depth=50)
    sd = {k: torch.zeros(v.shape) for k, v in src.state_dict().items()}
    with pytest.raises(ValueError, match=r"wrong shapes \(checkpoint vs model\): layer1\.0\.conv1\.weight"):
        load_imagenet_checkpoint(model, sd)


def test_c4_backbone_and_res5_head():
    sd = _classifier_state_dict("resnet18")
    full = ResNet(depth=18, norm="bn").eval()
    full.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    body = ResNet(depth=18, return_stages=("c4",))
    assert not hasattr(body, "layer4")
    assert body.out_channels == {"c4": 256} and body.strides == {"c4": 16}
    load_imagenet_checkpoint(body, sd, ignore=("fc.", "layer4."))
    res5 = make_res5(depth=18)
    load_imagenet_checkpoint(res5, sd, prefix="layer4.")
    x = torch.randn(1, 3, 64, 64)
    # autograd on: FrozenBatchNorm2d is not folded into the convs, so the numbers are bit-identical
    ref = full(x)
    c4 = body.eval()(x)["c4"]
    assert torch.equal(c4, ref["c4"])
    assert torch.equal(res5.eval()(c4), ref["c5"])
    rois = torch.randn(3, 256, 14, 14)
    assert res5(rois).shape == (3, 512, 7, 7)


def test_make_stage_bottleneck_res5_shapes():
    stage = make_stage(
        block=Bottleneck, in_channels=1024, out_channels=2048, num_blocks=3, stride=2, norm="frozen_bn"
    )
    assert [k for k in stage.state_dict() if k.startswith("0.downsample")] == [
        "0.downsample.0.weight",
        "0.downsample.1.weight",
        "0.downsample.1.bias",
        "0.downsample.1.running_mean",
        "0.downsample.1.running_var",
    ]
    assert stage[0].conv2.stride == (2, 2) and stage[0].conv1.stride == (1, 1)  # ResNet v1.5
    with torch.no_grad():
        assert stage(torch.randn(2, 1024, 14, 14)).shape == (2, 2048, 7, 7)


# ---------------------------------------------------------------- FPN


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Independent nearest-neighbour resize: output pixel i reads input pixel floor(i * in / out)."""
    h, w = x.shape[-2:]
    iy = (torch.arange(size[0]) * h) // size[0]
    ix = (torch.arange(size[1]) * w) // size[1]
    return x[..., iy[:, None], ix[None, :]]


def test_fpn_shapes_and_values_for_odd_input():
    torch.manual_seed(0)
    body = ResNet(depth=18).eval()
    fpn = FPN(in_channels=body.out_channels, out_channels=32).eval()
    with torch.no_grad():
        for m in fpn.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.normal_()
        feats = body(torch.randn(1, 3, 97, 131))
        out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert fpn.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert fpn.out_channels == 32
    sizes = {"p2": (25, 33), "p3": (13, 17), "p4": (7, 9), "p5": (4, 5), "p6": (2, 3)}
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == sizes
    assert all(v.shape[:2] == (1, 32) for v in out.values())
    # naive top-down reference
    names = ["c2", "c3", "c4", "c5"]
    with torch.no_grad():
        merged = fpn.inner_blocks[3](feats["c5"])
        ref = {"p5": fpn.layer_blocks[3](merged)}
        for i in (2, 1, 0):
            lat = fpn.inner_blocks[i](feats[names[i]])
            merged = lat + _nearest(merged, tuple(lat.shape[-2:]))
            ref[f"p{i + 2}"] = fpn.layer_blocks[i](merged)
        ref["p6"] = ref["p5"][..., ::2, ::2]
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)


def test_fpn_init_and_no_extra_pool():
    fpn = FPN(in_channels={"c3": 8, "c4": 16}, out_channels=4, extra_pool=False)
    assert fpn.strides == {"p3": 8, "p4": 16}
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0
            bound = (
                3.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])
            ) ** 0.5  # kaiming_uniform a=1
            assert m.weight.abs().max() <= bound
    out = fpn({"c3": torch.randn(1, 8, 10, 10), "c4": torch.randn(1, 16, 5, 5)})
    assert list(out) == ["p3", "p4"]
    with pytest.raises(ValueError, match="c<level>"):
        FPN(in_channels={"res2": 8})


def test_backbone_with_fpn_keys_and_attributes():
    model = resnet_fpn("resnet18", frozen_stages=2)
    assert model.out_channels == 256
    assert model.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    keys = list(model.state_dict())
    assert all(k.startswith(("body.", "fpn.")) for k in keys)
    assert "fpn.inner_blocks.0.weight" in keys and "fpn.layer_blocks.3.bias" in keys
    out = model(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 256, 16, 16),
        (1, 256, 8, 8),
        (1, 256, 4, 4),
        (1, 256, 2, 2),
        (1, 256, 1, 1),
    ]
    with pytest.raises(ValueError, match="not returned"):
        BackboneWithFPN(body=ResNet(depth=18, return_stages=("c4",)), fpn=FPN(in_channels={"c5": 512}))


def test_torchvision_maskrcnn_backbone_layout_maps_onto_ours():
    ref = _keys_json("maskrcnn_resnet50_fpn")
    with torch.device("meta"):
        frozen = resnet_fpn("resnet50")  # torchvision's pretrained layout: FrozenBN, stem+layer1 frozen
        plain = resnet_fpn("resnet50", norm="bn", frozen_stages=0)
    for layout, model in ((ref["pretrained_layout"]["state_dict"], frozen), (ref["state_dict"], plain)):
        tv = {k: torch.empty(v, device="meta") for k, v in layout.items() if k.startswith("backbone.")}
        ours = {k[len("backbone.") :]: v for k, v in torchvision_to_maskrcnn(tv).items()}
        assert _shapes(ours) == _shapes(model.state_dict())  # incl. num_batches_tracked for plain BN
    # parameter counts of the pretrained layout's backbone: total and trainable
    tv_backbone = {
        k: v for k, v in ref["pretrained_layout"]["state_dict"].items() if k.startswith("backbone.")
    }
    n_fpn = sum(torch.Size(v).numel() for k, v in tv_backbone.items() if ".fpn." in k)
    assert sum(p.numel() for p in frozen.fpn.parameters()) == n_fpn
    n_trainable = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
    n_frozen_convs = sum(p.numel() for p in frozen.parameters() if not p.requires_grad)
    n_total = ref["pretrained_layout"]["num_parameters"]
    n_total_trainable = ref["pretrained_layout"]["num_trainable_parameters"]
    assert n_frozen_convs == n_total - n_total_trainable  # stem + layer1 convs: what torchvision freezes
    n_heads = sum(
        torch.Size(v).numel()
        for k, v in ref["pretrained_layout"]["state_dict"].items()
        if not k.startswith("backbone.")
    )
    assert n_trainable + n_frozen_convs + n_heads == n_total


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = resnet_fpn("resnet18").eval()
    _randomize_norms(model)
    x = torch.randn(1, 3, 97, 131)
    model, x = model.double(), x.double()  # two convolution paths: compared in float64 (see TOL64)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    for k in ref:
        assert out[k].dtype == torch.float64 and out[k].is_contiguous(memory_format=torch.channels_last)
        scale = ref[k].abs().max()
        torch.testing.assert_close(out[k] / scale, ref[k] / scale, rtol=0, atol=TOL64)


def test_fpn_backward_through_in_place_merge():
    model = resnet_fpn("resnet18", frozen_stages=0)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = model(x)
    sum(v.sum() for v in out.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.fpn.parameters())
