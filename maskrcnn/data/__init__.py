"""Data: image decoding (one path for every reader), COCO-format datasets (validated up front), synthetic
shapes, joint transforms and loaders.

Conventions: images are float RGB ``[3, H, W]`` in [0, 1]; boxes are xyxy float32 absolute pixels; sizes are
``(h, w)``; label 0 is background and labels 1 .. K map to the dataset's sorted category ids; keypoints are
float ``[G, K, 3]`` ``(x, y, v)`` absolute pixels as COCO stores them (:mod:`maskrcnn.data.keypoints`).
"""

from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.images import ImageReadError, check_images, read_image
from maskrcnn.data.keypoints import (
    COCO_PERSON_KEYPOINT_NAMES,
    COCO_PERSON_OKS_SIGMAS,
    COCO_PERSON_SKELETON,
)
from maskrcnn.data.loader import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    aspect_ratio_groups,
    build_test_loader,
    build_train_loader,
    collate,
)
from maskrcnn.data.shapes import make_shapes_dataset
from maskrcnn.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge, hflip, resize

__all__ = [
    "COCO_PERSON_KEYPOINT_NAMES",
    "COCO_PERSON_OKS_SIGMAS",
    "COCO_PERSON_SKELETON",
    "CocoDataset",
    "Compose",
    "DatasetError",
    "GroupedBatchSampler",
    "ImageReadError",
    "InferenceSampler",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "TrainingSampler",
    "aspect_ratio_groups",
    "build_test_loader",
    "build_train_loader",
    "check_images",
    "collate",
    "hflip",
    "make_shapes_dataset",
    "read_image",
    "resize",
]
