"""Which image should a clinician label next: predictive uncertainty and diversity in diffusion-feature space."""

from __future__ import annotations

import math

import torch

from .features import FeatureCache
from .model import TextDiffModel
from .train import predict_logits


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Per image, the mean pixel entropy of the softmax, scaled to [0, 1] (1 = the model cannot tell any class)."""
    probabilities = logits.float().softmax(1)
    entropy = -(probabilities * probabilities.clamp_min(1e-8).log()).sum(1)
    return entropy.flatten(1).mean(1) / math.log(logits.shape[1])


def uncertainty_scores(model: TextDiffModel, items: list[dict], cache: FeatureCache | None = None) -> list[float]:
    """Uncertainty of the model's mask for each item (with its report), in order."""
    cache = cache or FeatureCache(model.extractor)
    cache.fill(items, progress=False)
    return mask_uncertainty(predict_logits(model, items, cache)).tolist()


def image_embeddings(cache: FeatureCache, items: list[dict]) -> torch.Tensor:
    """One unit vector per image: every diffusion feature map averaged over space, scales concatenated."""
    cache.fill(items, progress=False)
    vectors = [torch.cat([f.float().mean((-2, -1)) for f in cache.get(item)]) for item in items]
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
