"""Latent diffusion backbones: Stable Diffusion-family pipelines (diffusers folders) and MONAI generative bundles.

The image is encoded by the model's autoencoder (the mean of its latent distribution, scaled as the model was
trained), noised in latent space at the usual steps, and the latent UNet's decoder is read as any backbone's. A
text-conditioned UNet reads the image's report as its condition, through the pipeline's own tokenizer and text
encoder (an empty report gives the unconditional embedding), so the features themselves follow the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from textdiff import sources
from textdiff.errors import DataError

logger = logging.getLogger(__name__)


def is_pipeline_folder(folder: Path) -> bool:
    """A diffusers pipeline with an autoencoder: a latent model (Stable Diffusion and its fine-tunes)."""
    return (folder / "model_index.json").is_file() and (folder / "vae").is_dir()


def is_bundle_folder(folder: Path) -> bool:
    """A MONAI bundle: `configs/*.json` network definitions and `models/*.pt` weights."""
    return (folder / "configs").is_dir() and (folder / "models").is_dir()


def decoder_read_out(unet: torch.nn.Module) -> tuple[str, ...]:
    """Per decoder block its last attention (cross-attention where the UNet reads text), else its last resnet."""
    names = []
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        part = "attentions" if attentions is not None and len(attentions) else "resnets"
        names.append(f"up_blocks.{i}.{part}.{len(getattr(block, part)) - 1}")
    return tuple(names)


class LatentBackbone(torch.nn.Module):
    """What a feature extractor needs of a latent model: encode, condition, denoise, and its sizes."""

    kind = "latent diffusion model"
    conditioned = False

    def __init__(self, unet: torch.nn.Module, scheduler: DDPMScheduler, image_size: int, image_channels: int,
                 latent_channels: int, latent_size: int):
        super().__init__()
        self.unet, self.scheduler = unet.eval().requires_grad_(False), scheduler
        self.image_size, self.image_channels = image_size, image_channels
        self.latent_channels, self.latent_size = latent_channels, latent_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, reports: list[str]) -> torch.Tensor | None:
        return None

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> None:
        raise NotImplementedError


class PipelineBackbone(LatentBackbone):
    """A Stable Diffusion-family pipeline: autoencoder, text-conditioned UNet, tokenizer and text encoder."""

    kind = "diffusers latent pipeline"
    conditioned = True

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: DDPMScheduler, tokenizer,
                 text_encoder: torch.nn.Module):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(unet, scheduler, unet.config.sample_size * factor, vae.config.in_channels,
                         unet.config.in_channels, unet.config.sample_size)
        self.vae = vae.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, source: str, hub: bool = False) -> PipelineBackbone:
        """A diffusers pipeline folder (or hub id): `vae/`, `unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`."""
        from transformers import AutoModel, AutoTokenizer

        where = {"local_files_only": not hub}
        weights = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False, **where}
        return cls(UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
                   AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
                   DDPMScheduler.from_pretrained(source, subfolder="scheduler", **where),
                   AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **where),
                   AutoModel.from_pretrained(source, subfolder="text_encoder", dtype=torch.float32, **where))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def context(self, reports: list[str]) -> torch.Tensor:
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        tokens = self.tokenizer(reports, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.unet.device))[0]

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> None:
        self.unet(noisy, t, encoder_hidden_states=context.expand(len(noisy), -1, -1))


# MONAI's network classes a bundle may name (older bundles name them in MONAI Generative's `generative` package,
# whose `num_channels` argument MONAI calls `channels`); nothing else in a bundle's config is ever evaluated
_BUNDLE_NETWORKS = {"AutoencoderKL", "DiffusionModelUNet"}
_SCHEDULES = {"linear_beta": "linear", "scaled_linear_beta": "scaled_linear"}


class BundleBackbone(LatentBackbone):
    """A MONAI latent diffusion model: MONAI's `AutoencoderKL` and an unconditional `DiffusionModelUNet`."""

    kind = "MONAI latent diffusion bundle"

    def __init__(self, autoencoder: torch.nn.Module, unet: torch.nn.Module, scheduler: DDPMScheduler,
                 image_size: int, scale_factor: float):
        if getattr(unet, "with_conditioning", False):
            raise DataError("a text-conditioned MONAI bundle brings no text encoder of its own; only unconditional "
                             "bundles are read")
        factor = 2 ** (len(autoencoder.encoder.channels) - 1)
        super().__init__(unet, scheduler, image_size, autoencoder.encoder.in_channels, autoencoder.latent_channels,
                         image_size // factor)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = scale_factor

    @classmethod
    def from_folder(cls, folder: Path) -> BundleBackbone:
        """`configs/inference.json` (or `train_diffusion.json`) defining `autoencoder_def` and `network_def`, weights
        in `models/model_autoencoder.pt` and `models/model.pt`, as the MONAI model zoo lays bundles out."""
        config = _bundle_config(folder)
        models = folder / "models"
        autoencoder = _load_weights(_build_network(config, "autoencoder_def"), models / "model_autoencoder.pt")
        unet = _load_weights(_build_network(config, "network_def"), models / "model.pt")
        size = int(_resolve(config, config.get("train_patch_size", [256]))[0])
        return cls(autoencoder, unet, _bundle_scheduler(config), size, _scale_factor(folder, config))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z_mu, _ = self.autoencoder.encode((images + 1) / 2)  # MONAI's bundles train on images in [0, 1]
        return z_mu * self.scale_factor

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> None:
        self.unet(noisy, t)


def _bundle_config(folder: Path) -> dict:
    for name in ("inference.json", "train_diffusion.json"):
        path = folder / "configs" / name
        if path.is_file():
            config = json.loads(path.read_text())
            if "network_def" in config and "autoencoder_def" in config:
                return config
    raise DataError(f"'{folder}' is not a MONAI latent diffusion bundle: no configs/inference.json or "
                     "train_diffusion.json defining autoencoder_def and network_def")


def _resolve(config: dict, value):
    """A config value with its `@name` references replaced by the values they name; `$` expressions are refused."""
    if isinstance(value, str) and value.startswith("@"):
        return _resolve(config, config[value[1:]])
    if isinstance(value, str) and value.startswith("$"):
        raise DataError(f"a bundle value that is a Python expression is never evaluated: {value!r}")
    if isinstance(value, list):
        return [_resolve(config, v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(config, v) for k, v in value.items()}
    return value


def _build_network(config: dict, key: str) -> torch.nn.Module:
    from monai.networks import nets

    arguments = _resolve(config, {k: v for k, v in config[key].items() if not k.startswith("_")})
    name = config[key].get("_target_", "").rsplit(".", 1)[-1]
    if name not in _BUNDLE_NETWORKS:
        raise DataError(f"bundle {key} is a '{config[key].get('_target_')}', not one of {sorted(_BUNDLE_NETWORKS)}")
    if "num_channels" in arguments:
        arguments["channels"] = arguments.pop("num_channels")
    return getattr(nets, name)(**arguments)


def _load_weights(network: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The bundle's weights: MONAI's current layout, else the layout of MONAI Generative (`load_old_state_dict`)."""
    if not path.is_file():
        raise FileNotFoundError(f"bundle weights '{path}' are missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError:
        network.load_old_state_dict(state)
    return network


def _bundle_scheduler(config: dict) -> DDPMScheduler:
    spec = _resolve(config, {k: v for k, v in config.get("noise_scheduler", {}).items() if not k.startswith("_")})
    schedule = spec.get("schedule", "linear_beta")
    if schedule not in _SCHEDULES:
        raise DataError(f"bundle noise schedule '{schedule}' is not one of {sorted(_SCHEDULES)}")
    return DDPMScheduler(num_train_timesteps=spec.get("num_train_timesteps", 1000), beta_schedule=_SCHEDULES[schedule],
                         beta_start=spec.get("beta_start", 1e-4), beta_end=spec.get("beta_end", 2e-2))


def _scale_factor(folder: Path, config: dict) -> float:
    """The latent scale the UNet was trained at: a number in the config, else `scale_factor.json` beside the
    configs ({"scale_factor": 1.02}); MONAI's bundles compute it at training time and print it."""
    value = config.get("scale_factor")
    given = folder / "configs" / "scale_factor.json"
    if isinstance(value, (int, float)):
        return float(value)
    if given.is_file():
        return float(json.loads(given.read_text())["scale_factor"])
    logger.warning("bundle '%s' states no latent scale_factor: reading latents at scale 1.0 (write the one its "
                   "training printed into configs/scale_factor.json)", folder)
    return 1.0


def load_latent(source: str, hub: bool = False) -> LatentBackbone:
    """A latent backbone from a pipeline folder (or hub id) or a bundle folder."""
    if hub or is_pipeline_folder(Path(source)):
        backbone = PipelineBackbone.from_folder(source, hub)
    else:
        backbone = BundleBackbone.from_folder(Path(source))
    logger.info("%s '%s': images %d² with %d channel(s) -> latents %dx%d² (%.0f M UNet parameters)%s", backbone.kind,
                source, backbone.image_size, backbone.image_channels, backbone.latent_channels, backbone.latent_size,
                sum(p.numel() for p in backbone.unet.parameters()) / 1e6,
                "; the report is the UNet's condition" if backbone.conditioned else "")
    return backbone


def is_latent_source(source: str) -> bool:
    """A Stable Diffusion-family pipeline or a MONAI bundle (a hub id is asked for its model_index.json)."""
    if sources.is_checkpoint_file(source):
        return False
    folder, hub = sources.resolve(source, "diffusion backbone")
    if hub:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return "vae" in json.loads(Path(hf_hub_download(folder, "model_index.json")).read_text())
        except EntryNotFoundError:
            return False
    return is_pipeline_folder(Path(folder)) or is_bundle_folder(Path(folder))


def find_latent(source: str) -> LatentBackbone | None:
    if not is_latent_source(source):
        return None
    folder, hub = sources.resolve(source, "diffusion backbone")
    return load_latent(folder, hub)
