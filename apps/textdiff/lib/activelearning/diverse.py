"""Strategy `diverse`: the unlabeled image farthest from the labeled ones in diffusion-feature space.

Images handed out in the last hour that are still unlabeled count as labeled too (as do any ids a client passes in
`exclude`), so five clicks on "Next Sample" give five different kinds of image, not five near-copies. Images known
to be normal are never picked (`to_label`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy
from textdiff.activelearning import image_embeddings, pick_diverse
from textdiff.model.features import FeatureCache

from ..datastore_items import load_items, mean_by_source, to_label
from ..model_store import ModelStore

logger = logging.getLogger(__name__)

HANDED_OUT_SECONDS = 3600


class Diverse(Strategy):
    def __init__(self, store: ModelStore, cache_folder: Path, healthy_label: str = ""):
        super().__init__("The unlabeled image least like the labeled ones (diffusion features)")
        self.store = store
        self.cache_folder = cache_folder
        self.healthy_label = healthy_label
        self._handed_out: dict[str, float] = {}

    def __call__(self, request, datastore: Datastore):
        model = self.store.get()
        now = time.time()
        self._handed_out = {k: t for k, t in self._handed_out.items() if now - t < HANDED_OUT_SECONDS}
        pending = set(request.get("exclude", [])) | set(self._handed_out)
        unlabeled = [k for k in to_label(datastore, self.healthy_label) if k not in pending]
        candidates, _ = load_items(datastore, unlabeled, model)
        if not candidates:
            return None
        cache = FeatureCache(model.extractor, folder=self.cache_folder)
        known = datastore.get_labeled_images() + sorted(k for k in pending if k in datastore.list_images())
        anchors, _ = load_items(datastore, known, model)
        embeddings = self._embeddings(cache, candidates)  # one per image: a volume's slices are averaged
        labeled = self._embeddings(cache, anchors) if anchors else {}
        keys = list(embeddings)
        chosen = pick_diverse(torch.stack(list(embeddings.values())),
                              torch.stack(list(labeled.values())) if labeled else torch.empty(0, 1), 1)[0]
        pick = keys[chosen]
        self._handed_out[pick] = now
        logger.info("diverse: %s of %d unlabeled candidates", pick, len(keys))
        return {"id": pick}

    @staticmethod
    def _embeddings(cache: FeatureCache, items: list[dict]) -> dict[str, torch.Tensor]:
        means = mean_by_source(items, image_embeddings(cache, items))
        return {key: torch.nn.functional.normalize(vector, dim=0) for key, vector in means.items()}
