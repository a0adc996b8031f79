"""Synthetic copies (EMIT-Diff) in training: each training image is paired with one of its first
`train.synthetic_ratio` copies, and the loss sees, per patch of a random merging mask, the real or the synthetic
prediction (`textdiff.synthesis.emit.merge_predictions`). Validation uses real images only."""

from __future__ import annotations

import logging

import torch

from textdiff.config import TrainConfig
from textdiff.data.items import Item
from textdiff.data.studies import Case, DataError
from textdiff.model.features import feature_keys
from textdiff.synthesis.emit import merge_predictions
from textdiff.training.options.base import TrainingOption

logger = logging.getLogger(__name__)


class SyntheticCopies(TrainingOption):
    def __init__(self, copies: dict[str, list[Item]], cfg: TrainConfig):
        self.copies, self.alpha, self.patch = copies, cfg.merge_alpha, cfg.merge_patch
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def cached(self) -> list[Item]:
        return [copy for group in self.copies.values() for copy in group]

    def add_features(self, sample: dict, item: Item, cache, rng) -> None:
        """One of the image's copies ("synthetic0", ...), or the image itself again when it has none."""
        features = cache.get(rng.choice(self.copies.get(item["id"]) or [item]))
        sample.update(zip(feature_keys(len(features), "synthetic"), (f.float() for f in features)))

    def logits(self, model, batch) -> torch.Tensor:
        """Real and synthetic in one forward, then merged patch by patch (the mask is the same for both)."""
        device = next(model.head.parameters()).device
        synthetic = [batch.extra[key] for key in feature_keys(len(batch.features), "synthetic")]
        both = [torch.cat(pair).to(device) for pair in zip(batch.features, synthetic)]
        real, fake = model.logits_from_features(both, batch.reports + batch.reports).chunk(2)
        return merge_predictions(real, fake, self.alpha, self.patch, self.generator)


def synthetic_copies(train_items: list[Item], synthetic: dict[str, list[Item]] | None, ratio: int) -> dict | None:
    """The first `ratio` synthetic copies of each training image, or None when synthetic augmentation is off."""
    if ratio < 1 or not synthetic:
        return None
    return {item["id"]: synthetic.get(item["id"], [])[:ratio] for item in train_items}


def load_copies(model, synthetic: dict[str, list[Case]] | None, wanted: set[str]) -> dict[str, list[Item]] | None:
    """The synthetic copies (source id -> cases, from `read_synthetic`) of the `wanted` training images, loaded, when
    `train.synthetic_ratio` > 0; None when it is 0."""
    ratio = model.cfg.train.synthetic_ratio
    if ratio <= 0:
        return None
    if not synthetic:
        raise DataError("train.synthetic_ratio > 0 needs synthetic pairs: make them with `textdiff synthesize`")
    copies = {source: [model.load(c) for c in group[:ratio]] for source, group in synthetic.items() if source in wanted}
    logger.info("%d of %d training images have synthetic copies", len(copies), len(wanted))
    return copies
