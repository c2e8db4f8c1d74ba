"""``python -m benchmarks`` (``make bench``): every speed benchmark side by side with torchvision, one report.

Runs, each in its own process with tvref's Python (torchvision's genuine kernels; ``$TVREF_PYTHON``, default
/tmp/tvref-venv/bin/python, made by ``sh ../shared/tools/tvref/setup.sh``):

- ``benchmarks/ops.py``: RoIAlign forward+backward and NMS (median and min-max of --runs);
- ``benchmarks/roi_pool.py``: RoIPool forward and forward+backward on the ablation's maps;
- ``benchmarks/inference.py --bf16``: R-50-FPN at 800 px on coco-mini, per stage, with a bf16 column where
  the CPU has native bfloat16;
- ``benchmarks/train.py``: a training iteration, side by side (and ``--device cuda`` with and without AMP
  where CUDA is present).

It prints the machine (CPU model and its SIMD flags, GPU, torch version, date), each script's command and
tables, and with ``--write`` puts them into benchmarks/RESULTS.md as the section of this machine kind
(between ``<!-- bench: KIND -->`` markers; that section alone is replaced, everything else kept).

    .venv/bin/python -m benchmarks [--quick] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")


def cpu_description() -> tuple[str, str]:
    """(model name, the SIMD flags that decide oneDNN's kernels) from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown CPU", set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("", "unknown CPU", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return model, " ".join(simd) or "none of avx2/avx512/amx"


def machine_kind(model: str, simd: str, gpu: str | None) -> str:
    """A short name per kind of machine: the CPU's make, its widest SIMD, and the GPU if any."""
    make = "Intel Xeon" if "Intel" in model else ("AMD EPYC" if "AMD" in model else model)
    width = "AMX" if "amx_tile" in simd else ("AVX-512" if "avx512f" in simd else "AVX2")
    return f"{make}, {width}" + (f" + {gpu}" if gpu else "")


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _runs(quick: bool, gpu: bool) -> list[list[str]]:
    runs = [
        ["benchmarks/ops.py", "--runs", "3" if quick else "5"],
        ["benchmarks/roi_pool.py", "--runs", "3" if quick else "5"],
        ["benchmarks/inference.py", "--bf16", "--images", "2" if quick else "8"],
        ["benchmarks/train.py", "--iters", "5" if quick else "10"],
    ]
    if gpu:
        runs += [
            ["benchmarks/train.py", "--device", "cuda", "--iters", "10"],
            ["benchmarks/train.py", "--device", "cuda", "--iters", "10", "--amp", "bfloat16"],
        ]
    return runs


def replace_section(text: str, kind: str, body: str) -> str:
    """``text`` with the section of ``kind`` (between its markers) replaced by ``body``, or appended."""
    start, end = f"<!-- bench: {kind} -->", f"<!-- /bench: {kind} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs and images (a smoke test)")
    ap.add_argument("--write", action="store_true", help="put the report into benchmarks/RESULTS.md")
    args = ap.parse_args()
    python = os.environ.get("TVREF_PYTHON", "/tmp/tvref-venv/bin/python")
    if not os.path.exists(python):
        print(
            f"python -m benchmarks: error: {python} not found: create tvref's environment with "
            "`sh ../shared/tools/tvref/setup.sh` (or set TVREF_PYTHON)",
            file=sys.stderr,
        )
        return 2
    model, simd = cpu_description()
    gpu = _gpu()
    kind = machine_kind(model, simd, gpu)
    import torch

    lines = [
        f"## Benchmarks on {kind} ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {model} ({os.cpu_count()} CPUs; {simd}){f'; GPU: {gpu}' if gpu else ''}; torch "
        f"{torch.__version__}. Made by `python -m benchmarks{' --quick' if args.quick else ''}`; each "
        "script's own command is above its output.",
    ]
    failed = []
    for cmd in _runs(args.quick, gpu is not None):
        print(f"[bench] {' '.join(cmd)}", flush=True)
        proc = subprocess.run([python, *cmd], cwd=ROOT, capture_output=True, text=True)
        out = proc.stdout.strip()
        if proc.returncode != 0:
            failed.append(cmd[0])
            out += f"\n(exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]})"
        print(out, flush=True)
        lines += ["", f"### `{' '.join(cmd)}`", "", out]
    report = "\n".join(lines) + "\n"
    if args.write:
        with open(RESULTS) as fh:
            text = fh.read()
        from maskrcnn.atomic import atomic_write

        with atomic_write(RESULTS, "w") as fh:
            fh.write(replace_section(text, kind, report))
        print(f"[bench] written to {RESULTS} (section: {kind})")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
