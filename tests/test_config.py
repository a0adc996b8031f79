"""Config: dotted overrides, unknown keys, dict/JSON round-trips."""

import json

import pytest

from textdiff.config import BackboneConfig, TextDiffConfig, with_overrides


def test_with_overrides_applies_dotted_keys_and_turns_lists_into_tuples():
    cfg = with_overrides(TextDiffConfig(), {"train.epochs": 7, "backbone.timesteps": [5, 15], "head.use_text": False})
    assert cfg.train.epochs == 7
    assert cfg.backbone.timesteps == (5, 15)
    assert cfg.head.use_text is False
    # untouched settings keep their defaults and the original is not modified
    assert cfg.train.lr == TextDiffConfig().train.lr
    assert TextDiffConfig().train.epochs != 7


@pytest.mark.parametrize("key", ["train.no_such_setting", "backbone.imagesize"])
def test_unknown_setting_raises_and_lists_known_ones(key):
    with pytest.raises(ValueError, match="unknown") as err:
        with_overrides(TextDiffConfig(), {key: 1})
    assert key.split(".")[1] in str(err.value)
    assert "known:" in str(err.value)


@pytest.mark.parametrize("key", ["nosection.epochs", "train", "epochs"])
def test_key_without_valid_section_raises(key):
    with pytest.raises(ValueError, match="section.name"):
        with_overrides(TextDiffConfig(), {key: 1})


def test_to_dict_from_dict_round_trip_including_json(h):
    cfg = h.tiny_config(use_text=False)
    assert TextDiffConfig.from_dict(cfg.to_dict()) == cfg
    # a checkpoint stores the dict; JSON turns tuples into lists and from_dict must turn them back
    again = TextDiffConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.backbone.block_out_channels, tuple)


def test_from_dict_rejects_unknown_keys_and_fills_missing_sections():
    with pytest.raises(ValueError, match="BackboneConfig"):
        TextDiffConfig.from_dict({"backbone": {"bogus": 1}})
    cfg = TextDiffConfig.from_dict({"backbone": {"image_size": 64}})
    assert cfg.backbone.image_size == 64
    assert cfg.backbone.timesteps == BackboneConfig().timesteps
    assert cfg.head == TextDiffConfig().head
