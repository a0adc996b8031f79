"""How a model's stored proposals compare with what clinicians made of them, for the model's entry in /info.

A proposal is an `original` label written by an infer task (its label info names the model); once the clinician
saves a `final` label of the same image, their foreground Dice (any label > 0) measures how much the proposal was
worth. Each pair's Dice is kept until either file changes, so /info stays quick.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from textdiff.data.studies import DataError, read_image

logger = logging.getLogger(__name__)

_scores: dict[tuple, tuple] = {}  # (proposal path, final path) -> ((their mtimes), Dice)


def proposal_dice(datastore: Datastore, model: str) -> dict:
    """Mean Dice of `model`'s proposals against the final labels of the same images whose final label has
    foreground; {"dice": None, "images": 0} before there is any such pair."""
    values = []
    for key in datastore.get_labeled_images():
        proposal = datastore.get_label_by_image_id(key, DefaultLabelTag.ORIGINAL)
        if not proposal or datastore.get_label_info(proposal, DefaultLabelTag.ORIGINAL).get("model") != model:
            continue
        final = datastore.get_label_by_image_id(key, DefaultLabelTag.FINAL)
        pair = (Path(datastore.get_label_uri(proposal, DefaultLabelTag.ORIGINAL)),
                Path(datastore.get_label_uri(final, DefaultLabelTag.FINAL)))
        value = _pair_dice(*pair)
        if value is not None:
            values.append(value)
    return {"dice": round(float(np.mean(values)), 4) if values else None, "images": len(values)}


def _pair_dice(proposal: Path, final: Path) -> float | None:
    """Foreground Dice of one pair (cached); None when the final label is empty or a file cannot be read."""
    try:
        stamps = (proposal.stat().st_mtime_ns, final.stat().st_mtime_ns)
    except OSError:
        return None
    cached = _scores.get((proposal, final))
    if cached is None or cached[0] != stamps:
        try:
            drawn = np.asarray(read_image(final, "label")) > 0
            guess = np.asarray(read_image(proposal, "label")) > 0
        except DataError as err:
            logger.warning("cannot compare a proposal with its final label: %s", err)
            return None
        value = None if guess.shape != drawn.shape or not drawn.any() else float(
            2 * (guess & drawn).sum() / (guess.sum() + drawn.sum()))
        cached = _scores[(proposal, final)] = (stamps, value)
    return cached[1]
