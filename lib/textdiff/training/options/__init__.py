"""Training options that the project's results did not find to pay off by default, each in its own module and
joining the loop through `TrainingOption` (base.py): intensity copies, synthetic copies (EMIT-Diff) with merging,
report supervision; pseudo-labels, healthy images and the with/without gate act on a run's data around the loop
(extra_labels.py)."""

from __future__ import annotations

from textdiff.config import TrainConfig
from textdiff.data.items import Item
from textdiff.training.options.base import TrainingOption, refuse_windows
from textdiff.training.options.intensity import IntensityCopies
from textdiff.training.options.reports import ReportSupervision, check_lung_rules, report_items
from textdiff.training.options.synthetic import SyntheticCopies, synthetic_copies


def build_options(model, cfg: TrainConfig, train_items: list[Item], val_items: list[Item],
                  synthetic: dict[str, list[Item]] | None, unlabeled: list[Item]) -> list[TrainingOption]:
    """The options `cfg` turns on for a run, checked against its images."""
    check_lung_rules(model, train_items + val_items, unlabeled, cfg)
    options: list[TrainingOption] = []
    if (copies := synthetic_copies(train_items, synthetic, cfg.synthetic_ratio)) is not None:
        options.append(SyntheticCopies(copies, cfg))
    if cfg.report_weight > 0 and (weak := report_items(list(unlabeled))):
        options.append(ReportSupervision(weak, cfg))
    if extra := [item for option in options for item in option.cached()]:  # copies and reports pair whole images
        refuse_windows(train_items + val_items + extra, model.image_size)
    if cfg.intensity_copies > 0:
        options.append(IntensityCopies(cfg))
    return options
