"""Data-parallel training: two CPU processes (gloo) on one image each against one process on both.

Why the two must agree (up to float rounding). DistributedDataParallel averages the processes' gradients,
so it reproduces the 2-image batch exactly when every loss of the batch is the mean of the two per-image
losses, i.e. when each image contributes the same number of terms to each loss, and when nothing else
depends on the batch. The test model and data make that so:

* both images have the same size (64 x 64, not resized: ``min_size = max_size = 64``), so there is no
  padding difference, and the same ground-truth box layout (their pixels, classes and mask shapes differ):
  the anchors' labels, hence the number of labelled anchors, are the same in both;
* the RPN and RoI samplers take every labelled anchor / RoI (``batch_size_per_image`` 10**6): no random
  subset (the sampler returns sorted indices, so not even the order is random);
* each image gets exactly ``post_nms_topk_train`` proposals (many more survive NMS), plus its 2 boxes;
  with RoI IoU thresholds of 0.99 only the ground-truth boxes themselves are foreground (the test's boxes
  have sizes no anchor-derived proposal comes within 0.99 IoU of), so both images have 2 foreground RoIs
  for the mask loss and the same number of RoIs for the box losses;
* frozen BatchNorm: no batch statistics.

Why float64. Data parallelism guarantees the same *sum* of per-image terms, not the same rounding: the batch
of two sums a convolution's weight gradient over both images in one reduction, the two processes each over
one image and then average. The orders differ, and oneDNN picks different kernels (hence orders) on AVX2,
AVX-512 and AMX machines, so in float32 the results differ by up to n * 2**-24 * sum|terms| (n terms, up to
~10**5 here), i.e. by 1e-4 of a gradient entry where terms cancel. Comparing in float64 makes the same bound
~10**-11 of the summed magnitudes: the tolerance below (``TOL`` of each tensor's largest entry) sits well
above it on any CPU and far below any real fault (a missed average, a dropped image or an unsynchronised
weight changes entries by a large fraction of the largest one).
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from maskrcnn.config import SolverConfig, get_config, make_config
from maskrcnn.engine import distributed
from maskrcnn.engine.interrupt import TrainingInterrupted
from maskrcnn.engine.plot import read_metrics
from maskrcnn.engine.train import train
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.rcnn import MaskRCNN
from maskrcnn.weights import read_checkpoint

TOL = 1e-9  # relative to each tensor's largest entry, in float64 (see above)

BOXES = ((7.0, 9.0, 29.0, 44.0), (35.0, 21.0, 61.0, 47.0))


class SameLayout(torch.utils.data.Dataset):
    """Four 64 x 64 images with the two boxes of ``BOXES``; pixels, labels and mask shapes differ."""

    def __init__(self, n: int = 4):
        g = torch.Generator().manual_seed(7)
        self.items = []
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        for i in range(n):
            image = torch.rand(3, 64, 64, generator=g) * 0.4
            masks, labels = [], []
            for j, (x1, y1, x2, y2) in enumerate(BOXES):
                inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
                if (i + j) % 2:  # an ellipse filling the box
                    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                    inside &= ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
                image[:, inside] = torch.rand(3, 1, generator=g) * 0.5 + 0.5
                masks.append(inside.to(torch.uint8))
                labels.append(1 + (i + j) % 2)
            target = {
                "boxes": torch.tensor(BOXES),
                "labels": torch.tensor(labels),
                "masks": torch.stack(masks),
            }
            self.items.append((image, target))
        self.num_classes = 3

    def __len__(self) -> int:
        return len(self.items)

    def image_info(self, index: int) -> dict:
        return {"height": 64, "width": 64}

    def __getitem__(self, index: int):
        image, target = self.items[index]
        return image.clone(), {k: v.clone() for k, v in target.items()}


def model_config():
    m = get_config("R-18-FPN-small")
    m.num_classes = 3
    m.input.min_size, m.input.max_size = (64,), 64
    m.backbone.fpn_channels = 32
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 200, 16
    m.rpn.batch_size_per_image = 10**6
    m.roi_heads.batch_size_per_image = 10**6
    m.roi_heads.fg_iou_thresh = m.roi_heads.bg_iou_thresh = 0.99
    m.roi_heads.representation_size = 64
    return m


def run_config(output_dir: str):
    cfg = make_config(model_config(), output_dir=output_dir, device="cpu", log_period=1, checkpoint_period=0)
    # one iteration: from the second on, proposals (top-k, NMS) can flip with float-rounding differences of
    # the weights, a discontinuity that is no fault of the data-parallel training
    cfg.solver = SolverConfig(ims_per_batch=2, base_lr=0.01, reference_batch=2, max_iter=1, warmup_iters=0)
    cfg.data.num_workers = 0
    return cfg


pytestmark = pytest.mark.usefixtures("one_thread", "float64")


@pytest.fixture
def float64():
    """Models, images and losses in float64 (see the module docstring)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _assert_close(actual, expected, *, rtol: float, atol: float, name: str) -> None:
    excess = ((actual - expected).abs() - rtol * expected.abs()).max().item()
    assert excess <= atol, f"{name}: off by {excess:.3g} beyond rtol {rtol} (atol {atol:.3g})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, mode: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # a fresh process: see the module docstring
    data = SameLayout()
    if mode == "train":  # train() joins the group (torchrun's variables above) and leaves it
        train(run_config(os.path.join(out, "ddp")), dataset=data)
        return
    if mode == "signal":  # rank 1 alone gets SIGTERM during its first iteration
        cfg = run_config(os.path.join(out, "ddp"))
        cfg.solver.max_iter = 3
        if rank == 1:
            forward = MaskRCNN.forward

            def signalled(self, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)
                return forward(self, *args, **kwargs)

            MaskRCNN.forward = signalled
        try:
            train(cfg, dataset=data)
        except TrainingInterrupted as e:
            with open(os.path.join(out, f"stopped{rank}.txt"), "w") as fh:
                fh.write(f"{e.iteration} {e.exit_code}")
        return
    got = distributed.init_distributed("cpu")
    try:
        assert got[:3] == (rank, world_size, rank) and got[3] == torch.device("cpu")
        assert distributed.is_main_process() == (rank == 0)
        assert distributed.all_reduce_mean({"x": torch.tensor(float(rank)), "y": 2.0}) == {"x": 0.5, "y": 2.0}
        assert distributed.all_gather_objects({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
        distributed.barrier()
        torch.manual_seed(100 + rank)  # different on purpose: DDP broadcasts rank 0's weights
        model = build_model(model_config()).train()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        image, target = data[rank]
        losses = ddp([image], [target])
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "weights": model.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _spawn(tmp_path, mode: str) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_distributed("cpu") == (0, 1, 0, torch.device("cpu"))
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.all_reduce_mean({"a": torch.tensor(3.0), "b": 1}) == {"a": 3.0, "b": 1.0}
    assert distributed.all_gather_objects("x") == ["x"]
    distributed.barrier()
    distributed.cleanup()


def test_two_processes_average_gradients_like_one_batch(tmp_path):
    _spawn(tmp_path, "grads")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    torch.manual_seed(100)  # rank 0's initialisation
    model = build_model(model_config()).train()
    for k, v in model.state_dict().items():
        assert torch.equal(rank1["weights"][k], v), k  # rank 1 got rank 0's weights
    data = SameLayout()
    images, targets = zip(*(data[i] for i in range(2)))
    sum(model(list(images), list(targets)).values()).backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert rank0["grads"].keys() == rank1["grads"].keys() == single.keys()
    for n, g in single.items():
        assert torch.equal(rank0["grads"][n], rank1["grads"][n]), n  # all-reduced: the same everywhere
        assert g.dtype == torch.float64, n
        _assert_close(rank0["grads"][n], g, rtol=0.0, atol=TOL * g.abs().max().item(), name=n)
    assert any(g.abs().max() > 0 for g in single.values())


def test_two_process_training_matches_one_process(tmp_path):
    _spawn(tmp_path, "train")
    single = train(run_config(str(tmp_path / "single")), dataset=SameLayout())

    ddp = read_checkpoint(tmp_path / "ddp" / "model_final.pt")
    ref = read_checkpoint(single["final_checkpoint"])
    assert len(ddp["rng"]) == 2 and len(ref["rng"]) == 1  # one RNG state per process
    torch.manual_seed(0)
    init = build_model(model_config()).state_dict()
    moved = 0
    for k, v in ref["model"].items():
        step = v - init[k]  # compare the updates, not the (much larger) weights
        scale = step.abs().max().item() if v.is_floating_point() else 0.0
        assert not v.is_floating_point() or v.dtype == torch.float64, k
        _assert_close(ddp["model"][k] - init[k], step, rtol=0.0, atol=TOL * scale, name=k)
        moved += scale > 0
    assert moved > 50
    # the logged losses are averaged over the processes: the batch's losses
    ddp_log, ref_log = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(single["metrics"])
    for a, b in zip(ddp_log, ref_log, strict=True):
        for k in b:
            if k.startswith("loss"):
                assert a[k] == pytest.approx(b[k], rel=TOL), k


def test_a_signal_to_one_process_stops_every_process_at_the_same_iteration(tmp_path):
    _spawn(tmp_path, "signal")
    assert [(tmp_path / f"stopped{r}.txt").read_text() for r in (0, 1)] == ["1 143", "1 143"]
    assert (tmp_path / "ddp" / "last_checkpoint").read_text().strip() == "model_0000001.pt"
    assert read_checkpoint(tmp_path / "ddp" / "model_0000001.pt")["iteration"] == 1
