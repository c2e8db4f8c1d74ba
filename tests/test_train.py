"""The training loop, its schedule, checkpoints, resume, fine-tuning initialisation and outputs.

A tiny ResNet-18 FPN model (64-pixel images, few proposals) trains for a handful of iterations on an
in-memory dataset of coloured rectangles; everything runs on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from maskrcnn.config import ModelConfig, SolverConfig, get_config, load_config_file, make_config
from maskrcnn.data.transforms import RandomHorizontalFlip
from maskrcnn.engine.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from maskrcnn.engine.plot import plot_loss_curve, read_metrics
from maskrcnn.engine.schedule import build_scheduler, lr_factor
from maskrcnn.engine.train import (
    RunExistsError,
    TrainingInterrupted,
    _check_config,
    load_backbone_weights,
    load_init_weights,
    train,
)
from maskrcnn.modeling.backbone import ResNet
from maskrcnn.modeling.build import build_model
from maskrcnn.modeling.rcnn import MaskRCNN
from maskrcnn.weights import CheckpointError, load_model, read_checkpoint, save_checkpoint

# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny model and an in-memory dataset
# ------------------------------------------------------------------------------------------------


class Rectangles(torch.utils.data.Dataset):
    """``n`` images ``size (h, w)`` of noise with one or two filled rectangles; the colour is the class.

    Same interface as :class:`maskrcnn.data.coco.CocoDataset` as far as training uses it: ``(image,
    target)`` items, ``num_classes``, ``category_ids``, ``class_names`` and ``image_info(i)`` (for the
    loader's aspect-ratio grouping). Items are flipped at random (``flip``), so the data path draws
    random numbers like the real one.
    """

    COLORS = ((0.9, 0.2, 0.2), (0.2, 0.3, 0.9), (0.2, 0.8, 0.3))

    def __init__(self, n: int = 8, size: tuple[int, int] = (64, 80), num_classes: int = 3, flip: float = 0.5):
        g = torch.Generator().manual_seed(1234)
        h, w = size
        self.size = size
        self.items = []
        for i in range(n):
            image = torch.rand(3, h, w, generator=g) * 0.3
            boxes, labels, masks = [], [], []
            for _ in range(1 + i % 2):
                bw, bh = (int(torch.randint(16, 40, (), generator=g)) for _ in range(2))
                x1 = int(torch.randint(0, w - bw, (), generator=g))
                y1 = int(torch.randint(0, h - bh, (), generator=g))
                label = int(torch.randint(1, num_classes, (), generator=g))
                image[:, y1 : y1 + bh, x1 : x1 + bw] = torch.tensor(self.COLORS[label - 1]).view(3, 1, 1)
                mask = torch.zeros(h, w, dtype=torch.uint8)
                mask[y1 : y1 + bh, x1 : x1 + bw] = 1
                boxes.append([x1, y1, x1 + bw, y1 + bh])
                labels.append(label)
                masks.append(mask)
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "masks": torch.stack(masks),
                "image_id": i,
            }
            self.items.append((image, target))
        self.num_classes = num_classes
        self.category_ids = list(range(1, num_classes))
        self.class_names = ["background"] + [f"class{c}" for c in self.category_ids]
        self.flip = RandomHorizontalFlip(flip)

    def __len__(self) -> int:
        return len(self.items)

    def image_info(self, index: int) -> dict:
        return {"id": index, "height": self.size[0], "width": self.size[1]}

    def __getitem__(self, index: int):
        image, target = self.items[index]
        target = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        return self.flip(image.clone(), target)


def tiny_model_config(num_classes: int = 3) -> ModelConfig:
    m = get_config("R-18-FPN-small")
    m.num_classes = num_classes
    m.input.min_size = (56, 64)  # multi-scale: the model draws random numbers too
    m.input.max_size = 96
    m.backbone.fpn_channels = 32
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 100, 50
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 50, 20
    m.roi_heads.batch_size_per_image = 32
    m.roi_heads.representation_size = 64
    return m


def tiny_config(output_dir, *, max_iter: int = 6, **top):
    top = {"device": "cpu", "log_period": 1, "checkpoint_period": 3, "keep_checkpoints": 2, **top}
    cfg = make_config(tiny_model_config(), output_dir=str(output_dir), **top)
    cfg.solver = SolverConfig(
        ims_per_batch=2,
        base_lr=0.002,
        reference_batch=2,
        max_iter=max_iter,
        steps=(4,),
        warmup_iters=2,
        warmup_factor=0.1,
    )
    cfg.data.num_workers = 0
    return cfg


@pytest.fixture(scope="module")
def dataset():
    return Rectangles()


pytestmark = pytest.mark.usefixtures("one_thread")


def _interrupt_forward_at(monkeypatch, call: int, make_losses=None):
    """Patch MaskRCNN.forward: the ``call``-th training call raises KeyboardInterrupt, or returns
    ``make_losses(losses)`` when given."""
    original = MaskRCNN.forward
    calls = {"n": 0}

    def forward(self, images, targets=None):
        out = original(self, images, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                if make_losses is None:
                    raise KeyboardInterrupt("simulated interruption")
                return make_losses(out)
        return out

    monkeypatch.setattr(MaskRCNN, "forward", forward)


def _weights(path) -> dict:
    return read_checkpoint(path)["model"]


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def test_lr_factor_warmup_then_steps():
    f = dict(schedule="step", max_iter=40, steps=(20, 30), gamma=0.1, warmup_iters=10, warmup_factor=0.1)
    assert lr_factor(0, **f) == pytest.approx(0.1)
    assert lr_factor(5, **f) == pytest.approx(0.1 * 0.5 + 0.5)  # halfway up the linear ramp
    assert lr_factor(9, **f) == pytest.approx(0.1 * 0.1 + 0.9)
    assert lr_factor(10, **f) == 1.0
    assert lr_factor(19, **f) == 1.0
    assert lr_factor(20, **f) == pytest.approx(0.1)
    assert lr_factor(29, **f) == pytest.approx(0.1)
    assert lr_factor(30, **f) == pytest.approx(0.01)
    assert lr_factor(100, **f) == pytest.approx(0.01)


def test_lr_factor_cosine():
    f = dict(schedule="cosine", max_iter=100, warmup_iters=0)
    assert lr_factor(0, **f) == 1.0
    assert lr_factor(25, **f) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert lr_factor(50, **f) == pytest.approx(0.5)
    assert lr_factor(100, **f) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, **f) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past max_iter
    warm = dict(f, warmup_iters=10, warmup_factor=0.001)
    assert lr_factor(5, **warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.05)) * (0.001 * 0.5 + 0.5))
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, schedule="linear", max_iter=10)


def test_scheduler_follows_lr_factor_and_round_trips(tmp_path):
    solver = SolverConfig(base_lr=0.02, max_iter=12, steps=(6, 9), warmup_iters=4, warmup_factor=0.25)
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=solver.lr, momentum=0.9)
    sched = build_scheduler(opt, solver)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    kw = dict(schedule="step", max_iter=12, steps=(6, 9), gamma=0.1, warmup_iters=4, warmup_factor=0.25)
    assert seen == pytest.approx([0.02 * lr_factor(i, **kw) for i in range(8)])
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=solver.lr)
    sched2 = build_scheduler(opt2, solver)
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # (restored by the optimizer's state_dict)
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.config = ModelConfig()

    def forward(self, x):
        return self.fc(x)


def _small_training_state():
    torch.manual_seed(0)
    model = _Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, SolverConfig(max_iter=10, steps=(5,), warmup_iters=2))
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(2, 4)).square().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]


def test_checkpointer_keeps_last_and_points_at_newest(tmp_path):
    model, opt, sched = _small_training_state()
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.latest() is None
    for it in range(1, 5):
        _step(model, opt, sched)
        path = ck.save(
            Checkpointer.periodic_name(it), model=model, optimizer=opt, scheduler=sched, iteration=it
        )
        assert path == str(tmp_path / f"model_{it:07d}.pt")
        assert ck.latest() == path
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pt", "model_0000004.pt"]
    final = ck.save("model_final", model=model, optimizer=opt, scheduler=sched, iteration=4, extra={"a": 1})
    assert ck.latest() == final == str(tmp_path / "model_final.pt")
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pt"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000003.pt",
        "model_0000004.pt",
        "model_final.pt",
    ]
    # a training checkpoint is also a model checkpoint
    data = read_checkpoint(final)
    assert data["format"] == "maskrcnn" and data["iteration"] == 4 and data["extra"] == {"a": 1}


def test_checkpointer_save_is_atomic(tmp_path, monkeypatch):
    model, opt, sched = _small_training_state()
    ck = Checkpointer(tmp_path, keep=2)
    _step(model, opt, sched)
    good = ck.save("model_0000001", model=model, optimizer=opt, scheduler=sched, iteration=1)
    good_weights = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # dies half-way through writing
        f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="no space"):
        ck.save("model_0000002", model=model, optimizer=opt, scheduler=sched, iteration=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pt"]  # no partial file
    assert ck.latest() == good
    for k, v in read_checkpoint(good)["model"].items():
        assert torch.equal(v, good_weights[k])


def test_checkpointer_resume_restores_everything(tmp_path):
    model, opt, sched = _small_training_state()
    for _ in range(3):
        _step(model, opt, sched)
    ck = Checkpointer(tmp_path, keep=1)
    path = ck.save("model_0000003", model=model, optimizer=opt, scheduler=sched, iteration=3, extra={"x": 2})
    expected_draw = torch.rand(5)
    _step(model, opt, sched)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _small_training_state()
    iteration, extra = ck.load_for_resume(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert (iteration, extra) == (3, {"x": 2})
    assert torch.equal(torch.rand(5), expected_draw)  # the RNG continues where it was saved
    _step(model2, opt2, sched2)  # same data, momentum and lr as the original's 4th step
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_weights[k])
    assert sched2.last_epoch == sched.last_epoch == 4


def test_resume_restores_the_rng_state_of_its_rank(tmp_path, caplog):
    model, opt, sched = _small_training_state()
    states, draws = [], []
    for seed in (10, 11):  # the states of ranks 0 and 1
        torch.manual_seed(seed)
        states.append(capture_rng_state())
        draws.append(torch.rand(4))
    ck = Checkpointer(tmp_path, keep=1)
    path = ck.save(
        "model_0000001", model=model, optimizer=opt, scheduler=sched, iteration=1, rng_states=states
    )
    ck.load_for_resume(path, model=model, optimizer=opt, scheduler=sched, rank=1)
    assert torch.equal(torch.rand(4), draws[1])
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.checkpoint"):
        ck.load_for_resume(path, model=model, optimizer=opt, scheduler=sched, rank=2)
    assert "not for rank 2" in caplog.text


def test_non_finite_weights_are_never_checkpointed(tmp_path, dataset, monkeypatch):
    cfg = tiny_config(tmp_path / "inf", max_iter=4)
    cfg.checkpoint_period = 1
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, closure=None):  # the 2nd update overflows: the loss is finite, the weights are not
        real_step(self, closure)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(float("inf"))

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(FloatingPointError, match="non-finite weights after iteration 2") as info:
        train(cfg, dataset=dataset)
    assert "model_0000001.pt" in str(info.value)
    assert Checkpointer(cfg.output_dir, keep=2).latest().endswith("model_0000001.pt")
    assert not os.path.exists(os.path.join(cfg.output_dir, "model_0000002.pt"))


def test_latest_with_a_dangling_pointer_raises(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pt\n")
    with pytest.raises(FileNotFoundError, match="model_0000009"):
        Checkpointer(tmp_path, keep=1).latest()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_identical(tmp_path, dataset, monkeypatch, num_workers):
    full_cfg = tiny_config(tmp_path / "full")
    full_cfg.data.num_workers = num_workers
    full = train(full_cfg, dataset=dataset)

    cfg = tiny_config(tmp_path / "resumed")
    cfg.data.num_workers = num_workers
    with monkeypatch.context() as m:
        _interrupt_forward_at(m, call=5)  # after the checkpoint at 3 and the log line of 4
        with pytest.raises(KeyboardInterrupt):
            train(cfg, dataset=dataset)
    assert Checkpointer(cfg.output_dir, keep=2).latest().endswith("model_0000003.pt")
    assert not os.path.exists(os.path.join(cfg.output_dir, "model_final.pt"))
    resumed = train(cfg, dataset=dataset, resume=True)

    assert resumed["iteration"] == full["iteration"] == 6
    a, b = _weights(full["final_checkpoint"]), _weights(resumed["final_checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics agree too (iteration 4 of the interrupted run was dropped and logged again)
    full_records, resumed_records = read_metrics(full["metrics"]), read_metrics(resumed["metrics"])
    assert [r["iteration"] for r in resumed_records] == [1, 2, 3, 4, 5, 6]
    again = train(cfg, dataset=dataset, resume=True)  # a finished run: nothing left to do
    assert again["final_checkpoint"] == resumed["final_checkpoint"] and again["iteration"] == 6
    for r, s in zip(full_records, resumed_records):
        assert {k: v for k, v in r.items() if "time" not in k} == {
            k: v for k, v in s.items() if "time" not in k
        }


def _signal_at(monkeypatch, call: int, *signals: int) -> None:
    """The ``call``-th training forward sends this process ``signals`` (as a scheduler or Ctrl-C would)."""

    def send(losses):
        for s in signals:
            os.kill(os.getpid(), s)
        return losses

    _interrupt_forward_at(monkeypatch, call=call, make_losses=send)


def _leftovers(folder) -> list[str]:
    return [n for _, _, names in os.walk(folder) for n in names if ".tmp." in n]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_iteration_with_a_checkpoint_and_resume_is_bit_identical(
    tmp_path, dataset, monkeypatch, signum
):
    full = train(tiny_config(tmp_path / "full"), dataset=dataset)
    cfg = tiny_config(tmp_path / "stopped")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with monkeypatch.context() as m:
        _signal_at(m, 5, signum)  # iteration 5: after the periodic checkpoint of 3
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg, dataset=dataset)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are given back
    stopped = info.value
    assert stopped.exit_code == 128 + signum and stopped.iteration == 5
    assert stopped.checkpoint == Checkpointer(cfg.output_dir, keep=2).latest()
    assert stopped.checkpoint.endswith("model_0000005.pt")  # the iteration in progress was finished
    assert "--resume" in str(stopped) and signal.Signals(signum).name in str(stopped)
    assert [r["iteration"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert not os.path.exists(tmp_path / "stopped" / "model_final.pt") and not _leftovers(tmp_path)

    resumed = train(cfg, dataset=dataset, resume=True)
    a, b = _weights(full["final_checkpoint"]), _weights(resumed["final_checkpoint"])
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def untimed(path):
        return [{k: v for k, v in r.items() if "time" not in k} for r in read_metrics(path)]

    assert untimed(full["metrics"]) == untimed(resumed["metrics"])


def test_a_second_sigint_stops_at_once(tmp_path, dataset, monkeypatch):
    cfg = tiny_config(tmp_path / "run")
    with monkeypatch.context() as m:
        _signal_at(m, 5, signal.SIGINT, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, dataset=dataset)
    assert Checkpointer(cfg.output_dir, keep=2).latest().endswith("model_0000003.pt")  # iteration 5 not kept
    assert not _leftovers(tmp_path)


def test_an_output_dir_holding_another_run_is_refused_unless_resume_or_overwrite(tmp_path, dataset):
    out = tmp_path / "run"
    first = train(tiny_config(out, max_iter=3), dataset=dataset)
    (out / "eval_final").mkdir()  # as an evaluation would have written
    (out / "notes.txt").write_text("the user's own file")
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if (out / n).is_file()}
    with pytest.raises(RunExistsError, match=r"holds another run \(config.yaml, eval_final, last_checkpoint"):
        train(tiny_config(out, max_iter=3), dataset=dataset)
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if (out / n).is_file()} == before  # untouched

    again = train(tiny_config(out, max_iter=2, checkpoint_period=0), dataset=dataset, overwrite=True)
    names = sorted(os.listdir(out))
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) <= 1  # the new run's TensorBoard file (tensorboard installed); the old one is gone
    assert [n for n in names if n not in events] == [
        "config.yaml",
        "last_checkpoint",
        "loss_curve.png",
        "metrics.jsonl",
        "model_final.pt",
        "notes.txt",
    ]  # the old run's periodic checkpoint and evaluation are gone, the user's file stays
    assert read_checkpoint(again["final_checkpoint"])["iteration"] == 2
    assert [r["iteration"] for r in read_metrics(first["metrics"])] == [1, 2]  # the new run's log only
    # a folder where nothing was trained (an empty metrics file, a config) is not another run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text("")
    train(tiny_config(fresh, max_iter=1), dataset=dataset)


def test_resume_refuses_a_changed_model_and_accepts_other_changes(tmp_path, dataset, caplog):
    out = tmp_path / "run"
    train(tiny_config(out, max_iter=3), dataset=dataset)
    changed = tiny_config(out, max_iter=6)
    changed.model.roi_heads.pooler = "pool"
    changed.model.roi_heads.mask_pool_size = 7
    with pytest.raises(CheckpointError) as info:
        train(changed, dataset=dataset, resume=True)
    message = str(info.value)
    assert "model.roi_heads.mask_pool_size: 14 -> 7" in message
    assert "model.roi_heads.pooler: 'align' -> 'pool'" in message
    assert read_checkpoint(out / "model_final.pt")["iteration"] == 3  # nothing was written

    longer = tiny_config(out, max_iter=6, log_period=2)
    with caplog.at_level(logging.INFO, logger="maskrcnn.engine.train"):
        result = train(longer, dataset=dataset, resume=True)
    assert "solver.max_iter: 3 -> 6" in caplog.text and "log_period: 1 -> 2" in caplog.text
    assert result["iteration"] == 6 and read_checkpoint(result["final_checkpoint"])["iteration"] == 6


def test_run_writes_metrics_curve_config_and_checkpoints(tmp_path, dataset, caplog):
    cfg = tiny_config(tmp_path / "run", max_iter=4, keep_checkpoints=1)
    cfg.model.num_classes = 7  # the dataset says 3: taken from the dataset, with a message
    cfg.checkpoint_period = 1
    cfg.log_period = 2
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.train"):
        result = train(cfg, dataset=dataset)
    assert "model.num_classes=7 does not match the dataset's 3 classes" in caplog.text
    out = tmp_path / "run"
    assert sorted(p for p in os.listdir(out) if p.endswith(".pt")) == ["model_0000003.pt", "model_final.pt"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [2, 4]
    keys = {"iteration", "lr", "loss", "time", "data_time"}
    keys |= {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    for r in records:
        assert set(r) == keys
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-5)
    assert result["losses"]["loss"] == records[-1]["loss"]
    with Image.open(out / "loss_curve.png") as im:
        assert im.size == (960, 540) and im.mode == "RGB"
        assert len({color for _, color in im.getcolors(1 << 24)}) > 5  # lines, not a blank canvas
    saved = load_config_file(str(out / "config.yaml"))
    assert saved.model.num_classes == 3
    expected = tiny_config(tmp_path / "run", max_iter=4, keep_checkpoints=1)
    expected.model.num_classes, expected.checkpoint_period, expected.log_period = 3, 1, 2
    assert saved == expected
    model = load_model(result["final_checkpoint"])  # the final checkpoint is a usable model file
    assert model.config.num_classes == 3


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, dataset, monkeypatch):
    cfg = tiny_config(tmp_path / "nan", max_iter=4)
    cfg.checkpoint_period = 2

    def poison(losses):
        return {**losses, "loss_mask": losses["loss_mask"] * float("nan")}

    _interrupt_forward_at(monkeypatch, call=3, make_losses=poison)
    good = os.path.join(cfg.output_dir, "model_0000002.pt")
    with pytest.raises(FloatingPointError) as info:
        train(cfg, dataset=dataset)
    message = str(info.value)
    assert "non-finite loss at iteration 3" in message
    assert "loss_mask=nan" in message and "loss=nan" in message
    assert good in message
    assert sorted(p for p in os.listdir(cfg.output_dir) if p.endswith(".pt")) == ["model_0000002.pt"]
    assert Checkpointer(cfg.output_dir, keep=2).latest() == good
    model = load_model(good)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_train_on_coco_files_with_periodic_and_final_evaluation(tmp_path, caplog):
    from maskrcnn.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=4, num_val=2, image_size=(64, 64))
    cfg = tiny_config(tmp_path / "run", max_iter=2, eval_period=1, checkpoint_period=0)
    for key, value in paths.items():
        setattr(cfg.data, key, value)
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.train"):
        result = train(cfg)  # dataset from cfg.data: 3 shape categories + background
    assert "using 4" in caplog.text
    assert set(result["eval"]) == {"bbox", "segm"} and "AP50" in result["eval"]["bbox"]
    records = read_metrics(result["metrics"])
    evals = [r for r in records if "eval" in r]
    assert [r["iteration"] for r in evals] == [1, 2]
    assert evals[-1]["eval"] == result["eval"]
    assert os.path.isfile(tmp_path / "run" / "eval_final" / "metrics.json")
    assert sorted(p for p in os.listdir(tmp_path / "run") if p.endswith(".pt")) == ["model_final.pt"]


def test_broken_data_stops_before_training(tmp_path):
    from maskrcnn.data.coco import DatasetError
    from maskrcnn.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=0, image_size=(64, 64))
    os.remove(os.path.join(paths["train_images"], sorted(os.listdir(paths["train_images"]))[0]))
    cfg = tiny_config(tmp_path / "run")
    cfg.data.train_images, cfg.data.train_annotations = paths["train_images"], paths["train_annotations"]
    with pytest.raises(DatasetError):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "last_checkpoint")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixed_precision_training_and_resume_on_cuda(tmp_path, dataset, amp):
    cfg = tiny_config(tmp_path / amp, max_iter=4, device="cuda")
    cfg.solver.amp, cfg.solver.clip_grad_norm, cfg.checkpoint_period = amp, 5.0, 2
    result = train(cfg, dataset=dataset)
    assert all(math.isfinite(v) for v in result["losses"].values())
    assert (read_checkpoint(result["final_checkpoint"])["scaler"] is not None) == (amp == "float16")
    (tmp_path / amp / "last_checkpoint").write_text("model_0000002.pt\n")  # resume from iteration 2
    resumed = train(cfg, dataset=dataset, resume=True)
    assert resumed["iteration"] == 4
    assert [r["iteration"] for r in read_metrics(resumed["metrics"])] == [1, 2, 3, 4]


def test_amp_on_cpu_and_uneven_batches_are_errors(tmp_path, dataset):
    cfg = tiny_config(tmp_path / "amp")
    cfg.solver.amp = "bfloat16"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(cfg, dataset=dataset)
    cfg.solver.amp = "fp8"
    with pytest.raises(ValueError, match="solver.amp='fp8': expected one of"):
        train(cfg, dataset=dataset)
    cfg.solver.amp = "off"
    cfg.solver.ims_per_batch = 3
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        _check_config(cfg, world_size=2, device=torch.device("cpu"))


def test_injected_model_must_match_the_dataset(tmp_path, dataset):
    model = build_model(tiny_model_config(num_classes=5))
    with pytest.raises(ValueError, match="predicts 5 classes but the dataset has 3"):
        train(tiny_config(tmp_path / "x"), dataset=dataset, model=model)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------


def test_finetune_from_other_classes_reinitialises_class_layers(tmp_path, dataset, caplog):
    torch.manual_seed(1)
    source = build_model(tiny_model_config(num_classes=5))
    src_path = tmp_path / "coco.pt"
    save_checkpoint(src_path, source)
    src = source.state_dict()

    cfg = tiny_config(tmp_path / "ft", max_iter=0, init_weights=str(src_path))
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.train"):
        result = train(cfg, dataset=dataset)
    assert "re-initialised the class-specific layers" in caplog.text
    for name in ("cls_score.weight", "bbox_pred.bias", "mask_fcn_logits.weight"):
        assert name in caplog.text
    loaded = _weights(result["final_checkpoint"])
    reinit = [
        k for k in loaded if k.startswith(("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_"))
    ]
    assert len(reinit) == 6
    for k, v in loaded.items():
        if k in reinit:
            assert v.shape[0] in (3, 12) and v.shape != src[k].shape
        else:
            assert torch.equal(v, src[k]), k


def test_init_weights_with_other_mismatches_is_an_error(tmp_path):
    other = tiny_model_config(num_classes=5)
    other.roi_heads.representation_size = 32
    path = tmp_path / "other.pt"
    save_checkpoint(path, build_model(other))
    model = build_model(tiny_model_config(num_classes=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"roi_heads\.box_head\.fc6\.weight"):
        load_init_weights(model, str(path))
    for k, v in model.state_dict().items():  # nothing loaded
        assert torch.equal(v, before[k])


def test_init_backbone_from_an_imagenet_checkpoint(tmp_path):
    torch.manual_seed(2)
    classifier = ResNet(depth=18, norm="bn", frozen_stages=0)
    state = dict(classifier.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(tiny_model_config())
    load_backbone_weights(model, str(path))
    body = model.backbone.body.state_dict()
    for k, v in body.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, state[k]), k


# ------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------


def test_plot_loss_curve_draws_every_series(tmp_path):
    records = [
        {"iteration": i, "loss": 2.0 / i, "loss_a": 1.0 / i, "loss_b": 1.0 / i, "lr": 0.1}
        for i in range(1, 30)
    ]
    records.append({"iteration": 10, "eval": {"bbox": {"AP": 0.1}}})
    records.append({"iteration": 30, "loss": float("nan"), "loss_a": 1.0, "loss_b": float("inf")})
    path = plot_loss_curve(records, tmp_path / "c.png")
    with Image.open(path) as im:
        colors = {color for _, color in im.getcolors(1 << 24)}
    assert (0, 0, 0) in colors  # the total loss
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # loss_a and loss_b
    plot_loss_curve([], tmp_path / "empty.png")  # no data yet: still a valid image
    assert Image.open(tmp_path / "empty.png").size == (960, 540)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_metrics_file_tolerates_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 1, "loss": 1.0}) + "\n" + '{"iteration": 2, "lo')
    assert read_metrics(path) == [{"iteration": 1, "loss": 1.0}]
