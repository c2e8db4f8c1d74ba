"""Loading and saving weights: this project's checkpoints and torchvision's Mask R-CNN checkpoints.

A project checkpoint is a dict ``{"format": "maskrcnn", "version": 1, "config": <ModelConfig as a dict>,
"model": <state_dict>, ...}`` (training adds optimizer state and the like). torchvision's
``maskrcnn_resnet50_fpn`` checkpoints (a bare state_dict) are recognised by their keys and mapped onto the
``tv-R-50-FPN`` configuration. Files are read with ``torch.load(..., weights_only=True)``; a checkpoint
that does not fit the model raises an error naming the missing, unexpected and mis-shaped keys, and
nothing is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from maskrcnn.config import ModelConfig, config_from_dict, config_to_dict, get_config

__all__ = [
    "load_model",
    "save_checkpoint",
    "read_checkpoint",
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


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` with ``weights_only=True`` and a clear error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a safe checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(data).__name__}")
    return data


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Write a project checkpoint atomically (temporary file, then rename). ``extra`` items are stored too."""
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
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the complete new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_model(
    weights: str | os.PathLike | Mapping, config: ModelConfig | str | None = None, *, device: str = "cpu"
) -> nn.Module:
    """A model in eval mode with ``weights`` loaded: a project checkpoint (its config is stored inside) or a
    torchvision ``maskrcnn_resnet50_fpn`` state_dict (file or dict). ``config`` overrides the stored one."""
    from maskrcnn.modeling.build import build_model

    source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "state_dict"
    data = read_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else dict(weights)
    if isinstance(config, str):
        config = get_config(config)
    if data.get("format") == FORMAT:
        if data.get("version", 0) > VERSION:
            raise CheckpointError(
                f"{source}: checkpoint version {data['version']} is newer than this package's"
            )
        cfg = config if config is not None else config_from_dict(data["config"])
        state_dict = data["model"]
    elif is_torchvision_maskrcnn(data):
        state_dict = torchvision_to_maskrcnn(data)
        if config is None:
            config = get_config("tv-R-50-FPN")
            config.num_classes = int(data["roi_heads.box_predictor.cls_score.weight"].shape[0])
            config.roi_heads.mask = "roi_heads.mask_predictor.mask_fcn_logits.weight" in data
        cfg = config
    else:
        raise CheckpointError(
            f"{source}: not a maskrcnn checkpoint nor a torchvision Mask R-CNN state_dict "
            f"(first keys: {_short(list(data)[:5])})"
        )
    model = build_model(cfg)
    load_state_dict_strict(model, state_dict, source=source)
    return model.to(device).eval()
