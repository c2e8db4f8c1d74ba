"""What bfloat16 inference costs in accuracy and gains in speed: ``set_precision("bf16")`` against float32.

1. The demo model (``--demo-run``, default runs/demo: a finished ``maskrcnn demo``): COCO mask and box AP on
   its val split in float32 and in bf16, and the seconds per image of each.
2. torchvision-layout seeded R-50-FPN weights (tests/tv_parity.py) on --images coco-mini val images at 800
   px: detections of bf16 against float32 (greedy one-to-one matching of same-label detections at IoU >=
   0.5: matched fraction, median and max box corner difference in pixels, max score difference) and the
   median seconds per image of each.

bf16 runs only where the device has it natively (CPU: AVX512-BF16 or AMX; CUDA: compute capability >= 8);
elsewhere the script says so, measures what one emulated bf16 convolution costs against float32, and
stops, unless --force (emulated bf16 is very slow).

    .venv/bin/python benchmarks/precision.py [--demo-run runs/demo] [--images 4] [--device cpu] [--force]
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


def _timed(model, images):
    import torch

    outs, times = [], []
    with torch.no_grad():
        model([images[0]])  # warm-up
        for image in images:
            t0 = time.perf_counter()
            (out,) = model([image])
            times.append(time.perf_counter() - t0)
            outs.append(out)
    return outs, statistics.median(times)


def _match(a: dict, b: dict):
    """Greedy one-to-one matching of b's detections to a's (same label, IoU >= 0.5, by a's score order)."""
    from maskrcnn.ops.boxes import box_iou

    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return []
    iou = box_iou(a["boxes"], b["boxes"])
    iou[a["labels"][:, None] != b["labels"][None, :]] = 0
    pairs, used = [], set()
    for i in range(len(a["boxes"])):
        order = iou[i].argsort(descending=True).tolist()
        j = next((j for j in order if j not in used and iou[i, j] >= 0.5), None)
        if j is not None:
            used.add(j)
            pairs.append((i, j))
    return pairs


def demo_ap(run: str, device: str) -> None:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluate import evaluate
    from maskrcnn.weights import load_model

    ckpt = os.path.join(run, "train", "model_final.pt")
    if not os.path.isfile(ckpt):
        print(f"demo model: {ckpt} not found (run `maskrcnn demo` first); skipped")
        return
    val = CocoDataset(
        image_dir=os.path.join(run, "data", "val"),
        annotation_file=os.path.join(run, "data", "annotations", "instances_val.json"),
    )
    print("| demo model, val split | mask AP | mask AP50 | box AP | box AP50 | s / image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for precision in ("fp32", "bf16"):
        model = load_model(ckpt, device=device).set_precision(precision, force=True)
        t0 = time.perf_counter()
        m = evaluate(model, val, num_workers=0, progress=False)
        per_image = (time.perf_counter() - t0) / len(val)
        s, b = m["segm"], m["bbox"]
        cells = [s["AP"], s["AP50"], b["AP"], b["AP50"]]
        print(f"| {precision} | " + " | ".join(f"{c:.4f}" for c in cells) + f" | {per_image:.3f} |")


def coco_mini(shared: str, count: int, device: str) -> None:
    import torch

    from maskrcnn.weights import load_model
    from tests.tv_parity import parity_weights, read_image, to_torchvision

    folder = os.path.join(shared, "data", "coco-mini", "val2017")
    if not os.path.isdir(folder):
        print(f"coco-mini: {folder} not found; skipped")
        return
    images = [read_image(os.path.join(folder, f)).to(device) for f in sorted(os.listdir(folder))[:count]]
    weights = to_torchvision(parity_weights())
    fp32, t32 = _timed(load_model(weights, device=device), images)
    bf16, t16 = _timed(load_model(weights, device=device).set_precision("bf16", force=True), images)
    matched, total, corner, score = 0, 0, [], []  # corner: px, score: probability
    for a, b in zip(fp32, bf16, strict=True):
        pairs = _match(a, b)
        matched += len(pairs)
        total += max(len(a["boxes"]), len(b["boxes"]))
        for i, j in pairs:
            corner.append(float((a["boxes"][i] - b["boxes"][j]).abs().max()))
            score.append(float((a["scores"][i] - b["scores"][j]).abs()))
    print(
        f"\ncoco-mini, {len(images)} val images at 800 px, torchvision-layout seeded R-50-FPN weights: "
        f"{matched} of {total} detections matched (same label, IoU >= 0.5); box corners differ by median "
        f"{statistics.median(corner) if corner else float('nan'):.2f} px, "
        f"max {max(corner, default=0):.2f} px; "
        f"scores by max {max(score, default=0):.4f}. Seconds per image: float32 {t32:.3f}, bf16 {t16:.3f} "
        f"({t32 / t16:.2f}x). torch {torch.__version__}"
    )


def emulation_cost(device: str) -> float:
    """How many times float32's time one bf16 3x3 convolution (128 -> 128 channels, 32 x 32) takes under
    autocast here (median of 3 after a warm-up): the cost of running bf16 where it is emulated."""
    import torch

    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device).eval()
    x = torch.randn(1, 128, 32, 32, device=device)

    def seconds(bf16: bool) -> float:
        times = []
        kind = torch.device(device).type
        with torch.no_grad(), torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=bf16):
            for _ in range(4):
                t0 = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    return seconds(True) / seconds(False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-run", default=os.path.join(ROOT, "runs", "demo"))
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--images", type=int, default=4, help="coco-mini val images (sorted by name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="run bf16 even where it is emulated (very slow)")
    args = ap.parse_args()
    import torch

    from maskrcnn.modeling.precision import native_support

    torch.set_num_threads(args.threads)
    native, why = native_support("bf16", args.device)
    print(f"bf16 on {args.device}: {why}; command: {' '.join(sys.argv)}")
    if not native and not args.force:
        cost = emulation_cost(args.device)
        print(
            f"an emulated bf16 3x3 convolution (128 channels, 32 x 32) takes {cost:.0f}x float32's time here;"
            " not measured (--force measures bf16's accuracy anyway, slowly)"
        )
        return 0
    demo_ap(args.demo_run, args.device)
    coco_mini(args.shared, args.images, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
