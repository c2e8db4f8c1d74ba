"""Where a demo training iteration spends its time: data loading, each forward stage, backward, optimizer.

Runs the demo's exact model, data pipeline (CocoDataset of the synthetic shapes, loader with the demo's
workers) and solver on a small generated split, and reports per-iteration medians over --iters
iterations after --warmup: data wait, forward of backbone (ResNet body, FPN), RPN, box branch (pooler,
head, predictor), mask branch (pooler, head, predictor), the losses' remainder, backward, optimizer step.
Forward stages are timed with module hooks (the CPU runs synchronously). With --ops, the top operators of
whole iterations (forward and backward together) by self CPU time, from torch.profiler, and the
convolutions' forward and backward grouped by shape (which layer costs what).

    .venv/bin/python benchmarks/profile_demo.py [--iters 20] [--warmup 5] [--ops] [--weights W] \
        [--layout auto|nchw|channels-last] [KEY=VALUE ...]

--layout sets the training layout (default: ``maskrcnn.modeling.rcnn.fast_layout``'s choice for this CPU);
the report's first line names the one in effect.

--weights starts from a trained checkpoint of the same model (e.g. a demo run's ``train/model_final.pt``)
instead of the initialisation: late in training most proposals overlap objects, so the RoI heads see many
more positives (mask targets and mask head run on each) than in the first iterations.

KEY=VALUE overrides the demo's run config (e.g. model.roi_heads.batch_size_per_image=32), to measure a
change before training with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.train import LAYOUTS, training_layout  # noqa: E402

STAGES = {
    "backbone.body": "backbone: ResNet body",
    "backbone.fpn": "backbone: FPN",
    "rpn": "RPN (head, anchors, proposals, losses)",
    "roi_heads.box_pooler": "box pooler (RoIAlign)",
    "roi_heads.box_head": "box head",
    "roi_heads.box_predictor": "box predictor",
    "roi_heads.mask_pooler": "mask pooler (RoIAlign)",
    "roi_heads.mask_head": "mask head",
    "roi_heads.mask_predictor": "mask predictor",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ops", action="store_true", help="also the top operators (torch.profiler)")
    ap.add_argument("--weights", help="a checkpoint of the same model to start from (default: its init)")
    ap.add_argument("--layout", default="auto", choices=LAYOUTS, help="the training layout")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-demo-") as tmp:  # its data and run folder, removed after
        profile(args, tmp)


def profile(args, tmp: str) -> None:
    import torch

    from maskrcnn.config import apply_overrides
    from maskrcnn.data.loader import build_train_loader
    from maskrcnn.data.shapes import make_shapes_dataset
    from maskrcnn.demo import demo_config
    from maskrcnn.engine.schedule import build_scheduler
    from maskrcnn.engine.train import build_train_dataset
    from maskrcnn.modeling.build import build_model

    cfg = apply_overrides(demo_config(tmp), args.overrides)
    make_shapes_dataset(os.path.join(tmp, "data"), num_train=64, num_val=0, image_size=(256, 256), seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.training_layout = training_layout(args.layout)
    model.train()
    if args.weights:
        from maskrcnn.weights import load_state_dict_strict, read_checkpoint

        load_state_dict_strict(model, read_checkpoint(args.weights)["model"], source=args.weights)
    s = cfg.solver
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    scheduler = build_scheduler(optimizer, s)
    dataset = build_train_dataset(cfg)
    loader = build_train_loader(
        dataset,
        batch_size=s.ims_per_batch,
        num_workers=cfg.data.num_workers,
        seed=0,
        rank=0,
        world_size=1,
        start_iter=0,
        aspect_ratio_grouping=True,
    )
    batches = iter(loader)

    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    modules = dict(model.named_modules())
    if "backbone.body" not in modules:  # C4 / C5 forms: the ResNet is the whole backbone
        modules["backbone.body"] = modules["backbone"]
    for name in [n for n in STAGES if n in modules]:  # a C4 model has no FPN, its res5 head no mask head

        def pre(module, inputs, name=name):
            started[name] = time.perf_counter()

        def post(module, inputs, output, name=name):
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

        modules[name].register_forward_pre_hook(pre)
        modules[name].register_forward_hook(post)

    positives: list[int] = []  # RoIs the mask branch pooled per iteration (training: the positives)
    if "roi_heads.mask_pooler" in modules:
        modules["roi_heads.mask_pooler"].register_forward_pre_hook(
            lambda module, inputs: positives.append(sum(len(b) for b in inputs[1]))
        )

    rows: dict[str, list[float]] = {}

    def iteration(record: bool) -> None:
        spent.clear()
        t0 = time.perf_counter()
        images, targets = next(batches)
        t1 = time.perf_counter()
        losses = model(images, targets)
        loss = sum(losses.values())
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
        t3 = time.perf_counter()
        optimizer.step()
        scheduler.step()
        t4 = time.perf_counter()
        if record:
            parts = {"data wait": t1 - t0, **{STAGES[k]: spent.get(k, 0.0) for k in STAGES}}
            parts["forward: rest (transform, sampling, targets, losses)"] = (t2 - t1) - sum(spent.values())
            parts["backward (+ gradient clipping)"] = t3 - t2
            parts["optimizer step"] = t4 - t3
            parts["whole iteration"] = t4 - t0
            for k, v in parts.items():
                rows.setdefault(k, []).append(v)

    for _ in range(args.warmup):
        iteration(False)
    for _ in range(args.iters):
        iteration(True)
    recorded = positives[-args.iters :]

    total = statistics.median(rows["whole iteration"])
    layout = "channels-last" if model.layout == torch.channels_last else "NCHW"
    print(
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, {args.iters} iterations, medians, "
        f"training in {layout}"
    )
    if recorded:
        print(f"positive RoIs per iteration (mask branch): median {statistics.median(recorded):g}")
    print("| part | ms | share |\n| --- | --- | --- |")
    for k, v in rows.items():
        m = statistics.median(v)
        print(f"| {k} | {m * 1000:.1f} | {m / total:.0%} |")

    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        runs = 5
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(runs):
                iteration(False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        # which convolutions: forward and backward grouped by input and weight shape (the layer they are)
        wrappers = ("aten::conv2d", "aten::conv_transpose2d", "aten::convolution", "aten::_convolution")
        convs = [
            e
            for e in prof.key_averages(group_by_input_shape=True)
            if "conv" in e.key and e.key not in wrappers
        ]
        convs.sort(key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in convs) / runs / 1000
        print(f"convolutions: {total:.1f} ms per iteration (self CPU), the largest by shape:")
        print(
            "| op | ms per iteration | calls per iteration | input, weight (backward: grad output, input) |"
        )
        print("| --- | --- | --- | --- |")
        for e in convs[:15]:
            shapes = ", ".join(str(list(x)) for x in e.input_shapes[:2])
            ms = e.self_cpu_time_total / runs / 1000
            print(f"| {e.key.removeprefix('aten::')} | {ms:.1f} | {e.count / runs:g} | {shapes} |")


if __name__ == "__main__":
    main()
