"""The one interface through which a training option joins the method's loop (`textdiff.training.train`).

The loop reads plain labeled windows and minimises DiceCE. An option may add training windows, add features to each
sample before augmentation, read a batch with its own forward pass, or add a loss term; every hook here changes
nothing, so an option overrides only what it does.
"""

from __future__ import annotations

import torch

from textdiff.data.items import Item
from textdiff.errors import DataError


class TrainingOption:
    def windows(self, windows: list[Item]) -> list[Item]:
        """The run's training windows, with any this option adds."""
        return windows

    def cached(self) -> list[Item]:
        """Items besides the training windows whose features this option reads (filled into the cache up front)."""
        return []

    def add_features(self, sample: dict, item: Item, cache, rng) -> None:
        """Features read beside an item's own, put in its sample before augmentation so both get the same flips."""

    def logits(self, model, batch) -> torch.Tensor | None:
        """The batch's logits when this option reads it its own way (None: the model's plain forward)."""
        return None

    def loss(self, loop) -> torch.Tensor | None:
        """A term added to the batch's DiceCE, drawn after it (None: nothing)."""
        return None

    def stats(self) -> dict:
        """What a run's result says of this option (e.g. how many images it added)."""
        return {}


def refuse_windows(items: list[Item], window: int) -> None:
    """Synthetic copies and report supervision pair whole images (a copy, a report's sides): not windows."""
    if any(tuple(item["image"].shape[1:]) != (window, window) for item in items):
        raise DataError("synthetic copies and report supervision need each image in one window: set "
                         "backbone.max_windows=1 (or a backbone.patch_scale that fits the images into one window)")
