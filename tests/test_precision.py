"""Reduced-precision inference (maskrcnn.modeling.precision): which layers run in bfloat16, the error of one
such layer against float64 within bfloat16's rounding bound, float32 restored exactly, the fallback."""

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from maskrcnn.modeling import precision as precision_module
from maskrcnn.modeling.precision import REDUCED, native_support
from tests.common import tiny_model


@pytest.fixture()
def model():
    return tiny_model(num_classes=3).eval()


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 56, 64, generator=g) * 0.3
    image[:, 10:40, 12:44] += 0.6
    return image


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 spelled it differently
        return torch.is_autocast_cpu_enabled()


def test_bf16_runs_the_heavy_layers_in_bf16_and_everything_after_them_in_float32(model):
    seen = {}

    def record(name):
        def hook(module, args, output):
            first = output[0] if isinstance(output, (tuple, list)) else output
            seen[name] = (args[0].dtype, first.dtype)

        return hook

    watched = {
        "backbone.body.layer1": model.backbone.body.layer1,  # inside the backbone: bf16 out
        "backbone": model.backbone,  # the backbone's own outputs: float32 again (dict, checked below)
        "rpn.head.cls_logits": model.rpn.head.cls_logits,  # the 1x1 predictors stay float32
        "roi_heads.box_head.fc7": model.roi_heads.box_head.fc7,
        "roi_heads.box_predictor": model.roi_heads.box_predictor,
        "roi_heads.mask_head.mask_fcn4": model.roi_heads.mask_head.mask_fcn4,
        "roi_heads.mask_predictor": model.roi_heads.mask_predictor,
    }
    features = {}
    model.backbone.register_forward_hook(lambda m, a, out: features.update(out))
    for name, module in watched.items():
        if name != "backbone":
            module.register_forward_hook(record(name))
    model.set_precision("bf16", force=True)
    assert model.precision == "bf16"
    with torch.no_grad():
        (out,) = model([_image()])
    bf16, f32 = torch.bfloat16, torch.float32
    assert seen["backbone.body.layer1"][1] == bf16
    assert seen["roi_heads.box_head.fc7"][1] == bf16 and seen["roi_heads.mask_head.mask_fcn4"][1] == bf16
    assert seen["rpn.head.cls_logits"] == (f32, f32)
    assert seen["roi_heads.box_predictor"][0] == f32 and seen["roi_heads.mask_predictor"][0] == f32
    # the hook order: our recorder runs before the precision hook's cast, so the backbone's raw output is
    # bf16; the RPN and RoI heads receive float32 (checked by the predictors' inputs above)
    assert all(f.dtype == bf16 for f in features.values())
    assert all(v.dtype == f32 for k, v in out.items() if v.is_floating_point())
    assert len(model._precision_hooks) == 2 * sum(n in dict(model.named_modules()) for n in REDUCED)


def test_one_bf16_layer_is_within_bf16_rounding_of_float64(model):
    """The RPN's 3x3 conv (hooked) against float64: inputs, weights and bias are rounded to bfloat16 (relative
    error <= 2^-9 each, so <= 2^-8 + 2^-18 per product), products accumulate in float32 (<= n 2^-24 of the
    sum of |terms|, n = 9 C + 1 terms), and the output is rounded to bfloat16 (<= 2^-9 of |y|)."""
    model.set_precision("bf16", force=True)
    conv = model.rpn.head.conv
    x = torch.randn(1, conv.in_channels, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = conv(x)
        w64, b64, x64 = conv.weight.double(), conv.bias.double(), x.double()
        exact = F.conv2d(x64, w64, b64, padding=1)
        magnitude = F.conv2d(x64.abs(), w64.abs(), b64.abs(), padding=1)  # sum of |terms|
    n = 9 * conv.in_channels + 1
    bound = (2**-8 + 2**-18 + n * 2**-24) * magnitude + 2**-9 * exact.abs() * (1 + 2**-8)
    assert y.dtype == torch.float32
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    assert (err / magnitude).max() > 2**-14  # bf16 really ran: float32 would be ~2^-24 here


def test_fp32_again_gives_the_float32_model_bit_for_bit(model):
    image = _image()
    with torch.no_grad():
        (before,) = model([image])
        model.set_precision("bf16", force=True)
        model([image])
        model.set_precision("fp32")
        (after,) = model([image])
    assert model.precision == "fp32" and model._precision_hooks == []
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_exception_inside_a_bf16_layer_leaves_autocast_off(model):
    model.set_precision("bf16", force=True)
    with pytest.raises(RuntimeError):
        model.backbone(torch.zeros(1, 5, 32, 32))  # 5 channels: the stem's conv refuses
    assert not _autocast_on()


def test_without_native_support_it_warns_and_stays_float32(model, monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "native_support", lambda p, d: (False, "no bf16 here"))
    with caplog.at_level(logging.WARNING):
        model.set_precision("bf16")
    assert model.precision == "fp32" and model._precision_hooks == []
    assert "precision bf16: no bf16 here; staying float32" in caplog.text
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        model.set_precision("fp16", force=True)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        model.set_precision("int8")


def test_native_support_matches_the_cpu_flags():
    ok, why = native_support("bf16", "cpu")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None and " avx512_bf16" not in flags and " amx_bf16" not in flags:
        assert not ok, why  # no bf16 instructions: never claimed (torch may also decline where they exist)
    assert native_support("fp32", "cpu") == (True, "float32")
    assert native_support("fp16", "cpu")[0] is False
