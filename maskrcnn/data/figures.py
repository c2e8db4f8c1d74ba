"""A synthetic COCO person-keypoints dataset of articulated stick figures, easy enough to train on a CPU.

Each image has 1-3 front-facing "people" on a textured background (the shapes dataset's background): a
torso (trapezoid), a head with eyes, nose and ears, and four two-segment limbs drawn as thick outlined
capsules with a darker round marker on every joint. Figures vary in scale (standing height 22-78% of the
shorter image side, so boxes are roughly 40-200 px in 256 px images), position (a quarter may extend past the
image border), whole-body tilt (+-25 degrees), head tilt, pose (shoulder, elbow, hip and knee angles within
plausible limits, foreshortened legs), proportions and colours (every limb its own colour, contrasting
with the background). Later figures occlude earlier ones, and about a third of the images get an
un-annotated occluder block on top; placements that would leave an earlier figure less than half visible
or with fewer than 6 visible keypoints are redrawn.

Landmarks are COCO's 17 person keypoints in COCO's order, with COCO's skeleton, so COCO's OKS sigmas and
flip map apply unchanged (:data:`KEYPOINT_NAMES`, :data:`SKELETON`, :data:`FLIP_INDICES`). Left and right
are visible the way they are on real people: every figure faces the viewer (eyes and nose on the head) and
stands roughly upright, so its left side is on the image's right in the figure's own upright frame; each
limb has its own colour and outline, so a limb that crosses the body or the other limb can be traced back
to its shoulder or hip. This cue survives a horizontal flip with COCO's left/right swap (the mirrored
figure still faces the viewer, and its mirrored right arm is now on the image's right), unlike a colour
code such as "left limbs darker", which a flip with the swap would contradict.

Keypoints are stored as the landmarks' continuous positions, in the frame of the boxes and masks (pixel
column ``i`` covers ``[i, i + 1)``, so a landmark at the centre of pixel ``(row 7, col 5)`` is stored as
``x = 5.5, y = 7.5``), as floats with 2 decimals. Real COCO stores integer clicks whose half-pixel meaning
is ambiguous (detectron2 reads them as pixel indices and adds 0.5; torchvision and
:mod:`maskrcnn.data.keypoints` read them as continuous coordinates, with the flip ``x -> W - x``); the
continuous frame is the one in which this project's flip and heatmap decoding are exact.

Visibility: ``v = 2`` when the pixel under the landmark shows the landmark's own body part (its limb, or
the head for the face points), ``v = 1`` when it is inside the image but covered (by the figure's other
limb, a later figure, or an occluder), ``v = 0`` (stored as ``0, 0, 0``) when it is outside the image.
``num_keypoints`` counts ``v > 0``. Segmentations are compressed RLE of the visible mask (as for the
shapes dataset's occluded shapes), ``area`` its pixel count and ``bbox`` its tight box; ``iscrowd`` is 0.

The output is deterministic for a seed (byte-identical files). A complete dataset made with the same
parameters (recorded in ``meta.json``) is reused; one made by this generator with other parameters is
regenerated; files this generator did not write are never overwritten (:class:`FileExistsError`).
"""

from __future__ import annotations

import math

import numpy as np

from maskrcnn.data.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
from maskrcnn.data.synthetic import instance_record, polygon_mask, textured_background, write_dataset
from maskrcnn.ops.keypoints import keypoint_flip_map

__all__ = ["CATEGORY", "FLIP_INDICES", "KEYPOINT_NAMES", "SKELETON", "draw_image", "make_figures_dataset"]

KEYPOINT_NAMES = COCO_PERSON_KEYPOINT_NAMES
SKELETON = tuple(tuple(pair) for pair in COCO_PERSON_SKELETON)  # 1-based keypoint indices, as COCO's
# index of each keypoint's mirror image (left <-> right): keypoints[:, FLIP_INDICES] after flipping x
FLIP_INDICES = tuple(keypoint_flip_map(KEYPOINT_NAMES))
CATEGORY = {
    "id": 1,
    "name": "person",
    "supercategory": "person",
    "keypoints": list(KEYPOINT_NAMES),
    "skeleton": [list(pair) for pair in SKELETON],
}

_VERSION = 1  # bump when the generated data changes, so that old folders are regenerated
_GENERATOR = "maskrcnn.data.figures"
_MAX_FIGURES = 3
_MIN_VISIBLE = 0.5  # fraction of a figure's mask that must stay visible when later things are drawn
_MIN_VISIBLE_KEYPOINTS = 6  # v = 2 keypoints a figure must keep
_MIN_LR_DISTANCE = 0.05  # between a figure's left and right landmarks, in body units (standing height ~1)
_MIN_CONTRAST = 70.0  # minimum RGB distance between a part's colour and the background beneath the figure

# body parts ("chains"): a keypoint is visible when the pixel under it shows its own chain
_TORSO, _HEAD, _LARM, _RARM, _LLEG, _RLEG = range(6)
_CHAIN_OF_KEYPOINT = (
    (_HEAD,) * 5 + (_LARM, _RARM) * 3 + (_LLEG, _RLEG) * 3
)  # nose, eyes, ears; shoulders, elbows, wrists; hips, knees, ankles
_OWNER_STRIDE = 8  # owner map value: figure * 8 + chain + 1 (0: background or occluder)


def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _direction(side: int, angle: float) -> np.ndarray:
    """Unit vector ``angle`` radians away from straight down, turned outward (``side`` +1: image right)."""
    return np.array([side * math.sin(angle), math.cos(angle)])


class _Layer:
    """One figure being drawn: colour and chain (-1: empty) per pixel, full image size."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.chain = np.full((h, w), -1, dtype=np.int8)
        self.colour = np.zeros((h, w, 3), dtype=np.float32)

    def _window(self, x0: float, y0: float, x1: float, y1: float):
        """Pixel window covering continuous ``[x0, x1] x [y0, y1]`` and its pixel-centre grids, or None."""
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, self.w)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        yy = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5  # broadcast against xx
        xx = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        return (slice(r0, r1), slice(c0, c1)), yy, xx

    def _paint(self, window, inside: np.ndarray, colour, chain: int) -> None:
        (rs, cs) = window
        self.chain[rs, cs][inside] = chain
        self.colour[rs, cs][inside] = colour

    def capsule(self, p: np.ndarray, q: np.ndarray, radius: float, colour, chain: int) -> None:
        """Pixels whose centre is within ``radius`` of the segment ``p``-``q`` (round caps)."""
        win = self._window(
            min(p[0], q[0]) - radius, min(p[1], q[1]) - radius, max(p[0], q[0]) + radius,
            max(p[1], q[1]) + radius,
        )  # fmt: skip
        if win is None:
            return
        window, yy, xx = win
        d = q - p
        t = ((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist2 = (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2
        self._paint(window, dist2 <= radius * radius, colour, chain)

    def disc(self, c: np.ndarray, radius: float, colour, chain: int) -> None:
        self.capsule(c, c, radius, colour, chain)

    def polygon(self, points: np.ndarray, colour, chain: int) -> None:
        """A filled polygon, rasterised by pycocotools (as COCO polygons are)."""
        flat = [float(v) for v in points.reshape(-1)]
        self._paint((slice(None), slice(None)), polygon_mask(flat, self.h, self.w), colour, chain)


def _luminance(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _marker_colour(c: np.ndarray) -> np.ndarray:
    """A clearly darker (or, for dark colours, lighter) shade of ``c``."""
    return c * 0.35 if _luminance(c) > 90 else c + (255.0 - c) * 0.6


def _colour(rng, away_from: list[np.ndarray], min_dist: list[float]) -> np.ndarray:
    """A random colour at least ``min_dist[i]`` from ``away_from[i]`` (best of 30 tries otherwise)."""
    best, best_margin = None, -math.inf
    for _ in range(30):
        c = rng.uniform(0, 255, size=3)
        margin = min((np.linalg.norm(c - a) - d for a, d in zip(away_from, min_dist)), default=0.0)
        if margin >= 0:
            return c
        if margin > best_margin:
            best, best_margin = c, margin
    return best


def _pose(rng) -> tuple[np.ndarray, list]:
    """A random figure in body units (standing height ~1, neck at the origin, x to the figure's left, which
    is the image's right since it faces the viewer, y down): ``(keypoints [17, 2], primitives)``.

    Primitives are ``(kind, chain, role, geometry)`` in drawing order; ``role`` picks the colour.
    """
    kp = np.zeros((17, 2))
    prims: list = []
    width = rng.uniform(0.9, 1.15)  # torso width factor
    arm_len, leg_len = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
    torso = np.array([[-0.15, -0.01], [0.15, -0.01], [0.115, 0.35], [-0.115, 0.35]]) * [width, 1.0]
    prims.append(("polygon", _TORSO, "torso", torso))
    # legs (drawn over the torso's lower edge, so the hips show), in random order
    legs = []
    for side, chain, (hip_i, knee_i, ankle_i) in ((1, _LLEG, (11, 13, 15)), (-1, _RLEG, (12, 14, 16))):
        hip = np.array([side * 0.08 * width, 0.33])
        a_hip = math.radians(rng.uniform(-12, 50))
        a_knee = a_hip + math.radians(rng.uniform(-40, 40))
        knee = hip + 0.22 * leg_len * rng.uniform(0.8, 1.0) * _direction(side, a_hip)
        ankle = knee + 0.21 * leg_len * rng.uniform(0.75, 1.0) * _direction(side, a_knee)
        kp[hip_i], kp[knee_i], kp[ankle_i] = hip, knee, ankle
        legs.append(
            [
                ("capsule", chain, "limb", (hip, knee, 0.052)),
                ("capsule", chain, "limb", (knee, ankle, 0.042)),
                *[("marker", chain, "marker", (p,)) for p in (hip, knee, ankle)],
            ]
        )
    # head: neck, ears (behind the head, so only their outer halves show), head, eyes, nose
    r = 0.1
    head_rot = _rot(math.radians(rng.uniform(-15, 15)))
    centre = head_rot @ np.array([0.0, -0.13])

    def on_head(x: float, y: float) -> np.ndarray:
        return centre + head_rot @ np.array([x * r, y * r])

    kp[0] = on_head(0.0, 0.3)
    kp[1], kp[2] = on_head(0.42, -0.12), on_head(-0.42, -0.12)
    kp[3], kp[4] = on_head(1.0, 0.02), on_head(-1.0, 0.02)
    head = [
        ("capsule", _HEAD, "head", (np.array([0.0, 0.01]), centre, 0.04)),
        ("disc", _HEAD, "ear", (kp[3], 0.32 * r)),
        ("disc", _HEAD, "ear", (kp[4], 0.32 * r)),
        ("disc", _HEAD, "head", (centre, r)),
        ("disc", _HEAD, "eye", (kp[1], 0.17 * r)),
        ("disc", _HEAD, "eye", (kp[2], 0.17 * r)),
        ("disc", _HEAD, "nose", (kp[0], 0.13 * r)),
    ]
    arms = []
    for side, chain, (sh_i, el_i, wr_i) in ((1, _LARM, (5, 7, 9)), (-1, _RARM, (6, 8, 10))):
        shoulder = np.array([side * 0.13 * width, 0.02])
        a_sh = math.radians(rng.uniform(-30, 160))
        a_el = a_sh + math.radians(rng.uniform(-120, 120))
        elbow = shoulder + 0.16 * arm_len * _direction(side, a_sh)
        wrist = elbow + 0.15 * arm_len * rng.uniform(0.8, 1.0) * _direction(side, a_el)
        kp[sh_i], kp[el_i], kp[wr_i] = shoulder, elbow, wrist
        arms.append(
            [
                ("capsule", chain, "limb", (shoulder, elbow, 0.042)),
                ("capsule", chain, "limb", (elbow, wrist, 0.036)),
                *[("marker", chain, "marker", (p,)) for p in (shoulder, elbow, wrist)],
            ]
        )
    for i in rng.permutation(2):
        prims += legs[i]
    prims += head
    for i in rng.permutation(2):
        prims += arms[i]
    return kp, prims


def _figure(rng, h: int, w: int, background: np.ndarray):
    """A random figure placed in the image: ``(layer, keypoints [17, 2] continuous image coordinates)``."""
    for _attempt in range(100):  # left and right landmarks apart, so that neither is ambiguous
        kp, prims = _pose(rng)
        if min(np.hypot(*(kp[i] - kp[j])) for i, j in enumerate(FLIP_INDICES) if i < j) >= _MIN_LR_DISTANCE:
            break
    height = math.exp(rng.uniform(math.log(0.22), math.log(0.78))) * min(h, w)  # px per body unit
    tilt = _rot(math.radians(rng.uniform(-25, 25)))

    def to_image(p: np.ndarray) -> np.ndarray:
        return (tilt @ np.asarray(p, dtype=np.float64).T).T * height

    head_centre = to_image(next(g[3][1] for g in prims if g[2] == "head" and g[0] == "capsule"))
    kp = to_image(kp)
    outline = max(1.0, 0.012 * height)
    marker_r = max(1.3, 0.026 * height)
    # extent of everything drawn (the head's top and the limbs' thickness beyond the keypoints), to place
    # the figure; a quarter of the figures may leave the image by up to 35% of their size
    pts = np.concatenate([kp, head_centre[None]])
    lo, hi = pts.min(0) - 0.115 * height, pts.max(0) + 0.115 * height
    size = hi - lo
    slack = 0.35 if rng.uniform() < 0.25 else 0.0
    shift = np.empty(2)
    for d, extent in enumerate((w, h)):
        a, b = -lo[d] - slack * size[d], extent - hi[d] + slack * size[d]
        shift[d] = rng.uniform(a, b) if a < b else (a + b) / 2
    kp = kp + shift

    def place(p: np.ndarray) -> np.ndarray:
        return to_image(p) + shift

    # colours: contrasting with the background under the figure; arms also with the torso and each other
    x0, y0 = np.clip(np.floor(lo + shift), 0, [w - 1, h - 1]).astype(int)
    x1, y1 = np.clip(np.ceil(hi + shift), [x0 + 1, y0 + 1], [w, h]).astype(int)
    under = background[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    torso_c = _colour(rng, [under], [_MIN_CONTRAST])
    head_c = _colour(rng, [under, torso_c], [_MIN_CONTRAST, 40.0])
    limb_c = {}
    for chain in (_LLEG, _RLEG, _LARM, _RARM):
        others = [under, torso_c] + ([limb_c[_LARM]] if chain == _RARM else [])
        limb_c[chain] = _colour(rng, others, [_MIN_CONTRAST, 60.0, 40.0][: len(others)])
    face_c = np.full(3, 20.0) if _luminance(head_c) > 110 else np.full(3, 240.0)
    colours = {
        "torso": torso_c,
        "head": head_c,
        "ear": head_c * 0.8,
        "eye": face_c,
        "nose": np.array([200.0, 30.0, 30.0]) if _luminance(head_c) > 110 else np.array([255.0, 160.0, 60.0]),
    }
    layer = _Layer(h, w)
    for kind, chain, role, g in prims:
        if kind == "polygon":
            layer.polygon(place(g), torso_c, chain)
        elif kind == "disc":
            c, radius = place(g[0]), g[1] * height
            if role in ("head", "ear"):
                layer.disc(c, radius, _marker_colour(colours[role]), chain)  # outline
                layer.disc(c, radius - outline, colours[role], chain)
            else:
                layer.disc(c, max(radius, 0.8), colours[role], chain)
        elif kind == "capsule":
            p, q, radius = place(g[0]), place(g[1]), g[2] * height
            colour = colours["head"] if role == "head" else limb_c[chain]
            layer.capsule(p, q, radius, _marker_colour(colour), chain)  # outline
            layer.capsule(p, q, radius - outline, colour, chain)
        else:  # joint marker
            layer.disc(place(g[0]), marker_r, _marker_colour(limb_c[chain]), chain)
    return layer, kp


def _occluder(rng, h: int, w: int) -> np.ndarray:
    """A random block (rectangle, maybe rotated) that covers part of the figures: full mask [h, w]."""
    s = min(h, w)
    bw, bh = rng.uniform(0.06, 0.3) * s, rng.uniform(0.06, 0.3) * s
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    corners = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]]) / 2
    corners = corners @ _rot(math.radians(rng.uniform(-30, 30))).T + [cx, cy]
    return polygon_mask([float(v) for v in corners.reshape(-1)], h, w)


def _visibility(owner: np.ndarray, figure: int, kp: np.ndarray) -> np.ndarray:
    """``v`` per keypoint (0 outside the image, 2 when its own chain shows under it, 1 otherwise)."""
    h, w = owner.shape
    v = np.zeros(len(kp), dtype=np.int64)
    for k, (x, y) in enumerate(kp):
        if 0 <= x < w and 0 <= y < h:
            own = figure * _OWNER_STRIDE + _CHAIN_OF_KEYPOINT[k] + 1
            v[k] = 2 if owner[int(y), int(x)] == own else 1
    return v


def _visible_enough(owner: np.ndarray, figures: list, full_areas: list) -> bool:
    """Whether every figure shows at least half its mask and ``_MIN_VISIBLE_KEYPOINTS`` visible keypoints."""
    for f, kp in enumerate(figures):
        visible = (owner > 0) & ((owner - 1) // _OWNER_STRIDE == f)
        if visible.sum() < _MIN_VISIBLE * full_areas[f]:
            return False
        if (_visibility(owner, f, kp) == 2).sum() < _MIN_VISIBLE_KEYPOINTS:
            return False
    return True


def _make_image(rng: np.random.Generator, h: int, w: int):
    """One image ``[h, w, 3]`` uint8 and its figures ``[(visible mask, keypoints [17, 2], v [17])]``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    canvas = textured_background(rng, h, w, yy, xx)
    background = canvas.copy()
    owner = np.zeros((h, w), dtype=np.int32)  # figure * 8 + chain + 1 of the pixel's top layer; 0: none
    figures: list[np.ndarray] = []
    full_areas: list[int] = []
    for _ in range(int(rng.integers(1, _MAX_FIGURES + 1))):
        f = len(figures)
        for _attempt in range(20 if figures else 200):
            layer, kp = _figure(rng, h, w, background)
            drawn = layer.chain >= 0
            area = int(drawn.sum())
            if area < 150 or sum(0 <= x < w and 0 <= y < h for x, y in kp) < 8:
                continue
            candidate = owner.copy()
            candidate[drawn] = f * _OWNER_STRIDE + layer.chain[drawn].astype(np.int32) + 1
            if _visible_enough(candidate, figures + [kp], full_areas + [area]):
                break
        else:
            continue  # no placement leaves every figure visible enough: fewer figures in this image
        canvas[drawn] = layer.colour[drawn] + rng.normal(0.0, 4.0, size=(area, 3))
        owner = candidate
        figures.append(kp)
        full_areas.append(area)
    if figures and rng.uniform() < 0.35:
        for _attempt in range(5):
            block = _occluder(rng, h, w)
            candidate = np.where(block, 0, owner)
            if _visible_enough(candidate, figures, full_areas):
                colour = rng.uniform(0, 255, size=3)
                canvas[block] = colour + rng.normal(0.0, 8.0, size=(int(block.sum()), 3))
                owner = candidate
                break
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    out = []
    for f, kp in enumerate(figures):
        visible = (owner > 0) & ((owner - 1) // _OWNER_STRIDE == f)
        out.append((visible, kp, _visibility(owner, f, kp)))
    return image, out


def draw_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[dict]]:
    """One image ``[h, w, 3]`` uint8 and its COCO annotation records (without ``id`` and ``image_id``)."""
    image, figures = _make_image(rng, h, w)
    records = []
    for visible, kp, v in figures:
        keypoints: list = []
        for (x, y), vis in zip(kp, v):
            # continuous coordinates (see the module docstring); unlabelled points are 0, 0, 0
            # (rounding must not carry a point at the far edge out of the image)
            xy = [min(round(float(x), 2), w - 0.01), min(round(float(y), 2), h - 0.01)]
            keypoints += [*xy, int(vis)] if vis else [0, 0, 0]
        record = instance_record(category_id=CATEGORY["id"], visible=visible)
        records.append({**record, "keypoints": keypoints, "num_keypoints": int((v > 0).sum())})
    return image, records


def make_figures_dataset(
    root: str,
    *,
    num_train: int = 400,
    num_val: int = 50,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> dict:
    """Write (or reuse) the figures dataset under ``root``: ``train/*.png``, ``val/*.png``,
    ``annotations/person_keypoints_{train,val}.json`` and ``meta.json``. ``image_size`` is ``(h, w)``.

    Returns ``{"train_images", "train_annotations", "val_images", "val_annotations"}`` (paths), ready for
    :class:`maskrcnn.data.CocoDataset` and :class:`maskrcnn.config.DataConfig`. Raises
    :class:`FileExistsError`, before writing anything, when a file it would write exists and was not
    written by this generator.
    """
    return write_dataset(
        root,
        generator=_GENERATOR,
        version=_VERSION,
        prefix="person_keypoints",
        categories=[CATEGORY],
        draw=draw_image,
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
    )
