"""The training loop: :func:`train`, one explicit function from a :class:`~maskrcnn.config.Config` to
checkpoints, metrics and a loss curve in ``cfg.output_dir``.

Files written (by rank 0)::

    config.yaml          the effective config (readable by maskrcnn.config.load_config_file)
    metrics.jsonl        one JSON object per line: every cfg.log_period iterations {"iteration", "lr",
                         "loss", "loss_*", "time", "data_time"} (averages over the window and the
                         processes; times in seconds per iteration), and {"iteration", "eval": {...}}
    loss_curve.png       the losses of metrics.jsonl, redrawn at each checkpoint and at the end
    model_{iter:07d}.pt  periodic checkpoints (the last cfg.keep_checkpoints are kept), model_final.pt
    last_checkpoint      the name of the newest checkpoint; train(cfg, resume=True) continues from it
    events.out.tfevents.*  TensorBoard event files (the values of metrics.jsonl: losses, lr and times
                         every cfg.log_period iterations, AP at each evaluation), unless cfg.tensorboard
                         is off or the tensorboard package is not installed

Progress on stderr: a tqdm bar on a terminal; otherwise (CI, nohup, a cluster job's log) one line every
cfg.log_period iterations and at the end with the losses, lr, s/it, ETA and peak memory
(:mod:`maskrcnn.engine.logs`).

Choices, stated once: SGD with momentum and the same weight decay on every trainable parameter (norm
layers and biases included, as torchvision's reference scripts; the frozen BatchNorms have no trainable
parameters); the learning rate of ``cfg.solver.lr`` (linear scaling rule) with the warmup and decay of
:mod:`maskrcnn.engine.schedule`; an iteration is one batch of ``cfg.solver.ims_per_batch`` images over all
processes. A run resumed with ``resume=True`` is bit-identical to an uninterrupted one on the same
hardware (weights, optimizer and scheduler state, RNG states of every process, data order).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from maskrcnn.atomic import atomic_write
from maskrcnn.config import Config, validate_config
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import (
    Checkpointer,
    capture_rng_state,
    config_differences,
    restore_rng_state,
    unwrap,
)
from maskrcnn.engine.interrupt import StopRequest, TrainingInterrupted
from maskrcnn.engine.logs import EventWriter, log_line
from maskrcnn.engine.plot import plot_loss_curve, read_metrics
from maskrcnn.engine.schedule import build_scheduler
from maskrcnn.progress import Progress
from maskrcnn.weights import (
    CheckpointError,
    check_metadata,
    is_torchvision_maskrcnn,
    load_state_dict_strict,
    read_checkpoint,
    torchvision_to_maskrcnn,
)

__all__ = [
    "AMP_MODES",
    "CLASS_SPECIFIC_PREFIXES",
    "RunExistsError",
    "TrainingInterrupted",
    "check_keypoints",
    "load_backbone_weights",
    "load_init_weights",
    "train",
]

logger = logging.getLogger(__name__)

AMP_MODES = {"off": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# parameters whose shape depends on num_classes: re-initialised when fine-tuning to other classes
CLASS_SPECIFIC_PREFIXES = (
    "roi_heads.box_predictor.",  # cls_score, bbox_pred
    "roi_heads.mask_predictor.mask_fcn_logits.",  # FCN and C4 mask heads
    "roi_heads.mask_predictor.fc_logits.",  # MLP mask head
)


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, dataset=None, model=None, val_dataset=None
) -> dict:
    """Train a Mask R-CNN as ``cfg`` says; returns ``{"iteration", "losses", "eval", "final_checkpoint",
    "output_dir", "metrics", "loss_curve", "config"}`` (losses: the last logged averages).

    ``dataset`` (training) and ``val_dataset`` default to :class:`~maskrcnn.data.coco.CocoDataset` built
    from ``cfg.data``; ``model`` to ``build_model(cfg.model)`` with the ``cfg.init_backbone`` /
    ``cfg.init_weights`` initialisation. ``resume=True`` continues from ``output_dir/last_checkpoint``
    (from scratch if there is none); its model config must be the checkpoint's. An ``output_dir`` holding
    another run is refused (:class:`RunExistsError`) unless ``resume`` or ``overwrite`` (which deletes
    that run's files first; other files are left alone). Launched by ``torchrun``, each process trains on
    its share of every batch and gradients are averaged (DistributedDataParallel).

    SIGINT / SIGTERM finish the current iteration, write a checkpoint and raise
    :class:`~maskrcnn.engine.interrupt.TrainingInterrupted` (a second SIGINT stops at once).
    """
    cfg = copy.deepcopy(cfg)
    owns_group = not distributed.is_distributed()
    rank, world_size, _, device = distributed.init_distributed(cfg.device)
    try:
        return _train(cfg, rank, world_size, device, resume, overwrite, dataset, model, val_dataset)
    finally:
        if owns_group:
            distributed.cleanup()


def _train(cfg: Config, rank, world_size, device, resume, overwrite, dataset, model, val_dataset) -> dict:
    solver = cfg.solver
    main = rank == 0
    _check_config(cfg, world_size, device)
    amp_dtype = AMP_MODES[solver.amp]
    per_process_batch = solver.ims_per_batch // world_size
    seed_everything(cfg.seed + rank)
    out = cfg.output_dir
    checkpointer = Checkpointer(out, keep=cfg.keep_checkpoints)
    metrics_path = os.path.join(out, "metrics.jsonl")
    curve_path = os.path.join(out, "loss_curve.png")
    resume_path = checkpointer.latest() if resume and os.path.isdir(out) else None
    if resume and resume_path is None:
        logger.info("resume: no checkpoint in %s; starting from scratch", out)
    if not resume:
        _claim_output_dir(out, overwrite=overwrite, main=main)

    # data: broken records stop the run here, before any training. Rank 0 decodes every image first (see
    # maskrcnn.data.images.check_images); the other ranks then find the results in its cache.
    if dataset is None or (val_dataset is None and cfg.data.val_annotations):
        if not main:
            distributed.barrier()
        if dataset is None:
            dataset = build_train_dataset(cfg)
        if val_dataset is None and cfg.data.val_annotations:
            val_dataset = build_val_dataset(cfg)
        if main:
            distributed.barrier()
    _check_classes(cfg, dataset, val_dataset, model)
    check_keypoints(cfg.model, {"train": dataset, "val": val_dataset}, cfg.data.keypoint_oks_sigmas)

    # model, optimizer, schedule
    if model is None:
        from maskrcnn.modeling.build import build_model

        model = build_model(cfg.model)
        if resume_path is None:  # a resumed run gets its weights from the checkpoint
            if cfg.init_backbone:
                load_backbone_weights(model, cfg.init_backbone)
            if cfg.init_weights:
                load_init_weights(model, cfg.init_weights)
    describe = getattr(dataset, "metadata", None)
    if callable(describe):  # the labels' names and category ids travel with the checkpoints
        model.metadata = check_metadata(describe(), cfg.model, source=cfg.data.train_annotations or "dataset")
    model.to(device).train()  # train(): the training layout, before DDP records the parameters' strides
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )
    scheduler = build_scheduler(optimizer, solver)
    scaler = torch.amp.GradScaler(device.type) if solver.amp == "float16" else None
    start_iter = 0
    if resume_path is not None:
        start_iter, _ = checkpointer.load_for_resume(
            resume_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=rank
        )
        logger.info("resumed from %s at iteration %d", resume_path, start_iter)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    logger.info(
        "training %d iterations on %d process(es) x %d image(s), lr %.4g (base_lr %.4g x %d / %d), %s",
        solver.max_iter,
        world_size,
        per_process_batch,
        solver.lr,
        solver.base_lr,
        solver.ims_per_batch,
        solver.reference_batch,
        device,
    )

    if main:
        os.makedirs(out, exist_ok=True)
        if resume_path is not None:
            _log_resumed_changes(cfg, os.path.join(out, "config.yaml"))
        save_config(cfg, os.path.join(out, "config.yaml"))
        _start_metrics(metrics_path, keep_up_to=start_iter if resume_path else None)

    from maskrcnn.data.loader import build_train_loader

    loader = build_train_loader(
        dataset,
        batch_size=per_process_batch,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        start_iter=start_iter,
        aspect_ratio_grouping=hasattr(dataset, "image_info"),
    )
    with preserved_rng():  # starting workers must not move the training RNG streams
        batches = iter(loader)

    def save(name: str, iteration: int) -> str:
        # a finite loss can still give non-finite weights (an overflowing gradient): never save those
        bad = [n for n, p in unwrap(model).named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(
                f"non-finite weights after iteration {iteration} ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}); training stopped, {name} not written. Last good "
                f"checkpoint: {last_good or 'none (none written yet)'}"
            )
        rng = distributed.all_gather_objects(capture_rng_state())  # collective: every rank calls save
        path = checkpointer.path(name)
        if main:
            checkpointer.save(
                name,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                iteration=iteration,
                extra={"seed": cfg.seed, "world_size": world_size},
                rng_states=rng,
            )
            plot_loss_curve(read_metrics(metrics_path), curve_path)
        return path

    def run_eval(iteration: int, name: str) -> dict:
        from maskrcnn.engine.evaluate import evaluate

        with preserved_rng():
            result = evaluate(
                unwrap(model),
                val_dataset,
                batch_size=per_process_batch,
                num_workers=cfg.data.num_workers,
                output_dir=os.path.join(out, name),
                progress=main,
                keypoint_oks_sigmas=cfg.data.keypoint_oks_sigmas,
            )
        model.train()
        if main:
            _append_jsonl(metrics_path, {"iteration": iteration, "eval": result})
            events.scalars("eval", result, iteration)
        return result

    def log(record: dict) -> None:
        """A training record (rank 0): metrics.jsonl, the log line without a terminal, TensorBoard."""
        _append_jsonl(metrics_path, record)
        progress.write(log_line(record, solver.max_iter, device))
        events.scalars("train", {k: v for k, v in record.items() if k != "iteration"}, record["iteration"])

    def interrupted(signum: int, iteration: int):
        """Keep the work of a run stopped by ``signum`` after ``iteration``: log the open window, write a
        checkpoint (unless one of this iteration exists), raise TrainingInterrupted naming it."""
        nonlocal window
        name = signal.Signals(signum).name
        if window.count:
            record = window.summary()  # collective: the stop iteration is the same on every rank
            if main:
                log({"iteration": iteration, "lr": lr, **record})
            window = _Window()
        path = checkpointer.path(Checkpointer.periodic_name(iteration))
        if last_good != path:  # not written by the periodic checkpoint of this iteration already
            path = save(Checkpointer.periodic_name(iteration), iteration)
        raise TrainingInterrupted(
            f"training stopped by {name} after iteration {iteration} of {solver.max_iter}; "
            f"checkpoint {path}. Resume with: "
            f"maskrcnn train --config {os.path.join(out, 'config.yaml')} --resume",
            signum=signum,
            iteration=iteration,
            checkpoint=path,
        )

    # the loop
    model.train()
    last_good = resume_path  # the newest checkpoint known to hold finite weights
    window = _Window()
    logged: dict = {}
    lr = optimizer.param_groups[0]["lr"]
    progress = Progress(solver.max_iter, desc="train", initial=start_iter, enabled=main, interval=None)
    purge = start_iter + 1 if resume_path else None  # hide the old run's steps after the checkpoint
    events = EventWriter(out, enabled=main and cfg.tensorboard, purge_step=purge)
    end = time.perf_counter()
    with contextlib.closing(events):  # open for the final evaluation too
        with StopRequest() as stop, contextlib.closing(progress):
            for iteration in range(start_iter + 1, solver.max_iter + 1):  # 1-based: the iteration-th batch
                images, targets = next(batches)
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
                data_time = time.perf_counter() - end

                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                values = distributed.all_reduce_mean(  # one collective: losses and stop requests
                    {"loss": loss.detach(), **{k: v.detach() for k, v in loss_dict.items()}, **stop.votes()}
                )
                signum = stop.agreed(values)  # the same on every rank: all stop after this iteration
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(
                        f"non-finite loss at iteration {iteration}: "
                        + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                        + "; training stopped, no checkpoint written. Last good checkpoint: "
                        + (last_good if last_good else "none (none written yet)")
                        + " (resume from it with a lower solver.base_lr, longer warmup or clip_grad_norm)"
                    )

                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if solver.clip_grad_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if solver.clip_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm)
                    optimizer.step()
                scheduler.step()

                window.add(values, time=time.perf_counter() - end, data_time=data_time)
                progress.update(1, status=_postfix(values, lr))
                if iteration % cfg.log_period == 0 or iteration == solver.max_iter:
                    logged = window.summary()  # collective: every rank logs at the same iterations
                    if main:
                        log({"iteration": iteration, "lr": lr, **logged})
                    window = _Window()
                if cfg.checkpoint_period > 0 and iteration % cfg.checkpoint_period == 0:
                    if iteration < solver.max_iter:
                        last_good = save(Checkpointer.periodic_name(iteration), iteration)
                if cfg.eval_period > 0 and iteration % cfg.eval_period == 0 and iteration < solver.max_iter:
                    if val_dataset is not None:
                        run_eval(iteration, f"eval_{iteration:07d}")
                if signum is not None and iteration < solver.max_iter:
                    interrupted(signum, iteration)
                end = time.perf_counter()

            if start_iter < solver.max_iter or resume_path is None:
                final = save("model_final", solver.max_iter)
            else:
                final = resume_path
                logger.info("%s is already at iteration %d of %d", resume_path, start_iter, solver.max_iter)
        results = run_eval(solver.max_iter, "eval_final") if val_dataset is not None else None
    if main:
        plot_loss_curve(read_metrics(metrics_path), curve_path)
    distributed.barrier()
    return {
        "iteration": max(start_iter, solver.max_iter),
        "losses": {k: v for k, v in logged.items() if k.startswith("loss")},
        "eval": results,
        "final_checkpoint": final,
        "output_dir": out,
        "metrics": metrics_path,
        "loss_curve": curve_path,
        "config": os.path.join(out, "config.yaml"),
    }


# ------------------------------------------------------------------------------------------------
# Set-up helpers
# ------------------------------------------------------------------------------------------------


def _check_config(cfg: Config, world_size: int, device: torch.device) -> None:
    """Every key's value (:func:`~maskrcnn.config.validate_config`, also for a config edited in Python),
    then what depends on the machine: the device and the number of processes."""
    validate_config(cfg)
    solver = cfg.solver
    if solver.amp != "off" and device.type != "cuda":
        raise ValueError(
            f"solver.amp={solver.amp!r} needs a CUDA device, this run is on {device}: set solver.amp=off"
        )
    if solver.ims_per_batch < 1 or solver.ims_per_batch % world_size:
        raise ValueError(
            f"solver.ims_per_batch={solver.ims_per_batch} must be a positive multiple of the number of "
            f"processes ({world_size})"
        )


class RunExistsError(ValueError):
    """``output_dir`` holds another run's work, and neither ``resume`` nor ``overwrite`` was asked for."""


_RUN_DIRS = re.compile(r"^eval_(final|\d{7,})$")  # evaluations written by run_eval
_RUN_FILES = re.compile(
    r"^(model_(final|\d{7,})\.pt|last_checkpoint|metrics\.jsonl|config\.yaml|loss_curve\.png"
    r"|events\.out\.tfevents\..+)$"
)


def _run_files(out: str) -> list[str]:
    """The names in ``out`` that a training run writes (see the module docstring)."""
    if not os.path.isdir(out):
        return []
    return sorted(
        e
        for e in os.listdir(out)
        if _RUN_FILES.match(e) or (_RUN_DIRS.match(e) and os.path.isdir(os.path.join(out, e)))
    )


def _claim_output_dir(out: str, *, overwrite: bool, main: bool) -> None:
    """Refuse an ``out`` holding another run (a checkpoint, or logged metrics), or with ``overwrite``
    delete that run's files (only those: other files stay). Decided on rank 0, the same on every rank."""
    problem = None
    if main:
        names = _run_files(out)
        metrics = os.path.join(out, "metrics.jsonl")
        worked = any(n.endswith(".pt") or n == "last_checkpoint" for n in names) or (
            os.path.isfile(metrics) and os.path.getsize(metrics) > 0
        )
        if worked and not overwrite:
            kept = [n for n in names if not n.startswith("events.out.tfevents.")]  # long, and never alone
            shown = ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else "")
            problem = (
                f"{out} holds another run ({shown}): pass --resume to continue it, --overwrite to delete it "
                "and start again, or choose another output_dir"
            )
        elif names and overwrite:
            logger.warning("overwrite: deleting the previous run's files in %s: %s", out, ", ".join(names))
            for n in names:
                path = os.path.join(out, n)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    problem = distributed.all_gather_objects(problem)[0]
    if problem:
        raise RunExistsError(problem)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def preserved_rng():
    """Run a block without moving the torch / NumPy / Python RNG streams of the training loop."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def build_train_dataset(cfg: Config):
    """The training :class:`~maskrcnn.data.coco.CocoDataset` of ``cfg.data`` with the random flip (which
    swaps left and right keypoints by the dataset's ``flip_map``)."""
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.transforms import RandomHorizontalFlip

    d = cfg.data
    if not d.train_images or not d.train_annotations:
        raise ValueError("set data.train_images and data.train_annotations (or pass a dataset)")
    dataset = CocoDataset(
        image_dir=d.train_images,
        annotation_file=d.train_annotations,
        filter_empty=d.filter_empty,
        skip_bad=d.skip_bad_records,
        min_keypoints_per_image=d.min_keypoints_per_image,
    )
    dataset.transforms = RandomHorizontalFlip(d.horizontal_flip, flip_map=dataset.flip_map)
    return dataset


def build_val_dataset(cfg: Config):
    from maskrcnn.data.coco import CocoDataset

    d = cfg.data
    if not d.val_images:
        raise ValueError("data.val_annotations is set but data.val_images is not")
    return CocoDataset(image_dir=d.val_images, annotation_file=d.val_annotations, skip_bad=d.skip_bad_records)


def _check_classes(cfg: Config, dataset, val_dataset, model) -> None:
    """Make ``cfg.model.num_classes`` the dataset's (logged), or fail when an injected model differs."""
    num_classes = getattr(dataset, "num_classes", None)
    if model is not None:
        model_cfg = getattr(unwrap(model), "config", None)
        if model_cfg is not None:
            cfg.model = copy.deepcopy(model_cfg)
        if num_classes is not None and cfg.model.num_classes != num_classes:
            raise ValueError(
                f"the model predicts {cfg.model.num_classes} classes but the dataset has {num_classes} "
                "(both including the background)"
            )
    elif num_classes is not None and cfg.model.num_classes != num_classes:
        logger.warning(
            "model.num_classes=%d does not match the dataset's %d classes (%d categories + background): "
            "using %d",
            cfg.model.num_classes,
            num_classes,
            num_classes - 1,
            num_classes,
        )
        cfg.model.num_classes = num_classes
    train_ids = getattr(dataset, "category_ids", None)
    val_ids = getattr(val_dataset, "category_ids", None)
    if train_ids is not None and val_ids is not None and list(train_ids) != list(val_ids):
        raise ValueError(
            f"the training and validation sets have different categories ({list(train_ids)[:10]} vs "
            f"{list(val_ids)[:10]}): labels would not mean the same classes"
        )


def check_keypoints(model_config, datasets: dict, oks_sigmas=(), *, hint: bool = True) -> None:
    """A keypoint model (``model_config.roi_heads.keypoint``) needs data sets with its ``num_keypoints``
    keypoints, and their evaluation OKS sigmas (``data.keypoint_oks_sigmas``, or COCO's for 17): raise a
    ``ValueError`` naming both numbers (and, with ``hint``, the key to set) when a data set of
    ``datasets`` (``{"train": ds, "val": ds}``; ``None`` entries skipped) has another number or none, before
    any training or inference. A model without the keypoint branch uses keypoint data as any other."""
    from maskrcnn.engine.evaluate import resolve_oks_sigmas

    heads = model_config.roi_heads
    if not heads.keypoint:
        return
    for split, ds in datasets.items():
        k = getattr(ds, "num_keypoints", None)
        if k is None:  # not a CocoDataset: nothing to check
            continue
        source = getattr(ds, "annotation_file", None) or f"the {split} data set"
        if k == 0:
            raise ValueError(
                f"model.roi_heads.num_keypoints={heads.num_keypoints} (a keypoint model) but {source} "
                "declares no keypoints (no category has a 'keypoints' list): use a person_keypoints_*.json"
            )
        if k != heads.num_keypoints:
            raise ValueError(
                f"model.roi_heads.num_keypoints={heads.num_keypoints} but {source} has {k} keypoints per "
                f"instance" + (f": set model.roi_heads.num_keypoints={k}" if hint else "")
            )
        if split == "val":
            resolve_oks_sigmas(k, oks_sigmas)  # names data.keypoint_oks_sigmas when they do not fit


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Initialise the backbone from a torchvision ImageNet classifier checkpoint (``resnet50-*.pth`` ...):
    the ResNet body of an FPN model, or the res2-res4 trunk and the res5 RoI head of a C4 model."""
    from maskrcnn.modeling.backbone import load_imagenet_checkpoint

    state_dict = read_checkpoint(path)
    net = unwrap(model)
    try:
        if net.config.backbone.kind == "fpn":
            load_imagenet_checkpoint(net.backbone.body, state_dict)
        else:
            load_imagenet_checkpoint(net.backbone, state_dict, ignore=("fc.", "layer4."))
            load_imagenet_checkpoint(net.roi_heads.box_head.res5, state_dict, prefix="layer4.")
    except ValueError as e:
        raise CheckpointError(f"init_backbone {path}: {e}") from e
    logger.info("backbone initialised from %s", path)


def load_init_weights(model: nn.Module, path: str) -> list[str]:
    """Fine-tuning initialisation from a trained checkpoint (ours or torchvision's Mask R-CNN).

    Every weight must match the model, except the class-specific layers (:data:`CLASS_SPECIFIC_PREFIXES`)
    when their shape differs (another number of classes): those keep their fresh initialisation, and a
    message names them. Any other missing, unexpected or mis-shaped key raises a ``CheckpointError``
    naming it, and nothing is loaded. Returns the names of the re-initialised parameters.
    """
    data = read_checkpoint(path)
    if data.get("format") == "maskrcnn":
        state_dict = dict(data["model"])
    elif is_torchvision_maskrcnn(data):
        state_dict = torchvision_to_maskrcnn(data)
    else:
        raise CheckpointError(f"init_weights {path}: not a maskrcnn or torchvision Mask R-CNN checkpoint")
    net = unwrap(model)
    own = net.state_dict()
    reinit = [
        k
        for k, v in own.items()
        if k.startswith(CLASS_SPECIFIC_PREFIXES) and k in state_dict and state_dict[k].shape != v.shape
    ]
    if reinit:
        logger.warning(
            "init_weights %s: re-initialised the class-specific layers whose shape differs "
            "(checkpoint -> model): %s",
            path,
            ", ".join(f"{k} {tuple(state_dict[k].shape)} -> {tuple(own[k].shape)}" for k in reinit),
        )
        state_dict.update({k: own[k] for k in reinit})
    load_state_dict_strict(net, state_dict, source=f"init_weights {path}")
    logger.info("initialised from %s", path)
    return reinit


def _log_resumed_changes(cfg: Config, previous: str) -> None:
    """Name the settings a resumed run changes (the model's are refused when the checkpoint loads)."""
    import yaml

    try:
        with open(previous) as fh:
            old = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return
    new = dataclasses.asdict(cfg)
    changed = config_differences(
        {k: v for k, v in old.items() if k != "model"}, {k: v for k, v in new.items() if k != "model"}
    )
    if changed:
        logger.info("resuming with changed settings: %s", "; ".join(changed))


def save_config(cfg: Config, path: str) -> None:
    """Write ``cfg`` as YAML (tuples as lists), atomically."""
    import yaml

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    with atomic_write(path) as fh:
        yaml.safe_dump(plain(dataclasses.asdict(cfg)), fh, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# Loop helpers
# ------------------------------------------------------------------------------------------------


def _to(value, device: torch.device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class _Window:
    """Sums of the per-iteration values since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float], **timings: float) -> None:
        for k, v in {**values, **timings}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def summary(self) -> dict[str, float]:
        """Window means; the timings are also averaged over the processes (losses already are)."""
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        timings = distributed.all_reduce_mean({k: means[k] for k in ("time", "data_time") if k in means})
        return {**means, **timings}


def _start_metrics(path: str, keep_up_to: int | None) -> None:
    """A fresh ``metrics.jsonl``, or (resuming at ``keep_up_to``) the old one without the records of
    iterations after the checkpoint, which the resumed run writes again."""
    records = []
    if keep_up_to is not None:
        records = [r for r in read_metrics(path) if r.get("iteration", 0) <= keep_up_to]
    with atomic_write(path) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _postfix(values: dict[str, float], lr: float) -> str:
    parts = [f"loss {values['loss']:.3f}"]
    parts += [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in values.items() if k.startswith("loss_")]
    return " ".join(parts) + f" lr {lr:.3g}"
