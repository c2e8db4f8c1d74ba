"""End-to-end CPU inference of R-50-FPN, side by side with torchvision's Mask R-CNN (same weights).

Both models get the seeded weights of tests/tv_parity.py (torchvision's layout for torchvision), the same
images from shared/data/coco-mini/val2017 at the default size (shorter side 800, longer <= 1333), one image
per call, alternating between the two models image by image. Stages are timed with forward hooks:
transform (normalise, resize, pad), backbone+FPN, RPN, box head (RoI heads up to the mask pooler: box
RoIAlign, box head, postprocessing with NMS), mask head (mask RoIAlign to the end of the RoI heads),
postprocess (boxes scaled back, masks pasted into the image). Peak memory: the process's peak RSS
(VmHWM, reset before each model's pass).

    /tmp/tvref-venv/bin/python benchmarks/inference.py [--images 8] [--runs 1] [--threads 2] [--bf16]

``--bf16`` adds a column: ours with ``set_precision("bf16")`` (backbone and heavy head layers in bfloat16),
measured only where the CPU runs bfloat16 natively (AVX512-BF16 or AMX); elsewhere it says why not
(``benchmarks/precision.py`` measures what emulated bf16 costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

STAGES = ("transform", "backbone+FPN", "RPN", "box head", "mask head", "postprocess")


class StageClock:
    """Marks set by hooks; ``stages()`` turns them into per-stage seconds."""

    def __init__(self):
        self.marks = {}

    def mark(self, name):
        self.marks[name] = time.perf_counter()

    def hook(self, module, start, end):
        module.register_forward_pre_hook(lambda *_: self.mark(start))
        module.register_forward_hook(lambda *_: self.mark(end))

    def wrap(self, obj, attr, start, end):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            self.mark(start)
            out = fn(*args, **kwargs)
            self.mark(end)
            return out

        setattr(obj, attr, timed)

    def stages(self, total_start, total_end):
        m = self.marks
        spans = {
            "transform": ("start", "backbone0"),
            "backbone+FPN": ("backbone0", "backbone1"),
            "RPN": ("rpn0", "rpn1"),
            "box head": ("heads0", "mask0"),
            "mask head": ("mask0", "heads1"),
            "postprocess": ("post0", "post1"),
        }
        m = dict(m, start=total_start, end=total_end)
        out = {k: m[b] - m[a] for k, (a, b) in spans.items() if a in m and b in m}
        return out


def paired_models(tv, *, size: int = 800, device="cpu") -> dict:
    """``{"maskrcnn": ours, "torchvision": theirs}`` (theirs only where ``tv`` is not None): R-50-FPN with
    tests/tv_parity.py's seeded weights (torchvision's layout for torchvision), short side ``size`` (longer
    <= size * 1333 / 800), in eval mode on ``device``."""
    from maskrcnn.weights import load_model
    from tests.tv_parity import parity_weights, to_torchvision

    weights = to_torchvision(parity_weights())
    longest = round(size * 1333 / 800)
    ours = load_model(weights)
    ours.transform.min_size, ours.transform.max_size = (size,), longest
    models = {"maskrcnn": ours.to(device).eval()}
    if tv is not None:
        theirs = tv.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=size, max_size=longest
        )
        weights.update({k: v for k, v in theirs.state_dict().items() if k.endswith("num_batches_tracked")})
        theirs.load_state_dict(weights)
        models["torchvision"] = theirs.to(device).eval()
    return models


def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--images", type=int, default=8, help="how many coco-mini val images (sorted by name)")
    ap.add_argument("--runs", type=int, default=1, help="passes over the images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also ours in bfloat16 (where the CPU has it)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(args.shared, "tools", "tvref"))
    import tvref

    tv = tvref.install()
    import torch

    from tests.tv_parity import read_image

    torch.set_num_threads(args.threads)
    models = paired_models(tv)
    ours = models["maskrcnn"]
    if args.bf16:
        import copy

        from maskrcnn.modeling.precision import native_support

        native, why = native_support("bf16", "cpu")
        if native:
            models["maskrcnn bf16"] = copy.deepcopy(ours).set_precision("bf16")
        else:
            print(f"bf16 column left out: {why}")
    clocks = {name: StageClock() for name in models}
    for name, model in models.items():
        c = clocks[name]
        tv_side = name == "torchvision"
        c.hook(model.backbone, "backbone0", "backbone1")
        c.hook(model.rpn, "rpn0", "rpn1")
        c.hook(model.roi_heads, "heads0", "heads1")
        c.hook(
            model.roi_heads.mask_roi_pool if tv_side else model.roi_heads.mask_pooler, "mask0", "mask0_end"
        )
        c.wrap(model.transform, "postprocess", "post0", "post1")

    folder = os.path.join(args.shared, "data", "coco-mini", "val2017")
    files = sorted(os.listdir(folder))[: args.images]
    images = [read_image(os.path.join(folder, f)) for f in files]
    samples = {name: [] for name in models}
    peak = {}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model([images[0]])
        for name, model in models.items():
            _reset_peak()
            model([images[0]])
            peak[name] = _status_kib("VmHWM") / 2**20
        for _ in range(args.runs):
            for image in images:
                for name, model in models.items():
                    clock = clocks[name]
                    clock.marks.clear()
                    t0 = time.perf_counter()
                    (out,) = model([image])
                    t1 = time.perf_counter()
                    samples[name].append(
                        {"total": t1 - t0, **clock.stages(t0, t1), "detections": len(out["boxes"])}
                    )

    def med(name, key):
        vals = [s[key] for s in samples[name] if key in s]
        return statistics.median(vals) if vals else float("nan")

    print(
        f"torch {torch.__version__}, torchvision {tv.__version__}, {args.threads} threads, "
        f"{os.cpu_count()} CPUs; {len(images)} coco-mini val images x {args.runs} runs, "
        f"detections per image: {sorted({s['detections'] for s in samples['maskrcnn']})} (ours) / "
        f"{sorted({s['detections'] for s in samples['torchvision']})} (torchvision)"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    names = list(models)
    print("| stage | " + " | ".join(f"{n} s (median)" for n in names) + " | speed-up (torchvision / ours) |")
    print("| --- " * (len(names) + 2) + "|")
    for key in ("total", *STAGES):
        times = {n: med(n, key) for n in names}
        ups = ", ".join(f"{times['torchvision'] / times[n]:.2f}x" for n in names if n != "torchvision")
        print(f"| {key} | " + " | ".join(f"{times[n]:.3f}" for n in names) + f" | {ups} |")
    print("| peak RSS (GiB) | " + " | ".join(f"{peak[n]:.2f}" for n in names) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
