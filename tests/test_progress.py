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
        "train: 10/10 (100%), 10.00 s/it, loss 5",
    ]


def test_iterating_ends_with_a_line_and_disabled_shows_nothing(clock, capsys):
    assert list(iterate_with_progress(range(3), total=3, desc="evaluate", interval=1e9)) == [0, 1, 2]
    assert capsys.readouterr().err.strip() == "evaluate: 3/3 (100%), 10.00 s/it"
    p = Progress(2, desc="x", enabled=False)
    p.update(2)
    assert capsys.readouterr().err == "" and p.count == 2
