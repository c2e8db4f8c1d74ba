"""Regenerate the torchvision parity references: torchvision's outputs with seeded weights.

Run with the tvref environment (torchvision's genuine kernels on a CPU torch; see ../shared/tools/tvref):

    /tmp/tvref-venv/bin/python tests/data/make_tv_reference.py [--model mask|keypoint] [--shared ../shared]

``--model mask`` (default) writes tests/data/tv_reference.pt for ``maskrcnn_resnet50_fpn``; ``--model
keypoint`` writes tests/data/tv_keypoint_reference.pt for ``keypointrcnn_resnet50_fpn``. The weights come
from tests/tv_parity.parity_weights (no torchvision needed to rebuild them), renamed to torchvision's layout
and loaded into the torchvision model built with ``weights=None, weights_backbone=None``; the images are COCO
val images from shared/data/coco-mini, read as uint8 / 255. The model and images run in float64
(torchvision's CPU kernels support it), so the reference holds the model's arithmetic and not one CPU's
float32 rounding (see tests/test_tv_parity.py). Stored per image: boxes, labels, scores, and for the mask
model the pasted mask probabilities at the pixels chosen by tv_parity.mask_probe, for the keypoint model
``keypoints [N, K, 3]`` and ``keypoints_scores [N, K]``.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mask", "keypoint"), default="mask")
    ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
    ap.add_argument("--out", help="default: tests/data/tv_reference.pt or tv_keypoint_reference.pt")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(args.shared, "tools", "tvref"))
    import tvref

    torchvision = tvref.install()
    import torch

    from tests.tv_parity import IMAGES as MASK_IMAGES
    from tests.tv_parity import (
        KEYPOINT_IMAGES,
        PARITY_PRESETS,
        SEED,
        mask_probe,
        parity_weights,
        read_image,
        to_torchvision,
    )

    keypoint = args.model == "keypoint"
    out_path = args.out or os.path.join(
        ROOT, "tests", "data", "tv_keypoint_reference.pt" if keypoint else "tv_reference.pt"
    )
    torch.set_num_threads(2)
    detection = torchvision.models.detection
    if keypoint:
        model = detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    else:
        model = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    tv_sd = to_torchvision(parity_weights(SEED, preset=PARITY_PRESETS[args.model]))
    own = model.state_dict()
    tv_sd.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(tv_sd, strict=True)
    model.eval().double()
    outputs = []
    for name in KEYPOINT_IMAGES if keypoint else MASK_IMAGES:
        image = read_image(os.path.join(args.shared, "data", "coco-mini", "val2017", name)).double()
        with torch.no_grad():
            (out,) = model([image])  # one image per call
        size = tuple(image.shape[-2:])
        entry = {
            "file": name,
            "image_size": size,
            "boxes": out["boxes"],
            "labels": out["labels"],
            "scores": out["scores"],
        }
        if keypoint:
            entry["keypoints"] = out["keypoints"]
            entry["keypoints_scores"] = out["keypoints_scores"]
        else:
            probe = mask_probe(out["boxes"], size)
            masks = out["masks"][:, 0].reshape(out["masks"].shape[0], -1)
            entry["mask_probe"] = probe
            entry["mask_values"] = torch.gather(masks, 1, probe)
        outputs.append(entry)
        print(
            f"{name}: {len(out['boxes'])} detections, "
            f"scores {out['scores'].min():.3f}-{out['scores'].max():.3f}"
        )
    torch.save(
        {
            "model": args.model,
            "seed": SEED,
            "dtype": "float64",
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "outputs": outputs,
        },
        out_path,
    )
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
