"""`textdiff-bench profile`: where the seconds of a head training run and of a pretraining epoch go, on this machine.

Nothing in the training code is changed to be measured: module hooks (text encoder, classifier), a hook on the
logits' gradient and the optimizer's global step hooks stamp the time of each boundary within an optimizer step, so
each step splits into batch assembly (cache reads, augmentation), text encoding, fusion forward, classifier forward,
loss (forward and backward), classifier backward, fusion backward and the optimizer. Feature extraction (the cache
fill) and validation (the epoch's wall time beyond its training steps) are timed around them. A pretraining epoch
splits the same way into data loading, noising, UNet forward, loss, backward and the optimizer with its EMA update.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from textdiff.config import TextDiffConfig
from textdiff.data.studies import DataError, read_studies
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.training.options.intensity import training_window_count
from textdiff.training.runs import split_train_val
from textdiff.training.train import train_head

# The phase that ends at each mark, in the order marks come within one optimizer step.
ASSEMBLY = "batch assembly (augmentation, stacking)"
HEAD_PHASES = {"text_start": ASSEMBLY, "text_end": "text encoding",
               "classifier_start": "fusion forward (reductions, cross-attention)",
               "classifier_end": "classifier forward (upsampling the scales, convolutions)",
               "logits_grad": "loss forward and backward",
               "classifier_grad": "classifier backward", "step_start": "fusion backward", "step_end": "optimizer step"}


class Marks:
    """Timestamps of named boundaries; the time between two marks is the phase the later one ends."""

    def __init__(self, phases: dict[str, str], counting=lambda: True):
        self.phases, self.last, self.counting = phases, None, counting
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        if self.last is not None and self.counting():
            self.seconds[self.phases[name]] += now - self.last
        self.last = now

    def restart(self) -> None:
        self.last = time.perf_counter()


def _hook_head(model: TextDiffModel, marks: Marks) -> list:
    """Hooks that stamp the boundaries of one training step of `model` (see HEAD_PHASES)."""
    classifier = model.head.classifier

    def logits_done(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: marks.mark("logits_grad"))

    def classifier_inputs(_module, args):
        """The classifier's backward ends when the gradient of the first of its fused scales arrives: autograd runs
        later-created nodes first, so every classifier node before any of the fusion's."""
        arrived = []

        def first(_grad):
            if not arrived:
                arrived.append(True)
                marks.mark("classifier_grad")

        for fused in args[0]:
            if fused.requires_grad:
                fused.register_hook(first)

    def train_mode(mode: bool = True):  # a round begins: its first step starts now, after the last validation
        if mode:
            marks.restart()
        return type(model.head).train(model.head, mode)

    model.head.train = train_mode
    return [model.text_encoder.register_forward_pre_hook(lambda *_: marks.mark("text_start")),
            model.text_encoder.register_forward_hook(lambda *_: marks.mark("text_end")),
            classifier.register_forward_pre_hook(lambda *_: marks.mark("classifier_start")),
            classifier.register_forward_hook(lambda *_: marks.mark("classifier_end")),
            model.head.register_forward_hook(logits_done),
            classifier.register_forward_pre_hook(classifier_inputs),
            register_optimizer_step_pre_hook(lambda *_: marks.mark("step_start")),
            register_optimizer_step_post_hook(lambda *_: marks.mark("step_end"))]


class _TimedCache(FeatureCache):
    """A feature cache that adds up the seconds spent computing features (before training, for the validation
    windows, and during it, for each training window the first time it is drawn) and reading cached ones back."""

    def __init__(self, extractor, training):
        super().__init__(extractor)
        self.training, self.extract_seconds, self.read_seconds, self.fill_seconds = training, 0.0, 0.0, 0.0
        self.step_extract_seconds = 0.0

    def fill(self, items, progress=True):
        start = time.perf_counter()
        super().fill(items, progress)
        self.fill_seconds += time.perf_counter() - start

    def _compute(self, images, reports):
        start = time.perf_counter()
        features = super()._compute(images, reports)
        self.extract_seconds += time.perf_counter() - start
        return features

    def get_many(self, items):
        start, extracting = time.perf_counter(), self.extract_seconds
        features = super().get_many(items)
        if self.training():  # a training step's read (and maybe its first extraction), not validation's
            self.step_extract_seconds += self.extract_seconds - extracting
            self.read_seconds += time.perf_counter() - start - (self.extract_seconds - extracting)
        return features


def profile_head(data: Path, cfg: TextDiffConfig, labels: int, seed: int = 0) -> dict:
    """Train the head as `cfg.train` says on `labels` labeled images of `data` (a seeded draw) and split the time."""
    cases = [c for c in read_studies(data) if c.label is not None]
    if len(cases) < labels:
        raise DataError(f"'{data}' has {len(cases)} labeled images, fewer than --labels {labels}")
    cases = random.Random(seed).sample(cases, labels)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    torch.manual_seed(seed)
    model = TextDiffModel(cfg)
    items = [item for case in cases for item in model.load_planes(case, cfg.train.volume_slices)]
    train, val = split_train_val(items, cfg.train)
    cache = _TimedCache(model.extractor, lambda: model.head.training)
    marks = Marks(HEAD_PHASES, lambda: model.head.training)  # validation (eval mode) is timed apart
    hooks = _hook_head(model, marks)
    start = time.perf_counter()
    try:
        result = train_head(model, train, val, cfg.train, cache=cache, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    total = time.perf_counter() - start
    steps_seconds = sum(h["seconds"] for h in result.history)
    phases = dict(marks.seconds)
    phases[ASSEMBLY] -= cache.read_seconds + cache.step_extract_seconds  # timed apart
    return {"images": len(items), "training windows": training_window_count(train, model.image_size, cfg.train),
            "steps": sum(h["step"] - b["step"] for h, b in zip(result.history, [{"step": 0}, *result.history])),
            "rounds": len(result.history), "threads": torch.get_num_threads(), "total_s": total,
            "seconds": {"feature extraction (backbone)": cache.extract_seconds, "cache reads": cache.read_seconds,
                        **phases, "validation (after each round), checkpoint choice":
                            total - steps_seconds - cache.fill_seconds}}


PRETRAIN_PHASES = {"forward_start": "data loading, noising, EMA update", "forward_end": "UNet forward",
                   "output_grad": "loss forward and backward", "step_start": "UNet backward, gradient clipping",
                   "step_end": "optimizer step"}


class _TimedWindows(torch.utils.data.Dataset):
    """The pretraining images as fit_denoiser reads them, adding up the seconds spent reading them."""

    def __init__(self, images):
        self.images = torch.utils.data.TensorDataset(images) if torch.is_tensor(images) else images
        self.seconds = 0.0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        start = time.perf_counter()
        item = self.images[index]
        self.seconds += time.perf_counter() - start
        return item


def profile_pretraining(data: Path, cfg: TextDiffConfig, epochs: int, batch_size: int) -> dict:
    """Pretrain a fresh backbone on `data`'s images for `epochs` epochs (into a temporary folder) and split the time."""
    import tempfile

    from textdiff.model.backbone import build_scheduler, build_unet
    from textdiff.training.pretrain import PretrainSettings, data_channels, fit_denoiser, load_unlabeled_images

    backbone = dataclasses.replace(cfg.backbone, in_channels=cfg.backbone.in_channels or data_channels([data]))
    windows = _TimedWindows(load_unlabeled_images([data], backbone))
    unet, scheduler = build_unet(backbone), build_scheduler(backbone)
    marks = Marks(PRETRAIN_PHASES)

    def output_done(_module, _inputs, output):
        output.sample.register_hook(lambda grad: marks.mark("output_grad"))

    hooks = [unet.register_forward_pre_hook(lambda *_: marks.mark("forward_start")),
             unet.register_forward_hook(lambda *_: marks.mark("forward_end")), unet.register_forward_hook(output_done),
             register_optimizer_step_pre_hook(lambda *_: marks.mark("step_start")),
             register_optimizer_step_post_hook(lambda *_: marks.mark("step_end"))]
    settings = PretrainSettings(epochs=epochs, batch_size=batch_size, save_every=epochs + 1)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as folder:
            marks.restart()
            history = fit_denoiser(unet, scheduler, windows, None, Path(folder) / "backbone", settings, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    phases = dict(marks.seconds)
    phases["data loading, noising, EMA update"] -= windows.seconds
    return {"windows per epoch": len(windows), "batch_size": batch_size, "epochs": epochs,
            "threads": torch.get_num_threads(), "total_s": time.perf_counter() - start,
            "epoch_s": sum(h["seconds"] for h in history) / epochs,
            "seconds": {"reading windows": windows.seconds, **phases}}


def format_profile(result: dict, title: str) -> str:
    """A markdown table: seconds and share per phase."""
    total = sum(result["seconds"].values())
    lines = [f"{title}", "", "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {100 * s / total:.0f} % |" for name, s in result["seconds"].items()]
    lines.append(f"| total | {total:.2f} | 100 % |")
    return "\n".join(lines)


def run_profile(data: Path, cfg: TextDiffConfig, labels: int, pretrain_epochs: int, pretrain_batch_size: int,
                out: Path | None) -> dict:
    """Profile head training and pretraining on `data`; print both tables and write them as JSON into `out`."""
    head = profile_head(data, cfg, labels)
    print(format_profile(head, f"Head training: {head['images']} images, {head['training windows']} training windows, "
                               f"{head['steps']} steps in {head['rounds']} rounds, {head['threads']} threads"))
    result = {"head": head}
    if pretrain_epochs:
        pretraining = profile_pretraining(data, cfg, pretrain_epochs, pretrain_batch_size)
        print()
        print(format_profile(pretraining, f"Pretraining: {pretraining['windows per epoch']} windows an epoch in "
                                          f"batches of {pretrain_batch_size}, {pretrain_epochs} epochs, "
                                          f"{pretraining['threads']} threads ({pretraining['epoch_s']:.1f} s an epoch)"))
        result["pretraining"] = pretraining
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result
