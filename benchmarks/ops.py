"""Speed and peak memory of RoIAlign and NMS, side by side with torchvision (through ../shared/tools/tvref).

Cases (one run of this script measures every implementation on the same inputs, interleaved):
- box head: 512 RoIs per image x 2 images, spread over P2-P5 (256 channels, 800x1216 input) by the FPN
  level rule, output 7x7, sampling ratio 2, aligned=False; forward + backward.
- mask head: 128 RoIs (64 per image), output 14x14, otherwise the same.
- NMS on 1,000 and 5,000 RPN-like boxes (IoU threshold 0.7).
Implementations: maskrcnn (NCHW input and channels-last input), one call per level as the pooler runs
it on a CPU, and all levels in one pass (``roi_align_levels``, the pooler's path on a GPU), torchvision's
C++ CPU kernel, torchvision's pure-PyTorch RoIAlign (``torchvision.ops.roi_align._roi_align``).

    /tmp/tvref-venv/bin/python benchmarks/ops.py [--runs 5] [--threads 2]

Time: median (min-max) seconds of --runs after one warm-up. Peak memory: the rise of the process's peak
RSS (VmHWM, reset before each measurement, after returning freed heap memory to the OS with malloc_trim)
over its RSS with the inputs allocated, for one call, beside the output size (and, for forward +
backward, the input gradient size, which every implementation allocates; zero-filled pages that are never
written may not count, so RSS can understate what an implementation allocates). The peak RSS includes
what glibc's heap retains of freed temporaries; ``--fixed-mmap-threshold`` fixes glibc's mmap threshold
at 128 KiB (``mallopt``) so that every large buffer is unmapped when freed and the peak RSS follows the
live memory (its timings are not representative: every large allocation then faults in fresh pages).
The last column, "x output", is the memory the operator itself holds at its peak (output and working
memory: the peak minus the input gradient and the output gradient the script feeds in) over the output
size.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_extra_mib(fn) -> float:
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap memory back to the OS, so that reuse of it shows in the RSS again
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    _reset_peak()
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def make_rois(per_image: int, *, height: int, width: int, generator, images: int = 2, largest: float = 640):
    """``[K, 5]`` RoIs (batch index, x1, y1, x2, y2), ``per_image`` per image, log-uniform sides 16 ..
    ``largest`` px and aspect ratios e^-1 .. e, clipped to ``height x width``; and each one's FPN level
    (2 .. 5, the paper's rule)."""
    import torch

    gen = generator
    k = per_image * images
    side = torch.exp(torch.empty(k).uniform_(math.log(16), math.log(largest), generator=gen))
    ratio = torch.exp(torch.empty(k).uniform_(-1, 1, generator=gen))
    w, h = side * ratio.sqrt(), side / ratio.sqrt()
    cx, cy = torch.rand(k, generator=gen) * width, torch.rand(k, generator=gen) * height
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    idx = (torch.arange(k) // per_image).float()[:, None]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(4 + torch.log2(area.sqrt() / 224 + 1e-6)).clamp(2, 5).long()
    return torch.cat([idx, boxes], 1), level


LEVELS = range(2, 6)  # P2-P5, stride 2**level


def per_level(fn):
    """``run(maps, rois, level, size)`` of a torchvision-signature RoIAlign ``fn``, called once per level
    (torchvision's MultiScaleRoIAlign; our pooler on a CPU); ``level``: absolute levels 2-5."""

    def run(maps, rois, level, size):
        return [fn(maps[lv - 2], rois[level == lv], size, 1 / 2**lv, 2, False) for lv in LEVELS]

    return run


def one_pass(maps, rois, level, size):
    """Our ``roi_align_levels`` over the four levels at once (our pooler on a GPU)."""
    from maskrcnn.ops.roi_align import roi_align_levels

    return [roi_align_levels(maps, rois, level - 2, size, [1 / 2**lv for lv in LEVELS], 2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tvref", default=os.path.join(HERE, "..", "..", "shared", "tools", "tvref"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-python-ref", action="store_true", help="skip torchvision's pure-PyTorch RoIAlign")
    ap.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="peak memory of live buffers only (glibc mmap threshold fixed at 128 KiB); slows every side",
    )
    args = ap.parse_args()
    if args.fixed_mmap_threshold:
        import ctypes

        # M_MMAP_THRESHOLD = -3: a fixed threshold, so that freed large buffers leave the RSS at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    sys.path.insert(0, os.path.abspath(args.tvref))
    import tvref

    tv = tvref.install()
    import torch
    from torchvision.ops.roi_align import _roi_align as tv_python_roi_align

    from maskrcnn.ops.nms import nms
    from maskrcnn.ops.roi_align import roi_align

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    height, width, channels = 800, 1216, 256

    feats = [torch.randn(2, channels, height // s, width // s, generator=gen) for s in (4, 8, 16, 32)]
    feats_cl = [f.to(memory_format=torch.channels_last) for f in feats]
    grad_mib = sum(f.numel() for f in feats) * 4 / 2**20

    def python_ref(x, r, size, scale, sr, aligned):
        return tv_python_roi_align(x, r, scale, size[0], size[1], sr, aligned)

    impls = {
        "maskrcnn (NCHW input)": (per_level(roi_align), feats),
        "maskrcnn (channels-last input)": (per_level(roi_align), feats_cl),
        "maskrcnn, levels in one pass (NCHW input)": (one_pass, feats),
        "maskrcnn, levels in one pass (channels-last input)": (one_pass, feats_cl),
        "torchvision C++": (per_level(tv.ops.roi_align), feats),
    }
    if not args.skip_python_ref:
        impls["torchvision pure PyTorch"] = (per_level(python_ref), feats)

    results = []
    for case, per_image, size in (("box head 7x7", 512, (7, 7)), ("mask head 14x14", 64, (14, 14))):
        rois, level = make_rois(per_image, height=height, width=width, generator=gen)
        out_mib = rois.shape[0] * channels * size[0] * size[1] * 4 / 2**20

        def run(fn, maps, backward, rois=rois, level=level, size=size):
            leaves = [m.detach().requires_grad_(backward) for m in maps]
            outs = fn(leaves, rois, level, size)
            if backward:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            return outs

        times = {(name, bw): [] for name in impls for bw in (False, True)}
        mem = {}
        for name, (fn, maps) in impls.items():
            for bw in (False, True):
                run(fn, maps, bw)  # warm-up
                mem[(name, bw)] = _peak_extra_mib(lambda fn=fn, maps=maps, bw=bw: run(fn, maps, bw))
        for _ in range(args.runs):
            for name, (fn, maps) in impls.items():
                for bw in (False, True):
                    with torch.no_grad() if not bw else torch.enable_grad():
                        t0 = time.perf_counter()
                        run(fn, maps, bw)
                        times[(name, bw)].append(time.perf_counter() - t0)
        for (name, bw), ts in times.items():
            results.append(
                (case, "forward+backward" if bw else "forward", name, ts, mem[(name, bw)], out_mib)
            )

    nms_rows = []
    for n in (1000, 5000):
        ctr = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(400), generator=gen))
        boxes = torch.cat([ctr - side / 2, ctr + side / 2], 1)
        scores = torch.rand(n, generator=gen)
        assert torch.equal(nms(boxes, scores, 0.7), tv.ops.nms(boxes, scores, 0.7))
        ts = {"maskrcnn": [], "torchvision C++": []}
        for fn in (nms, tv.ops.nms):
            fn(boxes, scores, 0.7)
        for _ in range(max(args.runs, 7)):
            for name, fn in (("maskrcnn", nms), ("torchvision C++", tv.ops.nms)):
                t0 = time.perf_counter()
                fn(boxes, scores, 0.7)
                ts[name].append(time.perf_counter() - t0)
        for name, v in ts.items():
            nms_rows.append((n, name, v))

    def fmt(ts):
        return f"{statistics.median(ts):.4f} ({min(ts):.4f}-{max(ts):.4f})"

    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}, "
        f"torchvision {tv.__version__}"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    print(
        "| case | pass | implementation | seconds, median (min-max) | peak extra memory MiB | output MiB"
        " | x output |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, kind, name, ts, m, out in results:
        backward = kind == "forward+backward"
        extra = f"{m:.0f}" + (f" (input grad {grad_mib:.0f})" if backward else "")
        held = m - (grad_mib + out if backward else 0.0)  # less the input gradient and the fed-in output grad
        print(f"| {case} | {kind} | {name} | {fmt(ts)} | {extra} | {out:.0f} | {held / out:.2f} |")
    print("\n| NMS boxes | implementation | seconds, median (min-max) |")
    print("| --- | --- | --- |")
    for n, name, ts in nms_rows:
        print(f"| {n} | {name} | {fmt(ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
