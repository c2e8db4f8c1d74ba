import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrcnn.modeling.matcher import Matcher, subsample_labels
from tests.reference.matcher_ref import match_ref


def run(iou, high=0.7, low=0.3, allow=True):
    iou = torch.as_tensor(iou, dtype=torch.float32).reshape(len(iou), -1) if len(iou) else torch.zeros(0, 3)
    got = Matcher(high_threshold=high, low_threshold=low, allow_low_quality_matches=allow)(iou)
    assert got.dtype == torch.int64
    return got.tolist()


def test_thresholds_by_hand():
    # columns: best IoU 0.9 (gt 1), 0.7 (== high: matched), 0.5 (ignore), 0.3 (== low: ignore), 0.1 (bg)
    iou = [[0.2, 0.7, 0.5, 0.0, 0.1], [0.9, 0.1, 0.2, 0.3, 0.05]]
    assert run(iou, allow=False) == [1, 0, -2, -2, -1]


def test_low_quality_matches_with_ties():
    # gt 0's best IoU 0.4 is reached by predictions 1 and 3 (a tie): both become matches of gt 0;
    # gt 1's best (0.9) is already a match.
    iou = [[0.1, 0.4, 0.2, 0.4], [0.9, 0.0, 0.1, 0.0]]
    assert run(iou, allow=False) == [1, -2, -1, -2]
    assert run(iou, allow=True) == [1, 0, -1, 0]


def test_low_quality_match_takes_the_predictions_own_best_gt():
    # prediction 1 is gt 0's best (0.5) but overlaps gt 1 more (0.6): like torchvision it gets gt 1.
    iou = [[0.1, 0.5, 0.0], [0.2, 0.6, 0.95]]
    assert run(iou, allow=True) == [-1, 1, 1]


def test_no_ground_truth_means_background():
    m = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    assert m(torch.zeros(0, 5)).tolist() == [-1] * 5
    assert m(torch.zeros(2, 0)).shape == (0,)


def test_invalid_thresholds():
    with pytest.raises(ValueError):
        Matcher(high_threshold=0.3, low_threshold=0.7, allow_low_quality_matches=False)


@settings(max_examples=60, deadline=None)
@given(
    g=st.integers(0, 4),
    p=st.integers(1, 12),
    allow=st.booleans(),
    data=st.data(),
)
def test_matches_naive_reference(g, p, allow, data):
    # values on a coarse grid make ties (between gts and between predictions) common
    vals = data.draw(
        st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 1.0]), min_size=g * p, max_size=g * p)
    )
    iou = [vals[i * p : (i + 1) * p] for i in range(g)]
    t = torch.tensor(vals, dtype=torch.float32).reshape(g, p)
    got = Matcher(high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=allow)(t).tolist()
    assert got == match_ref(iou, p, 0.7, 0.3, allow)


def test_subsample_counts_and_disjointness():
    labels = torch.tensor([1] * 10 + [0] * 300 + [-1] * 50)
    pos, neg = subsample_labels(labels, num_samples=256, positive_fraction=0.5)
    assert len(pos) == 10 and len(neg) == 246
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 10 and len(set(neg.tolist())) == 246
    assert pos.tolist() == sorted(pos.tolist()) and neg.tolist() == sorted(neg.tolist())

    many = torch.tensor([1.0] * 500 + [0.0] * 500)
    pos, neg = subsample_labels(many, num_samples=256, positive_fraction=0.25)
    assert (len(pos), len(neg)) == (64, 192)

    few_bg = torch.tensor([2, 3, 1] * 100 + [0] * 20)  # class indices count as foreground
    pos, neg = subsample_labels(few_bg, num_samples=256, positive_fraction=0.5)
    assert (len(pos), len(neg)) == (128, 20)

    pos, neg = subsample_labels(torch.full((7,), -1), num_samples=4, positive_fraction=0.5)
    assert pos.numel() == 0 and neg.numel() == 0


def test_subsample_is_random_and_seeded():
    labels = torch.tensor([1] * 100 + [0] * 100)
    a = subsample_labels(
        labels, num_samples=20, positive_fraction=0.5, generator=torch.Generator().manual_seed(0)
    )
    b = subsample_labels(
        labels, num_samples=20, positive_fraction=0.5, generator=torch.Generator().manual_seed(0)
    )
    c = subsample_labels(
        labels, num_samples=20, positive_fraction=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_subsample_draws_like_torchvision():
    # same RNG use as torchvision's sampler: randperm over the foreground, then over the background
    labels = torch.tensor([0, 1, -1, 0, 1, 1, 0, 0, 1, 0, 0, 1] * 5)
    torch.manual_seed(3)
    pos, neg = subsample_labels(labels, num_samples=16, positive_fraction=0.25)
    torch.manual_seed(3)
    fg, bg = torch.nonzero(labels == 1).squeeze(1), torch.nonzero(labels == 0).squeeze(1)
    want_pos = fg[torch.randperm(len(fg))[:4]].sort().values
    want_neg = bg[torch.randperm(len(bg))[:12]].sort().values
    assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)


def test_batch_draws_like_one_call_per_image_with_one_read():
    """The batch form draws what one call per image draws, image after image (torchvision's sampler over
    a batch), and reads every image's counts back at once."""
    from maskrcnn.modeling.matcher import subsample_labels_batch
    from tests.syncs import count_syncs

    g = torch.Generator().manual_seed(5)
    labels = [torch.randint(-1, 4, (n,), generator=g) for n in (50, 0, 200, 7)]
    kw = dict(num_samples=16, positive_fraction=0.25)
    torch.manual_seed(1)
    want = [subsample_labels(lab, **kw) for lab in labels]
    torch.manual_seed(1)
    with count_syncs() as syncs:
        got = subsample_labels_batch(labels, **kw)
    assert syncs.total == 1, syncs.report()
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))
    assert subsample_labels_batch([], **kw) == []
    with pytest.raises(ValueError, match="labels must be"):
        subsample_labels_batch([labels[0][None]], **kw)
