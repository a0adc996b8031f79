"""Datastore images as model-ready items for scoring and strategies; unreadable files are skipped, not fatal."""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from textdiff.data import Case, DataError, load_case
from textdiff.model import TextDiffModel

logger = logging.getLogger(__name__)


def load_items(datastore: Datastore, keys: list[str], model: TextDiffModel) -> tuple[list[dict], list[str]]:
    """(items with their reports, ids of files that could not be read)."""
    size, channels, classes = model.image_size, model.cfg.backbone.in_channels, model.cfg.head.num_classes
    items, skipped = [], []
    for key in keys:
        case = Case(key, Path(datastore.get_image_uri(key)), report=datastore.report(key))
        try:
            items.append(load_case(case, size, channels, classes))
        except DataError as err:  # one unreadable file must not stop the others
            skipped.append(key)
            logger.warning("skipping %s", err)
    return items, skipped
