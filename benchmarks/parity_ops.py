"""Parity of maskrcnn.ops with torchvision's compiled C++ CPU kernels (through ../shared/tools/tvref).

Runs roi_align (both ``aligned`` values, fixed and adaptive sampling), roi_pool, nms and batched_nms on
seeded random inputs (boxes partly or wholly outside the map, empty boxes, ties), forward and backward,
in float32 and float64, and prints the largest differences as a Markdown table.

    /tmp/tvref-venv/bin/python benchmarks/parity_ops.py [--tvref ../shared/tools/tvref] [--trials 30]

Differences are reported as max |mine - ref| / (1 + |ref|) over all elements (absolute for values of
order one, relative for large accumulated gradients); for the RoIAlign input gradient also relative to the
sum of the absolute terms each entry accumulates (gradients of overlapping RoIs with random signs cancel,
so |ref| can be far smaller than the float rounding of its terms, in any summation order); NMS as the
number of inputs whose kept indices differ in any position.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tvref", default=os.path.join(HERE, "..", "..", "shared", "tools", "tvref"))
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.tvref))
    import tvref

    tv = tvref.install()
    import torch

    from maskrcnn.ops.nms import batched_nms, nms
    from maskrcnn.ops.roi_align import roi_align, roi_pool

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    def err(a, b):
        return ((a - b).abs() / (1 + b.abs())).max().item() if a.numel() else 0.0

    rows = {}

    def record(name, value):
        rows[name] = max(rows.get(name, 0.0), value)

    def count(name, differs):
        rows[name] = rows.get(name, 0) + int(differs)

    for trial in range(args.trials):
        for dtype in (torch.float32, torch.float64):
            tag = "float32" if dtype == torch.float32 else "float64"
            n, c, h, w = 2, 8, 12 + trial % 9, 15 + trial % 7
            x = torch.randn(n, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
            k = 40
            scale = (1.0, 0.5, 0.25)[trial % 3]
            xy = (torch.rand(k, 2, generator=gen, dtype=dtype) * 1.6 - 0.3) * torch.tensor(
                [w, h], dtype=dtype
            )
            wh = torch.rand(k, 2, generator=gen, dtype=dtype) * max(h, w)
            wh[:5] = 0
            idx = torch.randint(0, n, (k, 1), generator=gen).to(dtype)
            rois = torch.cat([idx, xy / scale, (xy + wh) / scale], 1)
            for aligned in (False, True):
                for sr in (-1, 0, 2, 3):
                    for size in ((7, 7), (14, 14), (3, 5)):
                        ref = tv.ops.roi_align(x, rois, size, scale, sr, aligned)
                        mine = roi_align(x, rois, size, scale, sr, aligned)
                        g = torch.randn(ref.shape, generator=gen, dtype=dtype)
                        (gr,) = torch.autograd.grad(ref, x, g, retain_graph=True)
                        (gm,) = torch.autograd.grad(mine, x, g)
                        # the same adjoint applied to |g|: the sum of |terms| each gradient entry adds up
                        (terms,) = torch.autograd.grad(ref, x, g.abs())
                        record(f"roi_align forward {tag}", err(mine, ref))
                        record(f"roi_align backward {tag}", err(gm, gr))
                        record(
                            f"roi_align backward {tag}, |diff| / (1 + sum of |terms|)",
                            ((gm - gr).abs() / (1 + terms)).max().item(),
                        )
            for size in ((7, 7), (2, 3)):
                ref = tv.ops.roi_pool(x, rois, size, scale)
                mine = roi_pool(x, rois, size, scale)
                g = torch.randn(ref.shape, generator=gen, dtype=dtype)
                (gr,) = torch.autograd.grad(ref, x, g)
                (gm,) = torch.autograd.grad(mine, x, g)
                record(f"roi_pool forward {tag}", err(mine, ref))
                record(f"roi_pool backward {tag}", err(gm, gr))
            # NMS: random boxes with quantised scores (ties) and some duplicates / zero-area boxes
            m = 300
            ctr = torch.rand(m, 2, generator=gen, dtype=dtype) * 200
            size2 = torch.rand(m, 2, generator=gen, dtype=dtype) * 60
            boxes = torch.cat([ctr - size2 / 2, ctr + size2 / 2], 1)
            boxes[m // 2 : m // 2 + 20] = boxes[:20]
            boxes[-5:, 2:] = boxes[-5:, :2]
            scores = (torch.rand(m, generator=gen, dtype=dtype) * 20).floor() / 20
            cats = torch.randint(0, 5, (m,), generator=gen)
            for thr in (0.3, 0.5, 0.7):
                a, b = nms(boxes, scores, thr), tv.ops.nms(boxes, scores, thr)
                count(
                    f"nms: inputs with different kept indices, {tag} (of {3 * args.trials})",
                    not torch.equal(a, b),
                )
                a, b = batched_nms(boxes, scores, cats, thr), tv.ops.batched_nms(boxes, scores, cats, thr)
                count(
                    f"batched_nms: inputs with different kept indices, {tag} (of {3 * args.trials})",
                    not torch.equal(a, b),
                )
    print(f"| comparison ({args.trials} seeded trials each) | max difference |")
    print("| --- | --- |")
    for name, value in rows.items():
        print(f"| {name} | {value:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
