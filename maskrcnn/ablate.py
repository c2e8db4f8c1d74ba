"""``maskrcnn ablate``: the paper's Table 2 in miniature, re-run on the synthetic shapes data.

Each table compares variants of one design choice (paper section 4.2, R-50-C4 / R-50-FPN on COCO minival):

- ``2b`` mask loss: independent per-class sigmoid masks vs a softmax over classes (multinomial), and
  class-specific vs class-agnostic masks (the paper's text: 29.7 vs 30.3 AP);
- ``2c`` RoI feature extraction: RoIPool, RoIWarp (max / average), RoIAlign (max / average), on one
  stride-16 map (the paper's R-50-C4; here ``backbone.kind='c4'`` with the MLP box head);
- ``2d`` RoIPool vs RoIAlign on one stride-32 map (the paper's R-50-C5; here ``backbone.kind='c5'``);
- ``2e`` mask branch: the MLP (fc 1024 -> 1024 -> classes x 28 x 28) vs the FCN.

Every variant is the demo's model (:func:`maskrcnn.demo.demo_config`: a half-width ResNet-18-FPN from
scratch) with one change, trained on the same data with the same schedule and seeds, and evaluated on
the same held-out split (box and mask AP, AP50, AP75). RoIAlign is the paper's (``aligned=False``, no
half-pixel offset) in every variant. 2b uses the FPN form where the paper used C4, and 2c pools the C4
form's stride-16 map with the FPN model's heads: the paper's res5 head on every RoI costs more than this
budget allows; the note under each table says so.

Output (``--output-dir``, default ``runs/ablate``): ``data/`` (the shapes data), ``runs/<variant>-s<seed>/``
(each a resumable training run with its ``result.json``), ``ablations.json`` (every run's metrics),
``ablations.md`` (a table per paper table: mean +- std over seeds beside the paper's numbers, and whether
the paper's direction holds: a difference counts beyond twice the combined spread of the seeds and of the
val images, the latter from a paired bootstrap over the val images, :func:`_image_noise`) and
``ablations.png`` (mask AP and AP75 per variant). A finished run is not
run again; an interrupted one resumes from its last checkpoint, so rerunning the same command continues. A
finished run asked for on another val split (``--num-val``) is evaluated again from its ``model_final.pt``
(into ``eval_val<N>/``; its ``result.json`` keeps the earlier scores), not retrained; runs of another
schedule or training set (``--iters``, ``--num-train``) are refused, never mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from maskrcnn.atomic import atomic_write
from maskrcnn.config import Config, ConfigError, ModelConfig, SolverConfig, apply_overrides, config_from_dict

__all__ = ["TABLES", "Variant", "Table", "ablation_config", "run_ablation", "write_report"]

_METRICS = ("AP", "AP50", "AP75")
BOOTSTRAP_SAMPLES = 100  # val splits drawn for the image noise of each comparison


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: ``key`` names its runs' folders; ``overrides`` are ``KEY=VALUE`` strings applied to
    :func:`ablation_config`; ``paper`` is the paper's mask (AP, AP50, AP75) in points, None where it gives
    none (AP50/AP75 None where the paper gives AP only)."""

    key: str
    label: str
    overrides: tuple[str, ...]
    paper: tuple[float | None, float | None, float | None] | None


@dataclasses.dataclass(frozen=True)
class Table:
    """A paper table: its variants and the comparisons the paper draws (``(a, b, kind)``: ``">"`` means
    variant ``a`` beats ``b``, ``"~"`` that they are about equal)."""

    key: str
    title: str
    paper_setting: str
    variants: tuple[Variant, ...]
    claims: tuple[tuple[str, str, str], ...]
    note: str = ""


_BASE = Variant("align-avg", "RoIAlign (avg), sigmoid, class-specific, FCN", (), None)
_ONE_MAP_ANCHORS = "model.rpn.anchor_sizes=((24, 48, 96, 192, 384),)"
_C4 = ("model.backbone.kind=c4", "model.roi_heads.box_head=mlp", _ONE_MAP_ANCHORS)
_C5 = ("model.backbone.kind=c5", _ONE_MAP_ANCHORS)

TABLES: dict[str, Table] = {
    t.key: t
    for t in (
        Table(
            key="2b",
            title="Multinomial vs. independent masks; class-specific vs. class-agnostic",
            paper_setting="R-50-C4",
            variants=(
                Variant(
                    "softmax",
                    "softmax (multinomial)",
                    ("model.roi_heads.mask_loss=softmax",),
                    (24.8, 44.1, 25.1),
                ),
                dataclasses.replace(_BASE, label="sigmoid (independent)", paper=(30.3, 51.2, 31.5)),
                Variant(
                    "agnostic",
                    "sigmoid, class-agnostic",
                    ("model.roi_heads.class_agnostic_mask=true",),
                    (29.7, None, None),
                ),
            ),
            claims=(("align-avg", "softmax", ">"), ("align-avg", "agnostic", "~")),
            note="FPN model here (the paper: C4). Class-agnostic AP from the paper's text (no AP50/AP75).",
        ),
        Table(
            key="2c",
            title="RoIAlign vs. RoIPool and RoIWarp",
            paper_setting="R-50-C4",
            variants=(
                Variant(
                    "c4-pool", "C4, RoIPool (max)", (*_C4, "model.roi_heads.pooler=pool"), (26.9, 48.8, 26.4)
                ),
                Variant(
                    "c4-warp-max",
                    "C4, RoIWarp (max)",
                    (*_C4, "model.roi_heads.pooler=warp_max"),
                    (27.2, 49.2, 27.1),
                ),
                Variant(
                    "c4-warp-avg",
                    "C4, RoIWarp (avg)",
                    (*_C4, "model.roi_heads.pooler=warp_avg"),
                    (27.1, 48.9, 27.1),
                ),
                Variant(
                    "c4-align-max",
                    "C4, RoIAlign (max)",
                    (*_C4, "model.roi_heads.pooler=align_max"),
                    (30.2, 51.0, 31.8),
                ),
                Variant("c4-align-avg", "C4, RoIAlign (avg)", _C4, (30.3, 51.2, 31.5)),
            ),
            claims=(
                ("c4-align-avg", "c4-pool", ">"),
                ("c4-align-avg", "c4-warp-avg", ">"),
                ("c4-align-max", "c4-warp-max", ">"),
                ("c4-align-max", "c4-align-avg", "~"),
            ),
            note=(
                "Half-width ResNet-18-C4: every head pools the one stride-16 res4 map, as in the paper; the"
                " heads are the FPN model's (MLP box head, FCN mask head), not the paper's res5 per RoI"
                " (3.3x the time per iteration here). On the FPN model most of these objects are pooled"
                " from P2 (stride 4), where the choice of pooler did not matter within this budget."
            ),
        ),
        Table(
            key="2d",
            title="RoIAlign vs. RoIPool on one stride-32 map (R-C5)",
            paper_setting="R-50-C5",
            variants=(
                Variant("c5-pool", "C5, RoIPool", (*_C5, "model.roi_heads.pooler=pool"), (23.6, 46.5, 21.6)),
                Variant("c5-align", "C5, RoIAlign", _C5, (30.9, 51.8, 32.1)),
            ),
            claims=(("c5-align", "c5-pool", ">"),),
            note="Half-width ResNet-18-C5: one stride-32 map; a 30-100 px shape spans 1-3 cells of it.",
        ),
        Table(
            key="2e",
            title="Mask branch: MLP vs. FCN",
            paper_setting="R-50-FPN",
            variants=(
                Variant(
                    "mlp",
                    "MLP (fc 1024, 1024, 4x28x28)",
                    ("model.roi_heads.mask_head=mlp",),
                    (31.5, 53.7, 32.8),
                ),
                dataclasses.replace(_BASE, label="FCN (4 convs + deconv)", paper=(33.6, 55.2, 35.3)),
            ),
            claims=(("align-avg", "mlp", ">"),),
            note="The FCN's convolutions are 64 wide here (the paper: 256); the MLP's layers 1024, as in the"
            " paper.",
        ),
    )
}
TABLE_CHOICES = (*TABLES, "all")


def ablation_config(output_dir: str, *, iters: int, seed: int, overrides=(), device: str = "auto") -> Config:
    """The run config of one ablation run: the demo's model at half width, its mask head 64 wide (the demo's:
    32), with the paper's RoIAlign (``aligned=False``; the demo uses ``True``), ``iters`` iterations with the
    learning rate dropped x0.1 at 85% and 95%, on the shapes data in ``output_dir/data``; ``overrides``
    (``KEY=VALUE``) are the variant's change."""
    from maskrcnn.demo import demo_config

    cfg = demo_config(output_dir)
    cfg.model.backbone.base_channels = 32
    cfg.model.roi_heads.aligned = False
    # the FCN mask head 64 wide (the demo's is 32): 32 wide, the default ran 65 instead of ~75 minutes but the
    # seeds spread more, and 2c's RoIAlign-over-RoIPool fell inside it (benchmarks/RESULTS.md, Table 2).
    # Pinned here, so that a change to the demo does not change the ablation unseen
    cfg.model.roi_heads.mask_head_channels = 64
    s = cfg.solver
    s.max_iter = iters
    s.warmup_iters = min(50, max(1, iters // 5))
    s.steps = tuple(sorted({max(1, round(iters * 0.85)), max(1, round(iters * 0.95))}))
    cfg.seed = seed
    cfg.device = device
    cfg.checkpoint_period = max(20, iters // 4)  # resumable mid-run
    cfg.keep_checkpoints = 1
    cfg.log_period = max(1, min(20, iters // 10))
    cfg.tensorboard = False
    return apply_overrides(cfg, list(overrides))


def _selected(table: str) -> list[Table]:
    if table not in TABLE_CHOICES:
        raise ValueError(f"--table must be one of {', '.join(TABLE_CHOICES)}, got {table!r}")
    return list(TABLES.values()) if table == "all" else [TABLES[table]]


def _unique_variants(tables: list[Table]) -> list[Variant]:
    """Each distinct variant once (the default model appears in several tables and is trained once)."""
    seen: dict[str, Variant] = {}
    for t in tables:
        for v in t.variants:
            seen.setdefault(v.key, v)
    return list(seen.values())


def _check_run_config(run_dir: str, cfg: Config) -> None:
    """Refuse (``ValueError`` naming the file and keys) a finished run whose saved ``config.yaml`` has another
    model, solver or seed than ``cfg``: the variants' definitions or the demo's model may have changed since
    it was trained. Paths and the device may differ (a moved folder, another machine)."""
    import yaml

    from maskrcnn.engine.checkpoint import config_differences

    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as fh:
            saved = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(
            f"{path}: cannot read the finished run's config ({e}); use another --output-dir"
        ) from None
    try:  # keys added since it was written read as their defaults, as when its checkpoint is loaded
        then = {
            "model": dataclasses.asdict(config_from_dict(saved.get("model") or {}, ModelConfig())),
            "solver": dataclasses.asdict(config_from_dict(saved.get("solver") or {}, SolverConfig())),
            "seed": saved.get("seed"),
        }
    except (ConfigError, KeyError) as e:
        raise ValueError(f"{path}: the finished run's config is not one this version reads ({e})") from None
    now = dataclasses.asdict(cfg)
    changed = config_differences(then, {k: now[k] for k in then})
    if changed:
        shown = "; ".join(changed[:4]) + (f"; {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ValueError(
            f"{path}: the finished run was trained with other settings ({shown}); use another --output-dir"
        )


def _read_result(path: str, expected: dict) -> dict | None:
    """A finished run's ``result.json``, or None if there is none. A result of other training settings
    (another ``--iters`` or ``--num-train``, another variant definition) raises ``ValueError`` naming the
    file: never mixed in. (Its ``num_val`` may differ: such a run is evaluated again, not retrained.)"""
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        result = json.load(fh)
    differing = [k for k, v in expected.items() if result.get(k) != v]
    if differing:
        shown = ", ".join(
            f"{k}: {'not recorded' if k not in result else repr(result[k])} here, {expected[k]!r} asked"
            for k in differing
        )
        hint = (
            "; add the value you ran it with to the file if you know it"
            if any(k not in result for k in differing)
            else ""
        )
        raise ValueError(f"{path} holds a run of other settings ({shown}); use another --output-dir{hint}")
    return result


def _scores(metrics: dict) -> dict:
    """The box and mask AP, AP50 and AP75 of an evaluation's metrics (fractions)."""
    return {task: {k: metrics[task][k] for k in _METRICS} for task in ("bbox", "segm")}


def _evaluate_again(run_dir: str, cfg: Config, num_val: int) -> dict:
    """Box and mask metrics of a finished run's ``model_final.pt`` on the val split of ``cfg`` (now
    ``num_val`` images), written to ``run_dir/eval_val<num_val>/`` (the run's own ``eval_final/`` is kept)."""
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.distributed import resolve_device
    from maskrcnn.engine.evaluate import evaluate
    from maskrcnn.weights import load_model

    weights = os.path.join(run_dir, "model_final.pt")
    if not os.path.isfile(weights):
        raise ValueError(
            f"{weights} is missing: the finished run cannot be evaluated on {num_val} val images"
        )
    model = load_model(weights, device=str(resolve_device(cfg.device)))
    dataset = CocoDataset(image_dir=cfg.data.val_images, annotation_file=cfg.data.val_annotations)
    return evaluate(  # as the run's own final evaluation did (one process: its whole batch)
        model,
        dataset,
        batch_size=cfg.solver.ims_per_batch,
        num_workers=cfg.data.num_workers,
        output_dir=os.path.join(run_dir, f"eval_val{num_val}"),
        progress=False,
    )


def _calibrate(cfgs: dict[str, Config], steps: int = 2) -> dict[str, float]:
    """Seconds per training iteration of each config's model (by variant key) on the first training batch,
    on the config's device (one warm-up step, then the mean of ``steps``): the basis of the time estimate
    printed before the ablation starts. Variants differ in cost (RoIPool's gather, the MLP mask head)."""
    import torch

    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.loader import collate
    from maskrcnn.engine.distributed import resolve_device
    from maskrcnn.modeling.build import build_model

    first = next(iter(cfgs.values()))
    data = CocoDataset(image_dir=first.data.train_images, annotation_file=first.data.train_annotations)
    batch = collate([data[i] for i in range(min(len(data), first.solver.ims_per_batch))])
    seconds = {}
    for key, cfg in cfgs.items():
        device = resolve_device(cfg.device)
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch[1]]
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[key] = statistics.mean(times[1:])
    return seconds


def run_ablation(
    *,
    table: str = "all",
    seeds: int = 2,
    iters: int = 350,
    output_dir: str = "runs/ablate",
    device: str = "auto",
    num_train: int = 400,
    num_val: int = 50,
) -> dict:
    """Train and evaluate every run of ``table`` (``"2b" .. "2e"`` or ``"all"``) for seeds ``0 .. seeds-1``,
    then write ``ablations.json``, ``ablations.md`` and ``ablations.png`` under ``output_dir``. Returns the
    JSON's content. ``num_train`` / ``num_val``: synthetic images per split (tests use fewer)."""
    from maskrcnn.data.shapes import make_shapes_dataset
    from maskrcnn.engine.train import train

    tables = _selected(table)
    if seeds < 1 or iters < 1:
        raise ValueError(f"--seeds and --iters must be >= 1, got {seeds} and {iters}")
    variants = _unique_variants(tables)
    runs = [(v, s) for v in variants for s in range(seeds)]

    def run_dir(v: Variant, s: int) -> str:
        return _run_dir(output_dir, v.key, s)

    def settings(v: Variant, s: int) -> dict:
        return {
            "variant": v.key,
            "overrides": list(v.overrides),
            "seed": s,
            "iters": iters,
            "num_train": num_train,
        }

    done = {
        (v.key, s): _read_result(os.path.join(run_dir(v, s), "result.json"), settings(v, s)) for v, s in runs
    }
    for v, s in runs:
        if done[(v.key, s)] is not None:
            _check_run_config(
                run_dir(v, s), ablation_config(output_dir, iters=iters, seed=s, overrides=v.overrides)
            )
    todo = [(v, s) for v, s in runs if done[(v.key, s)] is None]
    # the data after the results are read: a folder of other settings is refused before anything is written
    print(f"[ablate] synthetic shapes data -> {os.path.join(output_dir, 'data')}")
    make_shapes_dataset(
        os.path.join(output_dir, "data"), num_train=num_train, num_val=num_val, image_size=(256, 256), seed=0
    )
    # finished runs scored on another val split (another --num-val): their final model is evaluated again
    again = [
        (v, s) for v, s in runs if done[(v.key, s)] is not None and done[(v.key, s)].get("num_val") != num_val
    ]
    # evaluating a run: ~3 s to load, ~0.065 s per val image for inference and COCO scoring (the demo's
    # half-width model on 2 cores of an AMD EPYC with AVX2; 33 s for 500 images)
    eval_seconds = 3 + 0.065 * num_val
    if todo:
        per_iter = _calibrate(
            {
                v.key: ablation_config(output_dir, iters=iters, seed=0, overrides=v.overrides, device=device)
                for v in {v.key: v for v, _ in todo}.values()
            }
        )
        # + ~27 s per run on a 2-core CPU for building, the data check and checkpoints, and the evaluation
        estimate = sum(iters * per_iter[v.key] + 27 + eval_seconds for v, _ in todo)
        print(
            f"[ablate] {len(runs)} runs ({len(variants)} variants x {seeds} seed(s), {iters} iterations"
            f" each), {len(runs) - len(todo)} already done; {min(per_iter.values()):.2f}-"
            f"{max(per_iter.values()):.2f} s per iteration measured here: about {estimate / 60:.0f} min"
            f" for the {len(todo)} to run"
        )
    if again:
        print(
            f"[ablate] {len(again)} finished run(s) were scored on another val split: evaluating their final"
            f" models on these {num_val} val images (not retraining): about"
            f" {len(again) * eval_seconds / 60:.0f} min"
        )
    for i, (v, s) in enumerate(again):
        cfg = ablation_config(output_dir, iters=iters, seed=s, overrides=v.overrides, device=device)
        t0 = time.time()
        metrics = _evaluate_again(run_dir(v, s), cfg, num_val)
        previous = done[(v.key, s)]
        earlier = {k: previous[k] for k in ("num_val", "bbox", "segm") if k in previous}
        record = {
            **previous,
            "num_val": num_val,
            **_scores(metrics),
            "earlier_evals": [*previous.get("earlier_evals", []), earlier],
        }
        with atomic_write(os.path.join(run_dir(v, s), "result.json"), "w") as fh:
            json.dump(record, fh, indent=1)
        done[(v.key, s)] = record
        print(f"[ablate] evaluated {i + 1}/{len(again)}: {v.key} (seed {s}) in {time.time() - t0:.0f} s")
    start = time.time()
    for i, (v, s) in enumerate(todo):
        elapsed = time.time() - start
        left = f", ~{elapsed / i * (len(todo) - i) / 60:.0f} min left" if i else ""
        print(f"[ablate] run {i + 1}/{len(todo)}: {v.key} (seed {s}): {v.label}{left}")
        cfg = ablation_config(output_dir, iters=iters, seed=s, overrides=v.overrides, device=device)
        cfg.output_dir = run_dir(v, s)
        t0 = time.time()
        result = train(cfg, resume=True)  # its own folder: continues an interrupted run, else starts one
        record = {
            **settings(v, s),
            "minutes": round((time.time() - t0) / 60, 2),
            "num_val": num_val,
            **_scores(result["eval"]),
        }
        with atomic_write(os.path.join(run_dir(v, s), "result.json"), "w") as fh:
            json.dump(record, fh, indent=1)
        done[(v.key, s)] = record

    summary = {
        "tables": [t.key for t in tables],
        "seeds": seeds,
        "iters": iters,
        "num_train": num_train,
        "num_val": num_val,
        "runs": [done[(v.key, s)] for v, s in runs],
    }
    # ~0.35 ms per val image and draw to re-accumulate one run's matches (pycocotools on 2 cores of an AMD
    # EPYC with AVX2: 0.8 min for the default's 22 runs on 50 val images, 6.3 min on 500)
    minutes = len(runs) * BOOTSTRAP_SAMPLES * num_val * 0.00035 / 60
    print(
        f"[ablate] how much each comparison moves with the val images: {BOOTSTRAP_SAMPLES} draws of the"
        f" {num_val} val images, every run scored on each (about {max(minutes, 0.1):.1f} min)"
    )
    summary["image_noise"] = _image_noise(summary, output_dir)
    summary["bootstrap_samples"] = BOOTSTRAP_SAMPLES
    write_report(summary, output_dir)
    print(f"[ablate] {os.path.join(output_dir, 'ablations.md')} (+ ablations.json, ablations.png)")
    return summary


def _run_dir(output_dir: str, key: str, seed: int) -> str:
    return os.path.join(output_dir, "runs", f"{key}-s{seed}")


def _detections_file(output_dir: str, record: dict) -> str:
    """A run's detections on the val split its ``result.json`` was scored on (a finished run scored again
    on another split keeps them in ``eval_val<N>/``)."""
    sub = f"eval_val{record['num_val']}" if "earlier_evals" in record else "eval_final"
    return os.path.join(_run_dir(output_dir, record["variant"], record["seed"]), sub, "coco_results.json")


def _image_noise(summary: dict, output_dir: str, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """How much each claim's difference moves with the val images: a paired bootstrap. ``samples`` splits
    are drawn with replacement from the val images, every run is scored on each (the same draws for all),
    and for each claim ``(a, b)`` of the summary's tables the std over the draws of (a's mean mask AP over
    seeds - b's) is returned, in points: ``{"a|b": {"AP": std, "AP75": std}}``. Missing detections: ``{}``.
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO

    from maskrcnn.engine.evaluate import results_object
    from maskrcnn.engine.resample import Resampler

    claims = {(a, b) for key in summary["tables"] for a, b, _ in TABLES[key].claims}
    wanted = {k for pair in claims for k in pair}
    records = [r for r in summary["runs"] if r["variant"] in wanted]
    missing = [f for f in (_detections_file(output_dir, r) for r in records) if not os.path.isfile(f)]
    if missing:
        print(f"[ablate] the val images' noise is left out: {missing[0]} is missing")
        return {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(os.path.join(output_dir, "data", "annotations", "instances_val.json"))
    n = len(gt.getImgIds())
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    totals: dict[str, np.ndarray] = {}
    for r in records:
        with open(_detections_file(output_dir, r)) as fh:
            resampler = Resampler(gt, results_object(gt, json.load(fh), "segm"), "segm")
        scores = np.array([resampler.ap(picks)[::2] for picks in draws])  # [samples, (AP, AP75)]
        totals[r["variant"]] = totals.get(r["variant"], 0) + scores / summary["seeds"]
    out = {}
    for a, b in sorted(claims):
        std = 100 * (totals[a] - totals[b]).std(axis=0, ddof=1)
        out[f"{a}|{b}"] = {"AP": round(float(std[0]), 3), "AP75": round(float(std[1]), 3)}
    return out


def _stats(summary: dict, key: str, task: str, metric: str) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed) of a variant's metric, in points."""
    values = [100 * r[task][metric] for r in summary["runs"] if r["variant"] == key]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _judge(summary: dict, a: str, b: str, kind: str, label: dict[str, str]) -> str:
    """Whether the paper's claim holds here, in mask AP (and AP75 for '>'): a difference counts when it is
    larger than twice the combined spread of the seeds (each variant's std) and of the val images (the
    paired bootstrap of :func:`_image_noise`, where the summary has it); with one seed, at least 1 AP point.
    "About equal" holds within that noise, or within 1 point."""
    parts = []
    for metric in ("AP", "AP75") if kind == ">" else ("AP",):
        (ma, sa), (mb, sb) = _stats(summary, a, "segm", metric), _stats(summary, b, "segm", metric)
        diff = ma - mb
        images = summary.get("image_noise", {}).get(f"{a}|{b}", {}).get(metric, 0.0)
        if summary["seeds"] > 1:
            noise = 2 * math.sqrt(sa**2 + sb**2 + images**2)
        else:
            noise = max(1.0, 2 * images)
        if kind == ">":
            verdict = (
                "holds" if diff > noise else ("same direction, within noise" if diff > 0 else "does not hold")
            )
        else:
            noise = max(noise, 1.0)
            verdict = "holds" if abs(diff) <= noise else "does not hold"
        parts.append(f"{metric} {diff:+.1f} ({verdict}; noise {noise:.1f})")
    relation = "beats" if kind == ">" else "is about equal to"
    return f"{label[a]} {relation} {label[b]}: " + ", ".join(parts)


def write_report(summary: dict, output_dir: str) -> None:
    """``ablations.json``, ``ablations.md`` and ``ablations.png`` from :func:`run_ablation`'s summary."""
    with atomic_write(os.path.join(output_dir, "ablations.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    seeds = summary["seeds"]
    lines = [
        "# Table 2 in miniature",
        "",
        f"Mask R-CNN ablations on the synthetic shapes data ({summary['num_train']} training and"
        f" {summary['num_val']} val images, 256 px): half-width ResNet-18 from scratch (FPN unless the"
        " table says C4 or C5),"
        f" {summary['iters']} iterations, batch 4, {seeds} seed(s). Mask and box AP x 100 on the val split,"
        " mean"
        + (" +- std over seeds" if seeds > 1 else "")
        + "; the paper's mask AP / AP50 / AP75 on COCO minival beside them.",
        "A difference counts when it exceeds its noise: twice the combined spread of the seeds and of the val"
        " images (a paired bootstrap over the val images"
        + (f", {summary['bootstrap_samples']} draws" if "bootstrap_samples" in summary else "")
        + "; at least 1 AP point with one seed).",
    ]

    def cell(key: str, task: str, metric: str) -> str:
        mean, std = _stats(summary, key, task, metric)
        return f"{mean:.1f} +- {std:.1f}" if seeds > 1 else f"{mean:.1f}"

    for key in summary["tables"]:
        t = TABLES[key]
        label = {v.key: v.label for v in t.variants}
        lines += ["", f"## Table {t.key}: {t.title} (paper: {t.paper_setting})", ""]
        lines += [
            "| variant | mask AP | mask AP50 | mask AP75 | box AP | paper mask AP / AP50 / AP75 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for v in t.variants:
            paper = " / ".join("–" if x is None else f"{x:.1f}" for x in v.paper) if v.paper else "–"
            lines.append(
                f"| {v.label} | {cell(v.key, 'segm', 'AP')} | {cell(v.key, 'segm', 'AP50')} |"
                f" {cell(v.key, 'segm', 'AP75')} | {cell(v.key, 'bbox', 'AP')} | {paper} |"
            )
        lines.append("")
        lines += [f"- {_judge(summary, a, b, kind, label)}" for a, b, kind in t.claims]
        if t.note:
            lines.append(f"- Note: {t.note}")
    with atomic_write(os.path.join(output_dir, "ablations.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(summary, os.path.join(output_dir, "ablations.png"))


def _plot(summary: dict, path: str) -> None:
    """Grouped bars: mask AP and AP75 per variant (error bars: the seeds' std), one group per table."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, ap, ap_err, ap75, ap75_err = [], [], [], [], []
    for key in summary["tables"]:
        for v in TABLES[key].variants:
            names.append(f"{key}: {v.label}")
            (m, s), (m75, s75) = _stats(summary, v.key, "segm", "AP"), _stats(summary, v.key, "segm", "AP75")
            ap.append(m), ap_err.append(s), ap75.append(m75), ap75_err.append(s75)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2), dpi=100)
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], ap, height=0.4, xerr=ap_err, label="mask AP")
    ax.barh([i + 0.2 for i in y], ap75, height=0.4, xerr=ap75_err, label="mask AP75")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel(f"x 100, val split ({summary['num_val']} images)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        f"Table 2 in miniature ({summary['iters']} iterations, {summary['seeds']} seed(s))", fontsize=9
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
