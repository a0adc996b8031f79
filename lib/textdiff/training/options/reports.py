"""Report supervision: images without a mask whose report names the lungs' sides add `train.report_weight` x
`report_loss` on a batch of them per step (`textdiff.model.report_supervision`); and the checks that the lung rules
(this, and `head.obey_report`) are not asked of data whose reports name no side."""

from __future__ import annotations

import logging

import torch

from textdiff.config import TrainConfig
from textdiff.data.items import Item
from textdiff.data.studies import Case
from textdiff.model.report_supervision import check_reports_readable, named_sides, report_loss
from textdiff.training.options.base import TrainingOption

logger = logging.getLogger(__name__)


class ReportSupervision(TrainingOption):
    def __init__(self, weak: list[Item], cfg: TrainConfig):
        self.weak, self.weight, self.top_k, self.batch_size = weak, cfg.report_weight, cfg.report_top_k, cfg.batch_size
        logger.info("report supervision: %d images without a mask, weight %g", len(weak), cfg.report_weight)

    def cached(self) -> list[Item]:
        return self.weak

    def loss(self, loop) -> torch.Tensor:
        batch = loop.batch(loop.rng.sample(self.weak, min(len(self.weak), self.batch_size)), options=())
        logits = loop.model.logits_from_features([f.to(loop.device) for f in batch.features], batch.reports)
        return self.weight * report_loss(logits, [named_sides(report) for report in batch.said], self.top_k)

    def stats(self) -> dict:
        return {"report_images": len(self.weak)}


def report_items(items: list[Item]) -> list[Item]:
    """The images without a mask whose report constrains a mask (named_sides), for `train.report_weight`."""
    return [item for item in items if item["label"] is None and named_sides(item["report"]) is not None]


def load_report_items(model, unlabeled: list[Case], used: set[str]) -> list[Item]:
    """The unlabeled cases (not among `used`) that train through their reports, loaded, when `train.report_weight`
    > 0; none when it is 0."""
    if model.cfg.train.report_weight <= 0:
        return []
    weak = report_items([model.load(c) for c in unlabeled if c.label is None and c.id not in used])
    logger.info("%d images without a mask train through their reports", len(weak))
    return weak


def check_lung_rules(model, items: list[Item], unlabeled: list[Item], cfg: TrainConfig) -> None:
    """Refuse report loss or `head.obey_report` on data whose reports name no lung's side (they would do nothing)."""
    if cfg.report_weight > 0 and unlabeled:
        check_reports_readable([item["report"] for item in unlabeled], "train.report_weight")
    if model.cfg.head.obey_report:
        check_reports_readable([item["report"] for item in items], "head.obey_report")
