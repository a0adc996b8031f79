"""`textdiff cdm-benchmark`: masks from image-level labels only, and what they are worth as pseudo-labels.

Part 1, on the test split's abnormal images (as the CDM paper evaluates): Dice of the CDM map, of Grad-CAM on a MONAI
ResNet trained on the same image-level labels, and of the reconstruction baseline (denoise toward healthy from the
same x_Q, threshold |x - x_healthy|), all thresholded with Otsu, with the time per image of each.
Part 2: TextDiff trained with a few real masks, against the same plus CDM pseudo-labels on every other training
image (abnormal: the CDM mask; healthy: an empty mask), scored on the whole test split, same optimizer steps.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from textdiff.model.backbone import make_extractor
from textdiff.research.benchmark import _pool, _subset, epochs_for
from textdiff.weak.cdm import image_level_label, labeled_images, load_cdm
from textdiff.weak.cdm_masks import condition_maps, reconstruction_maps, threshold_map, to_size
from textdiff.config import TextDiffConfig
from textdiff.data.studies import load_case, read_studies
from textdiff.model.features import FeatureCache
from textdiff.research.gradcam import ClassifierSettings, cam_maps, train_classifier
from textdiff.training.inference import score_masks, segment_items
from textdiff.model.segmenter import TextDiffModel
from textdiff.plots import plot_bars, plot_map_examples
from textdiff.model.text import TextEncoder
from textdiff.training.train import split_train_val, train_head

MAP_METHODS = {"cdm": "CDM (condition derivative)", "gradcam": "Grad-CAM (ResNet classifier)",
               "reconstruction": "reconstruction toward healthy"}


@dataclass
class CDMBenchmarkSettings:
    real_masks: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400  # TextDiff optimizer steps per run, the same with and without pseudo-labels
    classifier: ClassifierSettings = dataclasses.field(default_factory=ClassifierSettings)


def run_cdm_benchmark(data: Path, cdm_folder: str, backbone: str | None, out: Path, settings: CDMBenchmarkSettings,
                      cfg: TextDiffConfig, cdm_overrides: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cdm = load_cdm(cdm_folder, device, **(cdm_overrides or {}))
    maps = _weak_masks(cdm, data, settings, device, out)
    pseudo = _pseudo_label_runs(cdm, data, backbone, settings, cfg, device)
    result = {"maps": maps, "pseudo_labels": pseudo, "device": str(device), "cdm": cdm_folder, "backbone": backbone,
              "cdm_config": dataclasses.asdict(cdm.cfg), "settings": dataclasses.asdict(settings)}
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
    """Part 2: TextDiff with `real_masks` real masks, with and without CDM pseudo-labels on the rest of the pool."""
    pretrained = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=backbone))
    cache = FeatureCache(make_extractor(pretrained.backbone).to(device))
    text_encoder = TextEncoder(cfg.text)
    size, channels = cache.extractor.cfg.image_size, cache.extractor.cfg.in_channels
    cases = _pool(data)
    pool = [load_case(c, size, channels, 2) for c in cases]
    test = [load_case(c, size, channels, 2) for c in read_studies(data / "test")]
    pseudo = {}
    for case, item in tqdm(list(zip(cases, pool)), desc="CDM pseudo-labels", unit="img"):
        target = image_level_label(case, cdm.cfg)
        if target is None:
            continue
        if target == cdm.cfg.healthy_class:
            pseudo[case.id] = torch.zeros_like(item["label"])
        else:
            soft = condition_maps(cdm, item["image"][None].to(device), target).cpu()  # at the model's size
            pseudo[case.id] = threshold_map(soft[0], cdm.cfg).long()
    rows = []
    for seed in settings.seeds:
        labeled = _subset(pool, settings.real_masks, seed)
        train, val = split_train_val(labeled, cfg.train.val_fraction, seed)
        chosen = {item["id"] for item in labeled}
        extra = [{**item, "label": pseudo[item["id"]]} for item in pool if item["id"] not in chosen and item["id"] in pseudo]
        for variant, items in (("real only", train), ("real + CDM pseudo-labels", train + extra)):
            torch.manual_seed(seed)
            model = TextDiffModel(pretrained, cache.extractor, text_encoder).to(device)
            epochs = epochs_for(settings.steps, len(items), cfg.train.batch_size)
            train_head(model, items, val, dataclasses.replace(cfg.train, epochs=epochs, seed=seed), cache=cache,
                       progress=False)
            dice = score_masks(segment_items(model, test, cache=cache), test, 2)["mean"]["dice"]
            rows.append({"variant": variant, "seed": seed, "dice": dice, "training_images": len(items)})
            print(f"{variant:<26} seed={seed} training images={len(items):<3} test Dice {dice:.4f}", flush=True)
    summary = {}
    for variant in ("real only", "real + CDM pseudo-labels"):
        values = [r["dice"] for r in rows if r["variant"] == variant]
        summary[variant] = {"mean": statistics.mean(values), "std": statistics.pstdev(values)}
    pseudo_dice = _pseudo_label_quality(pseudo, pool)
    return {"real_masks": settings.real_masks, "rows": rows, "summary": summary,
            "difference": summary["real + CDM pseudo-labels"]["mean"] - summary["real only"]["mean"],
            "pseudo_label_dice_on_pool": pseudo_dice}


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
    lines += ["", f"TextDiff with {pseudo['real_masks']} real masks (test Dice, mean ± std over seeds; pseudo-label "
              f"Dice on the pool {pseudo['pseudo_label_dice_on_pool']:.3f}):", "| training data | Dice |", "|---|---|"]
    for variant, stats in pseudo["summary"].items():
        lines.append(f"| {variant} | {stats['mean']:.3f} ± {stats['std']:.3f} |")
    lines.append(f"difference: {pseudo['difference']:+.3f}")
    return "\n".join(lines)
