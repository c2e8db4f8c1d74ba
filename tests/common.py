"""Helpers shared by the tests: where ``../shared`` is, and a tiny inference model."""

import os

import torch

from maskrcnn.config import get_config
from maskrcnn.modeling.build import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("MASKRCNN_SHARED", os.path.join(HERE, "..", "..", "shared"))
COCO_MINI = os.path.join(SHARED, "data", "coco-mini")


def tiny_model(num_classes: int = 3, *, mask: bool = True, seed: int = 0):
    """An R-18-FPN-small model (random weights, seeded) at 48-64 px with few proposals: fast inference."""
    cfg = get_config("R-18-FPN-small")
    cfg.num_classes = num_classes
    cfg.roi_heads.mask = mask
    cfg.input.min_size, cfg.input.max_size = (48,), 64
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 100, 50
    cfg.roi_heads.detections_per_img = 10
    torch.manual_seed(seed)
    return build_model(cfg)


def assert_refuses_a_foreign_file(make_dataset, root, relpath: str, **kwargs) -> None:
    """``make_dataset(root, **kwargs)`` (a synthetic data set generator) meets ``root/relpath``, a file it did
    not write: FileExistsError naming it, the file untouched, nothing else written."""
    import pytest

    foreign = root / relpath
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match=relpath):
        make_dataset(str(root), **kwargs)
    assert foreign.read_bytes() == b"not ours"
    assert sorted(os.listdir(root)) == [relpath.split("/")[0]]  # nothing written before refusing
