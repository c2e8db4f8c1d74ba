"""Command line: ``maskrcnn train | eval | predict | export | serve | demo | ablate | configs``.

Every command takes ``--config`` (a model preset name such as ``R-50-FPN``, or a YAML run config) and
``KEY=VALUE`` overrides of the run config (dotted keys: ``solver.base_lr=0.01``, ``model.num_classes=3``,
``data.train_images=...``), anywhere among the options. ``maskrcnn configs`` lists the presets and every key
with its default.

A mistake (a wrong key or value, a missing or unfit file, a folder that cannot be written) ends the command
with one line on stderr, ``maskrcnn <command>: error: <what and where>``, and exit status 2; ``--verbose``
shows the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import tempfile

EPILOG = """\
configuration:
  --config NAME     a model preset (see `maskrcnn configs`), e.g. R-50-FPN, R-18-FPN-small, tv-R-50-FPN
  --config F.yaml   a YAML run config: optional `preset: NAME`, then sections model:, data:, solver:,
                    and top-level keys (output_dir, device, seed, checkpoint_period, ...)
  KEY=VALUE ...     overrides applied last, e.g. solver.max_iter=2000 data.num_workers=4
examples:
  maskrcnn train --config R-50-FPN data.train_images=coco/train2017 \\
      data.train_annotations=coco/annotations/instances_train2017.json output_dir=runs/r50
  torchrun --nproc_per_node 8 -m maskrcnn.cli train --config run.yaml
  maskrcnn eval --weights runs/r50/model_final.pt data.val_images=... data.val_annotations=...
  maskrcnn predict --weights runs/r50/model_final.pt photos/ --output-dir predictions
  maskrcnn serve --weights runs/r50/model_final.pt --classes cat,dog   (then open http://127.0.0.1:8000/)
  maskrcnn demo
exit status: 0 done; 2 a mistake in the command, the configuration, the inputs or the output folder (one
  line on stderr naming the key or file; -v / --verbose shows the traceback)
"""

PREDICT_EPILOG = """\
outputs (in --output-dir):
  <input file name>.png   one drawing per readable image, named after the whole file name (good.jpg ->
                          good.jpg.png, good.png -> good.png.png); inputs from several folders keep their
                          folders below the deepest common one (a/im.jpg -> a/im.jpg.png)
  predictions.json        COCO results entries with the input file_name
no data loss: an --output-dir that holds any input image (e.g. the input folder itself, or a folder above it)
  is refused, and an existing file is never written over unless --overwrite, which replaces this run's
  own drawings and predictions.json only. Checked before the model is loaded.
exit status: 0 when at least one image was read (unreadable ones are named, one line each, and counted);
  2 when none could be read, or on any other mistake (one line on stderr)
"""

SERVE_EPILOG = """\
page: http://HOST:PORT/ (upload or drop an image; slider, class toggles, PNG and COCO JSON downloads)
API:
  GET  /health                            200 {"status": "ok", ...} while the model is loaded
  POST /predict?score_threshold=0.5       multipart field "image"; COCO results entries (compressed RLE
                                          masks, keypoints), image size, inference_ms
  curl -F image=@photo.jpg "http://127.0.0.1:8000/predict?score_threshold=0.7"
errors: a JSON {"error": ...} with 400 (no image field, empty, not an image, truncated), 413 (body over
  --max-upload-mb, image over --max-pixels: refused from its header, before decoding), 415 (not multipart)
requests run one at a time on the model. No authentication: keep --host 127.0.0.1 unless the network is
  yours.
"""

EXPORT_EPILOG = """\
the ONNX graph (needs `pip install -e ".[export]"`: onnx, onnxruntime):
  input   image      float32 [3, H, W], RGB in [0, 1]; H and W are dynamic (any size; the model resizes it
                     as in eager inference, --size only sets the example traced)
  outputs boxes      float32 [N, 4], xyxy in input-image pixels
          labels     int64 [N] (1 .. num_classes - 1)
          scores     float32 [N], decreasing
          masks      float32 [N, 1, H, W] probabilities (mask models; threshold at 0.5)
          keypoints  float32 [N, K, 3] (x, y, 1) and keypoints_scores [N, K] (keypoint models)
  N = 0 when nothing is detected. The score threshold and the other settings of the model are built in.
exit status: 0 written; 2 a mistake (unreadable weights, an existing --output without --overwrite, an
  unsupported model or opset), one line on stderr
"""


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser that accepts positionals (KEY=VALUE overrides, image paths) anywhere among the
    options, e.g. ``train --config X --resume solver.max_iter=10 --device cpu``."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _add_weights_args(p: argparse.ArgumentParser) -> None:
    """``--weights`` and the ``--config`` of a bare state dict (predict, serve, export)."""
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument(
        "--config", help="the model preset or YAML run config of a bare state dict (a checkpoint has its own)"
    )


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="bf16: backbone and heads in bfloat16 where the CPU (AVX512-BF16, AMX) or GPU has it, boxes, "
        "scores and masks computed in float32; without hardware support it warns and stays float32. "
        "fp16: CUDA only. Default fp32",
    )


def _add_classes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--classes",
        help="class names: a comma-separated list or a file with one name per line (default: the names our"
        " checkpoints keep from their training data; none for torchvision's weights)",
    )


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "R-50-FPN") -> None:
    extra = "" if default else "; also the model config of a bare state dict given to --weights"
    p.add_argument(
        "--config",
        default=default,
        help=f"model preset name or YAML run config (default: {default or 'R-50-FPN'}){extra}",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")


def _load_config(spec: str | None):
    """``--config``: a YAML run config file, or a model preset name (default ``R-50-FPN``)."""
    from maskrcnn.config import PRESETS, ConfigError, load_config_file, make_config

    spec = spec or "R-50-FPN"
    if spec.endswith((".yaml", ".yml")) or os.path.isfile(spec):
        return load_config_file(spec)
    if spec in PRESETS:
        return make_config(spec)
    raise ConfigError(
        f"unknown configuration {spec!r}: --config takes a model preset ({', '.join(sorted(PRESETS))}) "
        "or a YAML file"
    )


def _resolve_config(args):
    from maskrcnn.config import apply_overrides, validate_config

    cfg = apply_overrides(_load_config(args.config), getattr(args, "overrides", []))
    if getattr(args, "output_dir", None):
        cfg.output_dir = args.output_dir
    if getattr(args, "device", None):
        cfg.device = args.device
    return validate_config(cfg)


def _device(name: str):
    from maskrcnn.engine.distributed import resolve_device

    return resolve_device(name)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _check_writable(folder: str) -> None:
    """Fail early, in one line, when ``folder`` (or the nearest existing folder above it, where it would be
    created) cannot be written. Creates nothing."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"cannot write to {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionError(f"cannot write to {folder}: permission denied") from None
        if e.errno == errno.EROFS:
            raise PermissionError(f"cannot write to {folder}: read-only file system") from None
        raise


def cmd_train(args) -> int:
    from maskrcnn.engine.train import train

    cfg = _resolve_config(args)
    _check_writable(cfg.output_dir)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result["eval"]:
        from maskrcnn.engine.evaluate import format_metrics_table

        print(format_metrics_table(result["eval"]))
    print(f"final checkpoint: {result['final_checkpoint']}")
    print(f"metrics: {result['metrics']}  loss curve: {result['loss_curve']}")
    return 0


def cmd_eval(args) -> int:
    from maskrcnn.config import ConfigError
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluate import evaluate, format_metrics_table
    from maskrcnn.engine.train import check_keypoints

    cfg = _resolve_config(args)
    if not (cfg.data.val_images and cfg.data.val_annotations):
        raise ConfigError("eval needs data.val_images=DIR and data.val_annotations=FILE.json")
    out = args.output_dir or os.path.join(cfg.output_dir, "eval")
    _check_writable(out)
    device = _device(cfg.device)
    # --config is the model config of a bare state dict; a checkpoint's own config is kept (test-time keys
    # among the overrides apply to it)
    model = _inference_model(args, device, cfg.model if args.config else None, args.overrides)
    dataset = CocoDataset(
        image_dir=cfg.data.val_images,
        annotation_file=cfg.data.val_annotations,
        skip_bad=cfg.data.skip_bad_records,
    )
    if model.config.num_classes != dataset.num_classes:
        raise ConfigError(
            f"the model has {model.config.num_classes} classes (with background) but "
            f"{cfg.data.val_annotations} has {dataset.num_classes}"
        )
    trained_on = model.metadata.get("category_ids")
    if trained_on is not None and trained_on != dataset.category_ids:  # labels would name other categories
        raise ConfigError(
            f"{args.weights} was trained on category ids {trained_on} but {cfg.data.val_annotations} has"
            f" {dataset.category_ids}: its labels would be scored as other categories"
        )
    check_keypoints(model.config, {"val": dataset}, cfg.data.keypoint_oks_sigmas, hint=False)
    metrics = evaluate(
        model,
        dataset,
        num_workers=cfg.data.num_workers,
        output_dir=out,
        keypoint_oks_sigmas=cfg.data.keypoint_oks_sigmas,
    )
    print(format_metrics_table(metrics, dataset.class_names))
    print(f"detections and metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    from maskrcnn.engine.predict import check_output_dir, list_images, predict

    paths = list_images(args.images)
    check_output_dir(paths, args.output_dir, overwrite=args.overwrite)  # before the model: nothing lost
    _check_writable(args.output_dir)
    device = _device(args.device or "auto")
    model = _weights_model(args, device)
    results = predict(
        model,
        paths,
        output_dir=args.output_dir,
        score_threshold=args.score_threshold,
        class_names=_class_names(args),
        overwrite=args.overwrite,
        writers=args.writers,
    )
    line = f"{len(results)} detection(s) on {len(results.read)} image(s)"
    if results.unreadable:
        line += f"; {len(results.unreadable)} of {len(paths)} image(s) could not be read (named above)"
    print(f"{line}; drawings, predictions.json in {args.output_dir}")
    return 0


def cmd_serve(args) -> int:
    import importlib.util

    missing = [
        name
        for name, modules in (
            ("starlette", ["starlette"]),
            ("uvicorn", ["uvicorn"]),
            ("python-multipart", ["python_multipart", "multipart"]),
        )
        if not any(importlib.util.find_spec(m) for m in modules)
    ]
    if missing:
        print(
            f"maskrcnn serve: error: {', '.join(missing)} not installed; install the serve extra: "
            'pip install -e ".[serve]"',
            file=sys.stderr,
        )
        return 2
    from maskrcnn.config import ConfigError
    from maskrcnn.serve import serve

    if not 0.0 <= args.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold {args.score_threshold}: expected a number in [0, 1]")
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise ConfigError("--max-upload-mb and --max-pixels must be positive")
    device = _device(args.device or "auto")
    model = _weights_model(args, device)
    serve(
        model,
        host=args.host,
        port=args.port,
        class_names=_class_names(args),
        score_threshold=args.score_threshold,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
    )
    return 0


def _inference_model(args, device, model_config, overrides: list[str] = ()):
    """``--weights`` on ``device`` in eval mode and ``--precision``; ``model_config``: the config of a bare
    state dict (a checkpoint keeps its own); the test-time keys among ``overrides`` apply to either (other
    model keys are refused by name: :func:`maskrcnn.weights.apply_test_settings`)."""
    from maskrcnn.weights import apply_test_settings, load_model

    model = load_model(args.weights, device=str(device), default_config=model_config)
    return apply_test_settings(model, list(overrides)).set_precision(args.precision)


def _weights_model(args, device):
    """predict's and serve's model: ``--weights`` (with ``--config`` for a bare state dict) and ``--set``'s
    test-time keys, each of which must be a ``model.*`` key (the only section a loaded model has)."""
    from maskrcnn.config import ConfigError

    for item in args.overrides:
        if not item.split("=", 1)[0].strip().startswith("model."):
            raise ConfigError(f"--set {item}: only model.* test-time keys apply to a loaded model")
    model_config = _load_config(args.config).model if args.config else None
    return _inference_model(args, device, model_config, args.overrides)


def _add_test_settings_arg(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...``: test-time keys of the loaded model (predict, serve; ``eval`` takes them as its
    positional overrides)."""
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="test-time settings of the model, e.g. model.roi_heads.nms_thresh=0.3 "
        "'model.input.min_size=(1024,)' model.roi_heads.detections_per_img=300 (keys: "
        "maskrcnn.config.TEST_TIME_KEYS; a key the weights depend on is refused). It takes every word "
        "after it up to the next option: put it after the images",
    )


def _class_names(args):
    if not args.classes:
        return None
    if os.path.isfile(args.classes):
        with open(args.classes) as fh:
            return ["background"] + [line.strip() for line in fh if line.strip()]
    return ["background"] + [c.strip() for c in args.classes.split(",")]


def cmd_export(args) -> int:
    from maskrcnn.export import MIN_OPSET, ExportError, export_onnx, output_names
    from maskrcnn.weights import load_model

    out = args.output
    if os.path.isdir(out):
        raise IsADirectoryError(f"--output {out} is a folder; give the .onnx file to write")
    if os.path.exists(out) and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.opset < MIN_OPSET:
        raise ExportError(f"--opset {args.opset} is too old: RoiAlign's coordinate modes need >= {MIN_OPSET}")
    if args.size is not None and min(args.size) < 1:
        raise ExportError(f"--size takes two positive sides H W, got {' '.join(map(str, args.size))}")
    _check_writable(os.path.dirname(os.path.abspath(out)))
    model_cfg = _load_config(args.config).model if args.config else None
    model = load_model(args.weights, device="cpu", default_config=model_cfg)
    # written next to the output, then renamed: an interrupted export leaves no half-written file
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        export_onnx(model, tmp, size=args.size, opset=args.opset)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(
        f"wrote {out}: input image float32 [3, H, W] in [0, 1], any H and W; "
        f"outputs {', '.join(output_names(model))} (opset {args.opset})"
    )
    return 0


def cmd_demo(args) -> int:
    from maskrcnn.demo import run_demo

    return run_demo(output_dir=args.output_dir, overrides=args.overrides, task=args.task)


def cmd_ablate(args) -> int:
    from maskrcnn.ablate import run_ablation

    run_ablation(
        table=args.table,
        seeds=args.seeds,
        iters=args.iters,
        output_dir=args.output_dir,
        device=args.device,
        num_train=args.num_train,
        num_val=args.num_val,
    )
    return 0


def cmd_configs(args) -> int:
    from maskrcnn.config import PRESETS, Config

    print("model presets: " + ", ".join(sorted(PRESETS)))
    print("\nrun config keys (KEY=VALUE) and their defaults:")

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                print(f"  {prefix}{f.name} = {value!r}")

    walk(Config(), "")
    return 0


WEIGHTS_HELP = (
    "a maskrcnn checkpoint (model_final.pt ...), torchvision maskrcnn_resnet50_fpn or "
    "keypointrcnn_resnet50_fpn weights, or a bare "
    "maskrcnn state dict together with --config (the preset or run config.yaml it was trained with)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN in plain PyTorch: train on COCO-format data, measure COCO AP, segment.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and tracebacks for errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)

    p = sub.add_parser(
        "train", help="train a model", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUTPUT_DIR that holds another run, deleting that run's checkpoints, "
        "metrics and evaluations (other files stay); without it (or --resume) such a folder is refused",
    )
    p.add_argument("--output-dir", help="where checkpoints, metrics and plots go (overrides output_dir)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (overrides device)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="COCO box, mask and keypoint AP of a checkpoint on data.val_*",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p, default=None)
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument(
        "--output-dir", help="where coco_results.json and metrics.json go (default OUTPUT_DIR/eval)"
    )
    p.add_argument("--device", help="auto, cpu, cuda ...")
    _add_precision_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="segment images: drawings (PNG) and a COCO results JSON",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", help="image files, folders (not recursive) or globs")
    _add_weights_args(p)
    p.add_argument(
        "--output-dir",
        default="predictions",
        help="default: ./predictions; must not hold any input image",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this run's drawings and predictions.json if they exist (nothing else is ever replaced)",
    )
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections above this score")
    _add_classes_arg(p)
    p.add_argument("--device", help="auto (default), cpu, cuda ...")
    p.add_argument(
        "--writers",
        type=_positive_int,
        help="threads that draw and write beside the model (default: 1 on a CPU, up to 4 on a GPU)",
    )
    _add_precision_arg(p)
    _add_test_settings_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "serve",
        help="a local web page and JSON API: drop an image, see the detections",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_weights_args(p)
    _add_classes_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000 (0: a free port)")
    p.add_argument("--device", help="auto (default), cpu, cuda ...")
    _add_precision_arg(p)
    _add_test_settings_arg(p)
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="the API's default threshold and the page's initial slider position (default 0.5)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=25.0, help="largest request body, in MiB (default 25)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=20_000_000,
        help="largest image, width x height, checked before decoding (default 20000000)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "export",
        help="write a model to ONNX (image in, detections out) for onnxruntime",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_weights_args(p)
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="the example image size traced (default: the model's test min_size, square); the graph "
        "takes any H and W",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 16 (default: 17)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="synthetic data -> train a CPU-sized model -> evaluate -> predictions")
    p.add_argument("--output-dir", default="runs/demo", help="default: runs/demo")
    p.add_argument(
        "--task",
        choices=("shapes", "keypoints"),
        default="shapes",
        help="shapes: Mask R-CNN on synthetic shapes (default); keypoints: keypoint & mask R-CNN on "
        "synthetic articulated figures (COCO's 17 person keypoints, OKS AP)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo's run config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "ablate",
        help="the paper's Table 2 in miniature: train and evaluate each variant on the shapes data",
        description="Train the demo-sized model once per variant of the paper's Table 2 (2b mask loss, 2c "
        "RoI pooling, 2d RoIPool vs RoIAlign at stride 32, 2e mask head) and seed, on the same synthetic "
        "data, schedule and seeds; write ablations.md (beside the paper's numbers), ablations.json and "
        "ablations.png. Rerunning the same command continues an interrupted ablation.",
    )
    p.add_argument("--table", choices=("2b", "2c", "2d", "2e", "all"), default="all", help="default: all")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (default 2)")
    p.add_argument("--iters", type=int, default=350, help="training iterations per run (default 350)")
    p.add_argument("--output-dir", default="runs/ablate", help="default: runs/ablate")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, default), cpu, cuda, cuda:1 ...")
    p.add_argument("--num-train", type=int, default=400, help="synthetic training images (default 400)")
    p.add_argument(
        "--num-val",
        type=int,
        default=50,
        help="synthetic val images (default 50); finished runs of another --num-val are evaluated again"
        " from their final weights, not retrained",
    )
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("configs", help="list the model presets and every config key with its default")
    p.set_defaults(func=cmd_configs)
    for p in sub.choices.values():  # -v also after the command
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.version:
        from maskrcnn import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from maskrcnn.engine.interrupt import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as e:  # SIGINT / SIGTERM during training: a checkpoint was written
        print(f"maskrcnn {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: files are whole (atomic writes)
        print(f"maskrcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # training diverged; the message names the last good checkpoint
        if args.verbose:
            raise
        print(f"maskrcnn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, KeyError, OSError) as e:
        # mistakes in the configuration, the inputs, the weights or the output folder (ConfigError,
        # CheckpointError, ImageReadError, OutputConflictError ... are ValueErrors; missing or unwritable
        # files are OSErrors): one line, no traceback; --verbose shows it. Other exceptions are bugs.
        if args.verbose:
            raise
        print(f"maskrcnn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        message = f"{e.filename}: {e.strerror[:1].lower()}{e.strerror[1:]}"
    elif isinstance(e, KeyError) and e.args:
        message = str(e.args[0])
    else:
        message = str(e) or type(e).__name__
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
