"""`textdiff-bench benchmark`: test-split Dice against the number of labeled training images, for TextDiff, its ablations
and a MONAI UNet trained from scratch, plus the feature cache's speed-up, inference latency and peak memory.

Labeled subsets are drawn (seeded) from the training pool, whose masks are in `<data>/train-groundtruth/`. With
`synthetic` (pairs made by `textdiff synthesize` from the pool), the "+ synthetic" methods train TextDiff and the
UNet with EMIT-Diff augmentation: `synthetic_ratio` copies per real image and the random merging mask.
Each row also keeps the area oracle's Dice (`headroom`): the bound on what a report could add to that run's masks.
With `train.report_weight` > 0 the pool's other images (neither labeled nor healthy) train through their reports.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import UNet

from textdiff.model.backbone import make_extractor, make_random_extractor
from textdiff.config import TextDiffConfig, TrainConfig
from textdiff.data.studies import Case, DataError, find_by_id, read_studies
from textdiff.synthesis.emit import merge_predictions
from textdiff.model.features import FeatureCache, feature_augmentation
from textdiff_bench.headroom import area_oracle
from textdiff.evaluation import label_map, score_masks, segment_items
from textdiff.data.tiling import sliding_logits, windows_of
from textdiff.training.options.intensity import training_window_count, training_windows
from textdiff.model.segmenter import TextDiffModel
from textdiff.plots import plot_curves
from textdiff.synthesis.synthetic import read_synthetic
from textdiff.model.text import TextEncoder
from textdiff.training.options.extra_labels import healthy_cases, with_empty_mask
from textdiff.training.runs import split_train_val
from textdiff.training.train import CheckpointChoice, dice_per_image, segmentation_loss, selection_items, train_head

METHODS = {
    "textdiff": "TextDiff (pretrained backbone + report)",
    "empty_text": "TextDiff, empty report",
    "no_cross_attention": "diffusion features, no cross-attention",
    "unet": "MONAI UNet from scratch",
    "random_backbone": "TextDiff, random backbone",
    "textdiff_synthetic": "TextDiff + synthetic (EMIT-Diff)",
    "unet_synthetic": "MONAI UNet from scratch + synthetic (EMIT-Diff)",
}
# Rows made from others, not run: what `compare_without` keeps of TextDiff with and without synthetic copies.
DERIVED = {"textdiff_synthetic_gated": "TextDiff + synthetic, gated (better by validation Dice)"}
DEFAULT_METHODS = ("textdiff", "empty_text", "no_cross_attention", "unet", "random_backbone")


@dataclass
class BenchmarkSettings:
    label_counts: tuple[int, ...] = (5, 10, 20)
    seeds: tuple[int, ...] = (0,)
    # Optimizer steps per run, the same for every method and label count (an epoch budget would give the runs with
    # few labels only a handful of steps), rounded up to whole passes over the training windows, each ended by
    # validation (TrainConfig.epochs). None: TextDiff trains as the product does (train.steps, train.val_every) and
    # the UNet `unet_steps`.
    steps: int | None = 400
    unet_steps: int = 400
    methods: tuple[str, ...] = DEFAULT_METHODS
    synthetic: str | None = None  # folder of synthetic pairs of the training pool (the "+ synthetic" methods)
    synthetic_ratio: int = 4  # the merging mask is cfg.train's (merge_alpha, merge_patch)
    timing: bool = True  # also time the feature cache, one image's latency and the peak memory

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]  # DERIVED rows are not run
        if unknown:
            raise ValueError(f"unknown benchmark method(s) {unknown}; known: {', '.join(METHODS)}")
        if any(m.endswith("_synthetic") for m in self.methods) and not self.synthetic:
            raise ValueError("the '+ synthetic' methods need --synthetic DIR (pairs from `textdiff synthesize`)")


def _pool(data: Path) -> list[Case]:
    """Training pool with every image's ground-truth mask (for simulated labeling): from `train-groundtruth/` (the
    sample data, where most training images are unlabeled), else the pool's own final labels (an imported set)."""
    truth = data / "train-groundtruth"
    cases = read_studies(data / "train")
    return [dataclasses.replace(c, label=find_by_id(truth, c.id)) for c in cases] if truth.is_dir() else cases


def _subset(items: list[dict], count: int, seed: int) -> list[dict]:
    order = list(range(len(items)))
    random.Random(1000 + seed).shuffle(order)
    return [items[i] for i in sorted(order[:count])]


def _without_text(items: list[dict]) -> list[dict]:
    return [{**item, "report": ""} for item in items]


def epochs_for(steps: int, images: int, batch_size: int) -> int:
    """Epochs that give at least `steps` optimizer steps on `images` training images."""
    return math.ceil(steps / math.ceil(images / batch_size))


def _train_unet(train: list[dict], val: list[dict], epochs: int, cfg: TrainConfig, device, num_classes: int = 2,
                copies: dict[str, list[dict]] | None = None, merge: tuple[float, int] = (0.6, 32)) -> torch.nn.Module:
    """The from-scratch baseline on the same windows, with the same loss, epochs, batch size, augmentation and model
    selection as TextDiff's head; with `copies` (id -> synthetic copies) each image is paired with one copy and the
    merged prediction is scored."""
    torch.manual_seed(cfg.seed)
    merge_generator = torch.Generator().manual_seed(cfg.seed)
    net = UNet(2, train[0]["image"].shape[0], num_classes, channels=(16, 32, 64, 128), strides=(2, 2, 2),
               num_res_units=2).to(device)
    loss_fn, augment = segmentation_loss(), feature_augmentation(cfg.augment, 0, cfg.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    selection = selection_items(val, train)
    rng, choice, best_state = random.Random(cfg.seed), CheckpointChoice(cfg.selection_window), None
    for _ in range(epochs):
        net.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        for begin in range(0, len(order), cfg.batch_size):
            chunk = [augment({k: train[i][k] for k in ("image", "label", "report")})
                     for i in order[begin : begin + cfg.batch_size]]
            images = torch.stack([torch.as_tensor(it["image"]) for it in chunk]).to(device)
            labels = torch.stack([torch.as_tensor(it["label"]) for it in chunk]).long().to(device)
            if copies is None:
                logits = net(images)
            else:
                fakes = torch.stack([rng.choice(copies.get(train[i]["id"]) or [train[i]])["image"]
                                     for i in order[begin : begin + cfg.batch_size]]).to(device)
                real, fake = net(torch.cat([images, fakes])).chunk(2)
                logits = merge_predictions(real, fake, *merge, merge_generator)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if choice.is_best(_unet_dice(net, selection, device, num_classes)):
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval()


@torch.no_grad()
def _unet_dice(net, selection: list[dict], device, num_classes: int) -> float:
    net.eval()
    logits = torch.cat([net(torch.stack([it["image"] for it in selection[i : i + 16]]).to(device)).cpu()
                        for i in range(0, len(selection), 16)])
    return dice_per_image(logits, torch.stack([it["label"] for it in selection]), num_classes).mean().item()


@torch.no_grad()
def _unet_masks(net, test: list[dict], device, window: int, overlap: float) -> list[torch.Tensor]:
    """The UNet's masks on the test images, read in the same windows as TextDiff's and blended the same way."""
    logits_of = lambda windows: net(torch.stack([w["image"] for w in windows]).to(device)).cpu()  # noqa: E731
    return [label_map(sliding_logits(it, window, overlap, logits_of), it["original_shape"]) for it in test]


def _synthetic_items(settings: BenchmarkSettings, model: TextDiffModel) -> dict[str, list[dict]]:
    """Source id -> its first `synthetic_ratio` synthetic copies, loaded; {} when no synthetic folder is given."""
    if not settings.synthetic:
        return {}
    copies = read_synthetic(settings.synthetic)
    if not copies:
        raise DataError(f"no synthetic pairs in '{settings.synthetic}'")
    return {source: [model.load(c) for c in group[: settings.synthetic_ratio]] for source, group in copies.items()}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Models:
    """The benchmark's TextDiff models: one backbone and feature cache per backbone kind (pretrained or random),
    shared by every method and run, and one text encoder."""

    def __init__(self, cfg: TextDiffConfig, backbone: str | None, device: torch.device):
        self.cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=backbone))
        self.device, self.caches, self.text_encoder = device, {}, TextEncoder(cfg.text)
        self.last: dict[str, TextDiffModel] = {}  # the last trained model of each method (for the timings)
        self.val_dice: dict[str, float] = {}  # the best validation Dice of the last TextDiff run of each method

    def cache(self, method: str) -> FeatureCache:
        kind = "random" if method == "random_backbone" else "pretrained"
        if kind not in self.caches:
            build = make_random_extractor if kind == "random" else make_extractor
            self.caches[kind] = FeatureCache(build(self.cfg.backbone).to(self.device))
        return self.caches[kind]

    def model(self, method: str) -> TextDiffModel:
        head = dataclasses.replace(self.cfg.head, use_text=method != "no_cross_attention")
        return TextDiffModel(dataclasses.replace(self.cfg, head=head), self.cache(method).extractor,
                             self.text_encoder).to(self.device)


@dataclass
class _Split:
    """One run's training data: labeled windows' images, the pool's healthy and unlabeled images, the budget."""

    train: list[dict]
    val: list[dict]
    unlabeled: list[dict]
    epochs: int | None  # TextDiff's passes over the training windows; None: its step budget (train.steps)
    unet_epochs: int
    copies: dict[str, list[dict]] | None


def _split(pool: list[dict], healthy: set[str], labeled: list[dict], seed: int, cfg: TextDiffConfig,
           settings: BenchmarkSettings, synthetic: dict[str, list[dict]]) -> _Split:
    """The `labeled` images of the pool, split for model selection; the pool's healthy images join training with an
    empty mask (cfg.train.healthy_label), the rest of the pool trains through its reports alone
    (cfg.train.report_weight)."""
    train, val = split_train_val(labeled, cfg.train, seed)
    drawn = {it["id"] for it in labeled}
    train += [with_empty_mask(it) for it in pool if it["id"] in healthy and it["id"] not in drawn]
    unlabeled = [{**it, "label": None} for it in pool if it["id"] not in drawn and it["id"] not in healthy]
    windows = training_window_count(train, cfg.backbone.image_size, cfg.train)
    copies = {it["id"]: synthetic.get(it["id"], []) for it in train} if synthetic else None
    epochs = None if settings.steps is None else epochs_for(settings.steps, windows, cfg.train.batch_size)
    unet_epochs = epochs_for(settings.steps or settings.unet_steps, windows, cfg.train.batch_size)
    return _Split(train, val, unlabeled, epochs, unet_epochs, copies)


def _masks(method: str, split: _Split, test: list[dict], models: _Models, settings: BenchmarkSettings,
           seed: int, initial_head: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Train one method on one split and segment the test images with it; a TextDiff method starts from
    `initial_head` when given (as the app's `continue_from_current` does), else from a new head."""
    cfg, window = models.cfg, models.cfg.backbone.image_size
    train_cfg = dataclasses.replace(cfg.train, epochs=split.epochs, seed=seed)
    if method in ("unet", "unet_synthetic"):
        copies = split.copies if method == "unet_synthetic" else None
        net = _train_unet(training_windows(split.train, window, train_cfg), windows_of(split.val, window), split.unet_epochs,
                          train_cfg, models.device, cfg.head.num_classes, copies,
                          (cfg.train.merge_alpha, cfg.train.merge_patch))
        return _unet_masks(net, test, models.device, window, cfg.backbone.window_overlap)
    torch.manual_seed(seed)  # the head's initial weights, whatever ran before in this process
    model, cache = models.model(method), models.cache(method)
    if initial_head is not None:
        model.head.load_state_dict(initial_head)
    strip = _without_text if method == "empty_text" else (lambda items: items)
    if method == "textdiff_synthetic":
        train_cfg = dataclasses.replace(train_cfg, synthetic_ratio=settings.synthetic_ratio)
    run = train_head(model, strip(split.train), strip(split.val), train_cfg, cache=cache, progress=False,
                     synthetic=split.copies, unlabeled=strip(split.unlabeled))
    models.last[method], models.val_dice[method] = model, run.best_dice
    return segment_items(model, strip(test), cache=cache)


def _row(method: str, count: int, seed: int, masks: list[torch.Tensor], test: list[dict], seconds: float,
         num_classes: int) -> dict:
    scores = score_masks(masks, test, num_classes)
    return {"method": method, "labels": count, "seed": seed, "dice": scores["mean"]["dice"],
            "iou": scores["mean"]["iou"], "seconds": seconds,
            "per_image_dice": {r["image"]: round(r["dice"], 4) for r in scores["images"]},
            "area_oracle": area_oracle(masks, test, num_classes)}


def run_benchmark(data: Path, backbone: str | None, out: Path, settings: BenchmarkSettings, cfg: TextDiffConfig) -> dict:
    """Run every method x label count x seed; print a table, write results.json and dice_vs_labels.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = _Models(cfg, backbone, device)
    probe = models.model("textdiff")
    pool_cases = _pool(data)
    pool = [probe.load(c) for c in pool_cases]
    healthy = {c.id for c in healthy_cases([dataclasses.replace(c, label=None) for c in pool_cases],
                                           cfg.train.healthy_label)}
    test = [probe.load(c) for c in read_studies(data / "test")]
    synthetic = _synthetic_items(settings, probe)
    rows, about = [], {"settings": dataclasses.asdict(settings), "backbone": backbone, "device": str(device)}
    for count in settings.label_counts:
        for seed in settings.seeds:
            split = _split(pool, healthy, _subset(pool, count, seed), seed, models.cfg, settings, synthetic)
            for method in settings.methods:
                start = time.perf_counter()
                masks = _masks(method, split, test, models, settings, seed)
                rows.append(_row(method, count, seed, masks, test, time.perf_counter() - start,
                                 probe.cfg.head.num_classes))
                print(f"{METHODS[method]:<42} labels={count:<3} seed={seed} dice={rows[-1]['dice']:.4f} "
                      f"iou={rows[-1]['iou']:.4f} area oracle={rows[-1]['area_oracle']['dice']:.4f}", flush=True)
                rows[-1]["val_dice"] = models.val_dice.pop(method, None)
                _write_results(out, {"rows": rows, "partial": True, **about})  # a crash later keeps the runs so far
            rows += gated_rows(rows[-len(settings.methods):])
    timing = (_timings(models.last.get("textdiff") or probe, pool, test, cfg, settings, seed=settings.seeds[0])
              if settings.timing else {})
    result = {"rows": rows, "summary": summarise_rows(rows, out, f"{data.name}: test Dice vs labels"),
              "timing": timing, **about}
    _write_results(out, result)
    print(json.dumps(timing, indent=1))
    return result


def gated_rows(split_rows: list[dict]) -> list[dict]:
    """With TextDiff run with and without synthetic copies on one split: the run the gate (`compare_without`) keeps,
    the one with the higher validation Dice (a tie keeps the plain run), as a row of its own."""
    by_method = {row["method"]: row for row in split_rows}
    plain, extended = by_method.get("textdiff"), by_method.get("textdiff_synthetic")
    if plain is None or extended is None:
        return []
    kept = extended if extended["val_dice"] > plain["val_dice"] else plain
    return [{**kept, "method": "textdiff_synthetic_gated", "kept": kept["method"]}]


def _write_results(out: Path, result: dict) -> None:
    """results.json, replaced atomically (temp file, then rename)."""
    partial = out / "results.json.tmp"
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(out / "results.json")


def summarise_rows(rows: list[dict], out: Path, title: str = "test Dice vs labels",
                   references: dict[str, float] | None = None) -> dict[str, dict[int, tuple[float, float]]]:
    """Mean ± sd of Dice (and IoU) per method and label count over seeds: print the tables, write
    dice_vs_labels.png into `out` (with `references`, published figures, as dashed lines)."""
    summary = _summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves({{**METHODS, **DERIVED}[m]: by for m, by in summary.items()}, out / "dice_vs_labels.png", "labeled training images",
                title, references)
    counts, seeds = tuple(sorted({row["labels"] for row in rows})), _seed_counts(rows)
    print(f"seeds: {sorted({row['seed'] for row in rows})}")
    print("Dice\n" + format_table(summary, counts, seeds))
    if all("iou" in row for row in rows):
        print("IoU\n" + format_table(_summarise(rows, "iou"), counts, seeds))
    return summary


def merge_runs(folders: list[str | Path], out: Path, title: str = "test Dice vs labels",
               references: dict[str, float] | None = None) -> dict:
    """One table, plot and results.json from several benchmark runs (e.g. one process per method or seed).

    The runs must share a backbone; a (method, labels, seed) run found twice is an error, not averaged in twice.
    """
    runs = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise DataError(f"no benchmark results in '{folder}' (expected {path})")
        runs[str(folder)] = json.loads(path.read_text())
    backbones = {run.get("backbone") for run in runs.values()}
    if len(backbones) > 1:
        raise DataError(f"these runs used different backbones ({sorted(map(str, backbones))}): merge each apart")
    rows, seen = [], {}
    for folder, run in runs.items():
        for row in run["rows"]:
            key = (row["method"], row["labels"], row["seed"])
            if key in seen:
                raise DataError(f"{key[0]} with {key[1]} labels, seed {key[2]} is in both '{seen[key]}' and '{folder}'")
            seen[key] = folder
            rows.append(row)
    rows += _gate_across_runs(rows)
    result = {"rows": rows, "summary": summarise_rows(rows, out, title, references), "backbone": backbones.pop(),
              "runs": {folder: {k: run.get(k) for k in ("timing", "settings", "device")} for folder, run in runs.items()}}
    _write_results(out, result)
    return result


def _gate_across_runs(rows: list[dict]) -> list[dict]:
    """The gate's rows for splits whose runs with and without synthetic copies came from different processes."""
    splits: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        splits.setdefault((row["labels"], row["seed"]), []).append(row)
    return [gated for split in splits.values() if not any(r["method"] in DERIVED for r in split)
            for gated in gated_rows(split)]


def _summarise(rows: list[dict], metric: str = "dice") -> dict[str, dict[int, tuple[float, float]]]:
    summary: dict[str, dict[int, tuple[float, float]]] = {}
    for row in rows:
        summary.setdefault(row["method"], {}).setdefault(row["labels"], []).append(row[metric])
    return {m: {n: (statistics.mean(v), statistics.pstdev(v)) for n, v in by.items()} for m, by in summary.items()}


def _seed_counts(rows: list[dict]) -> dict[tuple[str, int], int]:
    """How many seeds each (method, label count) cell of the table averages."""
    return collections.Counter((row["method"], row["labels"]) for row in rows)


def format_table(summary: dict, counts: tuple[int, ...], seeds: dict[tuple[str, int], int] | None = None) -> str:
    """Mean ± sd per method and label count; a cell averaging fewer seeds than the fullest cell says how many."""
    most = max(seeds.values()) if seeds else 0
    header = "| method | " + " | ".join(f"{n} labels" for n in counts) + " |"
    lines = [header, "|" + "---|" * (len(counts) + 1)]
    for method, by in summary.items():
        cells = [f"{by[n][0]:.3f} ± {by[n][1]:.3f}" + _fewer(seeds, most, method, n) if n in by else "-" for n in counts]
        lines.append(f"| {({**METHODS, **DERIVED})[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fewer(seeds: dict | None, most: int, method: str, labels: int) -> str:
    count = seeds[method, labels] if seeds else most
    return f" ({count} seed{'s' if count > 1 else ''})" if count < most else ""


def _timings(model: TextDiffModel, pool: list[dict], test: list[dict], cfg: TextDiffConfig,
             settings: BenchmarkSettings, seed: int) -> dict:
    """Epoch time with and without the feature cache (10 labels), latency for one image, peak memory."""
    labeled = _subset(pool, 10, seed)
    train, val = split_train_val(labeled, cfg.train, seed)
    result = {}
    for cached in (True, False):
        cache = FeatureCache(model.extractor, enabled=cached)
        start = time.perf_counter()
        history = train_head(model, train, val, dataclasses.replace(cfg.train, epochs=3, seed=seed), cache=cache,
                             progress=False).history
        total = time.perf_counter() - start
        name = "cached" if cached else "uncached"
        result[f"{name}_first_epoch_s"] = total - sum(h["seconds"] for h in history[1:])
        result[f"{name}_later_epoch_s"] = statistics.mean(h["seconds"] for h in history[1:])
    result["cache_speedup_later_epochs"] = result["uncached_later_epoch_s"] / result["cached_later_epoch_s"]
    latencies = []
    for item in test[:10]:
        start = time.perf_counter()
        segment_items(model, [item])
        latencies.append(time.perf_counter() - start)
    result["latency_one_image_median_s"] = statistics.median(latencies)
    result["peak_memory_mb"] = _peak_memory_mb()
    return result
