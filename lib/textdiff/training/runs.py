"""A training run from a studies folder's cases: load them once, split off validation images, train the head
(`textdiff.training.train`), checkpoint; the data the options read (pseudo-labels, healthy images, synthetic copies,
reports) is loaded here and handed to the loop."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from textdiff.config import TextDiffConfig, TrainConfig
from textdiff.data.items import Item
from textdiff.data.studies import Case, DataError
from textdiff.data.tiling import describe
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel, record_seen_images
from textdiff.training.options.extra_labels import PlainRun, extra_label_items, keep_better, without_real
from textdiff.training.options.reports import load_report_items
from textdiff.training.options.synthetic import load_copies
from textdiff.training.train import TrainResult, train_head

logger = logging.getLogger(__name__)


def split_train_val(items: list, cfg: TrainConfig, seed: int | None = None) -> tuple[list, list]:
    """Hold out a seeded `cfg.val_fraction` of the labeled images for model selection, or none when that would be
    fewer than `cfg.min_val_images` (then every labeled image trains)."""
    order = list(range(len(items)))
    random.Random(cfg.seed if seed is None else seed).shuffle(order)
    count = round(len(items) * cfg.val_fraction)
    count = count if count >= cfg.min_val_images and count < len(items) else 0
    return [items[i] for i in order[count:]], [items[i] for i in order[:count]]


def held_out_cases(cases: list[Case], cfg: TrainConfig) -> list[Case]:
    """The labeled cases `train_on_cases` holds out for validation with this config (the same seeded split); none
    with fewer labels than that needs."""
    return split_train_val([c for c in cases if c.label is not None], cfg)[1]


def train_on_cases(cases: list[Case], cfg: TextDiffConfig, checkpoint: str | Path, device: str | torch.device = "cpu",
                   progress: bool = True, cache_folder: str | Path | None = None,
                   pseudo_cases: list[Case] = (), healthy: list[Case] = (),
                   synthetic: dict[str, list[Case]] | None = None,
                   unlabeled: list[Case] = (), compare_without: bool = False,
                   initial_head: dict[str, torch.Tensor] | None = None) -> tuple[TextDiffModel, TrainResult]:
    """Build the model of `cfg`, load the labeled cases, split off validation images, train and checkpoint.

    `pseudo_cases` (masks nobody drew) and `healthy` cases (see `healthy_cases`) join the training split only
    (`textdiff.training.options.extra_labels`). `synthetic` (source id -> synthetic copies, from `read_synthetic`) is
    used when `cfg.train.synthetic_ratio` > 0; `unlabeled` cases train through their reports alone when
    `cfg.train.report_weight` > 0. With `compare_without`, a run that uses pseudo-labels or synthetic copies also
    trains without them and keeps the better (`TrainResult.gate`). `initial_head` (a head's weights, e.g. of the
    model in service) is where training starts instead of a new head.
    """
    cases = [c for c in cases if c.label is not None]
    pseudo_cases, healthy = without_real({c.id for c in cases}, pseudo_cases, healthy)
    if not cases and not pseudo_cases:
        raise DataError("no labeled image: save at least one mask (labels/final) before training")
    torch.manual_seed(cfg.train.seed)  # the head's initial weights: the same run gives the same model
    model = TextDiffModel(cfg).to(device)
    if initial_head is not None:
        model.head.load_state_dict(initial_head)
    data = _training_data(model, cases, pseudo_cases, healthy, synthetic, unlabeled)
    cache = FeatureCache(model.extractor, enabled=cfg.train.cache_features, folder=cache_folder,
                         max_memory_gb=cfg.train.max_feature_cache_gb)
    initial = {k: v.detach().clone() for k, v in model.head.state_dict().items()}  # for a run without the extras
    torch.manual_seed(cfg.train.seed)
    result = train_head(model, data.train + data.pseudo + data.healthy, data.val, cfg.train, checkpoint=checkpoint,
                        cache=cache, progress=progress, synthetic=data.copies, unlabeled=data.weak)
    if compare_without and data.extras:
        if any(item["label"].any() for item in data.train + data.val):
            plain = PlainRun(data.train + data.healthy, data.val, data.weak, initial)
            model, result = keep_better(model, result, data.extras, plain, checkpoint, cache, progress)
        else:
            logger.warning("no drawn mask with foreground to train without %s: kept the run with them",
                           " and ".join(data.extras))
    if Path(checkpoint).is_file():  # what it read: masks, validation images, reports
        record_seen_images(checkpoint, {c.id for c in [*cases, *pseudo_cases, *healthy]} | {i["id"] for i in data.weak})
    return model, result


@dataclass
class _TrainingData:
    """The items of one training run, by where their masks come from."""

    train: list[Item]  # real masks (and no more) on the training side of the split
    val: list[Item]  # real masks only, always
    pseudo: list[Item]  # masks nobody drew
    healthy: list[Item]  # images labeled healthy, with an empty mask
    copies: dict[str, list[Item]] | None  # synthetic copies by source image id
    weak: list[Item]  # images without a mask that train through their reports

    @property
    def extras(self) -> list[str]:
        """What this run adds to the real masks that may make it worse: named, for the log and the stats."""
        return ["pseudo-labels"] * bool(self.pseudo) + ["synthetic copies"] * bool(self.copies)


def _training_data(model: TextDiffModel, cases: list[Case], pseudo_cases: list[Case], healthy: list[Case],
                   synthetic: dict[str, list[Case]] | None, unlabeled: list[Case]) -> _TrainingData:
    """Load every case once and split the real ones (a volume's slices stay on one side of the split)."""
    cfg = model.cfg
    groups = [group for c in cases if (group := model.load_planes(c, cfg.train.volume_slices))]
    if cases and not groups:
        raise DataError("every mask is empty: draw at least one region to segment")
    train_groups, val_groups = split_train_val(groups, cfg.train)
    train, val = [i for g in train_groups for i in g], [i for g in val_groups for i in g]
    for shape in sorted({item["original_shape"] for item in train + val}):
        logger.info("images of %s", describe(shape, model.cfg.backbone))
    pseudo, empty = extra_label_items(model, len(groups), pseudo_cases, healthy)
    copies = load_copies(model, synthetic, {item["id"] for item in train + pseudo + empty})
    weak = load_report_items(model, unlabeled, {item["id"] for item in train + val + pseudo + empty})
    return _TrainingData(train, val, pseudo, empty, copies, weak)
