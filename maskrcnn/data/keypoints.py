"""Person-keypoint metadata: COCO's 17 keypoints, their skeleton and OKS sigmas (the left/right flip map of
a list of names is :func:`maskrcnn.ops.keypoints.keypoint_flip_map`).

Conventions (one place): a target's ``keypoints`` is float ``[G, K, 3]`` = ``(x, y, v)`` in absolute image
pixels, COCO's coordinates as stored (no half-pixel shift); ``v`` is 0 (not labelled), 1 (labelled, not
visible) or 2 (labelled and visible), and a ``v = 0`` keypoint is ``(0, 0, 0)`` (COCO's own convention, kept
by every transform). Skeletons are COCO's: pairs of 1-based keypoint indices.
"""

from __future__ import annotations

__all__ = [
    "COCO_PERSON_KEYPOINT_NAMES",
    "COCO_PERSON_OKS_SIGMAS",
    "COCO_PERSON_SKELETON",
]

#: COCO's person keypoints, in the order of ``person_keypoints_*.json``.
COCO_PERSON_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

#: COCO's person skeleton: 1-based keypoint index pairs, as in ``person_keypoints_*.json``.
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip

#: The per-keypoint OKS sigmas of COCO's person keypoints (pycocotools' ``Params.kpt_oks_sigmas``).
COCO_PERSON_OKS_SIGMAS = tuple(
    v / 10.0
    for v in (
        0.26,
        0.25,
        0.25,
        0.35,
        0.35,
        0.79,
        0.79,
        0.72,
        0.72,
        0.62,
        0.62,
        1.07,
        1.07,
        0.87,
        0.87,
        0.89,
        0.89,
    )
)
