"""Command line: ``maskrcnn train | eval | predict | demo | configs``.

Every command takes ``--config`` (a model preset name such as ``R-50-FPN``, or a YAML run config) and
``KEY=VALUE`` overrides of the run config (dotted keys: ``solver.base_lr=0.01``, ``model.num_classes=3``,
``data.train_images=...``). ``maskrcnn configs`` lists the presets and every key with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

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
  maskrcnn demo
"""


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "R-50-FPN") -> None:
    p.add_argument(
        "--config", default=default, help=f"model preset name or YAML run config (default: {default})"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")


def _resolve_config(args):
    from maskrcnn.config import apply_overrides, load_config_file, make_config

    spec = args.config
    if spec and (spec.endswith((".yaml", ".yml")) or os.path.isfile(spec)):
        cfg = load_config_file(spec)
    else:
        cfg = make_config(spec or "R-50-FPN")
    cfg = apply_overrides(cfg, args.overrides)
    if getattr(args, "output_dir", None):
        cfg.output_dir = args.output_dir
    if getattr(args, "device", None):
        cfg.device = args.device
    return cfg


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_train(args) -> int:
    from maskrcnn.engine.train import train

    cfg = _resolve_config(args)
    result = train(cfg, resume=args.resume)
    print(f"final checkpoint: {result['final_checkpoint']}")
    print(f"metrics: {result['metrics']}  loss curve: {result['loss_curve']}")
    return 0


def cmd_eval(args) -> int:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.evaluate import evaluate, format_metrics_table
    from maskrcnn.weights import load_model

    cfg = _resolve_config(args)
    if not (cfg.data.val_images and cfg.data.val_annotations):
        raise SystemExit("eval needs data.val_images=DIR and data.val_annotations=FILE.json")
    model = load_model(args.weights, device=str(_device(cfg.device)))
    dataset = CocoDataset(
        image_dir=cfg.data.val_images,
        annotation_file=cfg.data.val_annotations,
        skip_bad=cfg.data.skip_bad_records,
    )
    if model.config.num_classes != dataset.num_classes:
        raise SystemExit(
            f"the model has {model.config.num_classes} classes (with background) but "
            f"{cfg.data.val_annotations} has {dataset.num_classes}"
        )
    out = args.output_dir or os.path.join(cfg.output_dir, "eval")
    metrics = evaluate(model, dataset, num_workers=cfg.data.num_workers, output_dir=out)
    print(format_metrics_table(metrics, dataset.class_names))
    print(f"detections and metrics written to {out}")
    return 0


def cmd_predict(args) -> int:
    from maskrcnn.engine.predict import list_images, predict
    from maskrcnn.weights import load_model

    model = load_model(args.weights, device=str(_device(args.device or "auto")))
    class_names = _class_names(args)
    paths = list_images(args.images)
    results = predict(
        model,
        paths,
        output_dir=args.output_dir,
        score_threshold=args.score_threshold,
        class_names=class_names,
    )
    print(
        f"{len(results)} detections on {len(paths)} image(s); drawings, predictions.json in {args.output_dir}"
    )
    return 0


def _class_names(args):
    if not args.classes:
        return None
    if os.path.isfile(args.classes):
        with open(args.classes) as fh:
            return ["background"] + [line.strip() for line in fh if line.strip()]
    return ["background"] + [c.strip() for c in args.classes.split(",")]


def cmd_demo(args) -> int:
    from maskrcnn.demo import run_demo

    return run_demo(output_dir=args.output_dir, overrides=args.overrides)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN in plain PyTorch: train on COCO-format data, measure COCO AP, segment.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a model", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint")
    p.add_argument("--output-dir", help="where checkpoints, metrics and plots go (overrides output_dir)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (overrides device)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="COCO box and mask AP of a checkpoint on data.val_*",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument(
        "--weights", required=True, help="a maskrcnn checkpoint or a torchvision Mask R-CNN state_dict"
    )
    p.add_argument(
        "--output-dir", help="where coco_results.json and metrics.json go (default OUTPUT_DIR/eval)"
    )
    p.add_argument("--device", help="auto, cpu, cuda ...")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment images: drawings (PNG) and a COCO results JSON")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    p.add_argument(
        "--weights", required=True, help="a maskrcnn checkpoint or a torchvision Mask R-CNN state_dict"
    )
    p.add_argument("--output-dir", default="predictions", help="default: ./predictions")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections above this score")
    p.add_argument("--classes", help="class names: a comma-separated list or a file with one name per line")
    p.add_argument("--device", help="auto (default), cpu, cuda ...")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="synthetic data -> train a CPU-sized model -> evaluate -> predictions")
    p.add_argument("--output-dir", default="runs/demo", help="default: runs/demo")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the demo's run config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("configs", help="list the model presets and every config key with its default")
    p.set_defaults(func=cmd_configs)
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
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        # configuration and input errors (unknown keys, bad values, broken data, unfit checkpoints) are
        # reported without a traceback; --verbose shows it
        if args.verbose:
            raise
        msg = e.args[0] if e.args else str(e)
        print(f"maskrcnn {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
