"""Reduced-precision inference: the heavy convolutions and linear layers in bfloat16 (or float16 on CUDA),
everything that decides a box, a score or a mask pixel in float32.

:func:`set_precision` runs these modules under ``torch.autocast`` and casts their outputs back to float32:
the backbone (ResNet body and FPN), the RPN's shared 3x3 conv, the box head (MLP or C4's res5), the mask
head's convs and the keypoint head's convs. The small predictors (class scores, box deltas, mask and
keypoint logits), RoIAlign, box decoding, NMS, mask pasting and keypoint decoding stay float32, so the
precision lost is the features', not the outputs' arithmetic. Nothing in the model's code changes: the
switch is a pair of forward hooks per module, and the weights stay float32 (``set_precision("fp32")``
restores the exact float32 model).

bfloat16 is for hardware that has it: CPUs with AVX512-BF16 or AMX (where oneDNN has bf16 kernels), CUDA
GPUs of compute capability >= 8.0. Elsewhere bf16 is emulated and far slower than float32
(``benchmarks/precision.py`` measures it), so :func:`set_precision` stays float32 and warns, unless
``force=True`` (to measure bf16's accuracy on any machine).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PRECISIONS", "native_support", "set_precision"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the modules that run in reduced precision (dotted names under the model; absent ones are skipped)
REDUCED = (
    "backbone",
    "rpn.head.conv",
    "roi_heads.box_head",
    "roi_heads.mask_head",
    "roi_heads.keypoint_head",
)


def native_support(precision: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` runs ``precision`` natively, and a few words saying why (or why not)."""
    device = torch.device(device)
    if precision == "fp32":
        return True, "float32"
    if device.type == "cuda":
        if precision == "fp16":
            return True, "CUDA float16"
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA bfloat16" if ok else "this GPU has no native bfloat16 (compute capability < 8.0)"
    if device.type == "cpu" and precision == "bf16":
        cpu = getattr(torch, "cpu", None)
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
        if amx or avx512_bf16:
            return True, "CPU with " + ("AMX" if amx else "AVX512-BF16")
        return (
            False,
            "this CPU has neither AVX512-BF16 nor AMX: bfloat16 would be emulated, slower than float32",
        )
    return False, f"{precision} is not supported on {device.type}"


def _to_float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value


class _Autocast:
    """The hooks of one module: enter ``torch.autocast`` before its forward, leave it after (also when the
    forward raises) and return its outputs in float32."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.contexts: list = []

    def before(self, module: nn.Module, args: tuple) -> None:
        device = next((a.device.type for a in _tensors(args)), "cpu")
        context = torch.autocast(device_type=device, dtype=self.dtype)
        context.__enter__()
        self.contexts.append(context)

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.contexts.pop().__exit__(None, None, None)
        return _to_float32(output)


def _tensors(value: Any):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def set_precision(model: nn.Module, precision: str, *, force: bool = False) -> str:
    """Run ``model``'s heavy layers (:data:`REDUCED`) in ``precision`` (``"fp32"``, ``"bf16"`` or
    ``"fp16"``); returns the precision in effect. Where the model's device lacks native support the model
    stays float32 with a warning, unless ``force``. Calling it again replaces the previous setting."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for handle in getattr(model, "_precision_hooks", ()):
        handle.remove()
    model._precision_hooks = []
    device = next(model.parameters()).device
    ok, why = native_support(precision, device)
    if precision != "fp32" and not ok:
        if not force:
            logger.warning("precision %s: %s; staying float32", precision, why)
            precision = "fp32"
        elif precision == "fp16" and device.type == "cpu":
            raise ValueError("precision fp16 is for CUDA; on a CPU use bf16")
    if precision != "fp32":
        modules = dict(model.named_modules())
        for name in REDUCED:
            if name in modules:
                hooks = _Autocast(_DTYPES[precision])
                model._precision_hooks += [
                    modules[name].register_forward_pre_hook(hooks.before),
                    modules[name].register_forward_hook(hooks.after, always_call=True),
                ]
    model.precision = precision
    return precision
