"""The frozen diffusion backbone and its multi-timestep feature read-out: a diffusers UNet2DModel + DDPMScheduler
(our own pretrained one, a diffusers model, or a converted guided-diffusion checkpoint), or a latent model's UNet
(`textdiff.model.latent`).

Features are the outputs of chosen decoder modules (forward hooks) after noising the image to a few timesteps with
one fixed, seeded noise tensor, so an image's features are deterministic and can be cached.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from textdiff import sources
from textdiff.config import BackboneConfig
from textdiff.errors import DataError
from textdiff.model.guided_diffusion import load_guided_diffusion
from textdiff.model.latent import LatentBackbone, decoder_read_out, find_latent, is_latent_source

logger = logging.getLogger(__name__)

# Images read at a time on the CPU, each in a thread of its own (`DiffusionFeatureExtractor.side_by_side`).
SIDE_BY_SIDE = 2


def build_unet(cfg: BackboneConfig) -> UNet2DModel:
    """A fresh UNet of the configured architecture, initialised from `cfg.init_seed` so it can be rebuilt."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=cfg.in_channels or 1,
            out_channels=cfg.in_channels or 1,
            layers_per_block=cfg.layers_per_block,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            norm_num_groups=min(32, min(cfg.block_out_channels)),
        )


def build_scheduler(cfg: BackboneConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear")


def architecture(unet: UNet2DModel) -> dict:
    """The `BackboneConfig` fields that a UNet's weights decide, whatever the config's defaults say: a checkpoint
    then records the backbone it was really trained on."""
    c = unet.config
    return dict(image_size=c.sample_size, in_channels=c.in_channels, block_out_channels=tuple(c.block_out_channels),
                layers_per_block=c.layers_per_block, down_block_types=tuple(c.down_block_types),
                up_block_types=tuple(c.up_block_types))


def default_feature_layers(unet: UNet2DModel) -> tuple[str, ...]:
    """The decoder blocks the papers read in a model converted from their checkpoints (`paper_feature_layers`);
    otherwise the last resnet of every decoder block: features from coarse to fine, as DDPM-Seg reads them, down to
    the window's own resolution, where fine boundaries are (docs/results/mri.md)."""
    if getattr(unet, "paper_feature_layers", None):
        return unet.paper_feature_layers
    return tuple(f"up_blocks.{i}.resnets.{len(block.resnets) - 1}" for i, block in enumerate(unet.up_blocks))


def load_diffusion(source: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a UNet2DModel and its scheduler from a diffusers folder or hub id (pipeline layout or bare unet), or
    from a guided-diffusion `.pt` file (path, or `hf:<org>/<name>/<file>.pt`), converted.

    A pipeline folder has `unet/` and `scheduler/`; a bare model folder has config.json and the scheduler config
    beside it (as in google/ddpm-* checkpoints). Weights stored in half precision (as shipped, to halve the download)
    are upcast to float32: half-precision convolutions are slow or missing on CPUs.
    """
    if sources.is_checkpoint_file(source):
        return load_guided_diffusion(sources.resolve_file(source, "guided-diffusion checkpoint"))
    if is_latent_source(source):
        raise DataError(f"'{source}' is a latent diffusion model: it gives features, but pretraining, the CDM and "
                         "EMIT-Diff continue pixel-space UNets only (a folder written by `textdiff pretrain`, a "
                         "diffusers UNet2DModel or a guided-diffusion checkpoint)")
    source, hub = sources.resolve(source, "diffusion backbone")
    folder = {"subfolder": "unet"} if Path(source, "unet").is_dir() else {}
    try:
        # low_cpu_mem_usage=False says outright what diffusers does without `accelerate` (instead of a warning)
        unet = UNet2DModel.from_pretrained(source, torch_dtype=torch.float32, local_files_only=not hub,
                                           low_cpu_mem_usage=False, **folder)
        scheduler = DDPMScheduler.from_pretrained(source, local_files_only=not hub,
                                                  **({"subfolder": "scheduler"} if folder else {}))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"cannot load a diffusers UNet2DModel + DDPMScheduler from '{source}': {err}. "
            "Pass a folder written by `textdiff pretrain` or a diffusers checkpoint (folder, or hf:<hub id>)."
        ) from err
    return unet, scheduler


def save_diffusion(unet: UNet2DModel, scheduler: DDPMScheduler, target: str | Path,
                   extra_files: dict[str, str] | None = None, half: bool = False) -> Path:
    """Write `unet/`, `scheduler/` and any `extra_files` (name -> text) into `target` atomically: a crash never
    leaves a half-written model. `half` stores the weights in float16 (half the size, for a model that is shipped;
    `load_diffusion` upcasts them) and leaves `unet` itself as it is."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    (copy.deepcopy(unet).to(torch.float16) if half else unet).save_pretrained(staging / "unet")
    scheduler.save_pretrained(staging / "scheduler")
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


class _Captured(Exception):
    """Raised by the last hook to skip the rest of the UNet once every feature has been read."""


class DiffusionFeatureExtractor(torch.nn.Module):
    """Frozen UNet whose decoder activations at several noise steps become per-scale feature maps.

    All timesteps of an image go through the UNet in one batched forward, a forward of its own for each image: a
    convolution's arithmetic depends on the batch size, so batching images together would make an image's features
    depend (in the last bits, enough to change a checkpoint choice) on which images it was batched with. On the CPU
    those forwards run `SIDE_BY_SIDE` at a time, in threads (`_each_image`). For a batch of B images, the
    output is one tensor per hooked layer of shape (B, len(timesteps) * C_layer, h_layer, w_layer).

    A `latent` backbone (`textdiff.model.latent`) encodes the image first and noises its latents; a text-conditioned
    one reads each image's report as the UNet's condition, so its features depend on the report too.
    """

    def __init__(self, unet: torch.nn.Module, scheduler: DDPMScheduler, cfg: BackboneConfig,
                 latent: LatentBackbone | None = None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.latent = latent
        self.architecture = architecture(unet) if latent is None else {
            "image_size": latent.image_size, "in_channels": latent.image_channels}
        layers = cfg.feature_layers or (decoder_read_out(unet) if latent else default_feature_layers(unet))
        cfg = dataclasses.replace(cfg, **self.architecture, feature_layers=tuple(layers))
        self.cfg = cfg
        self.timesteps = torch.tensor(cfg.timesteps, dtype=torch.long)
        self.scheduler = scheduler
        noise_shape = ((latent.latent_channels, latent.latent_size, latent.latent_size) if latent else
                       (cfg.in_channels, cfg.image_size, cfg.image_size))
        generator = torch.Generator().manual_seed(cfg.noise_seed)
        self.register_buffer("noise", torch.randn(1, *noise_shape, generator=generator))
        modules = dict(unet.named_modules())
        missing = [name for name in cfg.feature_layers if name not in modules]
        if missing:
            decoder = [n for n in modules if n.startswith("up_blocks.") and n.count(".") <= 2]
            raise DataError(f"feature layer(s) {missing} not in the UNet; decoder modules: {decoder}")
        self._order = list(cfg.feature_layers)
        self._stores: dict[int, dict[str, torch.Tensor]] = {}  # per thread (`_each_image`, a volume's slices)
        for name in self._order:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def capture(_module, _inputs, output):
            store = self._stores.get(threading.get_ident())
            if store is None:  # the UNet run for anything but its features
                return
            store[name] = output[0] if isinstance(output, tuple) else output
            if len(store) == len(self._order):
                raise _Captured

        return capture

    def train(self, mode: bool = True):
        """The backbone is frozen: it stays in eval mode whatever the parent module does."""
        return super().train(False)

    @property
    def text_conditioned(self) -> bool:
        """Whether an image's features depend on its report (a text-conditioned latent UNet)."""
        return self.latent is not None and self.latent.conditioned

    @functools.cached_property
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, h, w) per returned feature map (timesteps concatenated), found by one dry run."""
        with torch.no_grad():
            dummy = torch.zeros(1, self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)
            return [tuple(f.shape[1:]) for f in self(dummy.to(self.noise.device))]

    @property
    def feature_channels(self) -> list[int]:
        return [shape[0] for shape in self.feature_shapes]

    def noised(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_sample every image (its latents, for a latent backbone) at every timestep with the shared fixed noise:
        (B*T, C, h, w) and the steps."""
        x = self.latent.encode(images) if self.latent is not None else images
        batch, steps = x.shape[0], len(self.timesteps)
        x = x.repeat_interleave(steps, dim=0)  # image-major: (image 0, t0), (image 0, t1), ...
        t = self.timesteps.to(images.device).repeat(batch)
        return self.scheduler.add_noise(x, self.noise.expand_as(x), t), t

    @torch.no_grad()
    def forward(self, images: torch.Tensor, reports: list[str] | None = None) -> list[torch.Tensor]:
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size) or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"backbone expects images of shape (B, {self.cfg.in_channels}, {size}, {size}), "
                             f"got {tuple(images.shape)}")
        reports = reports if reports is not None else [""] * len(images)
        per_image = self._each_image(images, reports)
        return [torch.cat(layer) for layer in zip(*per_image)]

    def side_by_side(self, count: int) -> int:
        """How many of `count` images to read at a time: on the CPU `SIDE_BY_SIDE`, as one image's small convolutions
        leave the cores idle between them; on a GPU, and for a latent model (its own autoencoder and text encoder), one.
        A batch's windows (`_each_image`) and a volume's slices (`textdiff.inference.ReportInferer`) are read so."""
        if self.latent is not None or self.noise.device.type != "cpu":
            return 1
        return max(1, min(SIDE_BY_SIDE, count))

    def _each_image(self, images: torch.Tensor, reports: list[str]) -> list[list[torch.Tensor]]:
        """`_image_features` of every image, `side_by_side` at a time, each in a thread that keeps the caller's
        autocast; each image's arithmetic stays what it is alone."""
        readers = self.side_by_side(len(images))
        if readers == 1:
            return [self._image_features(image[None], report) for image, report in zip(images, reports)]
        autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def one(image: torch.Tensor, report: str) -> list[torch.Tensor]:
            with torch.no_grad(), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                return self._image_features(image[None], report)

        with ThreadPoolExecutor(readers, thread_name_prefix="backbone") as pool:
            return list(pool.map(one, images, reports))

    def _image_features(self, image: torch.Tensor, report: str) -> list[torch.Tensor]:
        """The hooked features of one (1, C, H, W) image, all its timesteps in one forward."""
        noisy, t = self.noised(image)  # a latent model's autoencoder in float32: in float16 some overflow
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=image.is_cuda)
        store = self._stores[threading.get_ident()] = {}
        try:
            with autocast:
                if self.latent is None:  # channels-last input: a window's CPU features in 0.9 of the time
                    self.unet(noisy.to(self.noise.dtype, memory_format=torch.channels_last), t)
                else:
                    self.latent.denoise(noisy, t, self.latent.context([report]) if self.text_conditioned else None)
        except _Captured:
            pass
        finally:
            del self._stores[threading.get_ident()]
        features = [store[name].float() for name in self._order]
        return [f.reshape(1, -1, *f.shape[2:]) for f in features]


def make_extractor(cfg: BackboneConfig, weights: str | None = None) -> DiffusionFeatureExtractor:
    """Extractor over pretrained weights (folder/hub id in `weights` or cfg.pretrained) or a random-init UNet."""
    source = weights or cfg.pretrained
    latent = find_latent(source) if source else None
    if latent is not None:
        return DiffusionFeatureExtractor(latent.unet, latent.scheduler, cfg, latent)
    if source:
        unet, scheduler = load_diffusion(source)
    else:
        unet, scheduler = build_unet(cfg), build_scheduler(cfg)
    return DiffusionFeatureExtractor(unet, scheduler, cfg)


def make_random_extractor(cfg: BackboneConfig) -> DiffusionFeatureExtractor:
    """The "random backbone" ablation: the architecture of `cfg.pretrained` (or the configured one) with fresh
    weights from `cfg.init_seed`, so it differs from the pretrained backbone only by its training."""
    if not cfg.pretrained:
        return make_extractor(cfg)
    if is_latent_source(cfg.pretrained):
        raise DataError("the random-backbone ablation reads pixel-space UNets, not latent models")
    trained, scheduler = load_diffusion(cfg.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        unet = UNet2DModel.from_config(trained.config)
    unet.paper_feature_layers = getattr(trained, "paper_feature_layers", None)
    return DiffusionFeatureExtractor(unet, scheduler, cfg)
