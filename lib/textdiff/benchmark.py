"""`textdiff benchmark`: test-split Dice against the number of labeled training images, for TextDiff, its ablations
and a MONAI UNet trained from scratch, plus the feature cache's speed-up, inference latency and peak memory.

Labeled subsets are drawn (seeded) from the training pool, whose masks are in `<data>/train-groundtruth/`. With
`synthetic` (pairs made by `textdiff synthesize` from the pool), the "+ synthetic" methods train TextDiff and the
UNet with EMIT-Diff augmentation: `synthetic_ratio` copies per real image and the random merging mask.
Each row also keeps the area oracle's Dice (`headroom`): the bound on what a report could add to that run's masks.
With `train.report_weight` > 0 the pool's other images (neither labeled nor healthy) train through their reports.
"""

from __future__ import annotations

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

from .backbone import make_extractor, make_random_extractor
from .config import TextDiffConfig
from .data import Case, DataError, find_by_id, load_case, read_studies
from .emit import merge_predictions
from .features import FeatureCache
from .headroom import area_oracle
from .inference import score_masks, segment_items, to_original_size
from .model import TextDiffModel
from .plots import plot_curves
from .synthetic import read_synthetic
from .text import TextEncoder
from .train import (CheckpointChoice, dice_per_image, healthy_cases, segmentation_loss, selection_items,
                    split_train_val, train_head, with_empty_mask)

METHODS = {
    "textdiff": "TextDiff (pretrained backbone + report)",
    "empty_text": "TextDiff, empty report",
    "no_cross_attention": "diffusion features, no cross-attention",
    "unet": "MONAI UNet from scratch",
    "random_backbone": "TextDiff, random backbone",
    "textdiff_synthetic": "TextDiff + synthetic (EMIT-Diff)",
    "unet_synthetic": "MONAI UNet from scratch + synthetic (EMIT-Diff)",
}
DEFAULT_METHODS = ("textdiff", "empty_text", "no_cross_attention", "unet", "random_backbone")


@dataclass
class BenchmarkSettings:
    label_counts: tuple[int, ...] = (5, 10, 20)
    seeds: tuple[int, ...] = (0,)
    # Optimizer steps per run, the same for every method and label count (an epoch budget would give the runs with
    # few labels only a handful of steps).
    steps: int = 400
    methods: tuple[str, ...] = DEFAULT_METHODS
    synthetic: str | None = None  # folder of synthetic pairs of the training pool (the "+ synthetic" methods)
    synthetic_ratio: int = 4
    merge_alpha: float = 0.6
    merge_patch: int = 32

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown benchmark method(s) {unknown}; known: {', '.join(METHODS)}")
        if any(m.endswith("_synthetic") for m in self.methods) and not self.synthetic:
            raise ValueError("the '+ synthetic' methods need --synthetic DIR (pairs from `textdiff synthesize`)")


def _pool(data: Path) -> list[Case]:
    """Training pool with every image's ground-truth mask (for simulated labeling)."""
    truth = data / "train-groundtruth"
    return [dataclasses.replace(c, label=find_by_id(truth, c.id)) for c in read_studies(data / "train")]


def _subset(items: list[dict], count: int, seed: int) -> list[dict]:
    order = list(range(len(items)))
    random.Random(1000 + seed).shuffle(order)
    return [items[i] for i in sorted(order[:count])]


def _without_text(items: list[dict]) -> list[dict]:
    return [{**item, "report": ""} for item in items]


def epochs_for(steps: int, images: int, batch_size: int) -> int:
    """Epochs that give at least `steps` optimizer steps on `images` training images."""
    return math.ceil(steps / math.ceil(images / batch_size))


def _train_unet(train: list[dict], val: list[dict], epochs: int, batch_size: int, seed: int, device,
                copies: dict[str, list[dict]] | None = None, merge: tuple[float, int] = (0.6, 32),
                selection_window: int = 1) -> torch.nn.Module:
    """The from-scratch baseline: same loss, epochs, batch size and model selection as TextDiff's head; with
    `copies` (id -> synthetic copies) each image is paired with one copy and the merged prediction is scored."""
    torch.manual_seed(seed)
    merge_generator = torch.Generator().manual_seed(seed)
    net = UNet(2, train[0]["image"].shape[0], 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).to(device)
    loss_fn = segmentation_loss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    selection = selection_items(val, train)
    rng, choice, best_state = random.Random(seed), CheckpointChoice(selection_window), None
    for _ in range(epochs):
        net.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        for begin in range(0, len(order), batch_size):
            chunk = [train[i] for i in order[begin : begin + batch_size]]
            images = torch.stack([it["image"] for it in chunk]).to(device)
            labels = torch.stack([it["label"] for it in chunk]).to(device)
            if copies is None:
                logits = net(images)
            else:
                fakes = torch.stack([rng.choice(copies.get(it["id"]) or [it])["image"] for it in chunk]).to(device)
                real, fake = net(torch.cat([images, fakes])).chunk(2)
                logits = merge_predictions(real, fake, *merge, merge_generator)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            logits = net(torch.stack([it["image"] for it in selection]).to(device)).cpu()
        dice = dice_per_image(logits, torch.stack([it["label"] for it in selection]), 2).mean().item()
        if choice.is_best(dice):
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net.eval()


def _unet_masks(net, test: list[dict], device) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = net(torch.stack([it["image"] for it in test]).to(device)).cpu()
    return [to_original_size(lg, it["original_shape"]) for lg, it in zip(logits, test)]


def _synthetic_items(settings: BenchmarkSettings, size: int, channels: int) -> dict[str, list[dict]]:
    """Source id -> its first `synthetic_ratio` synthetic copies, loaded; {} when no synthetic folder is given."""
    if not settings.synthetic:
        return {}
    copies = read_synthetic(settings.synthetic)
    if not copies:
        raise DataError(f"no synthetic pairs in '{settings.synthetic}'")
    return {source: [load_case(c, size, channels, 2) for c in group[: settings.synthetic_ratio]]
            for source, group in copies.items()}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_benchmark(data: Path, backbone: str | None, out: Path, settings: BenchmarkSettings, cfg: TextDiffConfig) -> dict:
    """Run every method x label count x seed; print a table, write results.json and dice_vs_labels.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder = TextEncoder(cfg.text)
    pretrained_cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=backbone))
    models, caches = {}, {}

    def model_for(method: str) -> TextDiffModel:
        """Models share one backbone and its feature cache per backbone kind (pretrained or random)."""
        kind = "random" if method == "random_backbone" else "pretrained"
        if kind not in caches:
            build = make_random_extractor if kind == "random" else make_extractor
            caches[kind] = FeatureCache(build(pretrained_cfg.backbone).to(device))
        head = dataclasses.replace(pretrained_cfg.head, use_text=method != "no_cross_attention")
        return TextDiffModel(dataclasses.replace(pretrained_cfg, head=head), caches[kind].extractor, text_encoder).to(device)

    probe = model_for("textdiff")
    size, channels = probe.image_size, probe.cfg.backbone.in_channels
    pool_cases = _pool(data)
    pool = [load_case(c, size, channels, 2) for c in pool_cases]
    # cfg.train.healthy_label: the pool's healthy images join every method's training split with an empty mask
    healthy = {c.id for c in healthy_cases([dataclasses.replace(c, label=None) for c in pool_cases],
                                           cfg.train.healthy_label)}
    test = [load_case(c, size, channels, 2) for c in read_studies(data / "test")]
    synthetic = _synthetic_items(settings, size, channels)
    merge = (settings.merge_alpha, settings.merge_patch)
    rows, about = [], {"settings": dataclasses.asdict(settings), "backbone": backbone, "device": str(device)}
    for count in settings.label_counts:
        for seed in settings.seeds:
            labeled = _subset(pool, count, seed)
            train, val = split_train_val(labeled, cfg.train.val_fraction, seed)
            drawn = {it["id"] for it in labeled}
            train += [with_empty_mask(it) for it in pool if it["id"] in healthy and it["id"] not in drawn]
            # cfg.train.report_weight: the rest of the pool trains through its reports alone (report supervision)
            unlabeled = [{**it, "label": None} for it in pool if it["id"] not in drawn and it["id"] not in healthy]
            epochs = epochs_for(settings.steps, len(train), cfg.train.batch_size)
            copies = {it["id"]: synthetic.get(it["id"], []) for it in train} if synthetic else None
            for method in settings.methods:
                start = time.perf_counter()
                if method in ("unet", "unet_synthetic"):
                    net = _train_unet(train, val, epochs, cfg.train.batch_size, seed, device,
                                      copies if method == "unet_synthetic" else None, merge, cfg.train.selection_window)
                    masks = _unet_masks(net, test, device)
                else:
                    torch.manual_seed(seed)  # the head's initial weights, whatever ran before in this process
                    model = model_for(method)
                    cache = caches["random" if method == "random_backbone" else "pretrained"]
                    strip = _without_text if method == "empty_text" else (lambda items: items)
                    train_cfg = dataclasses.replace(cfg.train, epochs=epochs, seed=seed)
                    if method == "textdiff_synthetic":
                        train_cfg = dataclasses.replace(train_cfg, synthetic_ratio=settings.synthetic_ratio,
                                                        merge_alpha=settings.merge_alpha, merge_patch=settings.merge_patch)
                    train_head(model, strip(train), strip(val), train_cfg, cache=cache, progress=False,
                               synthetic=copies, unlabeled=strip(unlabeled))
                    masks = segment_items(model, strip(test), cache=cache)
                    models[method] = model
                scores = score_masks(masks, test, 2)
                dice = scores["mean"]["dice"]
                per_image = {r["image"]: round(r["dice"], 4) for r in scores["images"]}
                rows.append({"method": method, "labels": count, "seed": seed, "dice": dice,
                             "seconds": time.perf_counter() - start, "per_image_dice": per_image,
                             "area_oracle": area_oracle(masks, test, 2)})
                print(f"{METHODS[method]:<42} labels={count:<3} seed={seed} dice={dice:.4f} "
                      f"area oracle={rows[-1]['area_oracle']['dice']:.4f}", flush=True)
                _write_results(out, {"rows": rows, "partial": True, **about})  # a crash later keeps the runs so far
    timing = _timings(models.get("textdiff") or probe, pool, test, cfg, settings, seed=settings.seeds[0])
    result = {"rows": rows, "summary": summarise_rows(rows, out), "timing": timing, **about}
    _write_results(out, result)
    print(json.dumps(timing, indent=1))
    return result


def _write_results(out: Path, result: dict) -> None:
    """results.json, replaced atomically (temp file, then rename)."""
    partial = out / "results.json.tmp"
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(out / "results.json")


def summarise_rows(rows: list[dict], out: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Mean ± sd per method and label count over seeds: print the table, write dice_vs_labels.png into `out`."""
    summary = _summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves({METHODS[m]: by for m, by in summary.items()}, out / "dice_vs_labels.png", "labeled training images",
                "Sample data: test Dice vs labels")
    print(f"seeds: {sorted({row['seed'] for row in rows})}")
    print(format_table(summary, tuple(sorted({row["labels"] for row in rows}))))
    return summary


def merge_runs(folders: list[str | Path], out: Path) -> dict:
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
    result = {"rows": rows, "summary": summarise_rows(rows, out), "backbone": backbones.pop(),
              "runs": {folder: {k: run.get(k) for k in ("timing", "settings", "device")} for folder, run in runs.items()}}
    _write_results(out, result)
    return result


def _summarise(rows: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    summary: dict[str, dict[int, tuple[float, float]]] = {}
    for row in rows:
        summary.setdefault(row["method"], {}).setdefault(row["labels"], []).append(row["dice"])
    return {m: {n: (statistics.mean(v), statistics.pstdev(v)) for n, v in by.items()} for m, by in summary.items()}


def format_table(summary: dict, counts: tuple[int, ...]) -> str:
    header = "| method | " + " | ".join(f"{n} labels" for n in counts) + " |"
    lines = [header, "|" + "---|" * (len(counts) + 1)]
    for method, by in summary.items():
        cells = [f"{by[n][0]:.3f} ± {by[n][1]:.3f}" if n in by else "-" for n in counts]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _timings(model: TextDiffModel, pool: list[dict], test: list[dict], cfg: TextDiffConfig,
             settings: BenchmarkSettings, seed: int) -> dict:
    """Epoch time with and without the feature cache (10 labels), latency for one image, peak memory."""
    labeled = _subset(pool, 10, seed)
    train, val = split_train_val(labeled, cfg.train.val_fraction, seed)
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
