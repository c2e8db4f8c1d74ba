"""ONNX export: onnxruntime against eager PyTorch inference on the CPU, one image per call.

Exports a model (``maskrcnn.export.export_onnx``), then times ``model([image])`` (eager, ``torch.no_grad``)
and ``session.run`` (onnxruntime, CPUExecutionProvider) on the same image, alternating, after warm-up
runs; reports the median and the spread of each, the export time, and how far apart the two results are
(detections, max box / score difference). Both use ``--threads`` threads (torch.set_num_threads,
onnxruntime's intra_op_num_threads).

The model: ``--weights`` (a checkpoint, e.g. the demo's runs/demo/train/model_final.pt), or, without it,
the demo's model (R-18-FPN at 256 px, ``maskrcnn.demo.demo_config``) with seeded random weights. The
image: ``--image`` (a file), or a generated synthetic-shapes image (``maskrcnn.data.shapes``) of ``--size``.

    .venv/bin/python benchmarks/export_onnx.py [--weights W] [--size 256 256] [--runs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _image(args):
    import numpy as np
    import torch

    if args.image:
        from maskrcnn.engine.predict import load_image

        array = np.asarray(load_image(args.image).convert("RGB"), dtype=np.float32) / 255.0
    else:
        from maskrcnn.data.shapes import draw_image

        h, w = args.size
        array = draw_image(np.random.default_rng(args.seed), h, w)[0].astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _model(args):
    import torch

    from maskrcnn.weights import load_model

    if args.weights:
        return load_model(args.weights)
    from maskrcnn.demo import demo_config
    from maskrcnn.modeling.build import build_model

    torch.manual_seed(args.seed)
    return build_model(demo_config(tempfile.gettempdir()).model).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="a checkpoint (default: the demo model with seeded random weights)")
    p.add_argument("--image", help="an image file (default: a generated shapes image of --size)")
    p.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    p.add_argument("--runs", type=int, default=10, help="timed runs of each (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from maskrcnn.export import export_onnx

    torch.set_num_threads(args.threads)
    model = _model(args)
    image = _image(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        export_onnx(model, path, size=tuple(image.shape[1:]), opset=args.opset)
        export_s = time.perf_counter() - start
        size_mb = os.path.getsize(path) / 2**20
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    feed = {"image": image.numpy()}

    def eager():
        with torch.no_grad():
            return model([image])[0]

    eager_s, ort_s = [], []
    for i in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        ref = eager()
        t1 = time.perf_counter()
        out = session.run(None, feed)
        t2 = time.perf_counter()
        if i >= args.warmup:
            eager_s.append(t1 - t0)
            ort_s.append(t2 - t1)
    boxes, labels, scores = (torch.from_numpy(o) for o in out[:3])
    same = boxes.shape == ref["boxes"].shape and torch.equal(labels, ref["labels"])
    diff = (
        f"box {float((boxes - ref['boxes']).abs().max()):.1e} px, score "
        f"{float((scores - ref['scores']).abs().max()):.1e}"
        if same and len(boxes)
        else "n/a"
    )

    def fmt(xs):
        return f"{statistics.median(xs) * 1e3:.1f} ms (min {min(xs) * 1e3:.1f}, max {max(xs) * 1e3:.1f})"

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s)")
    print(f"image {tuple(image.shape)}; export {export_s:.1f} s, {size_mb:.1f} MiB (opset {args.opset})")
    print(
        f"detections: eager {ref['boxes'].shape[0]}, onnxruntime {boxes.shape[0]}; same labels: {same}; "
        f"max difference: {diff}"
    )
    print(f"eager       median {fmt(eager_s)} over {args.runs} runs")
    print(f"onnxruntime median {fmt(ort_s)} over {args.runs} runs")
    print(f"onnxruntime / eager: {statistics.median(ort_s) / statistics.median(eager_s):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
