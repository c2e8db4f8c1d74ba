"""load_model / read_checkpoint on what users pass: our checkpoints, bare state dicts (ours and
torchvision's), and files that are not checkpoints; every failure is one line naming the file."""

import argparse
import copy

import pytest
import torch

from maskrcnn.config import config_to_dict
from maskrcnn.modeling.build import build_model
from maskrcnn.weights import (
    CheckpointError,
    check_metadata,
    load_model,
    maskrcnn_to_torchvision,
    read_checkpoint,
    save_checkpoint,
)
from tests.common import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_classes=4)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_project_checkpoint_round_trip(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    loaded = load_model(str(path))
    assert loaded.config == model.config and _same_weights(loaded, model) and not loaded.training


META = {"class_names": ["background", "cat", "dog", "bird"], "category_ids": [3, 17, 5]}


def test_checkpoints_carry_the_training_datas_names_and_category_ids(tmp_path, model):
    assert load_model(model.state_dict(), model.config).metadata == {}  # nothing recorded: nothing guessed
    named = copy.deepcopy(model)
    named.metadata = dict(META)
    save_checkpoint(tmp_path / "named.pt", named)
    assert load_model(str(tmp_path / "named.pt")).metadata == META
    save_checkpoint(tmp_path / "plain.pt", model)  # a model without metadata: none stored
    assert "metadata" not in torch.load(tmp_path / "plain.pt", weights_only=True)
    assert load_model(str(tmp_path / "plain.pt")).metadata == {}


@pytest.mark.parametrize(
    "metadata, named",
    [
        (
            {"class_names": ["background", "cat"]},
            "metadata.class_names=['background', 'cat']: expected 4 names",
        ),
        ({"category_ids": [1, 1, 2]}, "metadata.category_ids=[1, 1, 2]: expected 3 distinct ints"),
        ({"category_ids": ["1", "2", "3"]}, "metadata.category_ids"),
        ({"keypoint_names": ["nose"]}, "metadata.keypoint_names=['nose']: expected 0 names"),
        (
            {"skeleton": [[1, 2]]},
            "metadata.skeleton=[[1, 2]]: expected [i, j] pairs of keypoint indices in 1 .. 0",
        ),
        ({"colours": []}, "unknown metadata entry 'colours'"),
        ([1, 2], "'metadata' must be a dict"),
    ],
)
def test_bad_metadata_is_refused_naming_the_entry(tmp_path, model, metadata, named):
    with pytest.raises(CheckpointError, match="^x.pt: ") as err:
        check_metadata(metadata, model.config, source="x.pt")
    assert named in str(err.value)
    data = {"format": "maskrcnn", "version": 1, "config": config_to_dict(model.config)}
    data.update(model=model.state_dict(), metadata=metadata)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: ") as err:
        load_model(str(tmp_path / "bad.pt"))
    assert named in str(err.value)


def test_bare_state_dict_of_our_model_says_how_to_load_it(tmp_path, model):
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path} is a bare maskrcnn state dict (no config inside)")
    assert "--config" in msg and "load_model(path, config=" in msg and "\n" not in msg
    assert "bn3" not in msg  # not read as a torchvision R-50 any more
    # with the config it was made with, it loads exactly; default_config (the CLI's --config) too
    assert _same_weights(load_model(str(path), config=model.config), model)
    assert _same_weights(load_model(str(path), default_config=model.config), model)


def test_bare_state_dict_with_the_wrong_config_names_the_keys(tmp_path, model):
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    other = copy.deepcopy(model.config)
    other.num_classes = 7
    with pytest.raises(CheckpointError) as err:
        load_model(str(path), config=other)
    msg = str(err.value)
    assert str(path) in msg and "roi_heads.box_predictor.cls_score.weight (4, " in msg and "\n" not in msg


def test_torchvision_layout_loads_without_a_config():
    tv = build_model("tv-R-50-FPN")
    sd = tv.state_dict()
    for state_dict in (sd, maskrcnn_to_torchvision(sd)):  # torchvision's old and new key names
        loaded = load_model(state_dict)
        assert loaded.config.rpn.anchor_stride_rule == "torchvision" and _same_weights(loaded, tv)


def test_default_config_does_not_replace_a_stored_one(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    loaded = load_model(str(path), default_config="R-50-FPN")
    assert loaded.config == model.config


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"hello, not a checkpoint\n", "cannot read checkpoint"),
        (b"", "cannot read checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, expected):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_model(str(path))
    assert str(err.value).startswith(f"{expected} {path}") and "\n" not in str(err.value)


def test_truncated_and_unsafe_and_foreign_files(tmp_path, model):
    good = tmp_path / "good.pt"
    save_checkpoint(good, model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {truncated}"):
        read_checkpoint(truncated)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"x": argparse.Namespace(a=1)}, unsafe)  # a pickled object: refused by weights_only=True
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(unsafe)
    assert str(err.value) == (
        f"cannot read checkpoint {unsafe}: it holds Python objects (argparse.Namespace), not only weights; "
        "maskrcnn reads checkpoints with torch.load(weights_only=True)"
    )

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match=f"{tensor}: expected a dict checkpoint, got Tensor"):
        load_model(str(tensor))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"a": torch.zeros(1)}, "optimizer": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a maskrcnn checkpoint nor a Mask R-CNN state dict.*model"):
        load_model(str(foreign))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(str(tmp_path))


def test_project_checkpoint_with_a_newer_version_or_bad_config(tmp_path, model):
    data = read_checkpoint_dict(tmp_path, model)
    data["version"] = 99
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(data)
    data = read_checkpoint_dict(tmp_path, model)
    data["config"]["num_classes"] = 1
    with pytest.raises(CheckpointError, match="stored config.*num_classes=1"):
        load_model(data)


def read_checkpoint_dict(tmp_path, model):
    path = tmp_path / "c.pt"
    save_checkpoint(path, model)
    return read_checkpoint(path)


def test_test_time_settings_rebuild_with_the_same_weights(model):
    from maskrcnn.config import ConfigError
    from maskrcnn.weights import apply_test_settings

    loaded = copy.deepcopy(model).eval()
    loaded.metadata = {"class_names": ["background", "a", "b", "c"]}
    assert apply_test_settings(loaded, ["solver.max_iter=5", "seed=3"]) is loaded  # no model item
    assert apply_test_settings(loaded, ["model.num_classes=4", "model.roi_heads.aligned=false"]) is loaded
    items = [
        "model.roi_heads.score_thresh=0.0",
        "model.input.min_size=(32,)",
        "model.rpn.post_nms_topk_test=7",
    ]
    changed = apply_test_settings(loaded, items)
    assert changed is not loaded and not changed.training and _same_weights(changed, loaded)
    assert changed.metadata == loaded.metadata
    assert changed.config.roi_heads.score_thresh == 0.0 and tuple(changed.config.input.min_size) == (32,)
    assert changed.roi_heads.box_branch.score_thresh == 0.0  # reaches the modules, not only the config
    assert loaded.config.roi_heads.score_thresh == 0.05  # the given model is left as it was
    for key in (
        "model.backbone.fpn_channels=32",
        "model.roi_heads.pooler=pool",
        "model.rpn.fg_iou_thresh=0.6",
    ):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.")):
            apply_test_settings(loaded, [key])


def test_test_time_keys_name_config_keys():
    """A renamed config key must not leave a test-time key that no override can reach."""
    import functools

    from maskrcnn.config import TEST_TIME_KEYS, Config

    for key in TEST_TIME_KEYS:
        functools.reduce(getattr, key.split("."), Config())  # AttributeError names a stale key
