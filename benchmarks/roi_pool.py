"""RoIPool forward + backward, ours beside torchvision's C++ kernel, on the maps of ``maskrcnn ablate``.

RoIPool exists for the paper's Table 2c/2d, which the ablation trains on 256 px shapes images, batch 4,
with a half-width ResNet-18: the C5 variant pools one 8x8 stride-32 map (256 channels), the C4 variant one
16x16 stride-16 map (128 channels); the FPN form's finest map, 64x64 at stride 4 (64 channels), is the case
of large bins. Each case: 512 RoIs per image (the RoI heads' sample) of 16-160 px, 7x7 output, random
features; forward, then backward of a random output gradient. Ours and torchvision's get the same inputs,
one after the other; the outputs are checked equal, and the gradients within the bound of float32
summation (a cell's gradient sums those of every bin whose maximum it holds, in each implementation's own
order).

    /tmp/tvref-venv/bin/python benchmarks/roi_pool.py [--runs 5] [--threads 2]

Median (min-max) milliseconds of --runs after one warm-up. Without torchvision (or tvref's Python), ours
only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

#: (name, map size, channels, stride)
CASES = (
    ("C5: 8x8 map, stride 32", 8, 256, 32),
    ("C4: 16x16 map, stride 16", 16, 128, 16),
    ("P2: 64x64 map, stride 4", 64, 64, 4),
)


def _inputs(size: int, channels: int, stride: int, *, images: int = 4, per_image: int = 512, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    k = images * per_image
    image = size * stride
    wh = 16 + torch.rand(k, 2, generator=g) * 144
    xy = torch.rand(k, 2, generator=g) * (image - wh)
    index = torch.arange(images).repeat_interleave(per_image).float()[:, None]
    rois = torch.cat([index, xy, xy + wh], dim=1)
    x = torch.randn(images, channels, size, size, generator=g)
    grad = torch.randn(k, channels, 7, 7, generator=g)
    return x, rois, grad


def _time(fn, runs: int) -> list[float]:
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tvref", default=os.path.join(HERE, "..", "..", "shared", "tools", "tvref"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.tvref))
    try:  # torchvision with its genuine compiled ops (tvref), before anything imports torchvision
        import tvref

        tv_roi_pool = tvref.install().ops.roi_pool
    except Exception as e:  # noqa: BLE001 - absent, or its compiled ops do not load with this torch
        print(f"(torchvision left out: {e})")
        tv_roi_pool = None
    import torch

    from maskrcnn.ops.roi_align import roi_pool

    torch.set_num_threads(args.threads)
    impls = {"maskrcnn": roi_pool}
    if tv_roi_pool is not None:
        impls["torchvision"] = tv_roi_pool
    print(
        f"torch {torch.__version__}, {args.threads} threads; command: benchmarks/roi_pool.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    print()
    print("| case | implementation | forward ms | forward + backward ms |")
    print("| --- | --- | --- | --- |")
    for name, size, channels, stride in CASES:
        x, rois, grad = _inputs(size, channels, stride)
        outs = {}
        for impl, fn in impls.items():
            xg = x.clone().requires_grad_()

            def forward(fn=fn, xg=xg, rois=rois, scale=1.0 / stride):
                with torch.no_grad():
                    return fn(xg, rois, 7, scale)

            def both(fn=fn, xg=xg, rois=rois, scale=1.0 / stride, grad=grad):
                y = fn(xg, rois, 7, scale)
                return y, torch.autograd.grad(y, xg, grad)[0]

            fwd, full = _time(forward, args.runs), _time(both, args.runs)
            outs[impl] = both()
            print(
                f"| {name} | {impl} | {1e3 * statistics.median(fwd):.1f} ({1e3 * min(fwd):.1f}-"
                f"{1e3 * max(fwd):.1f}) | {1e3 * statistics.median(full):.1f} ({1e3 * min(full):.1f}-"
                f"{1e3 * max(full):.1f}) |"
            )
        # a cell's gradient sums the gradients of the m bins whose maximum it holds; two float32 sums of
        # them, in any order, differ by at most 2 (m - 1) u sum|g| (u = 2^-24): m and sum|g| from ours,
        # routing ones and |grad| through the same maxima
        xg = x.clone().requires_grad_()
        m = torch.autograd.grad(roi_pool(xg, rois, 7, 1.0 / stride), xg, torch.ones_like(grad))[0]
        total = torch.autograd.grad(roi_pool(xg, rois, 7, 1.0 / stride), xg, grad.abs())[0]
        bound = 2 * (m - 1).clamp(min=0) * 2.0**-24 * total
        same = all(torch.equal(out, outs["maskrcnn"][0]) for out, _ in outs.values())
        line = f"| {name} | outputs equal: {same}"
        if "torchvision" in outs:
            gap = (outs["maskrcnn"][1] - outs["torchvision"][1]).abs()
            line += f"; gradients within the float32 summation bound: {bool((gap <= bound).all())}"
            line += f" (largest difference {gap.max().item():.1e})"
        print(line + " | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
