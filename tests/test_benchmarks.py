"""``python -m benchmarks``: the machine kind it files results under; it replaces only its own section.
benchmarks/gpu.py and benchmarks/syncs.py, run small."""

import os

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
    for part in ("tests", "ops", "inference", "train", "profile", "infer_profile", "predict", "ablate"):
        assert f"### {part} (" in report
    assert "| box head 7x7 | forward+backward |" in report and "| 5000 |" in report
    assert "| all 2 images in one call | " in report.split("RPN NMS")[1]  # NMS block sizes on real candidates
    assert "| maskrcnn fp32 |" in report and "ms per iteration (wall)" in report
    assert "host time per stage" in report and "backbone" in report.split("host time per stage")[1]
    assert "| predict, 2 writer(s) | " in report and "| writing in 2 threads | " in report
    assert "- align-avg: " in report and "- the default (22 runs) at this pace" in report
    assert "Traceback" not in report
    assert main(["--out", str(out), "--device", "cpu", "--parts", "ops,nope"]) == 2


def test_syncs_script_counts_our_reads(capsys):
    """benchmarks/syncs.py, ours only and small: a table row with reads per call and per iteration."""
    from tests.common import COCO_MINI

    if not os.path.isdir(COCO_MINI):
        pytest.skip("needs ../shared/data/coco-mini")
    import importlib

    from benchmarks.syncs import main

    nms_module = importlib.import_module("maskrcnn.ops.nms")
    before = (nms_module._iou_gt_torch, nms_module._DEVICE_BLOCK, nms_module._DEVICE_TILE_ELEMS)
    shared = os.path.dirname(os.path.dirname(COCO_MINI))
    args = ["--shared", shared, "--no-torchvision", "--images", "1", "--size", "320", "--train-size", "128"]
    assert main([*args, "--nms-block", "1024"]) == 0
    # its NMS counting and block are this call's only: the suite's later tests see the package unchanged
    assert (nms_module._iou_gt_torch, nms_module._DEVICE_BLOCK, nms_module._DEVICE_TILE_ELEMS) == before
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| maskrcnn |")]
    reads, _, per_iteration, ops, ops_per_iteration = (cell.strip() for cell in row.split("|")[2:7])
    assert int(reads.split()[0]) > 0 and int(per_iteration) > 0
    assert int(ops.split()[0]) > 100 and int(ops_per_iteration) > 100
