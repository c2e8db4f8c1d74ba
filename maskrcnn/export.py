"""Export a model to ONNX: one image in, its detections out, for onnxruntime.

``export_onnx(model, "model.onnx", size=(H, W))`` (or ``maskrcnn export --weights W --output model.onnx``)
writes the whole inference path -- normalise, resize, pad, backbone, RPN, RoI heads, mapping back to the
image, mask pasting -- as one ONNX graph.

Input ``image``: one float32 RGB image ``[3, H, W]`` in [0, 1]. **H and W are dynamic**: any size works,
resized as the eager model resizes it (``size`` is only the size of the example traced at export time).
Outputs, what ``model([image])[0]`` returns for that image, by decreasing score:

* ``boxes [N, 4]`` float32, xyxy in input-image pixels; ``labels [N]`` int64 (1 .. num_classes - 1);
  ``scores [N]`` float32;
* ``masks [N, 1, H, W]`` float32 probabilities (threshold at 0.5), for models with a mask branch;
* ``keypoints [N, K, 3]`` rows ``(x, y, 1)`` in input-image pixels and ``keypoints_scores [N, K]``, for
  models with a keypoint branch.

An image without detections gives ``N = 0`` (empty outputs).

How. The eager model has data-dependent Python control flow (per-level loops over ``.tolist()`` counts,
NMS in numpy, RoIAlign as an ``embedding_bag``), which neither tracer records faithfully. So the export
traces :class:`ExportableMaskRCNN`, an export-only module that reuses the model's layers and weights and
restates the glue between them (proposal selection, multi-level pooling, box postprocessing, mask pasting,
keypoint decoding) with shape-generic tensor operations; the eager core is left as it is. Two operators are
mapped to ONNX's own through ``torch.autograd.Function.symbolic`` (the eager op runs while tracing):

* RoIAlign -> ``RoiAlign`` (opset >= 16): ``aligned=False`` is ``coordinate_transformation_mode =
  output_half_pixel``, ``aligned=True`` is ``half_pixel``; ``sampling_ratio <= 0`` (adaptive) is 0.
* batched NMS -> ``NonMaxSuppression`` with one "class" per category (a score matrix in which boxes of
  other categories are below ``score_threshold``), so categories never suppress each other (no
  coordinate-offset trick). The kept boxes are then ordered by decreasing score, ties by lower index,
  as :func:`maskrcnn.ops.nms.batched_nms` orders them (ONNX ``TopK`` puts equal values lower index first).

Two more places are written for bit-level agreement with PyTorch rather than with ONNX's own operators,
because a deep model with near-tied proposals turns an ulp into a different proposal: the image resize
(gathers and blends with PyTorch's taps; ONNX ``Resize`` in onnxruntime differs by ~1e-4) and the RPN's
sigmoid (``1 / (1 + exp(-x))``, which saturates to exactly 1.0 where PyTorch's does; ONNX ``Sigmoid`` does
not, and which proposals tie at 1.0 decides NMS's visiting order).

Keypoints upsample each detection's heatmaps to its own box size, which ONNX expresses as a ``Loop`` over the
detections (a scripted function inside the trace). The exporter is PyTorch's TorchScript-based one
(``torch.onnx.export(..., dynamo=False)``). The ``torch.export``-based one (``dynamo=True``, torch 2.13)
fails on the eager model ("Could not guard on data-dependent expression", a Python branch on a
data-dependent count) and on this wrapper (it traces into the NMS and RoIAlign kernels, which would have to
become ``torch.library`` custom ops with ONNX translations).

Supported: FPN and C4 models with RoIAlign poolers (``roi_heads.pooler = "align"``), with or without mask
and keypoint branches, batch of one image. RoIPool / RoIWarp / max-RoIAlign poolers (the paper's
ablations) have no ONNX counterpart here and are refused with a :class:`ExportError`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrcnn.ops.masks import expand_boxes_to_int, paste_resize_taps
from maskrcnn.ops.nms import batched_nms
from maskrcnn.ops.roi_align import roi_align

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_KEY",
    "MIN_OPSET",
    "ExportError",
    "ExportableMaskRCNN",
    "export_onnx",
    "output_names",
]

#: ONNX opset used by default, and the lowest that has RoiAlign's coordinate_transformation_mode.
DEFAULT_OPSET = 17
MIN_OPSET = 16
METADATA_KEY = "maskrcnn.metadata"  # ONNX model property: the model's metadata as JSON
_MAX_NMS_OUTPUT = 1 << 30  # NonMaxSuppression's max_output_boxes_per_class: "all of them"


class ExportError(ValueError):
    """The model (or an option) cannot be exported."""


# ------------------------------------------------------------------------------------- mapped operators


class _RoIAlignOp(torch.autograd.Function):
    """``roi_align(feature, [batch_idx, rois])`` eagerly; ONNX ``RoiAlign`` when exported."""

    @staticmethod
    def forward(ctx, feature, rois, batch_idx, output_size, spatial_scale, sampling_ratio, aligned):
        boxes = torch.cat([batch_idx[:, None].to(rois.dtype), rois], dim=1)
        out = roi_align(feature, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        return out.contiguous()

    @staticmethod
    def symbolic(g, feature, rois, batch_idx, output_size, spatial_scale, sampling_ratio, aligned):
        return g.op(
            "RoiAlign",
            feature,
            rois,
            batch_idx,
            spatial_scale_f=float(spatial_scale),
            output_height_i=int(output_size[0]),
            output_width_i=int(output_size[1]),
            sampling_ratio_i=max(int(sampling_ratio), 0),
            mode_s="avg",
            coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel",
        )


class _GroupedNMSOp(torch.autograd.Function):
    """Indices of the boxes kept by per-group NMS (in no particular order).

    ``member_scores [G, N]`` holds each box's visiting priority (> 0) in its own group's row and -1 elsewhere:
    ONNX ``NonMaxSuppression`` with ``score_threshold = -0.5`` then runs NMS per row on that row's boxes
    only. Eagerly, :func:`maskrcnn.ops.nms.batched_nms` on ``(scores, groups)``.
    """

    @staticmethod
    def forward(ctx, boxes, scores, groups, member_scores, iou_threshold):
        return batched_nms(boxes, scores, groups, iou_threshold)

    @staticmethod
    def symbolic(g, boxes, scores, groups, member_scores, iou_threshold):
        zero = g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64))
        selected = g.op(
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, zero),  # [1, N, 4]
            g.op("Unsqueeze", member_scores, zero),  # [1, G, N]
            g.op("Constant", value_t=torch.tensor([_MAX_NMS_OUTPUT], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([float(iou_threshold)], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([-0.5], dtype=torch.float32)),
            center_point_box_i=0,
        )  # [M, 3] rows (batch, group, box)
        return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor(2)), axis_i=1)


def _sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + exp(-x))``, the operations of PyTorch's CPU sigmoid. ONNX ``Sigmoid`` in onnxruntime
    rounds differently near 1: logits of ~16-17 give 0.99999994 there and exactly 1.0 in PyTorch, and
    which proposals tie at 1.0 decides NMS's visiting order (ties: lower index first)."""
    return torch.reciprocal(torch.exp(-x) + 1)


def _sort_desc(x: Tensor) -> Tensor:
    """Indices of ``x`` by decreasing value, equal values lower index first: ONNX ``TopK`` in the graph,
    a stable sort when run eagerly (the exporter has no stable sort)."""
    if torch.jit.is_tracing():
        return x.sort(descending=True).indices
    return x.sort(descending=True, stable=True).indices


def _grouped_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, iou_threshold: float
) -> Tensor:
    """``batched_nms``: kept indices by decreasing score, equal scores lower index first.

    NMS visits the boxes in that order, and equal scores are common (a saturated sigmoid gives many
    RPN scores of exactly 1.0); ``NonMaxSuppression`` does not say how it orders ties, so it is given each
    box's rank in that order (``N - position``, exact in float32 below 2**24 boxes) instead of its score.
    ONNX ``TopK`` (a descending sort) puts equal values lower index first, which gives the order."""
    order = _sort_desc(scores)
    n = _shape(scores)[0]
    rank = torch.zeros_like(scores).scatter(0, order, torch.arange(n, 0, -1, dtype=scores.dtype))
    rows = torch.arange(num_groups, device=groups.device)[:, None]
    member = torch.where(groups[None, :] == rows, rank[None, :], torch.full_like(rank, -1.0)[None, :])
    keep = _GroupedNMSOp.apply(boxes, scores, groups, member, float(iou_threshold))
    return keep[_sort_desc(rank[keep])]


def _upsampled_argmax_loop(maps: Tensor, heights: Tensor, widths: Tensor) -> tuple[Tensor, Tensor]:
    """Per detection ``i``: its ``[K, S, S]`` maps upsampled bicubically to ``(heights[i], widths[i])``;
    the flat argmax ``[N, K]`` and the value there ``[N, K]``. Scripted, so that ONNX gets a ``Loop``."""
    k = maps.size(1)
    pos = torch.zeros((0, k), dtype=torch.int64, device=maps.device)
    scores = torch.zeros((0, k), dtype=maps.dtype, device=maps.device)
    for i in range(maps.size(0)):
        up = F.interpolate(
            maps[i][:, None],
            size=(int(heights[i]), int(widths[i])),
            mode="bicubic",
            align_corners=False,
        ).reshape(k, -1)
        best = up.argmax(dim=1)
        pos = torch.cat([pos, best[None]], dim=0)
        scores = torch.cat([scores, up.gather(1, best[:, None]).reshape(1, k)], dim=0)
    return pos, scores


_SCRIPTED: dict[str, object] = {}


def _scripted_argmax_loop():
    if "loop" not in _SCRIPTED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            _SCRIPTED["loop"] = torch.jit.script(_upsampled_argmax_loop)
    return _SCRIPTED["loop"]


# ------------------------------------------------------------------------------- the exportable model


def _linear_taps(in_size: Tensor, out_size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Taps ``i0, i1`` and weights ``l0, l1`` of PyTorch's CPU bilinear resize (``align_corners=False``,
    output size given) along one axis: ``scale = in / out`` (float32), ``src = scale * (dst + 0.5) - 0.5``
    with one rounding (the fused multiply-add of its compiled kernel; exact in float64, then rounded),
    clamped at 0; ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1``."""
    scale = in_size.to(torch.float32) / out_size.to(torch.float32)
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale.to(torch.float64) - 0.5
    src = src.to(torch.float32).clamp(min=0)
    i0 = src.floor()
    l1 = (src - i0).clamp(0, 1)
    i0 = i0.to(torch.int64)
    i1 = torch.minimum(i0 + 1, in_size - 1)
    return i0, i1, 1 - l1, l1


def _resize_bilinear(image: Tensor, size: Tensor, new: Tensor) -> Tensor:
    """``F.interpolate(image[None], size=new, mode="bilinear", align_corners=False)[0]`` for ``[C, H, W]``,
    with PyTorch's taps and weights and its order of operations (columns, then rows).

    ONNX ``Resize`` in onnxruntime maps coordinates with ``1 / (out / in)`` instead of ``in / out``: a
    rounding apart, which moves samples by ~1e-5 px and the resized image by ~1e-4 near edges -- enough to
    reorder near-tied proposals of a deep random-weight model. These taps are PyTorch's bit for bit; the
    blends differ from its kernel by at most an ulp (its compiler fuses some of them). A side that is not
    resized (``in == out``) is copied exactly, as PyTorch does."""
    i0, i1, l0, l1 = _linear_taps(size[1], new[1])
    x = image[:, :, i0] * l0 + image[:, :, i1] * l1  # [C, H, w]
    i0, i1, l0, l1 = _linear_taps(size[0], new[0])
    return x[:, i0, :] * l0[:, None] + x[:, i1, :] * l1[:, None]  # [C, h, w]


def _shape(t: Tensor) -> Tensor:
    """``t.shape`` as an int64 tensor: traced as ONNX ``Shape`` (dynamic), not baked in as constants."""
    return torch._shape_as_tensor(t)


class ExportableMaskRCNN(nn.Module):
    """The inference path of a :class:`maskrcnn.modeling.rcnn.MaskRCNN` for one image, written for tracing.

    Holds the model (its layers and weights are used as they are) and restates, number for number, what
    the eager model does between them, with sizes kept as tensors so that a trace stays valid for every
    input size. ``forward(image [3, H, W]) -> (boxes, labels, scores[, masks][, keypoints,
    keypoints_scores])`` (:func:`output_names` gives the names). Eager use gives the same detections as
    ``model([image])`` too, which is how the export is checked while developing.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        heads = model.roi_heads
        self.model = model
        names = [b.name for b in heads.branches]
        unknown = [n for n in names if n not in ("mask", "keypoint")]
        if unknown:
            raise ExportError(f"no ONNX export for the RoI head branch(es) {unknown}")
        self.mask = next((b for b in heads.branches if b.name == "mask"), None)
        self.keypoint = next((b for b in heads.branches if b.name == "keypoint"), None)
        for branch, attr in (
            (heads.box_branch, "box_pooler"),
            (self.mask, "mask_pooler"),
            (self.keypoint, "keypoint_pooler"),
        ):
            pooler = getattr(branch, attr, None) if branch is not None else None
            if pooler is not None and pooler.kind != "align":
                raise ExportError(
                    f"the {attr} is {pooler.kind!r}; ONNX export supports RoIAlign poolers only "
                    "(roi_heads.pooler='align')"
                )

    # ----------------------------------------------------------------------------------- pieces

    def _preprocess(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise, resize by the model's factor, zero-pad to ``size_divisible``: ``([1, 3, Hp, Wp],
        resized (h, w) int64)``. Sizes in float64, as Python computes the eager model's."""
        t = self.model.transform
        mean = torch.tensor(t.pixel_mean, dtype=image.dtype).view(3, 1, 1)
        std = torch.tensor(t.pixel_std, dtype=image.dtype).view(3, 1, 1)
        image = (image - mean) / std
        size = _shape(image)[1:].to(torch.float64)
        factor = torch.minimum(t.min_size[-1] / size.min(), t.max_size / size.max())
        new = torch.floor(size * factor).to(torch.int64)  # floor(float(side) * factor), like F.interpolate
        x = _resize_bilinear(image, size.to(torch.int64), new)[None]
        d = t.size_divisible
        padded = torch.div(new + (d - 1), d, rounding_mode="floor") * d
        pad = padded - new
        x = F.pad(x, (0, pad[1], 0, pad[0]))
        return x, new

    @staticmethod
    def _clip(boxes: Tensor, size: Tensor) -> Tensor:
        """``clip_boxes`` with a tensor size ``(h, w)``: x into [0, w], y into [0, h]."""
        limit = torch.stack([size[1], size[0], size[1], size[0]]).to(boxes.dtype)
        return torch.minimum(boxes.clamp(min=0), limit)

    def _anchors(self, level: int, feature: Tensor, padded: Tensor) -> Tensor:
        """The level's anchors ``[H_l * W_l * A, 4]`` (:class:`maskrcnn.ops.anchors.AnchorGenerator`)."""
        gen = self.model.rpn.anchor_generator
        cell = gen.cell_anchors[level].to(torch.float32)  # [A, 4]
        fsize = _shape(feature)[-2:]
        if gen.strides is None:  # torchvision's rule: padded size // feature size
            stride = torch.div(padded, fsize, rounding_mode="floor")
        else:
            stride = torch.tensor(gen.strides[level], dtype=torch.int64)
        shift_x = (torch.arange(fsize[1], dtype=torch.int64) * stride[1]).to(torch.float32)
        shift_y = (torch.arange(fsize[0], dtype=torch.int64) * stride[0]).to(torch.float32)
        x = shift_x[None, :, None] + cell[:, 0::2].T[:, None, None, :]  # [2, 1, W, A]: x1, x2
        y = shift_y[:, None, None] + cell[:, 1::2].T[:, None, None, :]  # [2, H, 1, A]: y1, y2
        x, y = torch.broadcast_tensors(x, y)
        return torch.stack([x[0], y[0], x[1], y[1]], dim=-1).reshape(-1, 4)

    def _proposals(self, features: list[Tensor], padded: Tensor, size: Tensor) -> Tensor:
        """:func:`maskrcnn.modeling.rpn.select_proposals` for one image: ``[P, 4]`` by decreasing score."""
        rpn = self.model.rpn
        logits, deltas = rpn.head(features)
        pre_nms = rpn.pre_nms_topk[False]
        boxes, scores, levels = [], [], []
        for level, (lg, dt, f) in enumerate(zip(logits, deltas, features, strict=True)):
            a = lg.shape[1]
            lg = lg[0].permute(1, 2, 0).reshape(-1)  # [(y * W + x) * A + a]
            dt = dt[0].reshape(a, 4, -1).permute(2, 0, 1).reshape(-1, 4)
            k = torch.clamp(_shape(lg)[0], max=pre_nms)
            top = lg.topk(k).indices
            anchors = self._anchors(level, f, padded)
            b = rpn.box_coder.decode(dt[top], anchors[top])
            boxes.append(self._clip(b, size))
            scores.append(_sigmoid(lg[top]))
            levels.append(torch.full_like(top, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (w >= rpn.min_size) & (h >= rpn.min_size) & (scores >= rpn.score_thresh)
        keep = torch.nonzero(ok).squeeze(1)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = _grouped_nms(boxes, scores, levels, len(logits), rpn.nms_thresh)
        return boxes[keep[: rpn.post_nms_topk[False]]]

    @staticmethod
    def _pool(pooler: nn.Module, features: list[Tensor], boxes: Tensor) -> Tensor:
        """:class:`maskrcnn.modeling.poolers.MultiLevelPooler` on one image's boxes ``[R, 4]``."""
        from maskrcnn.modeling.poolers import assign_levels

        def align(feature: Tensor, rois: Tensor, scale: float) -> Tensor:
            batch = torch.zeros_like(rois[:, 0], dtype=torch.int64)
            return _RoIAlignOp.apply(
                feature, rois, batch, pooler.output_size, scale, pooler.sampling_ratio, pooler.aligned
            )

        if len(features) == 1:
            return align(features[0], boxes, pooler.scales[0])
        levels = (
            assign_levels(boxes, pooler.k_min, pooler.k_max, pooler.canonical_scale, pooler.canonical_level)
            - pooler.k_min
        )
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, pooler.scales, strict=True)):
            idx = torch.nonzero(levels == level).squeeze(1)
            pooled.append(align(feature, boxes[idx], scale))
            order.append(idx)
        return torch.cat(pooled)[torch.cat(order).sort().indices]

    def _detect(self, features: list[Tensor], proposals: Tensor, size: Tensor):
        """The box branch and :meth:`maskrcnn.modeling.box_branch.BoxBranch.postprocess` for one image."""
        box = self.model.roi_heads.box_branch
        class_logits, box_deltas = box.box_predictor(
            box.box_head(self._pool(box.box_pooler, features, proposals))
        )
        num_classes = class_logits.shape[1]
        boxes = box.box_coder.decode(box_deltas, proposals)
        boxes = boxes.reshape(-1, box_deltas.shape[1] // 4, 4).expand(-1, num_classes, 4)
        scores = F.softmax(class_logits.float(), -1)
        flat = torch.nonzero(scores[:, 1:].reshape(-1) > box.score_thresh).squeeze(1)
        roi = torch.div(flat, num_classes - 1, rounding_mode="floor")
        labels = flat % (num_classes - 1) + 1
        boxes, scores = self._clip(boxes[roi, labels], size), scores[roi, labels]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = torch.nonzero((w >= 1e-2) & (h >= 1e-2)).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = _grouped_nms(boxes, scores, labels, num_classes, box.nms_thresh)[: box.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def _mask_probs(self, features: list[Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """:meth:`maskrcnn.modeling.mask_branch.MaskBranch.forward_test`: ``[N, 1, M, M]`` probabilities."""
        branch = self.mask
        if branch.mask_pooler is None:  # C4: the box head's res5 output on the detections
            box = self.model.roi_heads.box_branch
            x = box.box_head.features(self._pool(box.box_pooler, features, boxes))
        else:
            x = self._pool(branch.mask_pooler, features, boxes)
        if branch.mask_head is not None:
            x = branch.mask_head(x)
        logits = branch.mask_predictor(x)
        channel = torch.zeros_like(labels) if branch.class_agnostic else labels
        rows = torch.arange(labels.shape[0])
        return logits[rows, channel].float().sigmoid()[:, None]

    def _keypoints(self, features: list[Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`maskrcnn.ops.keypoints.heatmaps_to_keypoints` of the keypoint branch's heatmaps."""
        branch = self.keypoint
        maps = branch.keypoint_predictor(
            branch.keypoint_head(self._pool(branch.keypoint_pooler, features, boxes))
        ).float()
        widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
        heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
        widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
        corr_x, corr_y = widths / widths_ceil, heights / heights_ceil
        widths_int = widths_ceil.to(torch.int64)
        pos, scores = _scripted_argmax_loop()(maps, heights_ceil.to(torch.int64), widths_int)
        x_int = pos % widths_int[:, None]
        y_int = torch.div(pos - x_int, widths_int[:, None], rounding_mode="floor")
        x = (x_int.float() + 0.5) * corr_x[:, None] + boxes[:, 0:1]
        y = (y_int.float() + 0.5) * corr_y[:, None] + boxes[:, 1:2]
        return torch.stack([x, y, torch.ones_like(x)], dim=2), scores

    @staticmethod
    def _paste(masks: Tensor, boxes: Tensor, image_size: Tensor, padding: int = 1) -> Tensor:
        """:func:`maskrcnn.ops.masks.paste_masks_in_image` with the same taps and weights, its fused
        ``embedding_bag`` blend written as two gathers."""
        n, m = masks.shape[0], masks.shape[-1]
        src = m + 2 * padding
        ib = expand_boxes_to_int(boxes, float(src) / m)
        mpad = F.pad(masks[:, 0], (padding,) * 4)  # [N, src, src]
        det = torch.arange(n)

        def blend(table: Tensor, base: Tensor, i0, i1, l0, l1, inside) -> Tensor:
            zero_row = _shape(table)[0]
            table = torch.cat([table, torch.zeros_like(table[:1])])
            r0 = (base[:, None] + i0).masked_fill(~inside, 0) + (~inside).long() * zero_row
            r1 = (base[:, None] + i1).masked_fill(~inside, 0) + (~inside).long() * zero_row
            return table[r1.reshape(-1)] * l1.reshape(-1, 1) + table[r0.reshape(-1)] * l0.reshape(-1, 1)

        h, w = image_size[0], image_size[1]
        cols = mpad.transpose(1, 2).reshape(-1, src)  # [N * src (columns), src (rows)]
        rows = blend(cols, det * src, *paste_resize_taps(ib[:, 0], ib[:, 2], w, src, masks.dtype))
        rows = rows.reshape(n, w, src).transpose(1, 2).reshape(-1, w)  # [N * src, w]
        out = blend(rows, det * src, *paste_resize_taps(ib[:, 1], ib[:, 3], h, src, masks.dtype))
        return out.reshape(n, 1, h, w)

    # --------------------------------------------------------------------------------- forward

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        original = _shape(image)[1:]
        batch, size = self._preprocess(image)
        padded = _shape(batch)[-2:]
        all_features = model.backbone(batch)
        proposals = self._proposals([all_features[k] for k in model.rpn_features], padded, size)
        features = [all_features[k] for k in model.roi_features]
        boxes, scores, labels = self._detect(features, proposals, size)
        ratio = original.float() / size.float()  # (h, w): resize_boxes' ratios
        scale = torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
        outputs = [boxes * scale, labels, scores]
        if self.mask is not None:
            outputs.append(self._paste(self._mask_probs(features, boxes, labels), outputs[0], original))
        if self.keypoint is not None:
            keypoints, kp_scores = self._keypoints(features, boxes)
            keypoints = keypoints * torch.stack([ratio[1], ratio[0], torch.ones_like(ratio[0])])
            outputs += [keypoints, kp_scores]
        return tuple(outputs)


def output_names(model: nn.Module) -> list[str]:
    """The exported graph's output names for ``model``, in order."""
    names = ["boxes", "labels", "scores"]
    branches = [b.name for b in model.roi_heads.branches]
    if "mask" in branches:
        names.append("masks")
    if "keypoint" in branches:
        names += ["keypoints", "keypoints_scores"]
    return names


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> str:
    """Write ``model`` (a :class:`maskrcnn.modeling.rcnn.MaskRCNN`) to ``path`` as ONNX; returns the path.

    ``size``: ``(H, W)`` of the example image traced (default: the model's test ``min_size`` square).
    The graph takes any ``H x W`` (dynamic axes ``height``, ``width``); outputs as in the module docstring.
    ``opset`` must be >= 16 (RoiAlign's ``coordinate_transformation_mode``). The model is used on the CPU in
    eval mode, float32; it is not modified (its mode and device are restored). The model's ``metadata``
    (class names, category ids, keypoint names, skeleton), when it has any, is stored as JSON under the
    ONNX model property ``maskrcnn.metadata`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``).
    """
    if importlib.util.find_spec("onnx") is None:
        raise ExportError(
            'ONNX export needs the onnx package: pip install -e ".[export]" (or pip install onnx)'
        )
    if int(opset) < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: RoiAlign's coordinate_transformation_mode needs >= 16")
    if size is None:
        side = int(model.transform.min_size[-1])
        size = (side, side)
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ExportError(f"size must be (H, W) with positive sides, got {tuple(size)}")
    h, w = (int(s) for s in size)
    wrapper = ExportableMaskRCNN(model)
    was_training, device = model.training, next(model.parameters()).device
    model.eval().cpu()
    example = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    names = output_names(model)
    axes = {"image": {1: "height", 2: "width"}}
    for name in names:
        axes[name] = {0: "detections"}
    if "masks" in names:
        axes["masks"].update({2: "height", 3: "width"})
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's notes on Python values taken from tensors: the sizes that matter are kept as
            # tensors (see ExportableMaskRCNN); the rest are constants of the model.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.4's own symbolic helpers
            warnings.filterwarnings("ignore", category=UserWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                os.fspath(path),
                dynamo=False,
                opset_version=int(opset),
                input_names=["image"],
                output_names=names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    finally:
        model.to(device).train(was_training)
    metadata = getattr(model, "metadata", None)
    if metadata:  # the class names and category ids travel with the graph, as with the checkpoint
        import json

        import onnx

        graph = onnx.load(os.fspath(path))
        onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(metadata)})
        onnx.save(graph, os.fspath(path))
    return os.fspath(path)
