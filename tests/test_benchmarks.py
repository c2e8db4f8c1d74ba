"""``python -m benchmarks``: the machine kind it files results under; it replaces only its own section.
benchmarks/val_noise.py: its bootstrap shortcut against pycocotools from scratch."""

import os

import numpy as np
import pytest

from benchmarks.__main__ import machine_kind, replace_section


def test_machine_kinds_tell_the_three_cpus_apart():
    assert machine_kind("AMD EPYC", "avx2", None) == "AMD EPYC, AVX2"
    assert machine_kind("AMD EPYC 9R14", "avx2 avx512f avx512_bf16", None) == "AMD EPYC, AVX-512"
    xeon = "Intel(R) Xeon(R) Platinum 8488C"
    assert machine_kind(xeon, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile", None) == "Intel Xeon, AMX"
    assert machine_kind(xeon, "avx2 avx512f amx_tile", "NVIDIA H100") == "Intel Xeon, AMX + NVIDIA H100"


def test_a_machines_section_is_replaced_and_everything_else_kept():
    text = "# Results\n\nhand-written notes\n"
    once = replace_section(text, "AMD EPYC, AVX2", "## run 1\n| a |")
    assert (
        once.startswith(text.rstrip())
        and "<!-- bench: AMD EPYC, AVX2 -->\n## run 1\n| a |\n<!-- /bench" in once
    )
    both = replace_section(once, "Intel Xeon, AMX", "## xeon")
    again = replace_section(both, "AMD EPYC, AVX2", "## run 2")
    assert "## run 1" not in again and "## run 2" in again and "## xeon" in again
    assert again.count("<!-- bench:") == 2 and again.startswith("# Results\n\nhand-written notes")
    assert replace_section(again, "Intel Xeon, AMX", "## xeon") == again  # idempotent


def test_gpu_script_runs_every_part_small_on_a_cpu(tmp_path):
    """benchmarks/gpu.py is run once per GPU lease: its code paths are smoke-tested here, small, on the
    CPU (torchvision's columns are left out where it is missing), so the lease is not spent on a typo."""
    from benchmarks.gpu import main

    out = tmp_path / "gpu"
    assert main(["--out", str(out), "--device", "cpu", "--quick", "--runs", "1"]) == 0
    report = (out / "gpu.md").read_text()
    for part in ("tests", "ops", "inference", "train", "profile", "ablate"):
        assert f"### {part} (" in report
    assert "| box head 7x7 | forward+backward |" in report and "| 5000 |" in report
    assert "| maskrcnn fp32 |" in report and "ms per iteration (wall)" in report
    assert "- align-avg: " in report and "- the default (22 runs) at this pace" in report
    assert "Traceback" not in report
    assert main(["--out", str(out), "--device", "cpu", "--parts", "ops,nope"]) == 2


def _coco(images, annotations, detections):
    """pycocotools objects: bbox GT ``{image_id: [xywh, ...]}``, detections ``[(image_id, xywh, score)]``."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    gt = {
        "images": [{"id": i, "height": 100, "width": 100} for i in images],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, b) in enumerate((i, b) for i in images for b in annotations.get(i, []))
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        found = [{"image_id": i, "category_id": 1, "bbox": b, "score": s} for i, b, s in detections]
        dt = coco.loadRes(found)
    return coco, dt


def test_val_noise_resampling_equals_evaluating_the_resampled_split():
    """The bootstrap's shortcut (re-accumulating per-image matches) against pycocotools run from scratch on
    a data set that holds the drawn images under new ids, a repeated image twice."""
    from benchmarks.val_noise import Resampler

    truth = {1: [[10, 10, 30, 30]], 2: [[50, 50, 20, 40], [5, 5, 10, 10]], 3: [[20, 30, 40, 20]]}
    found = [
        (1, [12, 11, 30, 28], 0.9),  # IoU ~0.8
        (1, [60, 60, 20, 20], 0.8),  # a false positive
        (2, [50, 55, 20, 40], 0.7),  # IoU ~0.78
        (2, [5, 5, 12, 12], 0.95),  # IoU ~0.69
        (3, [25, 30, 40, 20], 0.6),  # IoU ~0.78
    ]
    resampler = Resampler(*_coco([1, 2, 3], truth, found), "bbox")
    for picks in ([0, 1, 2], [1], [0, 0, 2], [2, 2, 1, 0, 1]):
        ids = [resampler.img_ids[p] for p in picks]
        # the reference: image k of the drawn split becomes image k + 1 of a new data set
        ref_truth = {k + 1: truth[i] for k, i in enumerate(ids)}
        ref_found = [(k + 1, b, s) for k, i in enumerate(ids) for j, b, s in found if j == i]
        reference = Resampler(*_coco(list(ref_truth), ref_truth, ref_found), "bbox")
        expected = tuple(_summarized(reference.ev).stats[:2])  # pycocotools' own AP and AP50
        assert resampler.ap(np.array(picks)) == pytest.approx(expected, abs=1e-12), picks
    assert resampler.ap(np.array([0, 1, 2]))[0] != resampler.ap(np.array([0, 0, 2]))[0]  # the draw matters


def _summarized(ev):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev.accumulate()
        ev.summarize()
    return ev


def test_syncs_script_counts_our_reads(capsys):
    """benchmarks/syncs.py, ours only and small: a table row with reads per call and per iteration."""
    from tests.common import COCO_MINI

    if not os.path.isdir(COCO_MINI):
        pytest.skip("needs ../shared/data/coco-mini")
    from benchmarks.syncs import main

    shared = os.path.dirname(os.path.dirname(COCO_MINI))
    args = ["--shared", shared, "--no-torchvision", "--images", "1", "--size", "320", "--train-size", "128"]
    assert main(args) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| maskrcnn |")]
    reads, _, per_iteration = (cell.strip() for cell in row.split("|")[2:5])
    assert int(reads.split()[0]) > 0 and int(per_iteration) > 0
