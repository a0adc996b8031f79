"""Images of any size: the working grid, training windows, sliding-window inference stitched back onto the image's own
grid, and the scale a backbone was pretrained at."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
from textdiff.config import BackboneConfig, TextDiffConfig
from textdiff.data.studies import Case
from textdiff.model.features import FeatureCache, RandMirrord
from textdiff.evaluation import segment_items
from textdiff.inference import segment_image
from textdiff.model.segmenter import TextDiffModel
from textdiff.data.tiling import (TILING_FILE, describe, relative_box, resolve_tiling, sliding_logits, window_items,
                             window_starts, working_scale, working_shape)
from textdiff.training.train import train_head


def test_the_automatic_scale_resizes_small_images_and_keeps_large_ones_fine():
    cfg = BackboneConfig(image_size=128, max_windows=4)
    assert working_shape((100, 80), cfg) == (128, 102)  # small: resized up to fill one window, aspect kept
    assert working_scale((256, 256), cfg) == 1.0  # a 256² MRI slice keeps its pixels: 3x3 overlapping windows
    assert working_shape((1000, 1000), cfg) == (512, 512)  # a 1000² H&E tile: at most 4 windows per side
    assert working_shape((1000, 1000), dataclasses.replace(cfg, max_windows=1)) == (128, 128)  # the papers' resize
    assert working_shape((1000, 600), dataclasses.replace(cfg, patch_scale=0.25)) == (250, 150)
    assert "one 128x128 window" in describe((100, 80), cfg)
    assert "patches at scale 0.512" in describe((1000, 1000), cfg)


def test_windows_cover_the_grid_and_know_where_they_are():
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(20, 32, 16) == [0]
    image = torch.arange(2 * 70 * 50, dtype=torch.float32).reshape(2, 70, 50)
    label = (image[:1] % 3 == 0).long()
    windows = window_items({"id": "tile", "image": image, "label": label, "report": "r"}, 32)
    covered = torch.zeros(70, 50, dtype=torch.bool)
    for window in windows:
        assert window["image"].shape == (2, 32, 32) and window["label"].shape == (1, 32, 32)
        assert window["id"].startswith("tile@70x50:") and window["source"] == "tile"
        x, y = (int(v) for v in window["id"].split(":")[1].split(","))
        assert torch.equal(window["image"], image[:, x : x + 32, y : y + 32])
        assert torch.equal(window["label"], label[:, x : x + 32, y : y + 32])
        covered[x : x + 32, y : y + 32] = True
    assert covered.all()
    assert torch.allclose(relative_box((0, 0), 70, (70, 50))[:3:2], torch.tensor([-1.0, 1.0]))
    # a one-window grid is the item itself, under its own id (the feature cache key of a whole image)
    whole = {"id": "x", "image": torch.zeros(1, 32, 32), "label": None, "report": ""}
    assert window_items(whole, 32) == [whole]


def test_a_large_image_is_tiled_and_stitched_back_to_exactly_its_grid():
    """Windows that return their own pixels blend (Gaussian weights, overlaps, the padded far edge) into the image."""
    image = torch.randn(3, 97, 61)
    stitched = sliding_logits({"id": "big", "image": image, "report": ""}, 32, 0.25,
                              lambda windows: torch.stack([w["image"] for w in windows]))
    assert stitched.shape == image.shape
    torch.testing.assert_close(stitched, image, rtol=1e-5, atol=1e-5)
    small = torch.randn(1, 20, 32)  # smaller than a window: padded, then cropped back
    torch.testing.assert_close(sliding_logits({"id": "s", "image": small, "report": ""}, 32, 0.25,
                                              lambda windows: torch.stack([w["image"] for w in windows])), small)


@pytest.fixture
def windowed_model(text_encoder, extractor, h):
    """A tiny model that reads images larger than its 32² window as patches."""
    def build(seed=0):
        torch.manual_seed(seed)
        cfg = h.tiny_config()
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, max_windows=4))
        return TextDiffModel(cfg, extractor=extractor, text_encoder=text_encoder)
    return build


def test_a_large_image_is_segmented_on_its_own_grid_through_windows(windowed_model, tmp_path, h):
    model = windowed_model()
    path = h.random_png(tmp_path / "large.png", 90, 70, seed=3)  # PIL (width, height)
    item = model.load(Case("large", path, report=h.normal))
    assert item["image"].shape == (1, 90, 70)  # scale 1: its own pixels, read as 32² windows
    cache = FeatureCache(model.extractor)
    (mask,) = segment_items(model, [item], cache=cache)
    assert mask.shape == (1, 90, 70) and mask.dtype == torch.uint8
    assert all("@90x70:" in key for key in cache._memory)  # the cache keys windows, not images
    assert len(cache._memory) == len(window_starts(90, 32, 24)) * len(window_starts(70, 32, 24))
    image = item["original_image"]
    assert torch.equal(segment_image(model, image, h.normal, fast=False), mask)  # the app's path, in float32


def test_training_reads_windows_and_their_places(windowed_model, tmp_path, h):
    model = windowed_model()
    items = []
    for n in range(3):
        mask = np.zeros((70, 90), np.uint8)  # (height, width) for PIL
        mask[10 + 5 * n : 40, 20:60] = 1
        case = Case(f"t{n}", h.random_png(tmp_path / f"t{n}.png", 90, 70, seed=n), h.write_png(tmp_path / f"m{n}.png", mask),
                    h.infected)
        items.append(model.load(case))
    cache = FeatureCache(model.extractor)
    result = train_head(model, items, [], dataclasses.replace(model.cfg.train, epochs=1), cache=cache, progress=False)
    assert result.best_epoch == 1
    per_image = len(window_starts(90, 32, 16)) * len(window_starts(70, 32, 16))
    assert len(cache._memory) == 3 * per_image  # every training window, each computed once


def test_obey_report_refuses_windows(windowed_model, tmp_path, h):
    model = windowed_model()
    model.cfg.head.obey_report = True
    item = model.load(Case("large", h.random_png(tmp_path / "l.png", 90, 70), report=h.infected))
    with pytest.raises(ValueError, match="whole images"):
        segment_items(model, [item])


def test_mirroring_a_window_moves_it_to_the_other_side():
    box = torch.tensor([-1.0, -1.0, -0.2, 0.5])
    mirror = RandMirrord(["label"], prob=1.0)
    out = mirror({"label": torch.zeros(1, 4, 4), "report": "upper left lung", "box": box})
    assert out["report"] == "upper right lung"
    assert torch.equal(out["box"], torch.tensor([0.2, -1.0, 1.0, 0.5]))


def test_a_backbone_pretrained_at_a_scale_is_read_at_that_scale(tmp_path, h, text_encoder):
    cfg = h.tiny_backbone(max_windows=None)
    folder = tmp_path / "backbone"
    save_diffusion(build_unet(cfg), build_scheduler(cfg), folder,
                   {TILING_FILE: json.dumps({"patch_scale": 0.5, "max_windows": 2})})
    assert resolve_tiling(dataclasses.replace(cfg, pretrained=str(folder)), str(folder)).patch_scale == 0.5
    model = TextDiffModel(TextDiffConfig(backbone=dataclasses.replace(cfg, pretrained=str(folder)), text=h.tiny_config().text,
                                         head=h.tiny_config().head), text_encoder=text_encoder)
    assert (model.cfg.backbone.patch_scale, model.cfg.backbone.max_windows) == (0.5, 2)
    explicit = resolve_tiling(dataclasses.replace(cfg, patch_scale=1.0), str(folder))  # a setting wins, with a warning
    assert explicit.patch_scale == 1.0
    assert resolve_tiling(cfg, None).max_windows == 4.0  # no record: the defaults
