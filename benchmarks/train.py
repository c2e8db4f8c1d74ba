"""Training speed and peak memory, side by side with torchvision's Mask R-CNN (through ../shared/tools/tvref).

Both sides train the same architecture from the same seeded start on the same batches: ResNet-18-FPN (256
FPN channels, frozen BatchNorm, stem and res2 frozen), two 1024-d box FCs, the four-conv mask head, on
batches of synthetic images (shapes with random colours on noise, elliptical masks), at a short side of
--size. One iteration = forward, backward of the summed losses and an SGD step. The two models alternate
iteration by iteration; reported: median (min-max) seconds per iteration after --warmup iterations, and the
process's peak RSS (VmHWM, reset before each model's measured pass). Ours trains in the layout its fast
mode picks for the device (``maskrcnn.modeling.rcnn.fast_layout``: for these 256 FPN channels NCHW on CPUs
without AVX-512, channels-last elsewhere), or the one --layout names; the header says which. torchvision
trains in NCHW.

    /tmp/tvref-venv/bin/python benchmarks/train.py [--iters 10] [--batch 2] [--size 512] [--threads 2]
        [--layout auto|nchw|channels-last] [--profile N]

--profile N: after the timed iterations, one more iteration of each side under torch.profiler, and its N
top operators by self CPU time (CPU only).

With a CUDA torchvision install (the lent GPU machine) ``--device cuda`` times the R-50-FPN instead, with
and without mixed precision (--amp bfloat16|float16); ``--depth resnet50`` times it on the CPU too.
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


LAYOUTS = ("auto", "nchw", "channels-last")  # --layout: ours' training layout


def training_layout(name: str):
    """``MaskRCNN.training_layout`` for a --layout name (None: ``fast_layout``'s choice for the device)."""
    import torch

    return {"auto": None, "nchw": torch.contiguous_format, "channels-last": torch.channels_last}[name]


def synthetic_batch(batch: int, size: int, seed: int, num_classes: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        h, w = size, int(size * 4 / 3)
        image = torch.rand(3, h, w, generator=g) * 0.3
        n = 5
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(n, 2, generator=g) * 0.3 + 0.1) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            masks[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            image[:, masks[i].bool()] = torch.rand(3, 1, generator=g)
        labels = torch.randint(1, num_classes, (n,), generator=g)
        images.append(image)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_gib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bfloat16", "float16"])
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="top N operators of one iteration")
    ap.add_argument("--depth", choices=["resnet18", "resnet50"], help="default: 18 on the CPU, 50 on CUDA")
    ap.add_argument("--layout", default="auto", choices=LAYOUTS, help="ours' training layout")
    args = ap.parse_args()
    import torch

    if args.device == "cpu":
        sys.path.insert(0, os.path.join(args.shared, "tools", "tvref"))
        import tvref

        tv = tvref.install()
    else:
        import torchvision as tv
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from maskrcnn.config import get_config
    from maskrcnn.modeling.build import build_model
    from maskrcnn.weights import torchvision_to_maskrcnn

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    depth = args.depth or ("resnet18" if device.type == "cpu" else "resnet50")
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=depth, weights=None, trainable_layers=3)
    theirs = MaskRCNN(backbone, num_classes=args.num_classes, min_size=args.size, max_size=2 * args.size)
    cfg = get_config("R-50-FPN")
    cfg.backbone.name = depth
    cfg.num_classes = args.num_classes
    cfg.input.min_size, cfg.input.max_size = (args.size,), 2 * args.size
    ours = build_model(cfg)
    ours.training_layout = training_layout(args.layout)
    sd = torchvision_to_maskrcnn(theirs.state_dict())
    ours.load_state_dict({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
    models = {"maskrcnn": ours.to(device).train(), "torchvision": theirs.to(device).train()}
    ours_layout = "channels-last" if ours.layout == torch.channels_last else "NCHW"
    optims = {
        k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
        for k, m in models.items()
    }
    batches = [
        synthetic_batch(args.batch, args.size, s, args.num_classes) for s in range(args.warmup + args.iters)
    ]
    amp = {"off": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp]
    scalers = {k: torch.amp.GradScaler(device.type) if amp == torch.float16 else None for k in models}

    def step(name, images, targets):
        model, opt = models[name], optims[name]
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        if scalers[name] is not None:
            scalers[name].scale(loss).backward()
            scalers[name].step(opt)
            scalers[name].update()
        else:
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    times = {k: [] for k in models}
    peak = {}
    for i, (images, targets) in enumerate(batches):
        for name in models:
            if i == args.warmup:
                _reset_peak()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(name, images, targets)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            if i == args.warmup:
                peak[name] = (
                    torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _peak_gib()
                )
    profiles = {}
    if args.profile and device.type == "cpu":
        from torch.profiler import ProfilerActivity, profile

        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(name, *batches[-1])
            profiles[name] = prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=40
            )
    size = f"{args.size}x{int(args.size * 4 / 3)}"
    what = f"{depth}-FPN, batch {args.batch} at {size}, {args.device}, amp {args.amp}, ours in {ours_layout}"
    print(
        f"training: {what}; torch {torch.__version__}, torchvision {tv.__version__}, {args.threads} threads"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    mem = "peak GPU memory GiB" if device.type == "cuda" else "peak RSS GiB (process)"
    print(f"| implementation | s/iteration, median (min-max) | iterations/s | {mem} |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} ({min(ts):.3f}-{max(ts):.3f}) | {1 / med:.2f} | {peak[name]:.2f} |")
    for name, table in profiles.items():
        print(f"\n{name}, one more iteration under torch.profiler:\n```\n{table}```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
