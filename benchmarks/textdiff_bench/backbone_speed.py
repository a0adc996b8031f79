"""`textdiff-bench backbone-speed`: what a backbone costs before a user commits to it: parameters, feature channels, and
the seconds of diffusion features (all noise steps) for one 256² image as the product reads it, on this machine.

A backbone is a folder or file `--backbone` takes, or `random:<name>`: an architecture of a public model's size with
random weights (timing does not depend on the weights), so the table can be made without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMScheduler

from textdiff.config import BackboneConfig
from textdiff.data.tiling import resolve_tiling
from textdiff.model import guided_diffusion
from textdiff.model.backbone import DiffusionFeatureExtractor, build_unet, make_extractor
from textdiff.model.cost import describe_cost, measure_cost
from textdiff.model.latent import BundleBackbone, PipelineBackbone
from textdiff.model.text import default_encoder_path

# guided-diffusion's 256x256 unconditional ImageNet model (its README's flags)
IMAGENET_256 = guided_diffusion.Architecture(
    in_channels=3, model_channels=256, out_channels=6, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
    attention_levels=(False, False, False, True, True, True), resblock_updown=True, scale_shift=True,
    head_channels=64, new_attention_order=False)


def _random_sd15(cfg: BackboneConfig) -> DiffusionFeatureExtractor:
    """Stable Diffusion 1.5's sizes: 512² images, 4x64² latents, an 860 M UNet reading a 12-layer CLIP text encoder
    (its tokens come from the packaged MiniLM tokenizer here: the time does not depend on them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, max_position_embeddings=77))
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path(), model_max_length=77)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    parts = PipelineBackbone(unet, vae, scheduler, tokenizer, text)
    return DiffusionFeatureExtractor(unet, scheduler, cfg, parts)


def _random_brats_2d(cfg: BackboneConfig) -> DiffusionFeatureExtractor:
    """The sizes of MONAI's brats_mri_axial_slices_generative_diffusion bundle: 256² grey slices, 1x64² latents."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=1,
                                channels=(64, 128, 256), num_res_blocks=2, norm_eps=1e-6,
                                attention_levels=(False, False, False), include_fc=False)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 128, 256),
                              attention_levels=(False, True, True, True), num_head_channels=(0, 32, 32, 32),
                              num_res_blocks=2, include_fc=False)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
    return DiffusionFeatureExtractor(unet, scheduler, cfg, BundleBackbone(autoencoder, unet, scheduler, 256, 1.0))


def random_backbone(name: str, cfg: BackboneConfig) -> DiffusionFeatureExtractor:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    if name == "default":
        return DiffusionFeatureExtractor(build_unet(cfg), scheduler, cfg)
    if name == "guided-imagenet-256":
        unet = guided_diffusion.build_unet(IMAGENET_256, 256)
        unet.paper_feature_layers = guided_diffusion.paper_feature_layers(IMAGENET_256)
        return DiffusionFeatureExtractor(unet, scheduler, cfg)
    if name in RANDOM_LATENT:
        return RANDOM_LATENT[name](cfg)
    known = ", ".join(["default", "guided-imagenet-256", *RANDOM_LATENT])
    raise ValueError(f"unknown random backbone '{name}'; known: {known}")


RANDOM_LATENT = {"monai-brats-2d": _random_brats_2d, "sd-1.5": _random_sd15}


def load_backbone(source: str, cfg: BackboneConfig) -> DiffusionFeatureExtractor:
    if source.startswith("random:"):
        return random_backbone(source.removeprefix("random:"), resolve_tiling(cfg, None))
    return make_extractor(resolve_tiling(cfg, source), weights=source)


def run_backbone_speed(sources: list[str], out: Path | None = None, repeats: int = 2, device: str = "cpu") -> list[dict]:
    """One row per backbone on `device` (on a GPU the UNet runs in float16, as the product runs it there)."""
    rows = []
    for source in sources:
        cost = measure_cost(load_backbone(source, BackboneConfig()).to(device), repeats=repeats)
        rows.append({"backbone": source, **cost})
        print(f"{source}: {describe_cost(cost)}", flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows}, indent=1))
    return rows
