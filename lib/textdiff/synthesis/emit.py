"""EMIT-Diff: a diffusion model conditioned on an edge map and a text prompt, trained on the images at hand.

The edge map (Canny edges of the image plus the outline of its mask) fixes where structures are; the prompt
("Chest, X-ray." + the report) and the sampling noise vary how they look. A sampled image keeps the structure of the
labeled image it was drawn from, so that image's mask is reused for it. The condition map enters a diffusers
`UNet2DConditionModel` as an extra input channel and the prompt's token embeddings by cross-attention; prompts are
dropped in training so that classifier-free guidance has an unconditional prediction to extrapolate from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, Transformer2DModel, UNet2DConditionModel
from monai.transforms import LabelToContour
from skimage.feature import canny
from torch import nn

from textdiff.errors import DataError
from textdiff.model.backbone import load_diffusion
from textdiff.config import SynthConfig, TextConfig
from textdiff.data.studies import Case, load_case
from textdiff.training.pretrain import PretrainSettings, fit_denoiser
from textdiff.model.text import TextEncoder

MODEL_FILE = "synth.json"


def condition_map(image: torch.Tensor, mask: torch.Tensor | None, sigma: float) -> torch.Tensor:
    """(1, H, W) map in {0, 1}: Canny edges of the (C, H, W) image in [-1, 1], plus the outline of the mask."""
    edges = canny(image.float().mean(0).numpy(), sigma=sigma, low_threshold=0.05, high_threshold=0.15)
    result = torch.from_numpy(edges)[None].float()
    if mask is not None:
        outline = torch.as_tensor(LabelToContour()((torch.as_tensor(mask) > 0).float())) > 0
        result = torch.maximum(result, outline.float())
    return result


def prompt_for(report: str, cfg: SynthConfig) -> str:
    return f"{cfg.prompt} {report}".strip()


def build_synth_unet(cfg: SynthConfig, channels: int, text_dim: int, norm_groups: int | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=channels + 1,  # the noisy image and the condition map
        out_channels=channels,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=norm_groups or min(32, min(cfg.block_out_channels)),
    )


def backbone_layout(backbone_config, cfg: SynthConfig) -> SynthConfig:
    """`cfg` with the backbone's size, channels and depth; cross-attention stays at the two coarsest scales."""
    levels = len(backbone_config.block_out_channels)
    cross = min(2, levels)
    down = ("DownBlock2D",) * (levels - cross) + ("CrossAttnDownBlock2D",) * cross
    up = ("CrossAttnUpBlock2D",) * cross + ("UpBlock2D",) * (levels - cross)
    return dataclasses.replace(cfg, image_size=backbone_config.sample_size, layers_per_block=backbone_config.layers_per_block,
                               block_out_channels=tuple(backbone_config.block_out_channels),
                               down_block_types=down, up_block_types=up)


def synth_unet_from_backbone(backbone: str, cfg: SynthConfig, text_dim: int) -> tuple[UNet2DConditionModel, DDPMScheduler, SynthConfig]:
    """The generator started from a pretrained denoiser, as EMIT-Diff's ControlNet starts from Stable Diffusion.

    Every convolution, norm and time embedding is the backbone's; the edge channel's input weights and the output of
    every cross-attention block start at zero, so the untrained generator denoises as the backbone does (less its
    self-attention, which has no counterpart) and training only has to learn what the edges and the prompt add."""
    base, scheduler = load_diffusion(backbone)
    cfg = backbone_layout(base.config, cfg)
    unet = build_synth_unet(cfg, base.config.in_channels, text_dim, base.config.norm_num_groups)
    own, given = unet.state_dict(), base.state_dict()
    copied = {name: value for name, value in given.items() if name in own and own[name].shape == value.shape}
    left = [name for name in given if name not in copied and ".attentions." not in name and name != "conv_in.weight"]
    if left:
        raise DataError(f"'{backbone}' does not fit an EMIT-Diff generator: no place for {left[:5]}")
    conv_in = torch.zeros_like(own["conv_in.weight"])
    conv_in[:, : base.config.in_channels] = given["conv_in.weight"]  # the condition map's channel starts unheard
    unet.load_state_dict({**copied, "conv_in.weight": conv_in}, strict=False)
    for block in unet.modules():
        if isinstance(block, Transformer2DModel):  # residual blocks: a zero output makes each an identity at first
            torch.nn.init.zeros_(block.proj_out.weight)
            torch.nn.init.zeros_(block.proj_out.bias)
    return unet, scheduler, cfg


class EdgeTextDenoiser(nn.Module):
    """Predicts the noise from (noisy image, condition map, prompt tokens); in training, a `text_dropout` share of
    the prompts is replaced by the empty prompt."""

    def __init__(self, unet: UNet2DConditionModel, empty_tokens: torch.Tensor, empty_mask: torch.Tensor,
                 text_dropout: float = 0.0):
        super().__init__()
        self.unet = unet
        self.text_dropout = text_dropout
        self.register_buffer("empty_tokens", empty_tokens, persistent=False)
        self.register_buffer("empty_mask", empty_mask, persistent=False)

    def unconditional(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.empty_tokens.expand(batch, -1, -1), self.empty_mask.expand(batch, -1)

    def forward(self, noisy: torch.Tensor, steps: torch.Tensor, condition: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        if self.training and self.text_dropout > 0:
            drop = torch.rand(noisy.shape[0], device=noisy.device) < self.text_dropout
            empty_tokens, empty_mask = self.unconditional(noisy.shape[0])
            tokens = torch.where(drop[:, None, None], empty_tokens, tokens)
            mask = torch.where(drop[:, None], empty_mask, mask)
        return self.unet(torch.cat([noisy, condition], dim=1), steps, encoder_hidden_states=tokens,
                         encoder_attention_mask=mask.float()).sample


def guided_noise(denoiser: EdgeTextDenoiser, noisy: torch.Tensor, step: torch.Tensor, condition: torch.Tensor,
                 tokens: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps(empty prompt) + scale * (eps(prompt) - eps(empty prompt)), one batched forward.
    The edge map conditions both halves; only the prompt is guided."""
    batch = noisy.shape[0]
    steps = step.reshape(-1).expand(batch)
    empty_tokens, empty_mask = denoiser.unconditional(batch)
    both = denoiser(torch.cat([noisy, noisy]), torch.cat([steps, steps]), torch.cat([condition, condition]),
                    torch.cat([empty_tokens, tokens]), torch.cat([empty_mask, mask]))
    unconditional, conditional = both.chunk(2)
    return unconditional + scale * (conditional - unconditional)


@dataclass
class SynthModel:
    """A trained EMIT-Diff model with its text encoder, ready to sample."""

    denoiser: EdgeTextDenoiser
    scheduler_config: dict
    cfg: SynthConfig
    text_encoder: TextEncoder

    @property
    def channels(self) -> int:
        return self.denoiser.unet.config.out_channels

    def encode(self, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = self.text_encoder([prompt_for(r, self.cfg) for r in reports])
        device = self.denoiser.empty_tokens.device
        return tokens.to(device), mask.to(device)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, reports: list[str], generator: torch.Generator,
               guidance_scale: float | None = None, steps: int | None = None) -> torch.Tensor:
        """(B, C, S, S) images in [-1, 1] drawn by deterministic DDIM (eta 0) from seeded noise."""
        self.denoiser.eval()
        device = self.denoiser.empty_tokens.device
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps or self.cfg.ddim_steps)
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        tokens, mask = self.encode(reports)
        condition = condition.to(device)
        size = self.cfg.image_size
        x = torch.randn((len(reports), self.channels, size, size), generator=generator).to(device)
        for t in scheduler.timesteps:
            step = torch.as_tensor(t, device=device)[None]
            x = scheduler.step(guided_noise(self.denoiser, x, step, condition, tokens, mask, scale), t, x).prev_sample
        return x.clamp(-1, 1).cpu()


def _denoiser(unet: UNet2DConditionModel, text_encoder: TextEncoder, cfg: SynthConfig) -> EdgeTextDenoiser:
    empty_tokens, empty_mask = text_encoder([""])
    return EdgeTextDenoiser(unet, empty_tokens, empty_mask, cfg.text_dropout)


def training_tensors(cases: list[Case], cfg: SynthConfig, channels: int, text_encoder: TextEncoder) -> dict:
    """Images, condition maps and prompt tokens of every case; a case without a mask conditions on its edges alone."""
    images, conditions, reports = [], [], []
    for case in cases:
        item = load_case(case, cfg.image_size, channels, num_classes=256)
        images.append(item["image"])
        conditions.append(condition_map(item["image"], item["label"], cfg.edge_sigma))
        reports.append(prompt_for(case.report, cfg))
    tokens, mask = text_encoder(reports)
    return {"images": torch.stack(images), "condition": torch.stack(conditions), "tokens": tokens, "mask": mask}


def train_synth(cases: list[Case], out: str | Path, cfg: SynthConfig, text: TextConfig, settings: PretrainSettings,
                channels: int = 1, progress: bool = True, init: str | None = None) -> list[dict]:
    """Train the edge- and text-conditioned model on the cases (images with or without masks) and save it into `out`
    (a diffusers folder plus synth.json), atomically; returns the per-epoch loss history. With `init` (a backbone
    folder) the generator takes the backbone's layout, weights, scheduler and channels instead of `cfg`'s layout."""
    if not cases:
        raise DataError("no image to train the synthesis model on")
    text_encoder = TextEncoder(text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        if init:
            unet, scheduler, cfg = synth_unet_from_backbone(init, cfg, text_encoder.dim)
            channels = unet.config.out_channels
        else:
            unet = build_synth_unet(cfg, channels, text_encoder.dim)
            scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear")
    data = training_tensors(cases, cfg, channels, text_encoder)
    meta = json.dumps({"synth": dataclasses.asdict(cfg), "text": dataclasses.asdict(text), "images": len(cases),
                       "init": str(init) if init else None}, indent=1)
    conditions = {"condition": data["condition"], "tokens": data["tokens"], "mask": data["mask"]}
    return fit_denoiser(unet, scheduler, data["images"], conditions, Path(out), settings, progress,
                        {MODEL_FILE: meta}, denoiser=_denoiser(unet, text_encoder, cfg))


def load_synth(folder: str | Path, device: str | torch.device = "cpu", **overrides) -> SynthModel:
    """Load a model written by `train_synth`; `overrides` replace sampling settings (guidance_scale, ddim_steps)."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"no EMIT-Diff model in '{folder}' ({MODEL_FILE} missing): train one with "
                                "`textdiff synth-train`")
    meta = json.loads((folder / MODEL_FILE).read_text())
    cfg = SynthConfig.from_dict({**meta["synth"], **overrides})
    text_encoder = TextEncoder(TextConfig(**meta["text"]))
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
    scheduler_config = DDPMScheduler.from_pretrained(folder / "scheduler").config
    denoiser = _denoiser(unet, text_encoder, cfg).to(device).eval()
    return SynthModel(denoiser, dict(scheduler_config), cfg, text_encoder)


def merging_mask(batch: int, size: int, alpha: float, patch: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) random merging mask: 1 where the loss sees the real image, 0 the synthetic copy; one
    Bernoulli(alpha) draw per patch of `patch` pixels, upsampled by nearest neighbour."""
    cells = -(-size // patch)
    grid = torch.bernoulli(torch.full((batch, 1, cells, cells), alpha), generator=generator)
    return F.interpolate(grid, scale_factor=patch, mode="nearest")[..., :size, :size]


def merge_predictions(real: torch.Tensor, synthetic: torch.Tensor, alpha: float, patch: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Per patch, the real or the synthetic logits (B, K, S, S); the label is the same for both (the reused mask)."""
    mask = merging_mask(real.shape[0], real.shape[-1], alpha, patch, generator).to(real)
    return mask * real + (1 - mask) * synthetic


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
