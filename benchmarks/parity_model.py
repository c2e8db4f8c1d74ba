"""Largest differences between our Mask R-CNN and torchvision's committed reference outputs.

The reference (tests/data/tv_reference.pt, made by tests/data/make_tv_reference.py with tvref) holds
torchvision's detections with seeded weights on two coco-mini val images; this prints, per image, whether
the detections come in the same order and the max differences of boxes, scores and probed mask values,
for the exact mode (torchvision's float operations) and the default fast mode, in float64 (the reference's
dtype: differences are the two models' arithmetic) and in float32 (differences include float32 rounding,
amplified by the random weights; detections are matched within a score difference of 1e-3 there). No
torchvision needed.

    .venv/bin/python benchmarks/parity_model.py
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch

    from maskrcnn.weights import load_model
    from tests.test_tv_parity import COCO_VAL, REFERENCE, _match
    from tests.tv_parity import parity_weights, read_image, to_torchvision

    torch.set_num_threads(2)
    reference = torch.load(REFERENCE, weights_only=True)
    weights = to_torchvision(parity_weights(reference["seed"]))
    print(
        "| mode | image | detections (ours / tv) | same order | max box diff px | max score diff "
        "| max mask diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float64, torch.float32):
        for fast in (False, True):
            model = load_model(weights).to(dtype).set_fast_inference(fast)
            for ref in reference["outputs"]:
                _row(model, ref, dtype, fast, read_image, _match, COCO_VAL)
    return 0


def _row(model, ref, dtype, fast, read_image, match, coco_val) -> None:
    import torch

    image = read_image(os.path.join(coco_val, ref["file"])).to(dtype)
    ref = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in ref.items()}
    with torch.no_grad():
        (out,) = model([image])
    mode = f"{'fast' if fast else 'exact'}, {str(dtype).removeprefix('torch.')}"
    row = f"| {mode} | {ref['file']} | {len(out['boxes'])} (ours) / {len(ref['boxes'])} (tv) |"
    try:
        order = match(ref, out, score_tol=1e-9 if dtype == torch.float64 else 1e-3)
    except AssertionError as e:  # a reference detection without a counterpart
        print(f"{row} no: {e} | | | |")
        return
    masks = torch.gather(out["masks"][order][:, 0].flatten(1), 1, ref["mask_probe"])
    print(
        f"{row} {bool((order == torch.arange(len(order))).all())} "
        f"| {(out['boxes'][order] - ref['boxes']).abs().max():.2e} "
        f"| {(out['scores'][order] - ref['scores']).abs().max():.2e} "
        f"| {(masks - ref['mask_values']).abs().max():.2e} |"
    )


if __name__ == "__main__":
    sys.exit(main())
