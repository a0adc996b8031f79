"""Datastore images as model-ready items for scoring and strategies; unreadable files are skipped, not fatal.

A 3D volume is read as a few evenly spaced slices, each an item whose `source` is the volume's id: a score or an
embedding of the volume is then the mean over its slices.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from textdiff.data.studies import DataError, read_image
from textdiff.model.segmenter import TextDiffModel

logger = logging.getLogger(__name__)

SLICES_PER_VOLUME = 8


def to_label(datastore: Datastore, healthy_label: str) -> list[str]:
    """The unlabeled images a clinician may be asked to draw: those whose image-level label says normal
    (`healthy_label`) are not, since their mask is known to be empty (training uses them as such)."""
    normal = {key for key, label in datastore.image_labels().items() if label == healthy_label} if healthy_label else set()
    return [key for key in datastore.get_unlabeled_images() if key not in normal]


def load_items(datastore: Datastore, keys: list[str], model: TextDiffModel) -> tuple[list[dict], list[str]]:
    """(items with their reports and `source` ids, ids of files that could not be read)."""
    items, skipped = [], []
    for key in keys:
        try:
            items += image_items(Path(datastore.get_image_uri(key)), key, datastore.report(key), model)
        except DataError as err:  # one unreadable file must not stop the others
            skipped.append(key)
            logger.warning("skipping %s", err)
    return items, skipped


def image_items(path: Path, key: str, report: str, model: TextDiffModel) -> list[dict]:
    """A 2D image as one item; a volume as up to SLICES_PER_VOLUME evenly spaced slices (last axis)."""
    image = read_image(path, "image")
    spatial = [n for n in image.shape[1:] if n > 1]
    if len(spatial) > 3 or len(spatial) < 2:
        raise DataError(f"'{path}' has spatial shape {tuple(image.shape[1:])}: expected a 2D image or a 3D volume")
    if len(spatial) == 2:
        planes = {key: image.reshape(image.shape[0], *spatial)}
    else:
        chosen = np.unique(np.linspace(0, image.shape[-1] - 1, SLICES_PER_VOLUME).round().astype(int))
        planes = {f"{key}#z{z}": image[..., z] for z in chosen}
    return [{**model.plane_item(torch.as_tensor(plane), name, report), "source": key} for name, plane in planes.items()]


def mean_by_source(items: list[dict], values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image id -> the mean of its items' values (rows of `values`), in the order the images first appear."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(item["source"], []).append(index)
    return {key: values[rows].mean(0) for key, rows in groups.items()}
