"""What a training run tells people: log lines every log_period iterations without a terminal, the tqdm
bar on one, and TensorBoard event files (their scalars read back with TensorBoard's own reader)."""

from __future__ import annotations

import glob
import logging
import os
import re
import sys

import pytest
import torch

from maskrcnn import progress as progress_mod
from maskrcnn.engine.logs import log_line, peak_memory
from maskrcnn.engine.train import RunExistsError, train
from tests.test_train import Rectangles, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(
    r"^train: (?P<it>\d+)/(?P<max>\d+) \(\d+%\), "
    r"loss (?P<loss>\d+\.\d{3}) \((?P<named>(\w+ \d+\.\d{3}(, )?)+)\), "
    r"lr (?P<lr>[0-9.e-]+), (?P<sit>\d+\.\d+) s/it \(data \d+\.\d+\), "
    r"eta (?P<eta>\d+[hms]\S*), peak memory (?P<mem>\d+) MiB \(CPU RSS\)$"
)


def _events(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder``, as TensorBoard reads them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def dataset():
    return Rectangles()


def test_without_a_terminal_one_line_every_log_period_and_at_the_end(tmp_path, dataset, capsys):
    assert not sys.stderr.isatty()  # captured
    result = train(
        tiny_config(tmp_path / "run", max_iter=5, log_period=2, tensorboard=False), dataset=dataset
    )
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m["it"]) for m in matches] == [2, 4, 5] and {m["max"] for m in matches} == {"5"}
    names = {part.split()[0] for part in matches[0]["named"].split(", ")}
    assert names == {"rpn_cls", "rpn_box", "cls", "box", "mask"}
    assert float(matches[-1]["loss"]) == pytest.approx(result["losses"]["loss"], abs=1e-3)
    assert matches[-1]["eta"] == "0s" and int(matches[0]["mem"]) > 0
    assert float(matches[0]["sit"]) > 0
    assert _events(tmp_path / "run") == []  # tensorboard=False: no event files


def test_on_a_terminal_the_bar_and_no_lines(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True, raising=False)
    train(tiny_config(tmp_path / "run", max_iter=2, tensorboard=False), dataset=dataset)
    err = capsys.readouterr().err
    assert "\r" in err and "2/2" in err  # tqdm's redraws
    assert "peak memory" not in err


def test_log_line_fields_and_peak_memory():
    record = {"iteration": 30, "lr": 0.02, "loss": 1.5, "loss_cls": 1.0, "loss_box": 0.5, "time": 2.0}
    record["data_time"] = 0.05
    line = log_line(record, 100, torch.device("cpu"))
    assert line.startswith("train: 30/100 (30%), loss 1.500 (cls 1.000, box 0.500), lr 0.02, ")
    assert "2.00 s/it (data 0.0500), eta 2m20s, peak memory " in line and line.endswith(" MiB (CPU RSS)")
    mib, what = peak_memory(torch.device("cpu"))
    assert what == "CPU RSS" and 1 < mib < 1e6  # MiB, not KiB or bytes


def test_tensorboard_scalars_resume_and_overwrite(tmp_path, caplog):
    from maskrcnn.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=4, num_val=2, image_size=(64, 64))
    out = tmp_path / "run"
    cfg = tiny_config(out, max_iter=3, log_period=2, eval_period=2, checkpoint_period=2)
    for key, value in paths.items():
        setattr(cfg.data, key, value)
    result = train(cfg)
    (first,) = _events(out)
    scalars = _scalars(out)
    for tag in ("train/loss", "train/loss_mask", "train/lr", "train/time"):
        assert [step for step, _ in scalars[tag]] == [2, 3], tag
    assert scalars["train/loss"][-1][1] == pytest.approx(result["losses"]["loss"], rel=1e-5)
    assert [step for step, _ in scalars["eval/bbox/AP"]] == [2, 3]  # periodic and final evaluation
    assert scalars["eval/segm/AP50"][-1][1] == pytest.approx(result["eval"]["segm"]["AP50"], rel=1e-5)
    first_bytes = open(first, "rb").read()

    # as if it had stopped before the final checkpoint: resumed from iteration 2, in a new event file;
    # the old file is kept, its step 3 hidden (the resumed run logs at 4 and 5)
    os.remove(out / "model_final.pt")
    (out / "last_checkpoint").write_text("model_0000002.pt\n")
    cfg.solver.max_iter = 5
    train(cfg, resume=True)
    files = _events(out)
    assert len(files) == 2 and first in files and open(first, "rb").read() == first_bytes
    scalars = _scalars(out)
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 5]
    assert [step for step, _ in scalars["eval/bbox/AP"]] == [2, 4, 5]

    with pytest.raises(RunExistsError) as info:  # the message names the run's files, not the event files
        train(cfg)
    assert "events.out" not in str(info.value)

    # overwrite deletes the run's event files with the rest; the key off writes none
    cfg.tensorboard = False
    cfg.eval_period = 0
    cfg.solver.max_iter = 1
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.train"):
        train(cfg, overwrite=True)
    assert "events.out.tfevents." in caplog.text  # named among the deleted files
    assert _events(out) == []


def test_without_tensorboard_one_info_line_and_no_files(tmp_path, dataset, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger="maskrcnn.engine.logs"):
        train(tiny_config(tmp_path / "run", max_iter=1), dataset=dataset)
    messages = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.INFO
    assert "pip install tensorboard" in messages[0].getMessage()
    assert _events(tmp_path / "run") == []


def test_the_tensorboard_key(tmp_path):
    from maskrcnn.config import ConfigError, apply_overrides, load_config_file, make_config
    from maskrcnn.engine.train import save_config

    cfg = make_config("R-18-FPN-small")
    assert cfg.tensorboard is True
    cfg = apply_overrides(cfg, ["tensorboard=false"])  # as `maskrcnn train ... tensorboard=false`
    assert cfg.tensorboard is False
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config_file(str(tmp_path / "config.yaml")) == cfg  # the run's config.yaml round-trips
    with pytest.raises(ConfigError, match="tensorboard=3: expected true or false"):
        make_config("R-18-FPN-small", tensorboard=3)
