"""Label assignment shared by the RPN and the RoI heads: IoU matching and balanced sampling.

:class:`Matcher` turns a ground-truth x prediction quality matrix (IoU) into one matched
ground-truth index per prediction, or a negative code; :func:`subsample_labels` draws a fixed-size,
class-balanced random subset of the labelled predictions. Both follow torchvision's ``Matcher``
and ``BalancedPositiveNegativeSampler`` exactly (same results for the same inputs and RNG state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Matcher", "subsample_labels", "subsample_labels_batch"]


class Matcher:
    """Assigns to each prediction its best ground truth, or background / ignore.

    Args (keyword only):
        high_threshold: a prediction whose best IoU is ``>= high_threshold`` is matched.
        low_threshold: best IoU ``< low_threshold`` -> :attr:`BELOW_LOW_THRESHOLD` (-1, background);
            ``low_threshold <= IoU < high_threshold`` -> :attr:`BETWEEN_THRESHOLDS` (-2, ignore).
        allow_low_quality_matches: additionally, for every ground truth, all predictions that reach
            that ground truth's highest IoU (every tie) are matched, even below the thresholds.
            As in torchvision, such a prediction gets *its own* best ground truth (the argmax of
            its column), which is a different one when it overlaps another ground truth more.
            Also as in torchvision: a ground truth that overlaps no prediction (highest IoU 0)
            makes every prediction with IoU 0 to it a "tie", so all of them become matches.

    ``matcher(iou)`` with ``iou [G, P]`` (ground truths x predictions) returns ``int64 [P]``:
    the matched ground-truth index in ``[0, G)``, or -1 / -2. Ties between ground truths for one
    prediction go to the lowest index (``Tensor.max``). ``G == 0`` gives all -1 (every prediction
    is background).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self, *, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, iou: Tensor) -> Tensor:
        """``iou [G, P]`` -> ``int64 [P]`` matched ground-truth index, -1 (background) or -2 (ignore)."""
        if iou.dim() != 2:
            raise ValueError(f"iou must be [G, P], got shape {tuple(iou.shape)}")
        num_gt, num_pred = iou.shape
        if num_gt == 0 or num_pred == 0:
            return torch.full((num_pred,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
        best_iou, best_gt = iou.max(dim=0)  # [P], [P]
        matches = torch.where(
            best_iou < self.low_threshold,
            self.BELOW_LOW_THRESHOLD,
            torch.where(best_iou < self.high_threshold, self.BETWEEN_THRESHOLDS, best_gt),
        )
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1).values  # [G]
            is_best_for_some_gt = (iou == best_per_gt[:, None]).any(dim=0)  # [P]
            matches = torch.where(is_best_for_some_gt, best_gt, matches)
        return matches


def subsample_labels(
    labels: Tensor,
    *,
    num_samples: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random balanced subset of labelled predictions.

    Args:
        labels: ``[P]`` labels: ``>= 1`` foreground (1, or a class index), 0 background, -1 (any
            other value) ignored. Any real or integer dtype.
        num_samples: total number to draw (e.g. 256 anchors or 512 RoIs per image).
        positive_fraction: the largest share of foreground in the sample.
        generator: optional ``torch.Generator`` on ``labels``' device; the default one otherwise.

    Returns:
        ``(pos_idx, neg_idx)``, int64 indices into ``labels``, each sorted ascending:
        ``num_pos = min(#fg, int(num_samples * positive_fraction))`` foreground and
        ``num_neg = min(#bg, num_samples - num_pos)`` background predictions, drawn uniformly
        without replacement with ``torch.randperm`` (foreground first, then background, so the
        same RNG state draws the same sample as torchvision's ``BalancedPositiveNegativeSampler``).
    """
    return subsample_labels_batch(
        [labels], num_samples=num_samples, positive_fraction=positive_fraction, generator=generator
    )[0]


def subsample_labels_batch(
    labels: Sequence[Tensor],
    *,
    num_samples: int,
    positive_fraction: float,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`subsample_labels` of each image's ``[P_i]`` labels, in image order (the same draws as one
    call per image, as torchvision's sampler draws for a batch), with one host read for the whole batch:
    every image's foreground and background counts at once."""
    for lab in labels:
        if lab.dim() != 1:
            raise ValueError(f"labels must be [P], got shape {tuple(lab.shape)}")
    if not labels:
        return []
    # per image, the foreground positions, then the background ones, each ascending (a stable sort by
    # group); the counts of all images in one read back
    orders, counts = [], []
    for lab in labels:
        foreground, background = lab >= 1, lab == 0
        group = torch.where(foreground, 0, torch.where(background, 1, 2)).to(torch.uint8)
        orders.append(torch.sort(group, stable=True).indices)
        counts += [foreground.sum(), background.sum()]
    counts = torch.stack(counts).tolist()
    samples = []
    for order, lab, num_fg, num_bg in zip(orders, labels, counts[0::2], counts[1::2], strict=True):
        positive, negative = order[:num_fg], order[num_fg : num_fg + num_bg]
        num_pos = min(num_fg, int(num_samples * positive_fraction))
        num_neg = min(num_bg, max(num_samples - num_pos, 0))
        perm_pos = torch.randperm(positive.numel(), generator=generator, device=lab.device)[:num_pos]
        perm_neg = torch.randperm(negative.numel(), generator=generator, device=lab.device)[:num_neg]
        samples.append((positive[perm_pos].sort().values, negative[perm_neg].sort().values))
    return samples
