"""Training of the fusion block and the head on a handful of masks; the backbone and text encoder stay frozen.

MONAI DiceCELoss (CE + 1.5 x Dice, as in the paper), MONAI DiceMetric on a validation split, the best checkpoint by
validation Dice written atomically, seeded shuffling, augmentation and text dropout; optionally the reports of images
without a mask as weak supervision (`train.report_weight`, `report_supervision`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from textdiff.config import TextDiffConfig, TrainConfig
from textdiff.data.studies import Case, DataError
from textdiff.synthesis.emit import merge_predictions
from textdiff.model.features import FeatureCache, feature_augmentation, feature_keys
from textdiff.model.segmenter import TextDiffModel, save_checkpoint
from textdiff.model.report_supervision import check_reports_readable, named_sides, report_loss
from textdiff.data.tiling import describe, windows_of
from textdiff.training.intensity import training_windows

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    history: list[dict]
    best_dice: float
    best_epoch: int
    report_images: int = 0  # images without a mask that trained through their reports (train.report_weight)
    gate: dict | None = None  # with or without pseudo-labels / synthetic copies, and both scores (compare_without)


def split_train_val(items: list[dict], cfg: TrainConfig, seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded `cfg.val_fraction` of the labeled images for model selection, or none when that would be
    fewer than `cfg.min_val_images` (then every labeled image trains)."""
    order = list(range(len(items)))
    random.Random(cfg.seed if seed is None else seed).shuffle(order)
    count = round(len(items) * cfg.val_fraction)
    count = count if count >= cfg.min_val_images and count < len(items) else 0
    return [items[i] for i in order[count:]], [items[i] for i in order[:count]]


def selection_cases(cases: list[Case], cfg: TrainConfig) -> list[Case]:
    """The labeled cases `train_on_cases` holds out for validation with this config (the same seeded split), or all
    of them when it holds out none: the images two models of the same data are compared on."""
    labeled = [c for c in cases if c.label is not None]
    _, val = split_train_val(labeled, cfg)
    return val or labeled


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


def selection_items(val_items: list[dict], train_items: list[dict]) -> list[dict]:
    """The images the best epoch is chosen on: the validation split, or the training images with a drawn mask when
    the split is empty or has no foreground (on normal images alone the best epoch is one that draws nothing: 5
    labels, seed 0). Never a pseudo-labeled or healthy-by-label image (`origin`): selection is on real masks only."""
    if any(item["label"].any() for item in val_items):
        return val_items
    logger.info("no validation image with foreground (%d held out): selecting on the training images", len(val_items))
    return [item for item in train_items if "origin" not in item] or train_items


@torch.no_grad()
def predict_logits(model: TextDiffModel, items: list[dict], cache: FeatureCache, batch_size: int = 8) -> torch.Tensor:
    """Logits at window resolution for labeled or unlabeled window items (whole images or windows), in order."""
    model.eval()
    device = next(model.head.parameters()).device
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        # float16 as cached, widened before stacking (CPU autocast has no float16 stack)
        features = [torch.stack([f.float() for f in scale]).to(device)
                    for scale in zip(*(cache.get(item) for item in chunk))]
        outputs.append(model.logits_from_features(features, [item["report"] for item in chunk],
                                                  [item.get("box") for item in chunk]).float().cpu())
    return torch.cat(outputs)


@dataclass
class _Batch:
    features: list[torch.Tensor]
    synthetic: list[torch.Tensor] | None  # one synthetic copy's features per image, or None
    labels: torch.Tensor | None  # None for images without a mask (report supervision)
    reports: list[str]  # what the model reads: some dropped to "" (text dropout)
    sides: list[frozenset[str] | None]  # what the reports, as augmented, say before dropout (named_sides)
    boxes: list[torch.Tensor | None]  # where each window lies in its image, as augmented (None: a whole image)


def _training_batch(chunk: list[dict], cache: FeatureCache, augment, text_dropout: float, rng: random.Random,
                    copies: dict[str, list[dict]] | None = None) -> _Batch:
    """Features, masks and reports of a batch, augmented; with `copies`, each image also brings the features of one
    of its synthetic copies (its own features again when it has none) as "synthetic0", ..."""
    samples = []
    for item in chunk:
        features = cache.get(item)
        count = len(features)
        sample = dict(zip(feature_keys(count), (f.float() for f in features)), report=item["report"],
                      box=item.get("box"))
        if item["label"] is not None:
            sample["label"] = item["label"]
        if copies is not None:
            options = copies.get(item["id"]) or [item]
            sample.update(zip(feature_keys(count, "synthetic"), (f.float() for f in cache.get(rng.choice(options)))))
        samples.append(augment(sample))
    stack = lambda key: torch.stack([torch.as_tensor(s[key]) for s in samples])  # noqa: E731
    features = [stack(key) for key in feature_keys(count)]
    synthetic = [stack(key) for key in feature_keys(count, "synthetic")] if copies is not None else None
    labels = stack("label").long() if "label" in samples[0] else None
    reports = ["" if rng.random() < text_dropout else s["report"] for s in samples]
    return _Batch(features, synthetic, labels, reports, [named_sides(s["report"]) for s in samples],
                  [s["box"] for s in samples])


def report_items(items: list[dict]) -> list[dict]:
    """The images without a mask whose report constrains a mask (named_sides), for `train.report_weight`."""
    return [item for item in items if item["label"] is None and named_sides(item["report"]) is not None]


def synthetic_copies(train_items: list[dict], synthetic: dict[str, list[dict]] | None, ratio: int) -> dict | None:
    """The first `ratio` synthetic copies of each training image, or None when synthetic augmentation is off."""
    if ratio < 1 or not synthetic:
        return None
    return {item["id"]: synthetic.get(item["id"], [])[:ratio] for item in train_items}


def segmentation_loss() -> DiceCELoss:
    """Cross-entropy + 1.5 x Dice, as in the paper; the same for the head and the benchmark's UNet baseline."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, lambda_dice=1.5)


def train_head(
    model: TextDiffModel, train_items: list[dict], val_items: list[dict], cfg: TrainConfig,
    checkpoint: str | Path | None = None, cache: FeatureCache | None = None, progress: bool = True,
    synthetic: dict[str, list[dict]] | None = None, unlabeled: list[dict] = (),
) -> TrainResult:
    """Train fusion + head; keeps (in `model` and in `checkpoint`) the weights with the best validation Dice.

    Training runs in rounds (`training_rounds`), each ended by validation on the held-out windows (`validation_windows`)
    and a step of the cosine learning-rate schedule. A training window's features are computed the first time it is
    drawn, so a short run over many windows pays only for those it reads.
    Items whose working grid is larger than one window train and validate as their windows (`tiling.window_items`).
    `synthetic` maps an image id to its synthetic copies (EMIT-Diff); with `cfg.synthetic_ratio` > 0 each training
    image is paired with one of its first `synthetic_ratio` copies and the loss sees, per patch of a random merging
    mask, the real or the synthetic prediction. Validation uses real images only.
    `unlabeled` images (no mask) whose report names sides add `cfg.report_weight` x `report_loss` on a batch of them
    per step, when the weight is above 0.
    """
    _check_training_items(model, train_items, val_items, cfg, unlabeled)
    torch.manual_seed(cfg.seed)
    loop = _Loop(model, cache or FeatureCache(model.extractor, enabled=cfg.cache_features,
                                              max_memory_gb=cfg.max_feature_cache_gb), cfg,
                 feature_augmentation(cfg.augment, len(model.extractor.cfg.feature_layers), cfg.seed),
                 random.Random(cfg.seed), synthetic_copies(train_items, synthetic, cfg.synthetic_ratio),
                 report_items(list(unlabeled)) if cfg.report_weight > 0 else [],
                 torch.Generator().manual_seed(cfg.seed), next(model.head.parameters()).device)
    extra = loop.weak + [c for group in (loop.copies or {}).values() for c in group]
    if extra:
        _refuse_windows(train_items + val_items + extra, model.image_size)
    if loop.weak:
        logger.info("report supervision: %d images without a mask, weight %g", len(loop.weak), cfg.report_weight)
    train_items = training_windows(train_items, model.image_size, cfg)
    selection = validation_windows(selection_items(windows_of(val_items, model.image_size), train_items), cfg)
    loop.cache.fill(selection + extra, progress=progress)
    return _fit(model, loop, train_items, selection, checkpoint, progress)


def _fit(model: TextDiffModel, loop: "_Loop", train_items: list[dict], selection: list[dict],
         checkpoint: str | Path | None, progress: bool) -> TrainResult:
    """A run's rounds: optimizer steps, then validation on `selection` and the checkpoint choice; `model` ends with the
    best round's weights."""
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
        dice = dice_per_image(predict_logits(model, selection, loop.cache),
                              torch.stack([it["label"] for it in selection]), model.cfg.head.num_classes).mean().item()
        history.append({"epoch": number, "step": done, "loss": loss, "val_dice": dice, "seconds": seconds})
        bar.update(steps)
        bar.set_postfix(loss=f"{loss:.3f}", val_dice=f"{dice:.3f}")
        # one line per round for logs (server jobs, -v), where a progress bar does not show
        logger.info("round %d/%d (step %d/%d): loss %.4f, validation Dice %.4f", number, len(rounds), done,
                    sum(rounds), loss, dice)
        if choice.is_best(dice):
            best = TrainResult(history, dice, number)
            best_state = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
            if checkpoint:
                save_checkpoint(model, checkpoint, extra={"best_val_dice": dice, "epoch": number, "step": done})
    bar.close()
    model.head.load_state_dict(best_state)
    model.eval()
    return TrainResult(history, best.best_dice, best.best_epoch, len(loop.weak))


def training_rounds(windows: int, cfg: TrainConfig) -> list[int]:
    """Optimizer steps of each round of a run (a round ends with validation): `cfg.steps` in rounds of
    `cfg.val_every`, or with `cfg.epochs` set, one pass over the `windows` training windows per round."""
    if cfg.epochs:
        return [math.ceil(windows / cfg.batch_size)] * cfg.epochs
    full, rest = divmod(cfg.steps, cfg.val_every)
    return [cfg.val_every] * full + [rest] * bool(rest)


def validation_windows(windows: list[dict], cfg: TrainConfig) -> list[dict]:
    """The windows a run validates on: at most `cfg.val_windows` of them, a seeded draw in their order (all of them
    with `cfg.epochs` set, as that recipe did)."""
    if cfg.epochs or cfg.val_windows is None or len(windows) <= cfg.val_windows:
        return windows
    return [windows[i] for i in sorted(random.Random(cfg.seed).sample(range(len(windows)), cfg.val_windows))]


def _shuffled_batches(items: list[dict], batch_size: int, rng: random.Random):
    """Batches of `items` for as long as asked: one seeded random order per pass, drawn when the pass begins (its last
    batch may be smaller)."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for begin in range(0, len(order), batch_size):
            yield [items[i] for i in order[begin : begin + batch_size]]


def _check_training_items(model: TextDiffModel, train_items: list[dict], val_items: list[dict], cfg: TrainConfig,
                          unlabeled: list[dict]) -> None:
    """Refuse a run that cannot train: no image, no epoch, a missing or empty mask, lung rules without lung reports."""
    if not train_items:
        raise DataError("no labeled image to train on: save at least one mask under labels/final")
    without_mask = [item["id"] for item in train_items + val_items if item["label"] is None]
    if without_mask:
        raise DataError(f"training items without a mask: {without_mask[:5]}")
    if not any(item["label"].any() for item in train_items + val_items):
        raise DataError("every mask is empty: draw at least one region to segment")
    if cfg.report_weight > 0 and unlabeled:
        check_reports_readable([item["report"] for item in unlabeled], "train.report_weight")
    if model.cfg.head.obey_report:
        check_reports_readable([item["report"] for item in train_items + val_items], "head.obey_report")


@dataclass
class _Loop:
    """What every optimizer step of one training run shares."""

    model: TextDiffModel
    cache: FeatureCache
    cfg: TrainConfig
    augment: object
    rng: random.Random
    copies: dict[str, list[dict]] | None
    weak: list[dict]
    merge_generator: torch.Generator
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

    def loss(self, chunk: list[dict]) -> torch.Tensor:
        """DiceCE of a batch (real and synthetic predictions merged patch by patch when there are copies), plus the
        report loss of a batch of images without a mask when report supervision is on."""
        cfg, model, device = self.cfg, self.model, self.device
        batch = _training_batch(chunk, self.cache, self.augment, cfg.text_dropout, self.rng, self.copies)
        if batch.synthetic is None:
            logits = model.logits_from_features([f.to(device) for f in batch.features], batch.reports, batch.boxes)
        else:  # real and synthetic in one forward, then merged patch by patch
            both = [torch.cat(pair).to(device) for pair in zip(batch.features, batch.synthetic)]
            real, fake = model.logits_from_features(both, batch.reports + batch.reports).chunk(2)
            logits = merge_predictions(real, fake, cfg.merge_alpha, cfg.merge_patch, self.merge_generator)
        loss = segmentation_loss()(logits, batch.labels.to(device))
        if self.weak:
            reported = _training_batch(self.rng.sample(self.weak, min(len(self.weak), cfg.batch_size)), self.cache,
                                       self.augment, cfg.text_dropout, self.rng)
            weak_logits = model.logits_from_features([f.to(device) for f in reported.features], reported.reports)
            loss = loss + cfg.report_weight * report_loss(weak_logits, reported.sides, cfg.report_top_k)
        return loss


def _refuse_windows(items: list[dict], window: int) -> None:
    """Synthetic copies and report supervision pair whole images (a copy, a report's sides): not windows."""
    if any(tuple(item["image"].shape[1:]) != (window, window) for item in items):
        raise DataError("synthetic copies and report supervision need each image in one window: set "
                         "backbone.max_windows=1 (or a backbone.patch_scale that fits the images into one window)")


def healthy_cases(cases: list[Case], healthy_label: str | None) -> list[Case]:
    """The cases without a mask whose image-level label is `healthy_label` (none when it is None)."""
    return [c for c in cases if healthy_label and c.label is None and c.image_label == healthy_label]


def with_empty_mask(item: dict) -> dict:
    return {**item, "label": torch.zeros(1, *item["image"].shape[1:], dtype=torch.long)}


def train_on_cases(cases: list[Case], cfg: TextDiffConfig, checkpoint: str | Path, device: str | torch.device = "cpu",
                   progress: bool = True, cache_folder: str | Path | None = None,
                   pseudo_cases: list[Case] = (), healthy: list[Case] = (),
                   synthetic: dict[str, list[Case]] | None = None,
                   unlabeled: list[Case] = (), compare_without: bool = False,
                   initial_head: dict[str, torch.Tensor] | None = None) -> tuple[TextDiffModel, TrainResult]:
    """Build the model of `cfg`, load the labeled cases, split off validation images, train and checkpoint.

    `pseudo_cases` carry masks nobody drew (e.g. CDM pre-annotations); they join the training split only, so the
    checkpoint is still chosen on real masks. An image with a real mask never uses its pseudo-label.
    `healthy` cases (see `healthy_cases`) join the training split too, with an empty mask.
    `synthetic` (source id -> synthetic copies, from `read_synthetic`) is used when `cfg.train.synthetic_ratio` > 0.
    `unlabeled` cases train through their reports alone when `cfg.train.report_weight` > 0 (`unlabeled_cases`).
    With `compare_without`, a run that uses pseudo-labels or synthetic copies also trains without them on the same
    split, and keeps the one with the higher validation Dice (`TrainResult.gate` says which, and both scores).
    `initial_head` (a head's weights, e.g. of the model in service) is where training starts instead of a new head.
    """
    cases = [c for c in cases if c.label is not None]
    real = {c.id for c in cases}
    pseudo_cases = [c for c in pseudo_cases if c.label is not None and c.id not in real]
    healthy = [c for c in healthy if c.id not in real and c.id not in {p.id for p in pseudo_cases}]
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
    if not compare_without or not data.extras:
        return model, result
    if not any(item["label"].any() for item in data.train + data.val):
        logger.warning("no drawn mask with foreground to train without %s: kept the run with them",
                       " and ".join(data.extras))
        return model, result
    return _keep_better(model, result, data, checkpoint, cache, progress, initial)


@dataclass
class _TrainingData:
    """The items of one training run, by where their masks come from."""

    train: list[dict]  # real masks (and no more) on the training side of the split
    val: list[dict]  # real masks only, always
    pseudo: list[dict]  # masks nobody drew
    healthy: list[dict]  # images labeled healthy, with an empty mask
    copies: dict[str, list[dict]] | None  # synthetic copies by source image id
    weak: list[dict]  # images without a mask that train through their reports

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
    pseudo = [{**item, "origin": "pseudo"} for c in pseudo_cases for item in model.load_planes(c)]
    empty = [{**with_empty_mask(item), "origin": "healthy"} for c in healthy for item in model.load_planes(c)]
    if pseudo_cases or healthy:
        logger.info("training on %d real, %d pseudo-labeled and %d healthy images", len(groups), len(pseudo_cases),
                    len(healthy))
    copies = None
    if cfg.train.synthetic_ratio > 0:
        if not synthetic:
            raise DataError("train.synthetic_ratio > 0 needs synthetic pairs: make them with `textdiff synthesize`")
        wanted = {item["id"] for item in train + pseudo + empty}
        copies = {source: [model.load(c) for c in group[: cfg.train.synthetic_ratio]]
                  for source, group in synthetic.items() if source in wanted}
        logger.info("%d of %d training images have synthetic copies", len(copies), len(wanted))
    weak = []
    if cfg.train.report_weight > 0:
        used = {item["id"] for item in train + val + pseudo + empty}
        weak = report_items([model.load(c) for c in unlabeled if c.label is None and c.id not in used])
        logger.info("%d images without a mask train through their reports", len(weak))
    return _TrainingData(train, val, pseudo, empty, copies, weak)


def _keep_better(model: TextDiffModel, result: TrainResult, data: _TrainingData, checkpoint: str | Path,
                 cache: FeatureCache, progress: bool, initial: dict) -> tuple[TextDiffModel, TrainResult]:
    """Train the same run without pseudo-labels and synthetic copies, on the same split from the same initial weights,
    and keep (in memory and in `checkpoint`) whichever scores the higher validation Dice; a tie keeps the plain run."""
    extras = " and ".join(data.extras)
    logger.info("training again without %s, to keep the better run", extras)
    checkpoint = Path(checkpoint)
    plain_path = checkpoint.with_name(f"{checkpoint.stem}.without-extras{checkpoint.suffix}")
    plain = TextDiffModel(model.cfg, model.extractor, model.text_encoder).to(next(model.head.parameters()).device)
    plain.head.load_state_dict(initial)
    torch.manual_seed(model.cfg.train.seed)
    plain_cfg = dataclasses.replace(model.cfg.train, synthetic_ratio=0)
    plain_result = train_head(plain, data.train + data.healthy, data.val, plain_cfg, checkpoint=plain_path,
                              cache=cache, progress=progress, unlabeled=data.weak)
    keep_extras = result.best_dice > plain_result.best_dice
    gate = {"extras": extras, "kept": f"with {extras}" if keep_extras else f"without {extras}",
            "dice_with": round(result.best_dice, 4), "dice_without": round(plain_result.best_dice, 4)}
    logger.info("kept the run %s: validation Dice %.4f with them, %.4f without", gate["kept"], result.best_dice,
                plain_result.best_dice)
    if keep_extras:
        plain_path.unlink(missing_ok=True)
        return model, dataclasses.replace(result, gate=gate)
    os.replace(plain_path, checkpoint)
    return plain, dataclasses.replace(plain_result, gate=gate)
