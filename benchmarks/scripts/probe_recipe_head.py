"""The head's training runs of `textdiff-bench time-to-model` with parts of the probe's recipe swapped in.

    python benchmarks/scripts/probe_recipe_head.py --change class-weights no-dice -- time-to-model \
        --data runs/mni256-deep-dev --backbone runs/mni-wm/backbone --labels 5 --seeds 0 1 2 --head-steps 150 \
        --methods head --set "$NAMES" --out runs/variants/cw-nodice

`feature_probe.py` shows a per-pixel MLP learning structures from the frozen features that the head does not learn.
The two differ in several ways at once; the ones that are no configuration setting are made here, each on its own or
together, in this process only, so that one `time-to-model` run measures them on the same draws as the default head:
- standardise: every scale's features pass a BatchNorm without learned scale before the head's 1x1 reduction (the
  probe standardises each channel);
- class-weights: cross-entropy weighted by class frequency^-0.5 over the run's training pixels, mean weight 1 (the
  probe's weights);
- no-dice: cross-entropy alone, without the Dice term (the probe has none);
- pixel-mlp: the classifier is a per-pixel two-layer MLP (1x1 convolutions, 128 wide, no BatchNorm) on the fused
  scales upsampled to the finest and concatenated (the probe's classifier, after the head's reductions and fusion),
  built after the default classifier (the product's setting, `head.classifier=pixel_mlp`, builds it instead);
- class-windows: each window of a batch holds a class drawn at random, background included (the head's batches are
  otherwise a few windows of a seeded shuffle, which may hold no small structure at all; the probe sees pixels of
  every window at each step).
Settings that are options (learning rate, windows a step, steps, text) go in time-to-model's --set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from textdiff.data.tiling import windows_of
from textdiff.model import fusion
from textdiff.training import train
from textdiff_bench import time_to_model

CHANGES = ("standardise", "class-weights", "no-dice", "pixel-mlp", "class-windows")


class ProbeLoss:
    """Cross-entropy, weighted by class when `weights` are given, plus 1.5 x the head's Dice term unless `dice` is off."""

    def __init__(self, weights: torch.Tensor | None, dice: bool, over_batch: bool):
        self.weights, self.dice = weights, DiceLoss(to_onehot_y=True, softmax=True, batch=over_batch) if dice else None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = None if self.weights is None else self.weights.to(logits)
        loss = F.cross_entropy(logits, labels[:, 0], weight=weights)
        return loss if self.dice is None else loss + 1.5 * self.dice(logits, labels)


def class_window_batches(items: list[dict], batch_size: int, rng) -> Iterator[list[dict]]:
    """Batches whose every window is drawn for a class picked at random among those the windows hold."""
    holding: dict[int, list[dict]] = {}
    for item in items:
        for value in item["label"].unique().tolist():
            holding.setdefault(int(value), []).append(item)
    classes = sorted(holding)
    while True:
        yield [rng.choice(holding[rng.choice(classes)]) for _ in range(batch_size)]


def patch_head(changes: set[str]) -> None:
    """Make every head built from now on take the architectural changes asked for."""
    build = fusion.TextDiffHead.__init__

    def changed(head, feature_channels, text_dim, cfg, out_size):
        build(head, feature_channels, text_dim, cfg, out_size)
        if "standardise" in changes:
            head.reduce = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c, affine=False), reduce)
                                        for c, reduce in zip(feature_channels, head.reduce))
        if "pixel-mlp" in changes:
            head.classifier = fusion.PixelMLPClassifier(len(feature_channels), cfg.dim, (128, 128), cfg.num_classes)

    fusion.TextDiffHead.__init__ = changed


def patch_loss(changes: set[str]) -> None:
    """Make every head run from now on train with the loss changes asked for (class weights from its own windows)."""
    run = time_to_model.train_head

    def weighted_run(model, train_items, val_items, cfg, *args, **kwargs):
        weights = None
        if "class-weights" in changes:
            labels = torch.cat([w["label"].flatten().long() for w in windows_of(train_items, model.image_size)])
            weights = (torch.bincount(labels, minlength=model.cfg.head.num_classes).float() + 1) ** -0.5
            weights = weights / weights.mean()
        dice = "no-dice" not in changes
        train.segmentation_loss = lambda over_batch=False, dice_weight=1.5: ProbeLoss(weights, dice, over_batch)
        return run(model, train_items, val_items, cfg, *args, **kwargs)

    time_to_model.train_head = weighted_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", nargs="+", choices=CHANGES, default=[], help="what to swap in (none: the default)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- time-to-model and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] != ["time-to-model"]:
        parser.error("give the time-to-model command after --")
    changes = set(args.change)
    patch_head(changes)
    if changes & {"class-weights", "no-dice"}:
        patch_loss(changes)
    if "class-windows" in changes:
        train._shuffled_batches = class_window_batches
    from textdiff_bench.cli import main as bench
    sys.argv = ["textdiff-bench", *command]
    bench()


if __name__ == "__main__":
    main()
