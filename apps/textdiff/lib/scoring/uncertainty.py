"""Scoring method: how unsure the current model is of each unlabeled image's mask, stored in the image info."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from textdiff.activelearning import uncertainty_scores
from textdiff.model.features import FeatureCache

import torch

from ..datastore_items import load_items, mean_by_source, to_label
from ..model_store import ModelStore

logger = logging.getLogger(__name__)

SCORE_KEY = "textdiff_uncertainty"
MODEL_KEY = "textdiff_uncertainty_model"  # which checkpoint (mtime, ns) the score came from


class MaskUncertainty(ScoringMethod):
    def __init__(self, store: ModelStore, cache_folder: Path, healthy_label: str = ""):
        super().__init__("Mean pixel entropy of the TextDiff mask of every unlabeled image not known to be normal "
                         "(1 = least sure)")
        self.store = store
        self.cache_folder = cache_folder  # diffusion features on disk: rescoring after training reruns only the head
        self.healthy_label = healthy_label  # images with this image-level label are not scored (`to_label`)

    def __call__(self, request, datastore: Datastore):
        if not self.store.exists():  # a fresh server: MONAI Label's start-up scoring job finds nothing to score with
            logger.info("no textdiff model yet: nothing scored (train one first)")
            return {"scored": 0, "skipped": []}
        model = self.store.get()
        items, skipped = load_items(datastore, to_label(datastore, self.healthy_label), model)
        cache = FeatureCache(model.extractor, folder=self.cache_folder)
        scores = mean_by_source(items, torch.tensor(uncertainty_scores(model, items, cache))) if items else {}
        for key, score in scores.items():  # a volume's score is the mean over its slices
            datastore.update_image_info(key, {SCORE_KEY: score.item(), MODEL_KEY: self.store.version})
        logger.info("scored %d unlabeled images (%d unreadable)", len(scores), len(skipped))
        return {"scored": len(scores), "skipped": skipped}
