"""What breaks first on a GPU, checked on the CPU: a tensor made on the wrong device, and mixed precision.

A tensor made without ``device=`` (``torch.arange(n)``, ``torch.zeros(...)``, ``torch.tensor([...])``)
lands on the default device. On a GPU run that is the CPU, and the first op mixing it with a CUDA tensor
raises. Here the model and its inputs are on the CPU and the default device is set to ``meta`` (a device no
real tensor is on), so the same mistake raises the same way. The GPU code paths are taken
(tests/syncs.py ``device_paths``), training and inference, for every model form the project builds.
Mixed-precision training (``solver.amp``, CUDA only) is stood in for by the CPU's ``torch.autocast``.
"""

import pytest
import torch

from maskrcnn.config import apply_overrides, get_config
from maskrcnn.modeling.build import build_model
from tests.syncs import device_paths

_C4 = ("backbone.kind=c4", "roi_heads.box_head=mlp", "rpn.anchor_sizes=((16, 32, 64),)")
_C5 = ("backbone.kind=c5", "rpn.anchor_sizes=((16, 32, 64),)")

FORMS = {
    "fpn": ("R-18-FPN-small", ()),
    "fpn-softmax-masks": ("R-18-FPN-small", ("roi_heads.mask_loss=softmax",)),
    "fpn-agnostic-masks": ("R-18-FPN-small", ("roi_heads.class_agnostic_mask=true",)),
    "fpn-mlp-mask-head": ("R-18-FPN-small", ("roi_heads.mask_head=mlp",)),
    "c4-align-max": ("R-18-FPN-small", (*_C4, "roi_heads.pooler=align_max")),
    "c4-warp-avg": ("R-18-FPN-small", (*_C4, "roi_heads.pooler=warp_avg")),
    "c5-pool": ("R-18-FPN-small", (*_C5, "roi_heads.pooler=pool")),
    "keypoints": ("keypoint-R-50-FPN", ("backbone.name=resnet18",)),
}


def build(form: str):
    preset, overrides = FORMS[form]
    cfg = apply_overrides(get_config(preset), list(overrides))  # a ModelConfig: keys below model.
    cfg.num_classes = 2 if cfg.roi_heads.keypoint else 4
    cfg.input.min_size, cfg.input.max_size = (64,), 64
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 300, 100
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 200, 50
    cfg.roi_heads.batch_size_per_image = 32
    # narrow (half-precision convolutions are emulated on most CPUs, and slow)
    cfg.backbone.base_channels, cfg.backbone.fpn_channels = 16, 32
    cfg.roi_heads.representation_size = 64
    cfg.roi_heads.mask_head_channels = 16
    cfg.roi_heads.keypoint_head_channels = (32,) * 4
    cfg.roi_heads.score_thresh = 0.0  # an untrained model: detections reach every postprocessing step
    torch.manual_seed(0)
    return build_model(cfg)


def targets(model, n: int = 3) -> list[dict]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        xy = torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + 12 + torch.rand(n, 2, generator=g) * 16], dim=1)
        t = {"boxes": boxes, "labels": torch.arange(n) % (cfg.num_classes - 1) + 1}
        if cfg.roi_heads.mask:
            masks = torch.zeros(n, 64, 64, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            t["masks"] = masks
        if cfg.roi_heads.keypoint:
            k = cfg.roi_heads.num_keypoints
            pts = boxes[:, None, :2] + torch.rand(n, k, 2, generator=g) * 12
            t["keypoints"] = torch.cat([pts, torch.full((n, k, 1), 2.0)], dim=2)
        out.append(t)
    return out


def test_a_tensor_made_without_device_raises_here():
    """The check works: a stray default-device tensor meets the model's and raises, as on a GPU."""
    x = torch.ones(3)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        x + torch.arange(3)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_model_makes_its_tensors_on_the_inputs_device(form):
    model = build(form)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    batch = targets(model)
    with device_paths(), torch.device("meta"):  # the default device within the block
        model.train()
        losses = model(images, batch)
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            out = model(images)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in model.parameters())
    for o in out:
        assert len(o["boxes"]) > 0  # postprocessing ran on detections
        assert all(v.device.type == "cpu" for v in o.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["fpn", "c5-pool", "keypoints"])
def test_mixed_precision_training_and_inference_keep_their_float32_parts(form, dtype):
    """``solver.amp`` (CUDA only in training) runs the model under ``torch.autocast``: the CPU's autocast
    stands in for it, so a dtype mismatch (a float32 buffer receiving half values, a half box decode) fails
    here. Losses and every output come back float32 and finite."""
    model = build(form)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with device_paths(), torch.autocast("cpu", dtype=dtype):
        model.train()
        losses = model(images, targets(model))
        model.eval()
        with torch.no_grad():
            out = model(images)
    sum(losses.values()).backward()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    for o in out:
        assert len(o["boxes"]) > 0
        assert all(v.dtype in (torch.float32, torch.int64) for v in o.values()), {
            k: v.dtype for k, v in o.items()
        }
        assert all(torch.isfinite(v).all() for v in o.values() if v.is_floating_point())
