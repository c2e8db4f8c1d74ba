"""Loading and saving weights: this project's checkpoints and torchvision's Mask / Keypoint R-CNN checkpoints.

A project checkpoint is a dict ``{"format": "maskrcnn", "version": 1, "config": <ModelConfig as a dict>,
"model": <state_dict>, "metadata": {...}, ...}`` (training adds optimizer state and the like; ``metadata``
is the model's :attr:`MaskRCNN.metadata`, the training data's class names, category ids, keypoint names
and skeleton, checked on loading by :func:`check_metadata`; older checkpoints have none). A bare state
dict (what ``torch.save(model.state_dict(), path)`` writes, ours or torchvision's) carries no config: one
whose keys and shapes are exactly torchvision's ``maskrcnn_resnet50_fpn`` (any number of classes, with or
without the mask branch) loads as the ``tv-R-50-FPN`` configuration, one of ``keypointrcnn_resnet50_fpn`` as
``tv-keypoint-R-50-FPN``; any other needs the config it was made with, as
torchvision needs the model built before ``load_state_dict``. Files are read with
``torch.load(..., weights_only=True)``; a file that is not a checkpoint, or one that does not fit the model,
raises :class:`CheckpointError` naming the file and the first missing, unexpected and mis-shaped keys, and
nothing is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from maskrcnn.atomic import atomic_write
from maskrcnn.config import (
    TEST_TIME_KEYS,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_config,
)

__all__ = [
    "apply_test_settings",
    "load_model",
    "save_checkpoint",
    "read_checkpoint",
    "check_metadata",
    "recorded_labels",
    "load_state_dict_strict",
    "torchvision_to_maskrcnn",
    "maskrcnn_to_torchvision",
    "is_torchvision_maskrcnn",
    "CheckpointError",
]

FORMAT = "maskrcnn"
VERSION = 1

# torchvision key -> ours, and back; everything else has the same name
_TORCHVISION_RENAMES = (
    (r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"backbone.fpn.\1.\2."),
    (r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}."),
)
_TO_TORCHVISION = (
    (r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.", r"backbone.fpn.\1.\2.0."),
    (r"^rpn\.head\.conv\.", "rpn.head.conv.0.0."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0."),
)


def _rename(state_dict: Mapping[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model, with the reason and the offending keys."""


def _short(keys, n: int = 12) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> None:
    """Load ``state_dict`` into ``module`` only if every key and shape matches (BatchNorm counters aside).

    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys; nothing is loaded then.
    """

    def counter(k: str) -> bool:
        return k.endswith("num_batches_tracked")

    sd = {k: v for k, v in state_dict.items() if not counter(k)}
    own = {k: v for k, v in module.state_dict().items() if not counter(k)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit {type(module).__name__} (nothing loaded): "
            f"missing keys: {_short(missing)}; "
            f"unexpected keys: {_short(unexpected)}; wrong shapes (checkpoint vs model): {_short(shapes)}"
        )
    result = module.load_state_dict(sd, strict=False)
    left = [k for k in result.missing_keys if not counter(k)] + list(result.unexpected_keys)
    if left:
        raise CheckpointError(f"{source}: incomplete load: {_short(left)}")


def is_torchvision_maskrcnn(state_dict: Mapping[str, Tensor]) -> bool:
    return (
        "backbone.body.conv1.weight" in state_dict
        and "roi_heads.box_predictor.cls_score.weight" in state_dict
    )


def torchvision_to_maskrcnn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision Mask R-CNN keys to this package's (see ``_TORCHVISION_RENAMES``)."""
    return _rename(state_dict, _TORCHVISION_RENAMES)


def maskrcnn_to_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`torchvision_to_maskrcnn` (e.g. to run our weights in torchvision)."""
    return _rename(state_dict, _TO_TORCHVISION)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True``; a missing file raises ``FileNotFoundError``, anything that
    is not a readable dict checkpoint (another kind of file, a truncated one) :class:`CheckpointError`,
    each with one line naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # corrupt, truncated, not a torch file, or not a safe (weights-only) checkpoint
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects ({unsafe.group(1)}), not only "
                "weights; maskrcnn reads checkpoints with torch.load(weights_only=True)"
            ) from e
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a complete PyTorch weights file "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(data).__name__}")
    return data


def check_metadata(metadata, config: ModelConfig, *, source: str = "metadata") -> dict:
    """``metadata`` (``MaskRCNN.metadata``) checked against the model's ``config``; returns a plain copy.

    ``class_names``: ``num_classes`` strings, ``[0]`` the background; ``category_ids``: ``num_classes - 1``
    distinct ints (label ``i`` is category ``category_ids[i - 1]``); ``keypoint_names``: ``num_keypoints``
    strings; ``skeleton``: ``[i, j]`` pairs of 1-based keypoint indices. Each is optional; anything else
    raises :class:`CheckpointError` naming the entry."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{source}: 'metadata' must be a dict, got {type(metadata).__name__}")
    k = config.roi_heads.num_keypoints if config.roi_heads.keypoint else 0
    checks = {
        "class_names": (str, config.num_classes, f"{config.num_classes} names (model.num_classes)"),
        "category_ids": (int, config.num_classes - 1, f"{config.num_classes - 1} distinct ints"),
        "keypoint_names": (str, k, f"{k} names (model.roi_heads.num_keypoints)"),
    }
    out = {}
    for key, value in metadata.items():
        if key == "skeleton":
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(p, (list, tuple))
                and len(p) == 2
                and all(type(i) is int and 1 <= i <= k for i in p)
                for p in value
            )
            expected = f"[i, j] pairs of keypoint indices in 1 .. {k}"
            out[key] = [list(p) for p in value] if ok else None
        elif key in checks:
            kind, n, expected = checks[key]
            ok = (
                isinstance(value, (list, tuple))
                and len(value) == n
                and all(type(v) is kind for v in value)
                and (key != "category_ids" or len(set(value)) == n)
            )
            out[key] = list(value) if ok else None
        else:
            raise CheckpointError(f"{source}: unknown metadata entry {key!r}")
        if not ok:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise CheckpointError(f"{source}: metadata.{key}={shown}: expected {expected}")
    return out


def recorded_labels(model: nn.Module) -> tuple[list[str] | None, dict[int, int] | type]:
    """``(class names, label -> category id)`` as the model's ``metadata`` recorded them: ``(None, int)``
    (labels are the category ids) for a model without (torchvision's weights, older checkpoints)."""
    meta = getattr(model, "metadata", None) or {}
    ids = meta.get("category_ids")
    return meta.get("class_names"), ({i + 1: int(c) for i, c in enumerate(ids)} if ids else int)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Write a project checkpoint atomically (temporary file, then rename), with the model's config and
    ``metadata`` (when it has any). ``extra`` items are stored too."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("the model has no .config; build it with maskrcnn.build_model")
    data = {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(cfg),
        "model": model.state_dict(),
        **extra,
    }
    metadata = getattr(model, "metadata", None)
    if metadata:
        data["metadata"] = check_metadata(metadata, cfg)
    path = os.fspath(path)
    with atomic_write(path, "wb") as fh:  # a reader sees the old file or the complete new one
        torch.save(data, fh)


_TORCHVISION_MARKERS = ("rpn.head.conv.0.0.", "backbone.fpn.inner_blocks.0.0.", "roi_heads.mask_head.0.0.")


def _is_state_dict(data: Mapping) -> bool:
    return bool(data) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items())


def apply_test_settings(model: nn.Module, overrides: list[str]) -> nn.Module:
    """A loaded ``model`` with the ``model.*`` items of ``KEY=VALUE`` ``overrides`` applied to its config.

    Only :data:`maskrcnn.config.TEST_TIME_KEYS` may change: another model key that would change raises
    :class:`~maskrcnn.config.ConfigError` naming it (the weights were trained as that model). Items of other
    sections are ignored here. Returns ``model`` itself when nothing changes, else a model rebuilt from the
    new config with the same weights, metadata, device and eval mode (set its precision after this).
    """
    from maskrcnn.engine.checkpoint import config_differences
    from maskrcnn.modeling.build import build_model

    items = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if not items:
        return model
    new = apply_overrides(Config(model=model.config), items).model
    changed = config_differences(dataclasses.asdict(model.config), dataclasses.asdict(new), prefix="model.")
    if not changed:
        return model
    fixed = [c for c in changed if c.split(":", 1)[0] not in TEST_TIME_KEYS]
    if fixed:
        raise ConfigError(
            f"{'; '.join(fixed)}: the weights were trained as the checkpoint's model; only test-time keys "
            f"can change here ({', '.join(k.removeprefix('model.') for k in TEST_TIME_KEYS)})"
        )
    device = next(model.parameters()).device
    rebuilt = build_model(new)
    load_state_dict_strict(rebuilt, model.state_dict(), source="the loaded model")
    rebuilt.metadata = getattr(model, "metadata", {})
    return rebuilt.to(device).eval()


def load_model(
    weights: str | os.PathLike | Mapping,
    config: ModelConfig | str | None = None,
    *,
    device: str = "cpu",
    default_config: ModelConfig | str | None = None,
) -> nn.Module:
    """A model in eval mode with ``weights`` loaded (a file or an already loaded dict).

    * a project checkpoint (:func:`save_checkpoint`, training's ``model_*.pt``): its stored config is used;
      ``config`` replaces it. Its metadata (class names, category ids, keypoint names, skeleton) becomes
      ``model.metadata``; other weights give an empty one.
    * a bare state dict (``torch.save(model.state_dict(), path)``): it carries no config. As with
      torchvision, where the model is built before ``load_state_dict``, pass the config it was made with:
      ``config`` (or ``default_config``, which is used for bare state dicts only; the command line passes
      ``--config`` there). Without one, a state dict whose keys and shapes are exactly torchvision's
      ``maskrcnn_resnet50_fpn`` (number of classes and mask branch read from the shapes) loads as
      ``tv-R-50-FPN``, and one of torchvision's ``keypointrcnn_resnet50_fpn`` (number of keypoints read from
      the predictor) as ``tv-keypoint-R-50-FPN``; any other raises :class:`CheckpointError` saying it is a
      bare maskrcnn state dict and how to load it. No other architecture is guessed from shapes: settings
      that are not in the weights (input sizes, anchors, thresholds) would be guessed too.

    Every key and shape must match (:func:`load_state_dict_strict`); otherwise nothing is loaded and the
    error names the file and the first offending keys.
    """
    from maskrcnn.modeling.build import build_model

    source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "state_dict"
    data = read_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else dict(weights)
    if isinstance(config, str):
        config = get_config(config)
    if isinstance(default_config, str):
        default_config = get_config(default_config)
    if data.get("format") == FORMAT:
        if not isinstance(data.get("version"), int) or data["version"] > VERSION:
            raise CheckpointError(
                f"{source}: checkpoint version {data.get('version')!r} is not one this package reads "
                f"(<= {VERSION})"
            )
        if not isinstance(data.get("model"), Mapping) or not isinstance(data.get("config"), Mapping):
            raise CheckpointError(f"{source}: a maskrcnn checkpoint without its 'model' or 'config' entry")
        if config is None:
            try:
                config = config_from_dict(data["config"])
            except ConfigError as e:
                raise CheckpointError(f"{source}: the stored config is not valid here: {e}") from None
        model = build_model(config)
        load_state_dict_strict(model, data["model"], source=source)
        model.metadata = check_metadata(data.get("metadata"), config, source=source)
        return model.to(device).eval()
    if not _is_state_dict(data) or "backbone.body.conv1.weight" not in data:
        raise CheckpointError(
            f"{source}: not a maskrcnn checkpoint nor a Mask R-CNN state dict "
            f"(first keys: {_short([str(k) for k in list(data)[:5]])})"
        )
    state_dict = torchvision_to_maskrcnn(data)  # a no-op on our own key layout
    config = config if config is not None else default_config
    if config is not None:
        model = build_model(config)
        load_state_dict_strict(model, state_dict, source=source)
        return model.to(device).eval()
    # no config: torchvision's maskrcnn_resnet50_fpn, or a bare state dict of ours
    torchvision_layout = any(k.startswith(_TORCHVISION_MARKERS) for k in data)
    model, mismatch = None, None
    if "roi_heads.box_predictor.cls_score.weight" in data:
        keypoints = state_dict.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
        tv = get_config("tv-R-50-FPN" if keypoints is None else "tv-keypoint-R-50-FPN")
        tv.num_classes = int(data["roi_heads.box_predictor.cls_score.weight"].shape[0])
        tv.roi_heads.mask = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state_dict
        if keypoints is not None:  # ConvTranspose2d weight: [in, K, 4, 4]
            tv.roi_heads.num_keypoints = int(keypoints.shape[1])
        try:
            model = build_model(tv)
            load_state_dict_strict(model, state_dict, source=source)
        except (CheckpointError, ConfigError) as e:
            model, mismatch = None, e
    if model is not None:
        return model.to(device).eval()
    if torchvision_layout:  # torchvision's key names, but not its maskrcnn_resnet50_fpn
        raise mismatch or CheckpointError(f"{source}: a torchvision state dict without a box predictor")
    raise CheckpointError(
        f"{source} is a bare maskrcnn state dict (no config inside) that is not torchvision's "
        "maskrcnn_resnet50_fpn: load it with the config it was trained with: --config PRESET or the run's "
        "config.yaml on the command line, load_model(path, config=PRESET or ModelConfig) in Python "
        "(checkpoints written by maskrcnn.weights.save_checkpoint or training carry their config)"
    )
