"""Intensity copies of training windows: jittered images, the same masks, features cached once per copy."""

import dataclasses

import pytest
import torch

from textdiff.config import TrainConfig
from textdiff.model.features import FeatureCache
from textdiff.training.options.intensity import training_window_count, training_windows
from textdiff.training.train import selection_items, train_head


def test_each_window_gets_its_copies_with_the_same_mask_and_other_intensities(labeled_items, h):
    items = labeled_items[:2]
    windows = training_windows(items, h.size, TrainConfig(intensity_copies=2, seed=3))
    assert [w["id"] for w in windows] == [items[0]["id"], items[1]["id"], f"{items[0]['id']}~i0",
                                          f"{items[1]['id']}~i0", f"{items[0]['id']}~i1", f"{items[1]['id']}~i1"]
    by_id = {w["id"]: w for w in windows}
    for item in items:
        for k in range(2):
            copy = by_id[f"{item['id']}~i{k}"]
            assert torch.equal(copy["label"], item["label"]) and copy["report"] == item["report"]
            assert copy["image"].shape == item["image"].shape
            assert not torch.allclose(copy["image"], item["image"]) and copy["image"].abs().max() <= 1
    assert training_window_count(items, h.size, TrainConfig(intensity_copies=2)) == len(windows)  # epochs in steps
    again = training_windows(items, h.size, TrainConfig(intensity_copies=2, seed=3))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(windows, again))  # fixed per seed
    assert training_windows(items, h.size, TrainConfig()) == items  # off by default
    # a checkpoint chosen on training images (no validation foreground) is scored on the real windows only
    assert selection_items([], windows) == items


def test_training_with_copies_computes_each_copys_features_once(make_model, labeled_items):
    model = make_model()
    cache = FeatureCache(model.extractor)
    cfg = dataclasses.replace(model.cfg.train, epochs=2, intensity_copies=3)
    result = train_head(model, labeled_items[:3], [], cfg, cache=cache, progress=False)
    assert len(result.history) == 2
    assert sorted(cache._memory) == sorted(f"{it['id']}{tail}" for it in labeled_items[:3]
                                           for tail in ("", "~i0", "~i1", "~i2"))


def test_a_negative_number_of_copies_is_refused():
    with pytest.raises(ValueError, match="intensity_copies"):
        TrainConfig(intensity_copies=-1)
