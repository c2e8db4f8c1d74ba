"""``maskrcnn predict`` on a folder: how much of the drawing and writing hides behind the model.

Per image, ``predict`` reads the file, runs the model, then draws the detections, encodes the PNG and the
COCO entries (RLE masks) and writes them; the reading and the writing run in threads beside the model
(``writers`` of them for the writing). This script times, on the same images and the same model:

- ``model alone``: reading and the model, one image after the other (what predict cannot go below);
- ``writing alone``: drawing, PNG, COCO entries and the file writes of those detections, one thread,
  and ``writing in N threads`` for each N > 1 of ``--writers`` (how much of it runs outside the GIL);
- ``predict, N writers``: the whole command's work (``maskrcnn.engine.predict.predict``) for each N of
  ``--writers``, into a temporary folder;

and prints seconds per image (median, min-max over ``--runs``) beside "one after the other" (model alone +
writing alone: what predict took before it overlapped them). The model is R-50-FPN at 800 px with
tests/tv_parity.py's seeded weights, whose sharpened classifier gives ~100 detections per image above 0.5:
the drawing's worst case.

    .venv/bin/python benchmarks/predict.py [--images 6] [--runs 3] [--writers 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _median(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} ({min(ts):.3f}-{max(ts):.3f})"


def measure(
    paths: list[str], *, device: str, runs: int, writers: list[int], size: int = 800
) -> tuple[list[str], dict]:
    """Markdown lines and ``{row: [seconds per image, one per run]}`` (see the module docstring)."""
    import torch

    from benchmarks.inference import paired_models
    from maskrcnn.data.images import read_image
    from maskrcnn.engine import predict as predict_module

    dev = torch.device(device)
    model = paired_models(None, size=size, device=dev)["maskrcnn"]  # benchmarks/inference.py's model
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = len(paths)

    def model_alone() -> list[dict]:
        outs = []
        with torch.no_grad():
            for p in paths:
                (out,) = model([read_image(p).to(dev)])
                outs.append({k: v[out["scores"] >= 0.5].cpu() for k, v in out.items()})
        sync()
        return outs

    outputs = model_alone()  # warm-up; the outputs the writing is timed on
    images = [read_image(p) for p in paths]
    rows: dict[str, list[float]] = {"model alone": [], "writing alone": []}
    rows.update({f"writing in {w} threads": [] for w in writers if w > 1})
    rows.update({f"predict, {w} writer(s)": [] for w in writers})
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            t = time.perf_counter()
            model_alone()
            rows["model alone"].append((time.perf_counter() - t) / n)
            for threads in sorted({1, *writers}):

                def write(i, threads=threads, run=run):
                    predict_module._draw_and_write(
                        outputs[i],
                        image=images[i],
                        index=i,
                        path=paths[i],
                        drawing=os.path.join(tmp, f"alone{threads}-{run}", f"{i}.png"),
                        class_names=None,
                        to_category=int,
                        skeleton=None,
                        keypoint_threshold=0.05,
                    )

                t = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(write, range(n)))
                name = "writing alone" if threads == 1 else f"writing in {threads} threads"
                rows.setdefault(name, []).append((time.perf_counter() - t) / n)
            for w in writers:
                t = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    predict_module.predict(
                        model, paths, output_dir=os.path.join(tmp, f"w{w}-{run}"), progress=False, writers=w
                    )
                rows[f"predict, {w} writer(s)"].append((time.perf_counter() - t) / n)
    sequential = [a + b for a, b in zip(rows["model alone"], rows["writing alone"], strict=True)]
    detections = sum(len(o["scores"]) for o in outputs)
    lines = [
        f"{n} images, R-50-FPN at {size} px (seeded weights, {detections / n:.0f} detections per image above"
        f" 0.5), {device}, {torch.get_num_threads()} torch threads, {runs} runs",
        "",
        "| what | seconds per image, median (min-max) |",
        "| --- | --- |",
        *(f"| {name} | {_median(ts)} |" for name, ts in rows.items()),
        f"| model alone + writing alone (one after the other) | {_median(sequential)} |",
    ]
    return lines, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared"))
    ap.add_argument("--image-dir", help="a folder of images (default: coco-mini's val2017 under --shared)")
    ap.add_argument("--images", type=int, default=6, help="the first N images of the folder, by name")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--writers", default="1,2", help="comma-separated writer thread counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=800, help="the images' shorter side")
    args = ap.parse_args(argv)
    folder = args.image_dir or os.path.join(args.shared, "data", "coco-mini", "val2017")
    if not os.path.isdir(folder):
        print(f"benchmarks/predict.py: error: no image folder {folder}", file=sys.stderr)
        return 2
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    paths = [os.path.join(folder, f) for f in names[: args.images]]
    writers = [int(w) for w in args.writers.split(",")]
    lines, _ = measure(paths, device=args.device, runs=args.runs, writers=writers, size=args.size)
    print(f"command: benchmarks/predict.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
