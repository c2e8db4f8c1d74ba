import pytest

from maskrcnn import progress as progress_mod
from maskrcnn.progress import Progress, iterate_with_progress


@pytest.fixture
def clock(monkeypatch):
    """A fake perf_counter: 10 s per call, stderr not a terminal."""
    monkeypatch.setattr(progress_mod.time, "perf_counter", iter(range(0, 10_000, 10)).__next__)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False, raising=False)


def test_plain_lines_every_interval_and_at_the_end(clock, capsys):
    p = Progress(10, desc="train", initial=4, interval=25)
    for i in range(6):
        p.update(1, status=f"loss {i}")
    p.close()
    lines = capsys.readouterr().err.splitlines()
    # the clock moves 10 s per call: lines after 30 s, 60 s, and the last step; 10 s per iteration
    assert lines == [
        "train: 7/10 (70%), 10.00 s/it, eta 30s, loss 2",
        "train: 10/10 (100%), 10.00 s/it, done in 1m00s, loss 5",
    ]


def test_iterating_ends_with_a_line_and_disabled_shows_nothing(clock, capsys):
    assert list(iterate_with_progress(range(3), total=3, desc="evaluate", interval=1e9)) == [0, 1, 2]
    assert capsys.readouterr().err.strip() == "evaluate: 3/3 (100%), 10.00 s/it, done in 30s"
    p = Progress(2, desc="x", enabled=False)
    p.update(2)
    assert capsys.readouterr().err == "" and p.count == 2


def test_fast_steps_still_in_seconds_per_step(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod.time, "perf_counter", iter(x / 100 for x in range(1000)).__next__)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False, raising=False)
    p = Progress(100, desc="predict", interval=0.05)
    for _ in range(5):
        p.update()
    assert capsys.readouterr().err.splitlines() == ["predict: 5/100 (5%), 0.0100 s/it, eta 1s"]


def test_no_timed_lines_with_interval_none_and_write_only_without_a_bar(clock, capsys, monkeypatch):
    p = Progress(3, desc="train", interval=None)  # training: its own lines every log_period
    for _ in range(3):
        p.update(1, status="loss 1")
    p.write("train: 3/3, loss 1")
    assert capsys.readouterr().err == "train: 3/3, loss 1\n"
    Progress(3, desc="train", enabled=False).write("hidden")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True, raising=False)
    p = Progress(3, desc="train", interval=None)  # a terminal: the bar, no lines
    assert p.shows_bar
    p.update(1, status="loss 1")
    p.write("not shown")
    p.close()
    err = capsys.readouterr().err
    assert "1/3" in err and "not shown" not in err
