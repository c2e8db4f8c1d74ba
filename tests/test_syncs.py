"""Host reads (host-device synchronisations on a GPU) in the hot path, counted on the CPU (tests/syncs.py).

What is asserted: the counter sees what it should; NMS reads back a number of times fixed by its blocks and
rounds, not by its categories; the pooler reads back twice on a GPU, whatever the levels; and a whole model
reads back as often for one detection as for a hundred, and for one ground-truth object as for eight.
"""

import contextlib

import pytest
import torch

from maskrcnn.config import get_config
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.poolers import MultiLevelPooler
from maskrcnn.ops import batched_nms, nms
from tests.syncs import count_syncs, device_paths


def test_counter_sees_the_reads_and_only_them():
    x = torch.arange(10.0)
    with count_syncs() as syncs:
        x.sum().item()
        bool(x.any())
        x.tolist()
        torch.nonzero(x > 3)
        x[x > 3]
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert syncs.total == 6, syncs.report()
    with count_syncs() as syncs:
        x[torch.tensor([1, 2])]
        x.sort()
        x.topk(3)
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        x.repeat_interleave(2)  # int repeats: the size is known on the host
        x.masked_fill(x > 3, 0)
        torch.where(x > 3, x, 0)
    assert syncs.total == 0, syncs.report()
    assert x.tolist() == list(range(10))  # the wrappers are removed again


def test_launch_counter_counts_kernels_not_views():
    x = torch.arange(6.0)
    with count_syncs(launches=True) as syncs:
        x.view(2, 3).t()[1:]  # views only
        x.detach()
        y = x + 1  # one kernel each
        y.sum()
        torch.empty(3)  # an allocation, no kernel
    assert sum(syncs.launches.values()) == 2, syncs.launches
    assert set(syncs.launches) == {"outside maskrcnn"}  # this file is not in the package
    with count_syncs() as syncs:
        x + 1
    assert not syncs.launches  # counted only when asked: the site lookup per op is slow


def disjoint_boxes(n: int) -> torch.Tensor:
    """``n`` unit squares on a grid, two cells apart: no two overlap."""
    i = torch.arange(n, dtype=torch.float32)
    x, y = (i % 100) * 2, (i // 100) * 2
    return torch.stack([x, y, x + 1, y + 1], dim=1)


@pytest.mark.parametrize("n, reads, by_category", [(1000, 2, 3), (3000, 6, 5)])
def test_nms_reads_per_block_not_per_category(n, reads, by_category, monkeypatch):
    """Disjoint boxes (nothing suppressed, settled before the first read), blocks of 1024: each block reads
    once whether any box is undecided, every block but the last shrinks the pool with one nonzero, and one
    more gathers the kept positions: 2 reads in one block, 3 + 2 + 1 in three. With 50 categories the
    boxes are swept category after category in fixed blocks (nothing to shrink): one read of the category
    sizes, one per block, one to gather, whatever the number of categories."""
    import importlib

    nms_module = importlib.import_module("maskrcnn.ops.nms")
    monkeypatch.setattr(nms_module, "_DEVICE_BLOCK", 1024)
    boxes = disjoint_boxes(n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for idxs, expected in ((None, reads), (torch.arange(n) % 50, by_category)):
        with device_paths(), count_syncs() as syncs:
            keep = nms(boxes, scores, 0.5) if idxs is None else batched_nms(boxes, scores, idxs, 0.5)
        assert sorted(keep.tolist()) == list(range(n))
        assert syncs.total == expected, syncs.report()


def test_nms_tiles_on_devices(monkeypatch):
    """A block of 4096 meets the rest of the pool in tiles of 16M IoU values (4096 boxes each): 9000
    disjoint boxes are 3 blocks (in-block tiles), the first meeting its 4904 successors in 2 tiles, the
    second its 808 in 1."""
    import importlib

    nms_module = importlib.import_module("maskrcnn.ops.nms")
    # pinned: the test is of the tiling, not of the tuning
    monkeypatch.setattr(nms_module, "_DEVICE_BLOCK", 4096)
    monkeypatch.setattr(nms_module, "_DEVICE_TILE_ELEMS", 1 << 24)
    calls = []
    original = nms_module._iou_gt_torch
    monkeypatch.setattr(nms_module, "_iou_gt_torch", lambda a, b, t: calls.append(1) or original(a, b, t))
    boxes = disjoint_boxes(9000)
    scores = torch.rand(9000, generator=torch.Generator().manual_seed(0))
    with device_paths():
        keep = nms(boxes, scores, 0.5)
    assert keep.numel() == 9000
    assert len(calls) == 3 + 2 + 1


def test_batched_nms_meets_only_its_own_category_on_devices(monkeypatch):
    """Categories never interact, so on a device the boxes are swept category after category and a block
    meets only the rest of the category it ends inside: 8000 boxes in 10 interleaved categories of 800, in
    blocks of 1024, take 8 in-block tiles of 1024 x 1024 and rests of under 800 boxes (about 13M IoU
    values), not the whole rest of the pool after each block (about 35M). Same result as the CPU's
    per-category sweeps."""
    import importlib

    nms_module = importlib.import_module("maskrcnn.ops.nms")
    monkeypatch.setattr(nms_module, "_DEVICE_BLOCK", 1024)
    values = []
    original = nms_module._iou_gt_torch
    monkeypatch.setattr(
        nms_module,
        "_iou_gt_torch",
        lambda a, b, t: values.append(a.shape[1] * b.shape[1]) or original(a, b, t),
    )
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(8000, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 20 + torch.rand(8000, 2, generator=g) * 80], dim=1)
    scores = torch.rand(8000, generator=g)
    idxs = torch.arange(8000) % 10
    expected = batched_nms(boxes, scores, idxs, 0.7)
    with device_paths():
        got = batched_nms(boxes, scores, idxs, 0.7)
    assert torch.equal(got, expected)
    assert sum(values) < 8 * 1024 * 1024 + 8 * 1024 * 800, sum(values)


@pytest.mark.parametrize("n", [2, 9, 17])
def test_nms_reads_every_other_round(n):
    """A chain: box i overlaps box i + 1 only (IoU 2/3 > 0.5; 3/7 with i + 2), scores decreasing, so
    greedy NMS keeps the even ones. Each fixed-point round settles two more boxes of the chain: the n - 1
    suppressed-or-not boxes take ceil((n - 1) / 2) rounds, and the block reads back every second round,
    then once more to gather the kept positions."""
    x = torch.arange(n, dtype=torch.float32) * 2
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1, 0.5, n)
    with device_paths(), count_syncs() as syncs:
        keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == list(range(0, n, 2))
    rounds = -(-(n - 1) // 2)
    assert syncs.total == -(-rounds // 2) + 1, syncs.report()


def test_device_paths_give_the_cpu_results():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(3000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 10 + torch.rand(3000, 2, generator=g) * 60], dim=1)
    scores = torch.rand(3000, generator=g)
    idxs = torch.randint(0, 5, (3000,), generator=g)
    expected = batched_nms(boxes, scores, idxs, 0.6)
    with device_paths(), count_syncs() as syncs:
        got = batched_nms(boxes, scores, idxs, 0.6)
    assert syncs.in_file("maskrcnn/ops/nms.py") > 0  # the torch backend ran
    assert torch.equal(got, expected)


def test_roi_align_backward_walks_fewer_ranges_on_devices():
    """RoIAlign's backward sums into ranges of cells: where reads stall the ranges are as large as the
    output (an eighth of it on a CPU), so fewer of them run, each a few kernels; same gradient bit for bit."""
    from maskrcnn.ops import roi_align

    g = torch.Generator().manual_seed(0)
    feats = torch.rand(2, 256, 64, 64, generator=g)
    xy = torch.rand(200, 2, generator=g) * 40
    boxes = torch.cat([torch.randint(0, 2, (200, 1), generator=g), xy, xy + 8 + 16 * torch.rand(200, 2)], 1)
    grads, kernels = [], []
    for paths in (contextlib.nullcontext, device_paths):
        leaf = feats.clone().requires_grad_()
        out = roi_align(leaf, boxes, 7, 1.0, 2, True)
        with paths(), count_syncs(launches=True) as syncs:
            out.backward(torch.ones_like(out))
        grads.append(leaf.grad)
        kernels.append(sum(syncs.launches.values()))
    assert torch.equal(grads[0], grads[1])
    # 8 ranges (4 of 1225 cells per 64 x 64 image) on a CPU, 2 (one per image) on a device, r kernels each
    # over a fixed part f: f + 8 r and f + 2 r
    per_range, rest = divmod(kernels[0] - kernels[1], 6)
    assert per_range > 0 and rest == 0 and kernels[1] - 2 * per_range > 0, kernels


def test_pooler_reads_twice_whatever_the_levels_on_devices():
    """On a GPU, RoIAlign over all levels in one pass: one read of the merge windows and one of the pair
    list, for 8 RoIs or 800, on one level or four; its backward reads twice too (the chunk bounds, the
    touched cells). On a CPU, one pass per level: one read of the level counts, two per occupied level."""
    pooler = MultiLevelPooler(output_size=7, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2)
    features = [torch.rand(1, 4, 256 // s, 256 // s, requires_grad=True) for s in (4, 8, 16, 32)]
    sides = torch.tensor([60.0, 150.0, 300.0, 600.0])  # levels 2, 3, 4, 5 (canonical 224 px at level 4)
    for side, levels in ((sides.repeat(2), 4), (sides.repeat(200), 4), (sides[:1].repeat(8), 1)):
        boxes = torch.stack([torch.zeros_like(side), torch.zeros_like(side), side, side], dim=1)
        with device_paths():
            with count_syncs() as syncs:
                out = pooler(features, [boxes])
            assert syncs.total == 2, syncs.report()
            with count_syncs() as syncs:
                out.sum().backward()
            assert syncs.total == 2, syncs.report()
        with count_syncs() as syncs:
            pooler(features, [boxes])
        assert syncs.total == 1 + 2 * levels, syncs.report()


def tiny_c4(**roi_heads):
    """A C4 model at 64 px (one feature map, so no level assignment varies with the boxes)."""
    cfg = get_config("R-18-FPN-small")
    cfg.num_classes = 4
    cfg.backbone.kind = "c4"
    cfg.roi_heads.box_head = "mlp"
    cfg.rpn.anchor_sizes = ((16, 32, 64),)
    cfg.input.min_size, cfg.input.max_size = (64,), 64
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 200, 100
    for key, value in roi_heads.items():
        setattr(cfg.roi_heads, key, value)
    torch.manual_seed(0)
    return build_model(cfg)


def outside_nms(syncs) -> int:
    return syncs.total - syncs.in_file("maskrcnn/ops/nms.py")


def test_inference_reads_do_not_grow_with_detections():
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))]
    counts = {}
    for wanted in (1, 100):
        model = tiny_c4(score_thresh=0.0, detections_per_img=wanted).eval()
        with torch.no_grad(), device_paths(), count_syncs() as syncs:
            (out,) = model(images)
        assert len(out["boxes"]) == wanted and out["masks"].shape[0] == wanted
        counts[wanted] = outside_nms(syncs)
    assert counts[1] == counts[100], counts
    # RPN: 1 nonzero + 1 read of the counts; box and mask pooling: 2 each; detections: 1 nonzero
    assert counts[100] <= 7, counts


def test_training_reads_do_not_grow_with_objects():
    def targets(n):
        g = torch.Generator().manual_seed(3)
        xy = torch.rand(n, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 16], dim=1)
        masks = torch.zeros(n, 64, 64, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        return {"boxes": boxes, "labels": torch.arange(n) % 3 + 1, "masks": masks}

    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    counts = {}
    for n in (1, 8):
        model = tiny_c4().train()
        with device_paths(), count_syncs() as syncs:
            losses = model(images, [targets(n), targets(n)])
            sum(losses.values()).backward()
        counts[n] = outside_nms(syncs)
    assert counts[1] == counts[8], counts


def foreground_reads(syncs, branch: str) -> int:
    """Reads in a branch's file and in the foreground RoI selection it calls (roi_heads.foreground_rois)."""
    found = sum(n for (_, site), n in syncs.by_site.items() if site.endswith(" foreground_rois"))
    return found + syncs.in_file(f"maskrcnn/modeling/{branch}")


def test_mask_branch_reads_do_not_grow_with_images():
    """The batch's foreground RoIs are found with one read and their mask targets cropped in one RoIAlign
    pass over every image's masks: RoIAlign and the mask branch read as often for 4 images as for 1."""

    def targets(seed):
        g = torch.Generator().manual_seed(seed)
        xy = torch.rand(3, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 8 + torch.rand(3, 2, generator=g) * 16], dim=1)
        masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        return {"boxes": boxes, "labels": torch.arange(3) + 1, "masks": masks}

    counts = {}
    for b in (1, 4):
        images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4 + i)) for i in range(b)]
        model = tiny_c4().train()
        with device_paths(), count_syncs() as syncs:
            losses = model(images, [targets(i) for i in range(b)])
            sum(losses.values()).backward()
        counts[b] = syncs.in_file("maskrcnn/ops/roi_align.py") + foreground_reads(syncs, "mask_branch.py")
    assert counts[1] == counts[4], counts


def test_keypoint_branch_reads_once_per_batch():
    """One read finds the batch's foreground RoIs; the heatmap targets need none."""
    from maskrcnn.modeling.build import build_model as build
    from tests.test_keypoint_model import person_sample, tiny

    counts = {}
    for b in (1, 3):
        torch.manual_seed(0)
        model = build(tiny("keypoint-R-50-FPN")).train()
        samples = [person_sample(seed=s) for s in range(b)]
        with device_paths(), count_syncs() as syncs:
            model([s[0] for s in samples], [s[1] for s in samples])
        counts[b] = foreground_reads(syncs, "keypoint_branch.py")
    assert counts == {1: 1, 3: 1}, counts
