"""Strategy `uncertainty`: the unlabeled image whose mask the model is least sure of (scored by MaskUncertainty),
among those not known to be normal: a normal image's mask is known to be empty, and uncertain masks are often those
of normal images (docs/results/active-learning.md).

Scores are recomputed first when an unlabeled image has none, or a score came from an older model.
"""

from __future__ import annotations

import logging
import random

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..datastore_items import to_label
from ..scoring.uncertainty import MODEL_KEY, SCORE_KEY, MaskUncertainty

logger = logging.getLogger(__name__)


class Uncertainty(Strategy):
    def __init__(self, scoring: MaskUncertainty):
        super().__init__("The unlabeled image whose predicted mask is most uncertain")
        self.scoring = scoring

    def __call__(self, request, datastore: Datastore):
        unlabeled = to_label(datastore, self.scoring.healthy_label)
        if not unlabeled:
            return None
        if not self.scoring.store.exists():  # nothing to be unsure with before the first model: any image will do
            pick = random.choice(unlabeled)
            logger.info("uncertainty: no model yet, %s at random of %d unlabeled", pick, len(unlabeled))
            return {"id": pick}
        current = self.scoring.store.version_on_disk()
        infos = {key: datastore.get_image_info(key) for key in unlabeled}
        if any(info.get(SCORE_KEY) is None or info.get(MODEL_KEY) != current for info in infos.values()):
            self.scoring({}, datastore)
            infos = {key: datastore.get_image_info(key) for key in unlabeled}
        scores = {key: info.get(SCORE_KEY) for key, info in infos.items()}
        scored = {key: score for key, score in scores.items() if score is not None}
        if not scored:
            return None
        pick = max(scored, key=scored.get)
        logger.info("uncertainty: %s (%.4f) of %d unlabeled", pick, scored[pick], len(unlabeled))
        return {"id": pick, "textdiff_uncertainty": scored[pick]}
