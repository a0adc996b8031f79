"""`textdiff-bench cdm-benchmark`: masks from image-level labels only, and what they are worth as pseudo-labels.

Part 1, on the test split's abnormal images (as the CDM paper evaluates): Dice of the CDM map, of Grad-CAM on a MONAI
ResNet trained on the same image-level labels, and of the reconstruction baseline (denoise toward healthy from the
same x_Q, threshold |x - x_healthy|), all thresholded with Otsu, with the time per image of each.
Part 2: TextDiff trained with a few real masks, against the same plus CDM pseudo-labels on every other training
image (abnormal: the CDM mask; healthy: an empty mask), scored on the whole test split, same optimizer steps; and
what the quality gate keeps of each pair (the run with the higher validation Dice, validation on real masks only).
Cold start: the same few images labeled by correcting their CDM proposals (`corrected_proposal`: whole-region errors
fixed from the ground truth, outlines kept) instead of drawing them, with the fraction of pixels the correction changed.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from textdiff.model.backbone import make_extractor
from textdiff_bench.benchmark import _pool, _subset, epochs_for
from textdiff.weak.cdm import image_level_label, labeled_images, load_cdm
from textdiff.weak.cdm_masks import condition_maps, reconstruction_maps, threshold_map, to_size
from textdiff.config import TextDiffConfig
from textdiff.data.studies import load_case, read_studies
from textdiff.model.features import FeatureCache
from textdiff.weak.cdm_readout import choose_readout
from textdiff_bench.gradcam import ClassifierSettings, cam_maps, train_classifier
from textdiff.evaluation import score_masks, segment_items
from textdiff.model.segmenter import TextDiffModel
from textdiff.plots import plot_bars, plot_map_examples
from textdiff.model.text import TextEncoder
from textdiff.training.runs import split_train_val
from textdiff.training.train import train_head

REAL, PSEUDO = "real only", "real + CDM pseudo-labels"
GATED = "gated (better by validation Dice)"
CORRECTED = "corrected CDM proposals"  # the same images as REAL, labeled by fixing their CDM masks (cold start)
VARIANTS = (REAL, PSEUDO, GATED, CORRECTED)
MAP_METHODS = {"cdm": "CDM (condition derivative)", "gradcam": "Grad-CAM (ResNet classifier)",
               "reconstruction": "reconstruction toward healthy"}


@dataclass
class CDMBenchmarkSettings:
    real_masks: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400  # TextDiff optimizer steps per run, the same with and without pseudo-labels
    choose_readout: bool = False  # pick Q, threshold and largest component on the training images first
    classifier: ClassifierSettings = dataclasses.field(default_factory=ClassifierSettings)


def run_cdm_benchmark(data: Path, cdm_folder: str, backbone: str | None, out: Path, settings: CDMBenchmarkSettings,
                      cfg: TextDiffConfig, cdm_overrides: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    readout = None
    if settings.choose_readout:
        chosen, rows = choose_readout(cdm_folder, _pool(data), device, base=cdm_overrides)
        cdm_overrides, readout = {**(cdm_overrides or {}), **chosen}, {"chosen": chosen, "rows": rows}
        best = max(row["dice"] for row in rows)
        print(f"read-out chosen on the training images: {chosen} (training Dice {best:.4f})", flush=True)
    cdm = load_cdm(cdm_folder, device, **(cdm_overrides or {}))
    maps = _weak_masks(cdm, data, settings, device, out)
    pseudo = _pseudo_label_runs(cdm, data, backbone, settings, cfg, device) if settings.seeds else None
    result = {"maps": maps, "pseudo_labels": pseudo, "device": str(device), "cdm": cdm_folder, "backbone": backbone,
              "cdm_config": dataclasses.asdict(cdm.cfg), "readout_selection": readout,
              "settings": dataclasses.asdict(settings)}
    (out / "cdm_results.json").write_text(json.dumps(result, indent=1))
    print(format_tables(result))
    return result


def _weak_masks(cdm, data: Path, settings: CDMBenchmarkSettings, device, out: Path) -> dict:
    """Part 1: Dice and seconds per image of each map method on the abnormal test images."""
    size, channels = cdm.image_size, cdm.in_channels
    images, labels = labeled_images(read_studies(data / "train"), cdm.cfg, size, channels)
    start = time.perf_counter()
    classifier = train_classifier(images.to(device), labels, len(cdm.cfg.classes), settings.classifier)
    classifier_seconds = time.perf_counter() - start
    healthy = cdm.cfg.healthy_class
    cases = [c for c in read_studies(data / "test") if c.label is not None and image_level_label(c, cdm.cfg) not in (None, healthy)]
    items = [load_case(c, size, channels, 2) for c in cases]
    methods = {
        "cdm": lambda x, label: condition_maps(cdm, x, label),
        "gradcam": lambda x, label: cam_maps(classifier, x, cdm.cfg.classes.index(label), settings.classifier.target_layer),
        "reconstruction": lambda x, label: reconstruction_maps(cdm, x),
    }
    rows, examples = {}, []
    for name, method in methods.items():
        masks, seconds, soft_maps = [], [], []
        for case, item in tqdm(list(zip(cases, items)), desc=MAP_METHODS[name], unit="img"):
            start = time.perf_counter()
            soft = to_size(method(item["image"][None].to(device), image_level_label(case, cdm.cfg)), item["original_shape"]).cpu()
            masks.append(threshold_map(soft[0], cdm.cfg))
            seconds.append(time.perf_counter() - start)
            soft_maps.append(soft[0])
        scores = score_masks(masks, items, 2)
        rows[name] = {"dice": scores["mean"]["dice"], "iou": scores["mean"]["iou"],
                      "seconds_per_image": statistics.median(seconds), "images": scores["images"]}
        examples.append(soft_maps)
        print(f"{MAP_METHODS[name]:<32} Dice {rows[name]['dice']:.4f}  {rows[name]['seconds_per_image']:.3f} s/image", flush=True)
    shown = [{"image": items[i]["original_image"], "truth": items[i]["original_label"],
              "maps": {MAP_METHODS[n]: examples[k][i] for k, n in enumerate(methods)}} for i in range(min(4, len(items)))]
    plot_map_examples(shown, out / "cdm_map_examples.png")
    plot_bars({MAP_METHODS[n]: r["dice"] for n, r in rows.items()}, out / "cdm_dice.png",
              "mean Dice (abnormal test images)", "Masks from image-level labels only")
    return {"test_images": len(items), "classifier_train_seconds": classifier_seconds, "methods": rows}


def _pseudo_label_runs(cdm, data: Path, backbone: str | None, settings: CDMBenchmarkSettings, cfg: TextDiffConfig,
                       device) -> dict:
    """Part 2: TextDiff with `real_masks` real masks, with and without CDM pseudo-labels on the rest of the pool, what
    the gate keeps of the two; and (cold start) the same images labeled by correcting their CDM proposals."""
    pretrained = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=backbone))
    cache = FeatureCache(make_extractor(pretrained.backbone).to(device))
    size, channels = cache.extractor.cfg.image_size, cache.extractor.cfg.in_channels
    cases = _pool(data)
    pool = [load_case(c, size, channels, 2) for c in cases]
    runs = _Runs(pretrained, cache, TextEncoder(cfg.text), [load_case(c, size, channels, 2) for c in
                                                             read_studies(data / "test")], settings.steps, device)
    pseudo = _pseudo_labels(cdm, cases, pool, device)
    rows = []
    for seed in settings.seeds:
        labeled = _subset(pool, settings.real_masks, seed)
        train, val = split_train_val(labeled, cfg.train, seed)
        chosen = {item["id"] for item in labeled}
        extra = [{**item, "label": pseudo[item["id"]], "origin": "pseudo"} for item in pool
                 if item["id"] not in chosen and item["id"] in pseudo]
        plain = runs.train(REAL, seed, train, val)
        extended = runs.train(PSEUDO, seed, train + extra, val)
        corrected = [{**item, "label": corrected_proposal(pseudo[item["id"]], item["label"])} if item["id"] in pseudo
                     else item for item in labeled]
        cold = runs.train(CORRECTED, seed, *split_train_val(corrected, cfg.train, seed))
        cold.update(correction_effort(corrected, labeled, pseudo))
        rows += [plain, extended, gated_row(plain, extended), cold]
    summary = {}
    for variant in VARIANTS:
        values = [r["dice"] for r in rows if r["variant"] == variant]
        summary[variant] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
    for key in ("changed_pixels", "drawn_pixels"):
        summary[CORRECTED][key] = statistics.mean(r[key] for r in rows if r["variant"] == CORRECTED)
    return {"real_masks": settings.real_masks, "rows": rows, "summary": summary,
            "difference": summary[PSEUDO]["mean"] - summary[REAL]["mean"],
            "gated_difference": summary[GATED]["mean"] - summary[REAL]["mean"],
            "corrected_difference": summary[CORRECTED]["mean"] - summary[REAL]["mean"],
            "pseudo_label_dice_on_pool": _pseudo_label_quality(pseudo, pool)}


@dataclass
class _Runs:
    """What every TextDiff run of part 2 shares: the model parts, the feature cache, the test images, the steps."""

    pretrained: TextDiffConfig
    cache: FeatureCache
    text_encoder: TextEncoder
    test: list[dict]
    steps: int
    device: torch.device

    def train(self, variant: str, seed: int, items: list[dict], val: list[dict]) -> dict:
        """Train on `items`, choose the epoch on `val`; the test Dice and the validation Dice the gate compares."""
        cfg = self.pretrained.train
        torch.manual_seed(seed)
        model = TextDiffModel(self.pretrained, self.cache.extractor, self.text_encoder).to(self.device)
        epochs = epochs_for(self.steps, len(items), cfg.batch_size)
        run = train_head(model, items, val, dataclasses.replace(cfg, epochs=epochs, seed=seed), cache=self.cache,
                         progress=False)
        dice = score_masks(segment_items(model, self.test, cache=self.cache), self.test, 2)["mean"]["dice"]
        print(f"{variant:<26} seed={seed} training images={len(items):<3} validation Dice {run.best_dice:.4f} "
              f"test Dice {dice:.4f}", flush=True)
        return {"variant": variant, "seed": seed, "dice": dice, "val_dice": run.best_dice, "training_images": len(items)}


def _pseudo_labels(cdm, cases: list, pool: list[dict], device) -> dict[str, torch.Tensor]:
    """The CDM's mask of every pool image with an image-level label, at the model's size (healthy: empty)."""
    pseudo = {}
    for case, item in tqdm(list(zip(cases, pool)), desc="CDM pseudo-labels", unit="img"):
        target = image_level_label(case, cdm.cfg)
        if target is None:
            continue
        if target == cdm.cfg.healthy_class:
            pseudo[case.id] = torch.zeros_like(item["label"])
        else:
            soft = condition_maps(cdm, item["image"][None].to(device), target).cpu()
            pseudo[case.id] = threshold_map(soft[0], cdm.cfg).long()
    return pseudo


def corrected_proposal(proposal: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """A clinician's quick fix of a (1, H, W) proposal: regions that touch no true foreground erased, true regions
    the proposal missed entirely added whole; where a proposed region meets a true one, its outline stays."""
    proposed, true = proposal[0].numpy() > 0, truth[0].numpy() > 0
    kept = np.zeros_like(proposed)
    regions, count = ndimage.label(proposed)
    for index in range(1, count + 1):
        region = regions == index
        kept |= region if (region & true).any() else False
    regions, count = ndimage.label(true)
    for index in range(1, count + 1):
        region = regions == index
        kept |= region if not (region & proposed).any() else False
    return torch.as_tensor(kept[None].astype(np.int64))


def correction_effort(corrected: list[dict], labeled: list[dict], pseudo: dict[str, torch.Tensor]) -> dict:
    """The fraction of pixels the correction changed, against the fraction drawing each mask from scratch paints."""
    changed = [float((item["label"] != pseudo.get(item["id"], torch.zeros_like(item["label"]))).float().mean())
               if item["id"] in pseudo else float((item["label"] > 0).float().mean()) for item in corrected]
    drawn = [float((item["label"] > 0).float().mean()) for item in labeled]
    return {"changed_pixels": statistics.mean(changed), "drawn_pixels": statistics.mean(drawn)}


def gated_row(plain: dict, extended: dict) -> dict:
    """What `train_on_cases(..., compare_without=True)` keeps of the two runs: the one with the higher validation
    Dice (a tie keeps the plain run), scored on the test images."""
    kept = extended if extended["val_dice"] > plain["val_dice"] else plain
    return {**kept, "variant": GATED, "kept": kept["variant"]}


def _pseudo_label_quality(pseudo: dict, pool: list[dict]) -> float:
    """Mean Dice of the pseudo-labels against the pool's ground truth (how good the free masks are)."""
    items = [item for item in pool if item["id"] in pseudo]
    masks = [pseudo[item["id"]].to(torch.uint8) for item in items]
    return score_masks(masks, [{**item, "original_label": item["label"]} for item in items], 2)["mean"]["dice"]


def format_tables(result: dict) -> str:
    maps = result["maps"]
    lines = [f"Masks from image-level labels ({maps['test_images']} abnormal test images, {result['device']}):",
             "| method | Dice | IoU | s / image |", "|---|---|---|---|"]
    for name, row in maps["methods"].items():
        lines.append(f"| {MAP_METHODS[name]} | {row['dice']:.3f} | {row['iou']:.3f} | {row['seconds_per_image']:.3f} |")
    pseudo = result["pseudo_labels"]
    if pseudo is None:  # no seeds: the masks only
        return "\n".join(lines)
    lines += ["", f"TextDiff with {pseudo['real_masks']} real masks (test Dice, mean ± std over seeds; pseudo-label "
              f"Dice on the pool {pseudo['pseudo_label_dice_on_pool']:.3f}):", "| training data | Dice |", "|---|---|"]
    for variant, stats in pseudo["summary"].items():
        lines.append(f"| {variant} | {stats['mean']:.3f} ± {stats['std']:.3f} |")
    corrected = pseudo["summary"][CORRECTED]
    lines += [f"difference: {pseudo['difference']:+.3f}; gated: {pseudo['gated_difference']:+.3f}; corrected "
              f"proposals: {pseudo['corrected_difference']:+.3f}, changing {corrected['changed_pixels']:.1%} of the "
              f"pixels (drawing from scratch paints {corrected['drawn_pixels']:.1%})",
              "", "| seed | validation Dice without / with | gate kept | test Dice kept |", "|---|---|---|---|"]
    by_seed = {}
    for row in pseudo["rows"]:
        by_seed.setdefault(row["seed"], {})[row["variant"]] = row
    for seed, runs in by_seed.items():
        lines.append(f"| {seed} | {runs[REAL]['val_dice']:.3f} / {runs[PSEUDO]['val_dice']:.3f} | {runs[GATED]['kept']} "
                     f"| {runs[GATED]['dice']:.3f} |")
    return "\n".join(lines)
