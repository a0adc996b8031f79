"""The `textdiff` train task: fusion + head on the images that have a final label, backbone and text frozen."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from textdiff.config import TextDiffConfig
from textdiff.data.studies import SYNTHETIC_MARKER, Case, DataError, image_id
from textdiff.model.segmenter import load_checkpoint_config, read_head_weights, seen_images
from textdiff.synthesis.synthetic import read_synthetic
from textdiff.training.comparison import comparison_basis, left_out_dice
from textdiff.training.runs import held_out_cases, train_on_cases
from textdiff.training.train import longer_run_hint

from ..configs.settings import AppSettings
from ..publish import candidate_path, publish_if_better
from .base import StatsTrainTask

logger = logging.getLogger(__name__)

PSEUDO_LABEL_MODEL = "cdm"


def labeled_cases(datastore: Datastore) -> list[Case]:
    """The datastore's (image, final label) pairs with each image's report."""
    cases = []
    for pair in datastore.datalist():
        key = image_id(pair["image"])
        cases.append(Case(key, Path(pair["image"]), Path(pair["label"]), datastore.report(key)))
    return cases


def pseudo_labeled_cases(datastore: Datastore, model: str = PSEUDO_LABEL_MODEL) -> list[Case]:
    """Images with no final label whose `original` label the `model` infer task made (CDM pre-annotations)."""
    final = set(datastore.get_labeled_images())  # MONAI Label 0.8.5 counts only final labels here, whatever the tag
    cases = []
    for key in datastore.list_images():
        label_id = datastore.get_label_by_image_id(key, DefaultLabelTag.ORIGINAL)
        if not label_id or key in final:
            continue
        if datastore.get_label_info(label_id, DefaultLabelTag.ORIGINAL).get("model") != model:
            continue
        label = Path(datastore.get_label_uri(label_id, DefaultLabelTag.ORIGINAL))
        cases.append(Case(key, Path(datastore.get_image_uri(key)), label, datastore.report(key)))
    return cases


def unlabeled_cases(datastore: Datastore) -> list[Case]:
    """Images without a final label, with their reports (report supervision reads the sides they name)."""
    final = set(datastore.get_labeled_images())
    return [Case(key, Path(datastore.get_image_uri(key)), None, datastore.report(key))
            for key in datastore.list_images() if key not in final]


def healthy_image_cases(datastore: Datastore, healthy_label: str) -> list[Case]:
    """Images without a final label whose image-level label is `healthy_label` (none for "")."""
    if not isinstance(healthy_label, str):
        raise DataError(f"healthy_label must be text, got {type(healthy_label).__name__}")
    if not healthy_label:
        return []
    final = set(datastore.get_labeled_images())
    chosen = [key for key, label in datastore.image_labels().items() if label == healthy_label and key not in final]
    images = set(datastore.list_images())
    return [Case(key, Path(datastore.get_image_uri(key)), None, datastore.report(key), healthy_label)
            for key in chosen if key in images]


class TextDiffTrain(StatsTrainTask):
    def __init__(self, settings: AppSettings, cfg: TextDiffConfig, backbone_for_training, description: str):
        self.model_dir = Path(settings.model_dir)
        super().__init__(
            description,
            {"max_steps": settings.steps, "max_epochs": settings.epochs, "checkpoint": settings.checkpoint,
             "continue_from_current": True,
             "val_split": cfg.train.val_fraction,
             "train_batch_size": cfg.train.batch_size, "learning_rate": cfg.train.lr,
             "pseudo_labels": settings.pseudo_labels, "synthetic_ratio": settings.synthetic_ratio,
             "healthy_label": settings.healthy_label, "report_weight": settings.report_weight,
             "obey_report": settings.obey_report, "volume_slices": cfg.train.volume_slices,
             "intensity_copies": cfg.train.intensity_copies, "compare_without": True, "force": False},
            self.model_dir / "train_stats.json",
        )
        self.settings = settings
        self.cfg = cfg
        self.backbone_for_training = backbone_for_training
        self.checkpoint = self.model_dir / "textdiff.pt"
        self.synthetic_dir = self.model_dir / "synthetic"

    def pre_process(self, request, datastore: Datastore) -> dict:
        """Final labels; CDM pre-annotations of the other images when the run asks for pseudo-labels; images with
        the run's healthy image-level label and no final label; synthetic copies (kept in the model folder, never in
        the datastore) when it asks for a synthetic ratio; the images without a final label, whose reports train
        too when it asks for a report weight."""
        data = {"labeled": labeled_cases(datastore),
                "pseudo": pseudo_labeled_cases(datastore) if request["pseudo_labels"] else [],
                "healthy": healthy_image_cases(datastore, request["healthy_label"]),
                "unlabeled": unlabeled_cases(datastore) if request["report_weight"] else []}
        if not data["labeled"] and not data["pseudo"]:
            raise DataError("no image has a final label yet: save at least one mask (Submit Label) before training")
        data["synthetic"] = self.synthetic_pairs(request)
        return data

    def synthetic_pairs(self, request: dict) -> dict[str, list[Case]]:
        """Source image id -> synthetic copies, when the run's synthetic_ratio asks for them ({} otherwise)."""
        ratio = request["synthetic_ratio"]
        if not ratio:
            return {}
        if not (self.synthetic_dir / SYNTHETIC_MARKER).is_file():
            raise DataError(f"synthetic_ratio {ratio} needs synthetic pairs in {self.synthetic_dir}: make them with "
                            f"`textdiff synthesize --model <synth-train folder> --data <studies> --out {self.synthetic_dir}`")
        return read_synthetic(self.synthetic_dir)

    def train(self, request, data: dict[str, list[Case]], backbone: str | None = None,
              base: TextDiffConfig | None = None) -> dict:
        """Train on the labeled cases (the best epoch by validation Dice) and publish the result when it segments
        the validation images at least as well as the model in service, or the request forces it (`publish`).
        A run with pseudo-labels or synthetic copies also trains without them and keeps the better by validation
        Dice, unless `compare_without` is false; the stats' `kept` says which, with both scores.

        `backbone` overrides the one `backbone_for_training` picks; `base` the config the run starts from (by
        default the current model's, so a deployment keeps its architecture; the app defaults when there is none).
        """
        cfg = self.run_config(request, backbone, base)
        start = time.time()
        initial = self.head_in_service(cfg) if request["continue_from_current"] else None
        logger.info("training TextDiff on %d labeled, %d pseudo-labeled and %d healthy images, backbone %s, %s",
                    len(data["labeled"]), len(data["pseudo"]), len(data["healthy"]), cfg.backbone.pretrained,
                    "from the head in service" if initial else "from a new head")
        model, result = train_on_cases(data["labeled"], cfg, candidate_path(self.checkpoint), request["device"],
                                       progress=False, cache_folder=self.model_dir / "feature-cache",
                                       pseudo_cases=data["pseudo"], healthy=data["healthy"],
                                       synthetic=data["synthetic"], unlabeled=data["unlabeled"],
                                       compare_without=request["compare_without"],
                                       initial_head=initial)
        best = result.history[result.best_epoch - 1]
        logger.info("kept %s: Dice %.4f after %d steps", result.kept, result.best_dice, best["step"])
        if result.short_on_labels:
            logger.info(longer_run_hint(result, cfg.train.batch_size))
        decision = self.publish(model, cfg, request, data, initial)
        return {**decision, "total_time": round(time.time() - start, 1), "steps": result.history[-1]["step"],
                "epochs": cfg.train.epochs, "passes": round(result.passes, 2),
                "continued_from_current": initial is not None,
                "best_metric": result.best_dice, "best_step": best["step"], "checkpoint": result.kept,
                "labeled_images": len(data["labeled"]),
                "pseudo_labeled_images": len(data["pseudo"]), "healthy_images": len(data["healthy"]),
                "synthetic_ratio": cfg.train.synthetic_ratio, "report_weight": cfg.train.report_weight,
                "report_images": result.report_images, "obey_report": cfg.head.obey_report,
                "images_with_synthetic_copies": len({c.id for c in data["labeled"]} & set(data["synthetic"])),
                "kept": result.gate, "backbone": cfg.backbone.pretrained, "history": result.history}

    def publish(self, model, cfg: TextDiffConfig, request: dict, data: dict, initial: dict | None) -> dict:
        """Publish the run's model when it is not worse than the one in service, on images neither learned where
        there are any (`textdiff.training.comparison`); the decision says on which."""
        labeled = data["labeled"]
        basis = comparison_basis(labeled, held_out_cases(labeled, cfg.train), seen_images(self.checkpoint),
                                 self.settings.left_out_runs, cfg.train.seed)
        images = {key: data[key] for key in ("healthy", "unlabeled", "synthetic")} | {"pseudo_cases": data["pseudo"]}

        def recipe_on_left_out() -> float:
            return left_out_dice(cfg, labeled, basis.cases, request["device"], self.model_dir / "feature-cache",
                                 initial, images)

        return publish_if_better(model, self.checkpoint, basis, request["device"], request["force"], recipe_on_left_out)

    def head_in_service(self, cfg: TextDiffConfig) -> dict | None:
        """The weights of the head in service, when a run of `cfg` can start from them: the same classes, backbone and
        head architecture (a new backbone or label set starts from a new head); None otherwise."""
        if not self.checkpoint.is_file():
            return None
        current = load_checkpoint_config(self.checkpoint)
        same_head = dataclasses.replace(current.head, obey_report=cfg.head.obey_report) == cfg.head
        if not same_source(current.backbone.pretrained, cfg.backbone.pretrained) or not same_head:
            logger.info("the model in service has another backbone or head: training a new head")
            return None
        return read_head_weights(self.checkpoint)

    def run_config(self, request: dict, backbone: str | None = None, base: TextDiffConfig | None = None) -> TextDiffConfig:
        """The library config for one run: the base config, the client's epochs / split / batch / lr, the backbone."""
        backbone = backbone or self.backbone_for_training()
        if not backbone:
            raise DataError("no diffusion backbone yet: run the diffusion_pretrain task first, "
                            "or start the server with --conf backbone <diffusers folder or hf:hub id>")
        if base is None:
            base = load_checkpoint_config(self.checkpoint) if self.checkpoint.is_file() else self.cfg
        train = dataclasses.replace(
            base.train, steps=request["max_steps"], epochs=request["max_epochs"] or None,
            checkpoint=request["checkpoint"], val_fraction=request["val_split"],
            batch_size=request["train_batch_size"], lr=request["learning_rate"],
            synthetic_ratio=request["synthetic_ratio"], healthy_label=request["healthy_label"] or None,
            report_weight=request["report_weight"], volume_slices=request["volume_slices"],
            intensity_copies=request["intensity_copies"], max_feature_cache_gb=self.settings.max_feature_cache_gb,
        )
        head = dataclasses.replace(base.head, obey_report=request["obey_report"])
        read = dataclasses.replace(base.backbone, pretrained=backbone)
        if backbone != base.backbone.pretrained:  # a new backbone reads images at the scale it learned (its tiling.json)
            read = dataclasses.replace(read, patch_scale=None, max_windows=None)
        return dataclasses.replace(base, train=train, head=head, backbone=read)


def same_source(first: str | None, second: str | None) -> bool:
    """Whether two backbone sources (folders, however written, or hf: ids) name the same model."""
    if not first or not second or first.startswith("hf:") or second.startswith("hf:"):
        return first == second
    return Path(first).resolve() == Path(second).resolve()
