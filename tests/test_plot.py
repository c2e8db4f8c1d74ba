"""The loss curve (maskrcnn.engine.plot): a PNG of the expected size drawn with matplotlib's Agg renderer,
smoothed, with a log-scale option, written atomically."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
from PIL import Image

from maskrcnn.engine import plot as plot_mod
from maskrcnn.engine.plot import plot_loss_curve, smooth

TAB10 = {"C0": (31, 119, 180), "C1": (255, 127, 14)}


def _records(n: int = 40) -> list[dict]:
    return [
        {"iteration": 20 * i, "loss": 3.0 / i, "loss_a": 2.0 / i, "loss_b": 1.0 / i, "lr": 0.1}
        for i in range(1, n + 1)
    ]


def _colors(path) -> set:
    with Image.open(path) as im:
        return {color for _, color in im.getcolors(1 << 24)}


def test_a_png_of_the_expected_size_with_every_series(tmp_path):
    path = plot_loss_curve(_records(), tmp_path / "sub" / "loss_curve.png")  # folders made
    assert path == str(tmp_path / "sub" / "loss_curve.png")
    with Image.open(path) as im:
        im.verify()  # a complete, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (960, 540) and im.mode == "RGB"
    colors = _colors(path)
    assert (0, 0, 0) in colors and TAB10["C0"] in colors and TAB10["C1"] in colors  # loss, loss_a, loss_b
    assert Image.open(plot_loss_curve(_records(), tmp_path / "small.png", size=(400, 300))).size == (400, 300)


def test_odd_records_one_point_and_nothing_logged(tmp_path):
    records = _records(3) + [
        {"iteration": 70, "eval": {"bbox": {"AP": 0.1}}},  # evaluation records are not losses
        {"iteration": 80, "loss": float("nan"), "loss_a": 1.0, "loss_b": float("inf")},
        {"loss": 1.0},  # no iteration
    ]
    plot_loss_curve(records, tmp_path / "odd.png")
    plot_loss_curve([{"iteration": 5, "loss": 1.0}], tmp_path / "one.png")  # a single point: a marker
    assert (0, 0, 0) in _colors(tmp_path / "one.png")
    plot_loss_curve([], tmp_path / "empty.png")  # no data yet: still a valid image
    assert Image.open(tmp_path / "empty.png").size == (960, 540)


def test_log_scale(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    scales = []
    real = Axes.set_yscale
    monkeypatch.setattr(Axes, "set_yscale", lambda self, v, **kw: (scales.append(v), real(self, v, **kw)))
    records = _records() + [{"iteration": 900, "loss": 0.0, "loss_a": -1.0, "loss_b": 1e-4}]
    linear = plot_loss_curve(records, tmp_path / "linear.png")
    log = plot_loss_curve(records, tmp_path / "log.png", log_scale=True)  # zero and negative left out
    assert scales == ["log"]
    assert Image.open(log).size == (960, 540)
    assert Image.open(log).tobytes() != Image.open(linear).tobytes()
    plot_loss_curve([{"iteration": 1, "loss": 0.0}], tmp_path / "none.png", log_scale=True)  # nothing >0


def test_smoothing():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    s = smooth([0.0, 10.0, 0.0, 10.0], 0.6)
    assert s[0] == 0 and 0 < s[1] < 10 and max(s) - min(s) < 10  # flattened
    with pytest.raises(ValueError, match="smoothing"):
        smooth([1.0], 1.0)


def test_a_failure_leaves_the_old_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "loss_curve.png"
    plot_loss_curve(_records(5), path)
    before = path.read_bytes()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    def broken(self, *args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(FigureCanvasAgg, "draw", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        plot_loss_curve(_records(), path)
    monkeypatch.undo()

    real_write = plot_mod.atomic_write

    class Full:
        def write(self, data):
            raise OSError("no space left on device")

    @contextlib.contextmanager
    def dies_while_writing(p, mode="w"):  # the disk fills half-way through the file
        with real_write(p, mode) as fh:
            fh.write(b"\x89PNG partial")
            yield Full()

    monkeypatch.setattr(plot_mod, "atomic_write", dies_while_writing)
    with pytest.raises(OSError, match="no space"):
        plot_loss_curve(_records(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["loss_curve.png"]  # no temporary file left


def test_no_display_and_no_pyplot(tmp_path):
    """Agg through the object API: works without a display and leaves pyplot (a user's backend) alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    records = [{"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 0.5}]
    code = (
        "import sys; from maskrcnn.engine.plot import plot_loss_curve; "
        f"plot_loss_curve({records!r}, {str(tmp_path / 'c.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert Image.open(tmp_path / "c.png").size == (960, 540)
