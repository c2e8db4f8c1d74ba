"""Every GPU figure of issue 12 in one short run, for the few minutes a GPU machine is lent.

    python3 benchmarks/gpu.py --out DIR [--images DIR] [--quick] [--parts tests,ops,...]

The lent machine has torch and a CUDA torchvision but reaches nothing outside it, and the ../shared beside
the checkout does not travel: first, here, ``sh benchmarks/gpu_prepare.sh`` puts 8 coco-mini images and
the wheels its Python lacks (pycocotools) into ``.gpu/`` (git-ignored); then one device ``run`` with
``carry: [".gpu"]`` and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 timeout 520 python3 benchmarks/gpu.py --out $OUT \
        --images .gpu/images

and copy $OUT/gpu.md into benchmarks/RESULTS.md. The parts, in this order (what a short lease must bring back
first), each on its own so that one failing part still leaves the others' figures (gpu.md is rewritten
after each):

1. ``tests``: the ``gpu`` tests (``pytest -m gpu``), their summary line;
2. ``inference``: R-50-FPN at 800 px with tests/tv_parity.py's seeded weights in both (torchvision's
   layout for torchvision): latency at batch 1 and throughput at batch 8 in float32, bf16 and fp16 (ours:
   ``set_precision``; torchvision: ``torch.autocast`` around the whole forward), peak GPU memory, the
   host-device synchronisations of one batch-1 call (``torch.cuda.set_sync_debug_mode``), and ours against
   torchvision's detections in float32 (count, labels, largest box and score difference);
3. ``train``: benchmarks/train.py ``--device cuda`` (R-50-FPN, batch 8 at 800 px) without AMP and with
   bf16 autocast;
4. ``ops``: RoIAlign (box head 7x7: 512 RoIs x 2 images over P2-P5; mask head 14x14: 64 x 2) forward and
   forward+backward, ours one call per level (the CPU's pooler) and all levels in one pass
   (``roi_align_levels``, the GPU's: is it the faster there?), and NMS on 1,000 / 5,000 boxes: ours
   against ``torchvision.ops`` (CUDA kernels);
   NMS keeps the same boxes as torchvision's or the script says so; and the RPN's NMS on the model's own
   candidates (1 image, the 8 as training's one call) with NMS device blocks of 1024, 2048 and 4096 boxes
   (larger: fewer reads and kernels, bigger IoU tiles; which is the faster there?);
5. ``profile``: one R-50-FPN training iteration of ours under torch.profiler: the kernels by GPU time,
   the iteration's wall time against its GPU time, and its host-device synchronisations;
   ``infer_profile``: one batch-1 inference call of ours and of torchvision likewise, operators by host
   time, with the kernel launch count (is the call bound by the host?);
6. ``predict``: benchmarks/predict.py on the images: ``maskrcnn predict``'s seconds per image with 1 and 4
   writer threads, beside the model alone and the writing alone (does the drawing keep up with a GPU?);
7. ``ablate``: issue 11's GPU budget, ``maskrcnn ablate --table 2e --seeds 1 --device cuda`` timed;
8. ``layout``: ``train``'s first run with ours in NCHW (is channels-last, ``fast_layout``'s choice on CUDA,
   the faster one there?).

Times: median (min-max) of --runs, each call bracketed by ``torch.cuda.synchronize()``, after warm-up.
Writes DIR/gpu.md (machine, command, each part's table) and prints it. ``--device cpu --quick`` runs the
same code small on a CPU (torchvision optional: its columns are left out when it is missing): the smoke
test of tests/test_benchmarks.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PRECISIONS = ("fp32", "bf16", "fp16")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, *, runs: int, warmup: int = 2) -> list[float]:
    """Seconds of ``runs`` calls of ``fn`` after ``warmup`` calls, each bracketed by a device sync."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def fmt_ms(ts: list[float]) -> str:
    return f"{1e3 * statistics.median(ts):.2f} ({1e3 * min(ts):.2f}-{1e3 * max(ts):.2f})"


def _torchvision():
    """torchvision with working compiled ops, or None (its columns are then left out). Where its C++ ops
    do not load with this torch (a CPU machine here), ../shared/tools/tvref's ``install()`` loads them."""
    try:
        import torchvision

        torchvision.ops.nms(*[__import__("torch").zeros(s) for s in ((0, 4), (0,))], 0.5)
        return torchvision
    except Exception:  # missing, or its C++ ops do not load with this torch
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    tvref = os.path.join(ROOT, "..", "shared", "tools", "tvref")
    if not os.path.isdir(tvref):
        return None
    sys.path.insert(0, tvref)
    try:
        import tvref as tvref_module

        return tvref_module.install()
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------- parts


def _run(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in the repository root; past ``timeout`` seconds it is stopped and reported as exit 124 with
    what it printed, so that one slow part cannot spend the lease of the others."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out + f"\n(stopped after {timeout:.0f} s)", "")


def part_tests(args, device, tv) -> list[str]:
    tests = os.path.join(ROOT, "tests")
    files = []  # only the files with gpu tests: the others may import what the GPU machine lacks (starlette)
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as fh:
                if "pytest.mark.gpu" in fh.read():
                    files.append(os.path.join(tests, name))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    proc = _run(cmd, timeout=180)
    tail = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    lines = [f"`{' '.join(['pytest', *cmd[3:6], 'tests/...'])}`: {tail} (exit {proc.returncode})"]
    if proc.returncode not in (0, 5):
        lines += ["", "```", *proc.stdout.strip().splitlines()[-40:], "```"]
    return lines


def part_ops(args, device, tv) -> list[str]:
    import torch

    from benchmarks.ops import make_rois, one_pass, per_level
    from maskrcnn.ops.nms import nms
    from maskrcnn.ops.roi_align import roi_align

    gen = torch.Generator().manual_seed(0)
    scale = 4 if args.quick else 1
    height, width, channels = 800 // scale, 1216 // scale, 256 // scale

    feats = [
        torch.randn(2, channels, height // s, width // s, generator=gen).to(device) for s in (4, 8, 16, 32)
    ]

    # one call per level: torchvision's MultiScaleRoIAlign, our pooler on a CPU; one pass: ours on a GPU
    impls = {"maskrcnn, per level": per_level(roi_align), "maskrcnn, one pass": one_pass}
    if tv is not None:
        impls["torchvision"] = per_level(tv.ops.roi_align)  # the same positional signature
    ours = [n for n in impls if n.startswith("maskrcnn")]
    lines = [
        f"| case | pass | {' | '.join(f'{n} ms' for n in impls)} |"
        + ("".join(f" torchvision / {n} |" for n in ours) if tv is not None else ""),
        "| --- " * (len(impls) + 2 + (len(ours) if tv is not None else 0)) + "|",
    ]
    for case, per_image, size in (("box head 7x7", 512, (7, 7)), ("mask head 14x14", 64, (14, 14))):
        rois, level = make_rois(per_image, height=height, width=width, generator=gen, largest=640 / scale)
        rois, level = rois.to(device), level.to(device)
        for backward in (False, True):

            def run(fn, backward=backward, rois=rois, level=level, size=size):
                leaves = [f.detach().requires_grad_(backward) for f in feats]
                with torch.set_grad_enabled(backward):
                    outs = fn(leaves, rois, level, size)
                    if backward:
                        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

            times = {n: timed(lambda fn=fn: run(fn), device, runs=args.runs) for n, fn in impls.items()}
            row = " | ".join(fmt_ms(t) for t in times.values())
            ratio = "".join(
                f" {statistics.median(times['torchvision']) / statistics.median(times[n]):.2f}x |"
                for n in (ours if tv is not None else [])
            )
            lines.append(f"| {case} | {'forward+backward' if backward else 'forward'} | {row} |{ratio}")
    lines += [
        "",
        f"| NMS boxes | {' | '.join(f'{n} ms' for n in impls)} | same kept boxes |",
        "| --- " * (len(impls) + 2) + "|",
    ]
    for n in (1000, 5000):
        ctr = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(400 / scale), generator=gen))
        boxes, scores = (
            torch.cat([ctr - side / 2, ctr + side / 2], 1).to(device),
            torch.rand(n, generator=gen).to(device),
        )
        fns = {"maskrcnn": nms, **({"torchvision": tv.ops.nms} if tv is not None else {})}
        times = {
            k: timed(lambda f=f, b=boxes, s=scores: f(b, s, 0.7), device, runs=max(args.runs, 7))
            for k, f in fns.items()
        }
        same = torch.equal(nms(boxes, scores, 0.7).cpu(), tv.ops.nms(boxes, scores, 0.7).cpu()) if tv else "-"
        lines.append(f"| {n} | {' | '.join(fmt_ms(t) for t in times.values())} | {same} |")
    return lines + ["", *_nms_blocks(args, device, tv)]


def _nms_blocks(args, device, tv) -> list[str]:
    """The RPN's NMS (one ``batched_nms`` per batch, groups = image x level) on the R-50-FPN's own
    candidates for 1 and 8 images, with NMS's device block of 1024 (the default), 2048 and 4096 boxes:
    larger blocks mean fewer reads and kernels (counted on the CPU: benchmarks/syncs.py) but bigger IoU
    tiles; which is the faster on this GPU?"""
    import importlib

    import torch

    from benchmarks.inference import paired_models
    from maskrcnn.ops.nms import batched_nms

    nms_module = importlib.import_module("maskrcnn.ops.nms")
    rpn_module = importlib.import_module("maskrcnn.modeling.rpn")
    model = paired_models(None, size=320 if args.quick else 800, device=device)["maskrcnn"]
    images, _ = _images(args, device, 2 if args.quick else 8)
    captured = []  # (boxes, scores, groups, iou) of each RPN call (inference batches images of one size)
    original = rpn_module.batched_nms
    rpn_module.batched_nms = lambda *a: captured.append(a) or original(*a)
    try:
        with torch.no_grad():
            model(images)
    finally:
        rpn_module.batched_nms = original
    # the batch as training's one call sees it: every image's candidates, groups numbered per image
    offsets = [0]
    for _, _, groups, _ in captured[:-1]:
        offsets.append(offsets[-1] + int(groups.max()) + 1 if groups.numel() else offsets[-1])
    batch = tuple(
        torch.cat([c[i] + (o if i == 2 else 0) for c, o in zip(captured, offsets)]) for i in range(3)
    )
    cases = [
        ("the first call", captured[0]),
        (f"all {len(images)} images in one call", (*batch, captured[0][3])),
    ]
    block, tile = nms_module._DEVICE_BLOCK, nms_module._DEVICE_TILE_ELEMS
    sizes = (1024, 2048, 4096)
    lines = [
        "RPN NMS (batched, IoU 0.7) on the model's candidates: ms, and host-device synchronisations",
        "",
        f"| candidates | boxes | {' | '.join(f'block {b}' for b in sizes)} |"
        + (" torchvision |" if tv is not None else ""),
        "| --- " * (len(sizes) + 2 + (tv is not None)) + "|",
    ]
    for n, inputs in cases:
        ours = functools.partial(batched_nms, *inputs)
        cells, reference = [], None
        try:
            for b in sizes:
                nms_module._DEVICE_BLOCK, nms_module._DEVICE_TILE_ELEMS = b, max(tile, b * b)
                keep = ours()
                reference = keep if reference is None else reference
                same = "" if torch.equal(keep, reference) else " (other boxes!)"
                t = timed(ours, device, runs=max(args.runs, 5))
                cells.append(f"{fmt_ms(t)}, {_syncs_in(ours)} syncs{same}")
        finally:
            nms_module._DEVICE_BLOCK, nms_module._DEVICE_TILE_ELEMS = block, tile
        if tv is not None:
            cells.append(
                fmt_ms(timed(functools.partial(tv.ops.batched_nms, *inputs), device, runs=max(args.runs, 5)))
            )
        lines.append(f"| {n} | {len(inputs[0])} | {' | '.join(cells)} |")
    return lines


def _images(args, device, n: int):
    import torch

    if args.images and os.path.isdir(args.images):
        from tests.tv_parity import read_image

        files = sorted(f for f in os.listdir(args.images) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        images = [read_image(os.path.join(args.images, f)) for f in files[:n]]
        source = f"{len(images)} images of {args.images}"
    else:
        gen = torch.Generator().manual_seed(0)
        images = [torch.rand(3, 480, 640, generator=gen) for _ in range(n)]
        source = f"{n} random 480x640 images (no --images folder)"
    return [im.to(device) for im in images], source


def _syncs_in(fn) -> int | str:
    """How many host-device synchronisations one call of ``fn`` makes (CUDA only)."""
    import torch

    if not torch.cuda.is_available():
        return "-"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _compare(a: dict, b: dict) -> str:
    """Each of ``a``'s detections matched to ``b``'s nearest of the same label (order may differ where
    scores tie within float noise): how many match within 1 px, the largest box and score differences."""
    import torch

    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return "nothing to compare"
    cost = (a["boxes"][:, None].float() - b["boxes"][None].float()).abs().amax(-1)
    cost[a["labels"][:, None] != b["labels"][None]] = float("inf")
    best, match = cost.min(1)
    found = torch.isfinite(best)
    gap = (a["scores"][found] - b["scores"][match[found]]).abs()
    score = gap.max().item() if found.any() else float("nan")
    return (
        f"{int((best <= 1).sum())} within 1 px of a same-label torchvision box; largest difference of the"
        f" matched {best[found].max().item():.3g} px, score {score:.3g}"
    )


def part_inference(args, device, tv) -> list[str]:
    import torch

    size = 320 if args.quick else 800
    from benchmarks.inference import paired_models

    base = paired_models(tv, size=size, device=device)
    batch = 2 if args.quick else 8
    images, source = _images(args, device, max(batch, 2))
    from maskrcnn.modeling.precision import native_support

    variants = {}
    for prec in PRECISIONS if device.type == "cuda" else ("fp32",):
        if prec != "fp32" and not native_support(prec, device.type)[0]:
            continue
        variants[f"maskrcnn {prec}"] = (copy.deepcopy(base["maskrcnn"]).set_precision(prec), None)
        if "torchvision" in base:
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
            variants[f"torchvision {prec}"] = (base["torchvision"], dtype)

    def call(model, dtype, ims):
        cast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.no_grad(), cast:
            return model(ims)

    lines = [
        f"{source}; short side {size}; batch-1 latency over the images, batch-{batch} throughput.",
        "",
        f"| model | batch 1 ms | batch {batch} images/s | peak memory GiB (batch {batch})"
        " | syncs per batch-1 call |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (model, dtype) in variants.items():
        one = []
        for _ in range(args.runs):
            for im in images:
                warm = 0 if one else 1
                one += timed(lambda im=im, m=model, d=dtype: call(m, d, [im]), device, runs=1, warmup=warm)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        many = timed(lambda m=model, d=dtype: call(m, d, images[:batch]), device, runs=max(2, args.runs))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        syncs = _syncs_in(lambda m=model, d=dtype: call(m, d, images[:1]))
        lines.append(
            f"| {name} | {fmt_ms(one)} | {batch / statistics.median(many):.1f} | {peak:.2f} | {syncs} |"
        )
    if "torchvision" in base:
        lines += [
            "",
            "Ours against torchvision, float32, same weights (TF32 as torch's defaults on both):",
            "",
        ]
        for i, im in enumerate(images[:2]):
            a, b = (call(base[k], None, [im])[0] for k in ("maskrcnn", "torchvision"))
            lines.append(f"- image {i}: {len(a['boxes'])} vs {len(b['boxes'])} detections; {_compare(a, b)}")
    return lines


def part_train(args, device, tv) -> list[str]:
    if device.type != "cuda":
        return ["(CUDA only: benchmarks/train.py times the CPU through tvref)"]
    return [line for amp in ("off", "bfloat16") for line in _train_run(["--amp", amp])]


def part_layout(args, device, tv) -> list[str]:
    """Ours trained in NCHW, beside ``train``'s channels-last (``fast_layout``'s CUDA choice): last, as
    the one figure a short lease can best do without."""
    if device.type != "cuda":
        return ["(CUDA only, as train)"]
    return _train_run(["--amp", "off", "--layout", "nchw"])


def _train_run(options: list[str]) -> list[str]:
    cmd = [sys.executable, "benchmarks/train.py", "--device", "cuda", "--batch", "8", "--size", "800"]
    cmd += ["--iters", "10", *options]
    proc = _run(cmd, timeout=150)
    lines = ["", f"`{' '.join(cmd[1:])}` (exit {proc.returncode})", "", proc.stdout.strip()]
    if proc.returncode:
        lines += ["```", *proc.stderr.strip().splitlines()[-15:], "```"]
    return lines


def part_profile(args, device, tv) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.train import synthetic_batch
    from maskrcnn.config import get_config
    from maskrcnn.modeling.build import build_model

    size, batch = (192, 1) if args.quick else (800, 8)
    cfg = get_config("R-50-FPN")
    cfg.backbone.name = "resnet18" if args.quick else "resnet50"
    cfg.num_classes, cfg.input.min_size, cfg.input.max_size = 5, (size,), 2 * size
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    images, targets = synthetic_batch(batch, size, 0, 5)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def step():
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    wall = timed(step, device, runs=1 if args.quick else 3, warmup=1 if args.quick else 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    on_gpu = device.type == "cuda"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=12 if args.quick else 25)
    busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 if on_gpu else float("nan")
    what = f"{cfg.backbone.name}-FPN, batch {batch} at {size}"
    syncs = _syncs_in(step)  # the CPU estimate of the same: benchmarks/syncs.py
    summary = (
        f"{what}: {fmt_ms(wall)} ms per iteration (wall); GPU busy {busy:.1f} ms of the profiled one;"
        f" host-device synchronisations of one iteration: {syncs}."
    )
    return [summary, "", "```", table, "```"]


@contextlib.contextmanager
def _stages(model):
    """Marks the forwards of ``model``'s stages (``transform``, ``backbone``, ``rpn``, ``roi_heads``: the
    same names in ours and torchvision's) as ``stage: NAME`` ranges for torch.profiler."""
    import torch

    handles, open_ranges = [], {}
    for name in ("transform", "backbone", "rpn", "roi_heads"):
        module = getattr(model, name, None)
        if module is None:
            continue

        def enter(mod, inputs, name=name):
            open_ranges[name] = torch.autograd.profiler.record_function(f"stage: {name}")
            open_ranges[name].__enter__()

        def leave(mod, inputs, output, name=name):
            open_ranges.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def part_infer_profile(args, device, tv) -> list[str]:
    """Where a batch-1 R-50-FPN inference call spends its time, ours beside torchvision: wall against GPU
    busy time, kernel launches, and the operators by host time (a call far above its GPU time is bound by
    the host: Python, launches or reads)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.inference import paired_models

    size = 320 if args.quick else 800
    models = paired_models(tv, size=size, device=device)
    images, _ = _images(args, device, 1)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    lines = [f"batch 1 at short side {size}, float32, the first image of the inference part.", ""]
    for name, model in models.items():

        def call(model=model):
            with torch.no_grad():
                return model(images[:1])

        wall = timed(call, device, runs=3, warmup=2)
        with _stages(model), profile(activities=activities) as prof:
            call()
            _sync(device)
        events = prof.key_averages()
        stages = [e for e in events if e.key.startswith("stage: ")]
        busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 if on_gpu else float("nan")
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        table = events.table(
            sort_by="self_cpu_time_total", row_limit=8 if args.quick else 30, max_name_column_width=50
        )
        lines += [
            f"{name}: {fmt_ms(wall)} ms per call (wall); GPU busy {busy:.1f} ms; {launches} kernel launches;"
            " host time per stage (the rest: postprocessing outside the stages' forwards): "
            + ", ".join(f"{e.key[7:]} {e.cpu_time_total / 1e3:.1f} ms" for e in stages)
            + ". Operators by self host time:",
            "",
            "```",
            table,
            "```",
            "",
        ]
    return lines


def part_predict(args, device, tv) -> list[str]:
    import tempfile

    from benchmarks.predict import measure

    with tempfile.TemporaryDirectory() as tmp:
        if args.images and os.path.isdir(args.images):
            names = sorted(os.listdir(args.images))
            paths = [os.path.join(args.images, f) for f in names if f.lower().endswith((".jpg", ".png"))][:8]
        else:
            from PIL import Image

            images, _ = _images(args, device, 2)
            paths = []
            for i, im in enumerate(images):
                paths.append(os.path.join(tmp, f"{i}.png"))
                Image.fromarray((im.cpu().permute(1, 2, 0) * 255).byte().numpy()).save(paths[-1])
        lines, _ = measure(
            paths,
            device=str(device),
            runs=args.runs if not args.quick else 1,
            writers=[1, 2] if args.quick else [1, 4],
            size=320 if args.quick else 800,
        )
    return lines


def part_ablate(args, device, tv) -> list[str]:
    """Issue 11's GPU budget: ``maskrcnn ablate --table 2e --seeds 1`` (the FPN default model and the MLP
    mask head, 350 iterations each) on the device; the default's 22 runs take about 11x its time."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ablate-") as out:  # its data and runs (~200 MB), removed after
        cmd = [sys.executable, "-m", "maskrcnn.cli", "ablate", "--table", "2e", "--seeds", "1"]
        cmd += ["--device", device.type, "--output-dir", out]
        if args.quick:
            cmd += ["--iters", "3", "--num-train", "8", "--num-val", "4"]
        t0 = time.time()
        proc = _run(cmd, timeout=240)
        wall = time.time() - t0
        path = os.path.join(out, "ablations.json")
        runs = None
        if proc.returncode == 0 and os.path.exists(path):
            with open(path) as fh:
                runs = json.load(fh)["runs"]
    lines = [f"`{' '.join(['maskrcnn', *cmd[3:]])}`: exit {proc.returncode}, {wall / 60:.2f} min wall"]
    if runs is not None:
        lines += [f"- {r['variant']}: {r['minutes']} min, mask AP {100 * r['segm']['AP']:.1f}" for r in runs]
        lines.append(f"- the default (22 runs) at this pace: about {11 * wall / 60:.0f} min")
    else:
        lines += ["```", *(proc.stdout + proc.stderr).strip().splitlines()[-20:], "```"]
    return lines


PARTS = {  # in order of what a short lease must bring back first
    "tests": part_tests,
    "inference": part_inference,
    "train": part_train,
    "ops": part_ops,
    "profile": part_profile,
    "infer_profile": part_infer_profile,
    "predict": part_predict,
    "ablate": part_ablate,
    "layout": part_layout,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu.md")
    ap.add_argument("--images", default="", help="a folder of JPEG/PNG images (else random images)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        print(f"benchmarks/gpu.py: error: unknown --parts {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    tv = _torchvision()
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none (CPU run)"
    lines = [
        f"## GPU benchmarks: {gpu} ({datetime.date.today().isoformat()})",
        "",
        f"torch {torch.__version__}, torchvision {getattr(tv, '__version__', 'absent')},"
        f" {os.cpu_count()} CPUs;"
        f" command: `python3 benchmarks/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
    ]
    failed = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.parts.split(","):
        print(f"[gpu] {name}", flush=True)
        t0 = time.time()
        try:
            body = PARTS[name](args, device, tv)
        except Exception:  # one broken part must not cost the others' figures
            failed.append(name)
            body = ["```", traceback.format_exc().strip(), "```"]
        lines += ["", f"### {name} ({time.time() - t0:.0f} s)", "", *body]
        with open(os.path.join(args.out, "gpu.md"), "w") as fh:  # after every part: a timeout keeps the rest
            fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        print(f"[gpu] failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
