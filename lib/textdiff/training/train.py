"""The method's training loop: the fusion block and the head on a handful of masks, backbone and text encoder frozen.

Plain labeled windows, MONAI DiceCELoss (CE + 1.5 x Dice, as in the paper), seeded shuffling, feature augmentation and
text dropout, optimizer steps in rounds each ended by MONAI DiceMetric on held-out windows, the best round's weights
kept and written atomically. Options beyond that (intensity and synthetic copies, report supervision) join through
`textdiff.training.options`; a run from cases, with its split and the pseudo-label gate, is `textdiff.training.runs`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from textdiff.config import TrainConfig
from textdiff.data.items import Item
from textdiff.data.studies import DataError
from textdiff.data.tiling import windows_of
from textdiff.model.features import FeatureCache, feature_augmentation, feature_keys
from textdiff.model.segmenter import TextDiffModel, predict_logits, save_checkpoint
from textdiff.training.options import TrainingOption, build_options

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list[dict]
    best_dice: float
    best_epoch: int
    gate: dict | None = None  # with or without pseudo-labels / synthetic copies, and both scores (compare_without)
    kept: str = ""  # which round was kept and what chose it, for the log and the stats
    judged_on: str = "held-out"  # the images `best_dice` is measured on: "held-out" or "training"
    options: dict = dataclasses.field(default_factory=dict)  # what the options say of the run (`TrainingOption.stats`)
    windows_drawn: int = 0  # training windows the run's batches read, counting repeats
    training_windows: int = 0

    @property
    def passes(self) -> float:
        """How often the run read each training window on average: below 1, some labeled windows were never read."""
        return self.windows_drawn / self.training_windows if self.training_windows else 0.0

    @property
    def short_on_labels(self) -> bool:
        """True when the run drew fewer windows than its labels hold: more steps would read them (docs/results/speed.md)."""
        return 0 < self.passes < 1

    @property
    def report_images(self) -> int:
        """Images without a mask that trained through their reports (`train.report_weight`)."""
        return self.options.get("report_images", 0)


def dice_per_image(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Foreground Dice per image; an empty mask predicted empty scores 1 (normal images count), as in evaluation."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    predicted = one_hot(logits.argmax(1, keepdim=True), num_classes)
    return metric(predicted, one_hot(labels, num_classes)).nanmean(1)


class CheckpointChoice:
    """Picks the checkpoint epoch by validation Dice averaged over a window of epochs ending at it (window 1: the
    single best epoch). The first epoch with the highest score wins ties."""

    def __init__(self, window: int = 1):
        self.window, self.dices, self.best_score = window, [], -1.0

    def is_best(self, dice: float) -> bool:
        """Record one epoch's validation Dice; True when this epoch is now the one to keep."""
        self.dices.append(dice)
        score = sum(self.dices[-self.window:]) / len(self.dices[-self.window:])
        if score > self.best_score:
            self.best_score = score
            return True
        return False


def selection_items(val_items: list[Item], train_items: list[Item]) -> list[Item]:
    """The images the best epoch is chosen on: the validation split, or the training images with a drawn mask when
    the split is empty or has no foreground (on normal images alone the best epoch is one that draws nothing: 5
    labels, seed 0). Never a pseudo-labeled or healthy-by-label image (`origin`): selection is on real masks only."""
    if any(item["label"].any() for item in val_items):
        return val_items
    return [item for item in train_items if "origin" not in item] or train_items


@dataclass
class _Batch:
    features: list[torch.Tensor]
    labels: torch.Tensor | None  # None for images without a mask (report supervision)
    reports: list[str]  # what the model reads: some dropped to "" (text dropout)
    said: list[str]  # the reports as augmented, before dropout
    boxes: list[torch.Tensor | None]  # where each window lies in its image, as augmented (None: a whole image)
    extra: dict[str, torch.Tensor]  # what options added to each sample ("synthetic0", ...), stacked


def segmentation_loss(over_batch: bool = False, dice_weight: float = 1.5) -> DiceCELoss:
    """Cross-entropy + 1.5 x Dice, as in the paper; the same for the head and the benchmark's UNet baseline. Dice per
    class over the whole batch with `over_batch` (`TrainConfig.dice_over_batch`), weighted by `dice_weight`
    (`TrainConfig.dice_weight`)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, lambda_dice=dice_weight, batch=over_batch)


def train_head(
    model: TextDiffModel, train_items: list[Item], val_items: list[Item], cfg: TrainConfig,
    checkpoint: str | Path | None = None, cache: FeatureCache | None = None, progress: bool = True,
    synthetic: dict[str, list[Item]] | None = None, unlabeled: list[Item] = (),
) -> TrainResult:
    """Train fusion + head; keeps (in `model` and in `checkpoint`) the weights with the best validation Dice.

    Training runs in rounds (`training_rounds`), each ended by validation on the held-out windows (`validation_windows`)
    and a step of the cosine learning-rate schedule. A training window's features are computed the first time it is
    drawn, so a short run over many windows pays only for those it reads.
    Items whose working grid is larger than one window train and validate as their windows (`tiling.window_items`).
    `synthetic` (image id -> its synthetic copies) and `unlabeled` (images without a mask) are read by the options
    `cfg` turns on (`textdiff.training.options`).
    """
    _check_training_items(train_items, val_items)
    torch.manual_seed(cfg.seed)
    options = build_options(model, cfg, train_items, val_items, synthetic, list(unlabeled))
    loop = _Loop(model, cache or FeatureCache(model.extractor, enabled=cfg.cache_features,
                                              max_memory_gb=cfg.max_feature_cache_gb), cfg,
                 feature_augmentation(cfg.augment, len(model.extractor.cfg.feature_layers), cfg.seed),
                 random.Random(cfg.seed), options, next(model.head.parameters()).device)
    windows = windows_of(train_items, model.image_size)
    for option in options:
        windows = option.windows(windows)
    held_out = windows_of(val_items, model.image_size)
    selection = validation_windows(selection_items(held_out, windows), cfg)
    judge = "held-out" if any(item["label"].any() for item in held_out) else "training"
    keep_last = cfg.checkpoint == "last" or (cfg.checkpoint == "auto" and judge == "training")
    if judge == "training":
        logger.info("no held-out image with foreground (%d held out): %s", len(held_out),
                    "keeping the last round" if keep_last else "choosing the round on the training images")
    loop.cache.fill(selection + [item for option in options for item in option.cached()], progress=progress)
    result = _fit(model, loop, windows, (selection, judge), keep_last, checkpoint, progress)
    return dataclasses.replace(result, options={k: v for option in options for k, v in option.stats().items()})


def _fit(model: TextDiffModel, loop: "_Loop", train_items: list[Item], selection: tuple[list[Item], str],
         keep_last: bool, checkpoint: str | Path | None, progress: bool) -> TrainResult:
    """A run's rounds: optimizer steps, then the Dice on the selection windows (of the "held-out" or the "training"
    images, as `selection` says) and the checkpoint choice; `model` ends with the best round's weights, or with
    `keep_last` the last round's (then only the last round is scored)."""
    selection, judge = selection
    cfg = loop.cfg
    rounds = training_rounds(len(train_items), cfg)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the learning rate follows a cosine down the run's steps (down its epochs when training by epochs, that recipe)
    per_step = cfg.epochs is None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=sum(rounds) if per_step else len(rounds))
    batches = _shuffled_batches(train_items, cfg.batch_size, loop.rng)
    history, best = [], TrainResult([], -1.0, 0)
    best_state, choice, done = None, CheckpointChoice(cfg.selection_window), 0
    bar = tqdm(total=sum(rounds), desc="train", unit="step", disable=not progress)
    for number, steps in enumerate(rounds, start=1):
        start = time.perf_counter()
        loss = loop.train(batches, steps, optimizer, scheduler if per_step else None)
        if not per_step:
            scheduler.step()
        seconds, done = time.perf_counter() - start, done + steps
        last = number == len(rounds)
        dice = None if keep_last and not last else _selection_dice(model, selection, loop.cache)
        history.append({"epoch": number, "step": done, "loss": loss, "val_dice": dice, "seconds": seconds})
        bar.update(steps)
        bar.set_postfix(loss=f"{loss:.3f}", **({} if dice is None else {"dice": f"{dice:.3f}"}))
        # one line per round for logs (server jobs, -v), where a progress bar does not show
        logger.info("round %d/%d (step %d/%d): loss %.4f%s", number, len(rounds), done, sum(rounds), loss,
                    "" if dice is None else f", Dice {dice:.4f} on {len(selection)} windows of the {judge} images")
        if (last if keep_last else choice.is_best(dice)):
            best = TrainResult(history, dice, number)
            best_state = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
            if checkpoint:
                save_checkpoint(model, checkpoint, extra={"best_val_dice": dice, "epoch": number, "step": done})
    bar.close()
    model.head.load_state_dict(best_state)
    model.eval()
    return TrainResult(history, best.best_dice, best.best_epoch, kept=f"round {best.best_epoch} of {len(rounds)}, " + (
        "the last" if keep_last else f"the best on the {judge} images"), judged_on=judge,
        windows_drawn=sum(rounds) * cfg.batch_size, training_windows=len(train_items))


def longer_run_hint(result: TrainResult, batch_size: int, passes: int = 6) -> str:
    """What a user with more labeled windows than the run read can do about it, with the measured gain."""
    steps, windows = result.history[-1]["step"], result.training_windows
    return (f"{steps} steps of {batch_size} read each of the {windows} training windows {result.passes:.1f} times on "
            f"average; with many labels a longer run can score higher: about {passes} passes (--steps "
            f"{math.ceil(passes * windows / batch_size)}, the app's max_steps) scored 0.018 Dice more on 24 labeled "
            f"MoNuSeg tiles, for several times the wait (docs/results/speed.md)")


@torch.no_grad()
def _selection_dice(model: TextDiffModel, selection: list[Item], cache: FeatureCache) -> float:
    """Mean per-image Dice of `model` on the selection windows."""
    return dice_per_image(predict_logits(model, selection, cache), torch.stack([it["label"] for it in selection]),
                          model.cfg.head.num_classes).mean().item()


def training_rounds(windows: int, cfg: TrainConfig) -> list[int]:
    """Optimizer steps of each round of a run (a round ends with validation): `cfg.steps` in rounds of
    `cfg.val_every`, or with `cfg.epochs` set, one pass over the `windows` training windows per round."""
    if cfg.epochs:
        return [math.ceil(windows / cfg.batch_size)] * cfg.epochs
    full, rest = divmod(cfg.steps, cfg.val_every)
    return [cfg.val_every] * full + [rest] * bool(rest)


def validation_windows(windows: list[Item], cfg: TrainConfig) -> list[Item]:
    """The windows a run validates on: at most `cfg.val_windows` of them, a seeded draw in their order (all of them
    with `cfg.epochs` set, as that recipe did)."""
    if cfg.epochs or cfg.val_windows is None or len(windows) <= cfg.val_windows:
        return windows
    return [windows[i] for i in sorted(random.Random(cfg.seed).sample(range(len(windows)), cfg.val_windows))]


def _shuffled_batches(items: list[Item], batch_size: int, rng: random.Random):
    """Batches of `items` for as long as asked: one seeded random order per pass, drawn when the pass begins (its last
    batch may be smaller)."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for begin in range(0, len(order), batch_size):
            yield [items[i] for i in order[begin : begin + batch_size]]


def _check_training_items(train_items: list[Item], val_items: list[Item]) -> None:
    """Refuse a run that cannot train: no image, a missing mask, every mask empty."""
    if not train_items:
        raise DataError("no labeled image to train on: save at least one mask under labels/final")
    without_mask = [item["id"] for item in train_items + val_items if item["label"] is None]
    if without_mask:
        raise DataError(f"training items without a mask: {without_mask[:5]}")
    if not any(item["label"].any() for item in train_items + val_items):
        raise DataError("every mask is empty: draw at least one region to segment")


@dataclass
class _Loop:
    """What every optimizer step of one training run shares."""

    model: TextDiffModel
    cache: FeatureCache
    cfg: TrainConfig
    augment: object
    rng: random.Random
    options: list[TrainingOption]
    device: torch.device

    def train(self, batches, steps: int, optimizer: torch.optim.Optimizer, scheduler=None) -> float:
        """`steps` optimizer steps on the next batches (each followed by a `scheduler` step when given); returns the
        mean loss per window."""
        self.model.train()
        total, count = 0.0, 0
        for _ in range(steps):
            chunk = next(batches)
            loss = self.loss(chunk)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total, count = total + loss.item() * len(chunk), count + len(chunk)
        return total / count

    def loss(self, chunk: list[Item]) -> torch.Tensor:
        """DiceCE of a batch (read by an option that reads it its own way, if any), plus the options' loss terms."""
        batch = self.batch(chunk)
        logits = next((out for option in self.options if (out := option.logits(self.model, batch)) is not None), None)
        if logits is None:
            logits = self.model.logits_from_features([f.to(self.device) for f in batch.features], batch.reports,
                                                     batch.boxes)
        loss = segmentation_loss(self.cfg.dice_over_batch, self.cfg.dice_weight)(logits, batch.labels.to(self.device))
        for option in self.options:
            if (term := option.loss(self)) is not None:
                loss = loss + term
        return loss

    def batch(self, chunk: list[Item], options: list[TrainingOption] | None = None) -> _Batch:
        """Features, masks and reports of a batch, augmented, with what `options` (the run's, unless given) add to
        each sample; text dropout last."""
        samples, added = [], set()
        for item, features in zip(chunk, self.cache.get_many(chunk)):
            sample = dict(zip(feature_keys(len(features)), (f.float() for f in features)), report=item["report"],
                          box=item.get("box"))
            if item["label"] is not None:
                sample["label"] = item["label"]
            own = set(sample)
            for option in self.options if options is None else options:
                option.add_features(sample, item, self.cache, self.rng)
            added |= set(sample) - own
            samples.append(self.augment(sample))
        stack = lambda key: torch.stack([torch.as_tensor(s[key]) for s in samples])  # noqa: E731
        own = feature_keys(len(features))
        extra = {key: stack(key) for key in sorted(added)}
        reports = ["" if self.rng.random() < self.cfg.text_dropout else s["report"] for s in samples]
        return _Batch([stack(key) for key in own], stack("label").long() if "label" in samples[0] else None, reports,
                      [s["report"] for s in samples], [s["box"] for s in samples], extra)
