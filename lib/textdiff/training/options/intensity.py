"""Intensity copies of training windows: each window also trains with its contrast, per-channel gain and offset
drawn at random, so the head does not learn the stain of a few slides or the contrast of one scanner.

The backbone is frozen, so a copy's features are computed once and cached like the window's own; the copies are fixed
per seed, not redrawn each epoch.
"""

from __future__ import annotations

import torch
from monai.transforms import Compose, RandAdjustContrast, RandScaleIntensity, RandShiftIntensity

from textdiff.config import TrainConfig
from textdiff.data.items import Item
from textdiff.data.tiling import windows_of
from textdiff.training.options.base import TrainingOption


class IntensityCopies(TrainingOption):
    """`train.intensity_copies` copies of every training window, intensities jittered (`intensity_copies`)."""

    def __init__(self, cfg: TrainConfig):
        self.count, self.seed = cfg.intensity_copies, cfg.seed

    def windows(self, windows: list[Item]) -> list[Item]:
        return windows + intensity_copies(windows, self.count, self.seed)


def intensity_copies(windows: list[Item], count: int, seed: int) -> list[Item]:
    """`count` copies of every window (ids "<window id>~i<k>"), the same mask, intensities jittered in [-1, 1]; marked
    with an "origin", so that choosing the checkpoint on training images (no validation foreground) scores real ones."""
    jitter = Compose([
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.4)),
        RandScaleIntensity(factors=0.15, prob=1.0, channel_wise=True),
        RandShiftIntensity(offsets=0.15, prob=1.0, channel_wise=True),
    ]).set_random_state(seed=seed)
    return [{**window, "id": f"{window['id']}~i{k}", "origin": "intensity",
             "image": torch.as_tensor(jitter(window["image"])).as_subclass(torch.Tensor).clamp(-1, 1)}
            for k in range(count) for window in windows]


def training_window_count(items: list[Item], window: int, cfg: TrainConfig) -> int:
    """How many windows `training_windows` yields, without drawing the copies (for counting epochs in steps)."""
    return len(windows_of(items, window)) * (1 + cfg.intensity_copies)


def training_windows(items: list[Item], window: int, cfg: TrainConfig) -> list[Item]:
    """The windows a training run learns from: every item's windows, and `cfg.intensity_copies` copies of each (what
    the benchmarks' UNet trains on beside the head)."""
    return IntensityCopies(cfg).windows(windows_of(items, window))
