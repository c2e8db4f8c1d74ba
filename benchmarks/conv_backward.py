"""Convolution forward and backward on this CPU, NCHW against channels-last: where the demo's backward goes.

Times, as medians of --runs after --warmup: a 3x3 C->C convolution on N x C x H x W for each --shape C N H W
(default 64 4 64 64: the demo's res2 and P2 size; 256 2 128 176 is benchmarks/train.py's P2) forward,
backward for the input gradient only and for the weight gradient only (each through ``torch.autograd.grad``
with the other not required), and the demo's whole backbone (ResNet-18 + FPN 64, BatchNorm in training
mode, batch 4 x 256 x 256) forward and backward. Both memory layouts alternate run by run, so machine noise
hits both alike. Which layout training uses per CPU: ``maskrcnn.modeling.rcnn.fast_layout``.

    .venv/bin/python benchmarks/conv_backward.py [--runs 20] [--warmup 3] [--shape C N H W ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    import torch

    from maskrcnn.demo import demo_config
    from maskrcnn.modeling.build import build_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=4, action="append", metavar=("C", "N", "H", "W"))
    args = ap.parse_args()
    shapes = args.shape or [[64, 4, 64, 64]]
    torch.manual_seed(0)
    layouts = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}

    convs = [
        (
            torch.nn.Conv2d(c, c, 3, padding=1, bias=False),
            torch.rand(n, c, h, w),
            f"{c}->{c} on {n} x {h} x {w}",
        )
        for c, n, h, w in shapes
    ]
    backbone = build_model(demo_config("unused").model).train().backbone
    images = torch.rand(4, 3, 256, 256)

    def conv_parts(conv, x, fmt):
        c = conv.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        g = torch.ones_like(c(xi))
        xg = xi.clone().requires_grad_(True)
        c.weight.requires_grad_(False)
        data = _timed(lambda: torch.autograd.grad(c(xg), xg, g))  # includes the forward
        c.weight.requires_grad_(True)
        weights = _timed(lambda: torch.autograd.grad(c(xi), c.weight, g))
        with torch.no_grad():
            forward = _timed(lambda: c(xi))
        return {
            "forward": forward,
            "backward, input gradient": data - forward,
            "backward, weight gradient": weights - forward,
        }

    def backbone_parts(fmt):
        net = backbone.to(memory_format=fmt)
        xi = images.contiguous(memory_format=fmt)
        t = time.perf_counter()
        out = net(xi)
        forward = time.perf_counter() - t
        loss = sum(o.float().mean() for o in out.values())
        return {"backbone forward": forward, "backbone backward": _timed(loss.backward)}

    rows: dict[str, dict[str, list[float]]] = {}
    for i in range(args.warmup + args.runs):
        for name, fmt in layouts.items():
            parts = {}
            for conv, x, what in convs:
                parts.update({f"conv 3x3 {what}, {k}": v for k, v in conv_parts(conv, x, fmt).items()})
            parts.update(backbone_parts(fmt))
            if i >= args.warmup:
                for k, v in parts.items():
                    rows.setdefault(k, {}).setdefault(name, []).append(v)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, medians of {args.runs} runs (ms)")
    print("| part | NCHW | channels-last |\n| --- | --- | --- |")
    for k, by_layout in rows.items():
        cells = " | ".join(f"{statistics.median(by_layout[n]) * 1000:.1f}" for n in layouts)
        print(f"| {k} | {cells} |")


if __name__ == "__main__":
    main()
