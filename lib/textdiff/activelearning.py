"""Which image should a clinician label next: predictive uncertainty and diversity in diffusion-feature space."""

from __future__ import annotations

import math

import torch

from textdiff.data.items import Item
from textdiff.model.features import FeatureCache
from textdiff.inference import grid_logits
from textdiff.model.segmenter import TextDiffModel
from textdiff.data.tiling import window_items


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Per image, the mean pixel entropy of the softmax, scaled to [0, 1] (1 = the model cannot tell any class)."""
    probabilities = logits.float().softmax(1)
    entropy = -(probabilities * probabilities.clamp_min(1e-8).log()).sum(1)
    return entropy.flatten(1).mean(1) / math.log(logits.shape[1])


def uncertainty_scores(model: TextDiffModel, items: list[Item], cache: FeatureCache | None = None) -> list[float]:
    """Uncertainty of the model's mask for each item (with its report, on its working grid), in order."""
    cache = cache or FeatureCache(model.extractor)
    return [mask_uncertainty(grid_logits(model, item, cache)[None]).item() for item in items]


def image_embeddings(cache: FeatureCache, items: list[Item]) -> torch.Tensor:
    """One unit vector per image: every diffusion feature map averaged over space (and over the image's windows when
    it has several), scales concatenated."""
    window = cache.extractor.cfg.image_size
    vectors = []
    for item in items:
        parts = [torch.cat([f.float().mean((-2, -1)) for f in cache.get(part)]) for part in window_items(item, window)]
        vectors.append(torch.stack(parts).mean(0))
    return torch.nn.functional.normalize(torch.stack(vectors), dim=1)


def pick_diverse(candidates: torch.Tensor, labeled: torch.Tensor, count: int) -> list[int]:
    """Greedy farthest-first: each pick is the candidate farthest from everything labeled or picked so far.

    Returns indices into `candidates`; with nothing labeled the first pick is the candidate farthest from the mean.
    """
    count = min(count, len(candidates))
    anchors = labeled if len(labeled) else candidates.mean(0, keepdim=True)
    distance = torch.cdist(candidates, anchors).min(1).values
    picks: list[int] = []
    for _ in range(count):
        best = int(distance.argmax())
        picks.append(best)
        distance = torch.minimum(distance, torch.cdist(candidates, candidates[best : best + 1])[:, 0])
        distance[picks] = -1.0
    return picks
