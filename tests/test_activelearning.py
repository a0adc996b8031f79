"""Uncertainty and diversity for picking the next image to label, and the labeling simulation."""

import random

import torch

from textdiff.activelearning import image_embeddings, mask_uncertainty, pick_diverse, uncertainty_scores
from textdiff.al_benchmark import choose
from textdiff.features import FeatureCache


def test_mask_uncertainty_is_zero_when_sure_and_one_when_undecided():
    sure = torch.zeros(1, 2, 4, 4)
    sure[:, 0] = 20.0
    undecided = torch.zeros(1, 2, 4, 4)
    scores = mask_uncertainty(torch.cat([sure, undecided]))
    assert scores[0] < 1e-6 and abs(scores[1] - 1.0) < 1e-6


def test_pick_diverse_takes_the_far_points_first_and_never_twice():
    candidates = torch.tensor([[0.0, 0.1], [0.0, 0.2], [5.0, 5.0], [-4.0, 0.0]])
    labeled = torch.tensor([[0.0, 0.0]])
    picks = pick_diverse(candidates, labeled, 3)
    assert picks[0] == 2 and picks[1] == 3 and len(set(picks)) == 3
    assert pick_diverse(candidates, torch.empty(0, 2), 10) and len(pick_diverse(candidates, labeled, 10)) == 4


def test_scores_and_embeddings_for_real_items(make_model, labeled_items):
    model = make_model()
    cache = FeatureCache(model.extractor)
    scores = uncertainty_scores(model, labeled_items, cache)
    assert len(scores) == len(labeled_items) and all(0 <= s <= 1 for s in scores)
    embeddings = image_embeddings(cache, labeled_items)
    assert embeddings.shape[0] == len(labeled_items)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(labeled_items)))


def test_each_strategy_picks_new_unlabeled_items(make_model, labeled_items):
    model = make_model()
    cache = FeatureCache(model.extractor)
    labeled, unlabeled = labeled_items[:2], labeled_items[2:]
    for strategy in ("random", "uncertainty", "diverse"):
        picked = choose(strategy, model, cache, labeled, unlabeled, 2, random.Random(0))
        ids = [item["id"] for item in picked]
        assert len(ids) == 2 and len(set(ids)) == 2
        assert set(ids) <= {item["id"] for item in unlabeled}
