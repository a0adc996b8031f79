"""Every `--conf key value` the app understands, with typed defaults, in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from textdiff.config import CHECKPOINT_CHOICES, SMALL_STRUCTURES
from textdiff.errors import DataError

from .params import parse_value, trusted_networks


@dataclass
class AppSettings:
    model_dir: str = ""  # default: <app>/model
    # diffusers folder, guided-diffusion .pt file or hf:<hub id> (docs/backbones.md); default: the backbone of the
    # current model, else the newest pretrained
    backbone: str = ""
    text_encoder: str = ""  # transformers folder or hf:<hub id>; default: the packaged all-MiniLM-L6-v2
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    demo_weights: bool = True  # start from the shipped sample-data weights when the model folder is empty
    # Head training: `steps` optimizer steps whatever the number of labels (the `max_steps` a client can change per
    # run); `epochs` above 0 trains that many passes over every training window instead (the `max_epochs` param)
    steps: int = 150
    epochs: int = 0
    # The round of steps a head run keeps (the `checkpoint` train param): "auto" the best on its held-out images, or
    # the last when nothing is held out (fewer than 8 labels); "best" chooses on the training images then; "last"
    checkpoint: str = "auto"
    # With fewer labels than a validation split needs, a run is judged against the model in service on the labels
    # that model never saw, each left out of one extra run of the new recipe (textdiff.training.comparison): at most
    # this many extra runs, each as long as the run itself (0: judge both on the labeled images, which both may have
    # learned: the faster loop; docs/results/publish-gate.md)
    left_out_runs: int = 1
    # Pretraining stops after `pretrain_minutes` (the `max_minutes` train param), when the denoising loss has not
    # improved by 1 % in `pretrain_patience` epochs, or after `pretrain_epochs`, whichever comes first; each run
    # continues the current backbone, so running it again adds to it
    pretrain_minutes: float = 10.0
    pretrain_patience: int = 20
    pretrain_epochs: int = 1000
    pretrain_batch_size: int = 8
    # Pretraining computes in bfloat16 on a CPU that does so natively (AVX512-BF16, AMX): about a fifth more epochs
    # in the same minutes, the same Dice on MRI validation slices (docs/results/speed.md, "Pretraining in bfloat16")
    pretrain_bfloat16: bool = False
    cdm_epochs: int = 100
    # textdiff training also uses CDM pre-annotations (`original` labels made by the cdm model) of images that have
    # no final label; a client can switch it per run with the `pseudo_labels` train param
    pseudo_labels: bool = False
    # textdiff training mixes in this many EMIT-Diff synthetic copies per labeled image (0: none), read from
    # <model_dir>/synthetic, which `textdiff synthesize --out <model_dir>/synthetic` writes (never the studies
    # folder); a client can set it per run with the `synthetic_ratio` train param
    synthetic_ratio: int = 0
    # textdiff training also uses the images with this image-level label and no final label, with an empty mask: a
    # normal study needs no drawing, and it teaches the model what a normal report means (docs/results/sample-data.md,
    # "What did not help").
    # "" turns it off; a client can set it per run with the `healthy_label` train param
    healthy_label: str = "normal"
    # textdiff training also learns from the reports of images without a final label, at this weight (0: off): no
    # foreground in a lung the report does not name, some in each lung it names (docs/results/report.md); a
    # client can set it per run with the `report_weight` train param
    report_weight: float = 0.0
    # the trained model's masks obey the report's sides (none in a lung it does not name, none at all under "No
    # pulmonary infection.", the most likely area in a named lung left empty); a wrong report then hides or invents
    # a finding. Per run: the `obey_report` train param
    obey_report: bool = False
    # The head's first convolution per feature scale at the scale's own resolution (a training step in 0.6 of the
    # time on a CPU, docs/results/speed.md); false: the papers' classifier, which upsamples and concatenates the
    # scales first. A model in service keeps the head it has.
    per_scale_entry: bool = True
    # A new model's head for several small structures of similar intensity (left and right of one tissue, a few
    # nuclei of the brain): textdiff.config.SMALL_STRUCTURES, a per-pixel MLP classifier trained 300 steps at 3e-3 on
    # cross-entropy alone (`steps` unless given). On large or many-instance targets it scores the same or lower in
    # about twice the time (docs/results/mri.md). A model in service keeps the head it has.
    small_structures: bool = False
    image_size: int = 128  # window size of a backbone pretrained from scratch
    # How a backbone pretrained from scratch reads images larger than its window (recorded with it; training and
    # infer then read images the same way): patch_scale working pixels per image pixel (0: automatic), at most
    # max_windows windows per side (1: every image resized into one window, e.g. for whole chest radiographs)
    patch_scale: float = 0.0
    max_windows: float = 4.0
    # Infer in bfloat16 on a CPU that computes it natively (AVX512-BF16, AMX): about 1.3x faster, masks the same to a
    # few pixels in ten thousand; a volume's slices in windows side by side (a 256x256x100 volume in 29 s on 2 cores,
    # not 90). Evaluation always reads in float32 with the model's overlap (docs/results/speed.md, "Volumes")
    fast_infer: bool = True
    # Diffusion features a training run keeps in memory (GB); past it they stay on disk in the model folder's feature
    # cache and are read back at each use: a large backbone (docs/backbones.md) takes about 140 MB a window
    max_feature_cache_gb: float = 8.0
    # Background jobs (train, scoring, batch infer) run in processes of their own at this CPU priority (nice, 0-19)
    # and with `train_threads` torch threads (0: torch's default), so a person's infer request gets the cores first
    job_nice: int = 19
    train_threads: int = 0
    # The classes to segment, in class order, comma-separated (class 0, the background, is implied): e.g. "nucleus"
    # or "white matter,grey matter,csf". A model trained on other classes is not served under these names.
    labels: str = "infection"
    # Limits that keep one request from exhausting the server: request bodies (uploads, archives once unpacked), image
    # sizes read from the file header before decoding (per 2D image or plane, and per volume), inference workers
    # (one per device) and how many more infers may wait (then 503 with Retry-After)
    max_upload_mb: int = 1024
    max_image_pixels: int = 40_000_000
    max_volume_voxels: int = 600_000_000
    infer_workers: int = 1
    infer_queue: int = 32
    # Web pages of other origins allowed to call the server from a browser, comma-separated (e.g. an OHIF viewer
    # served elsewhere: "https://viewer.example.org"); empty: MONAI_LABEL_CORS_ORIGINS, else none
    cors_origins: str = ""
    # Networks whose clients are answered without a login (MONAI_LABEL_AUTH_ENABLE), comma-separated, e.g.
    # "10.0.0.0/8,192.168.0.0/16"; others get a 403, whatever address MONAI Label listens on. Empty: this machine only
    # (a reverse proxy on it is answered)
    trusted_networks: str = ""
    viewer_dir: str = ""  # the OHIF viewer served at /viewer/ with a PACS; default: <app>/viewer (install_ohif.py)

    @property
    def label_names(self) -> tuple[str, ...]:
        """("background", *the configured classes)."""
        names = [name.strip() for name in self.labels.split(",") if name.strip()]
        names = names[1:] if names and names[0].lower() == "background" else names
        if not names or len(set(names)) != len(names) or "background" in (n.lower() for n in names):
            raise DataError(f"--conf labels {self.labels!r}: give the class names to segment, comma-separated, "
                             "each once (the background is class 0 and implied)")
        return ("background", *names)

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str) -> AppSettings:
        """Parse MONAI Label's string-valued conf; unknown keys are MONAI Label's own and are left alone."""
        values = {f.name: parse_value(str(conf[f.name]), f.default, f"--conf {f.name}")
                  for f in dataclasses.fields(cls) if f.name in conf}
        settings = cls(**values)
        trusted_networks(settings.trusted_networks)  # a network that does not parse stops the start, named
        if settings.checkpoint not in CHECKPOINT_CHOICES:
            raise DataError(f"--conf checkpoint must be one of {list(CHECKPOINT_CHOICES)}, got {settings.checkpoint!r}")
        if settings.small_structures and "steps" not in conf:
            settings.steps = SMALL_STRUCTURES["train.steps"]
        if not settings.model_dir:
            settings.model_dir = str(Path(app_dir) / "model")
        if not settings.viewer_dir:
            settings.viewer_dir = str(Path(app_dir) / "viewer")
        return settings
