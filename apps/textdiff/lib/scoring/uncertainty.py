"""Scoring method: how unsure the current model is of each unlabeled image's mask, stored in the image info."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from textdiff.activelearning import uncertainty_scores
from textdiff.data import Case, DataError, load_case

from ..model_store import ModelStore

logger = logging.getLogger(__name__)

SCORE_KEY = "textdiff_uncertainty"
MODEL_KEY = "textdiff_uncertainty_model"  # which checkpoint (mtime, ns) the score came from


class MaskUncertainty(ScoringMethod):
    def __init__(self, store: ModelStore):
        super().__init__("Mean pixel entropy of the TextDiff mask of every unlabeled image (1 = least sure)")
        self.store = store

    def __call__(self, request, datastore: Datastore):
        model = self.store.get()
        size, channels, classes = model.image_size, model.cfg.backbone.in_channels, model.cfg.head.num_classes
        items, skipped = [], []
        for key in datastore.get_unlabeled_images():
            case = Case(key, Path(datastore.get_image_uri(key)), report=datastore.report(key))
            try:
                items.append(load_case(case, size, channels, classes))
            except DataError as err:  # one unreadable file must not stop the others from being scored
                skipped.append(key)
                logger.warning("not scored: %s", err)
        scores = uncertainty_scores(model, items) if items else []
        for item, score in zip(items, scores):
            datastore.update_image_info(item["id"], {SCORE_KEY: score, MODEL_KEY: self.store.version})
        logger.info("scored %d unlabeled images (%d unreadable)", len(items), len(skipped))
        return {"scored": len(items), "skipped": skipped}
