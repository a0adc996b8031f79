"""Pretrain the diffusion backbone on unlabeled images (no pretrained weights can be downloaded here).

Standard DDPM noise-prediction training with diffusers' UNet2DModel, DDPMScheduler and EMAModel (the same loop trains
the class-conditional CDM). Runs on the CPU,
on one GPU with mixed precision, or on several GPUs with torch DDP when started by `torchrun`.
The model is saved atomically every `save_every` epochs and at the end, so an interrupted run loses little.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel
from monai.transforms import RandSpatialCrop, SpatialPad
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from textdiff.model.backbone import build_scheduler, build_unet, load_diffusion, save_diffusion
from textdiff.config import BackboneConfig
from textdiff.cpu import native_bfloat16
from textdiff.data.studies import DataError, is_blank, is_colour, preprocess_image, read_planes, read_studies
from textdiff.data.tiling import PAD_VALUE, TILING_FILE, describe, resolve_tiling, tiling_record, to_working_grid

logger = logging.getLogger(__name__)


@dataclass
class PretrainSettings:
    epochs: int = 100
    batch_size: int = 16
    lr: float = 2e-4
    ema_decay: float = 0.995
    # Learning rate of the class embedding (the CDM's); it starts at zero when fine-tuning a backbone and would
    # barely move at the backbone's rate. None: `lr`.
    class_embedding_lr: float | None = None
    seed: int = 0
    save_every: int = 10
    # Store the weights in float16: half the size of a backbone that is shipped or copied around (training stays
    # in float32).
    save_half: bool = False
    # Compute in bfloat16 (autocast; weights, optimizer and EMA stay float32) on a CPU that computes it natively
    # (AVX512-BF16 or AMX): an epoch in about 4/5 of the time (docs/results/speed.md, "Pretraining in bfloat16"). A GPU
    # always trains in mixed precision; elsewhere float32.
    bfloat16: bool = False
    # A run ends after `epochs`, or earlier at `max_minutes` of wall-clock time (None: no limit), or once the
    # denoising loss has not improved on its best by `min_improvement` (relative) for `patience` epochs (None:
    # never); the last history entry says which ("stopped").
    max_minutes: float | None = None
    patience: int | None = None
    min_improvement: float = 0.01
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.epochs < 1 or (self.max_minutes is not None and not self.max_minutes > 0) or \
                (self.patience is not None and self.patience < 1):
            raise DataError(f"need at least one epoch, max_minutes above 0 and patience of at least 1 epoch, got "
                             f"{self.epochs}, {self.max_minutes}, {self.patience}")


def load_unlabeled_images(folders: list[str | Path], cfg: BackboneConfig) -> torch.Tensor | Dataset:
    """Every image of the given studies folders on its working grid (`textdiff.data.tiling`), in [-1, 1]: an (N, C, S, S)
    tensor when each is one window, else a dataset of random S² windows (about one pass over every image per epoch).
    Unreadable files are skipped; with no `cfg.in_channels` the images decide (`data_channels`)."""
    channels = cfg.in_channels or data_channels(folders)
    images, shapes = [], set()
    for folder in folders:
        for case in read_studies(folder):
            try:
                for plane in read_planes(case.image, "image"):  # a volume gives each of its slices
                    if is_blank(plane):  # a slice outside the body teaches nothing
                        continue
                    scaled = preprocess_image(plane, tuple(plane.shape[1:]), channels, f"image '{case.image}'")
                    images.append(to_working_grid(scaled, cfg))
                    shapes.add(tuple(plane.shape[1:]))
            except DataError as err:
                logger.warning("skipping %s", err)
    if not images:
        raise DataError(f"no readable images in {', '.join(map(str, folders))}")
    logger.info("%d unlabeled images loaded; %s", len(images), "; ".join(describe(s, cfg) for s in sorted(shapes)[:3]))
    window = (cfg.image_size, cfg.image_size)
    if all(tuple(image.shape[1:]) == window for image in images):
        return torch.stack(images)
    return RandomWindows(images, cfg.image_size)


class RandomWindows(Dataset):
    """Random size² windows of images larger than one window (padded with black where smaller), so many that an
    epoch sees about as many pixels as the images hold."""

    def __init__(self, images: list[torch.Tensor], size: int, seed: int = 0):
        pad = SpatialPad((size, size), method="end", value=PAD_VALUE)
        self.images = [torch.as_tensor(pad(image)) for image in images]
        self.crop = RandSpatialCrop((size, size), random_size=False).set_random_state(seed)
        area = sum(image.shape[1] * image.shape[2] for image in self.images)
        self.length = max(len(images), round(area / size**2))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (torch.as_tensor(self.crop(self.images[index % len(self.images)])),)


def data_channels(folders: list[str | Path]) -> int:
    """3 when any image of the folders is in colour (a colour dataset gets a colour backbone), else 1."""
    for folder in folders:
        for case in read_studies(folder):
            try:
                if is_colour(read_planes(case.image, "image")[0]):
                    return 3
            except DataError:
                continue
    return 1


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device), joining the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def pretrain(
    folders: list[str | Path], out: str | Path, cfg: BackboneConfig, settings: PretrainSettings,
    init: str | None = None, progress: bool = True,
) -> list[dict]:
    """Train (or continue training `init`) a UNet to denoise the images; returns the per-epoch loss history."""
    if init:  # continuing: the existing model decides the image size, channels and scale
        unet, scheduler = load_diffusion(init)
        cfg = dataclasses.replace(cfg, image_size=unet.config.sample_size, in_channels=unet.config.in_channels,
                                  patch_scale=None, max_windows=None)
    else:
        cfg = dataclasses.replace(cfg, in_channels=cfg.in_channels or data_channels(folders))
        logger.info("a new backbone for %d-channel images", cfg.in_channels)
        unet, scheduler = build_unet(cfg), build_scheduler(cfg)
    cfg = resolve_tiling(cfg, init)
    return fit_denoiser(unet, scheduler, load_unlabeled_images(folders, cfg), None, Path(out), settings, progress,
                        extra_files={TILING_FILE: tiling_record(cfg)})


def fit_denoiser(
    unet, scheduler, images: torch.Tensor | Dataset, conditions: dict[str, torch.Tensor] | None, out: Path,
    settings: PretrainSettings, progress: bool = True, extra_files: dict[str, str] | None = None,
    denoiser: torch.nn.Module | None = None, on_save: Callable[[int], None] | None = None,
) -> list[dict]:
    """DDPM noise-prediction training on (N, C, S, S) images (or a dataset of 1-tuples of them, e.g. RandomWindows);
    EMA weights of `unet` (and `extra_files`) are saved atomically into `out` every `save_every` epochs and at the end.
    `conditions` are per-image tensors (first dimension N) passed by name to the model, e.g. the CDM's class labels.
    `denoiser` wraps `unet` when the conditions need more than keyword arguments (EMIT-Diff's edge map and report).
    `on_save(epoch)` runs after each save with the saved (EMA) weights in `unet`: a look at what it learned."""
    rank, world, device = _distributed()
    torch.manual_seed(settings.seed + rank)
    unet.to(device).train()
    denoiser = (denoiser or unet).to(device).train()
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: let cuDNN pick its fastest kernels
    ema = EMAModel(unet.parameters(), decay=settings.ema_decay, foreach=True)  # one fused update, not one per tensor
    ema.to(device)
    model = DistributedDataParallel(denoiser, device_ids=[device] if device.type == "cuda" else None) if world > 1 else denoiser
    names = list(conditions or {})
    dataset = TensorDataset(images, *(conditions or {}).values()) if torch.is_tensor(images) else images
    sampler = DistributedSampler(dataset, shuffle=True, seed=settings.seed) if world > 1 else None
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(dataset) > settings.batch_size)
    step = _DenoisingStep(model, unet, scheduler, torch.optim.AdamW(_parameter_groups(unet, settings), lr=settings.lr,
                                                                    weight_decay=1e-4), device, settings.bfloat16)
    history, stop = list(settings.history), _Stop(settings, len(settings.history), device)
    bar = stop.progress_bar(settings.epochs * len(loader), disable=not progress or rank > 0)
    for epoch in range(settings.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        start, total, count = time.perf_counter(), 0.0, 0
        for batch, *values in loader:
            batch = batch.to(device)
            given = {name: value.to(device) for name, value in zip(names, values)}
            loss = step(batch, given)
            ema.step(unet.parameters())
            total, count = total + loss * batch.shape[0], count + batch.shape[0]
            stop.tick(bar)
            if stop.out_of_time():
                break
        history.append({"epoch": len(history) + 1, "loss": total / count, "seconds": time.perf_counter() - start})
        reason = stop.reason(history, last=epoch + 1 == settings.epochs)
        bar.set_postfix(epoch=f"{epoch + 1}/{settings.epochs}", loss=f"{total / count:.4f}")
        logger.info("epoch %d/%d: denoising loss %.4f%s", epoch + 1, settings.epochs, total / count, stop.time_left())
        if reason:
            history[-1]["stopped"] = reason
            logger.info("pretraining stopped after %d epochs: %s", epoch + 1, STOP_REASONS[reason])
        if rank == 0 and (reason or (epoch + 1) % settings.save_every == 0):
            _save(unet, ema, scheduler, out, history, extra_files, settings.save_half, on_save)
        if reason:
            break
    bar.close()
    if world > 1:
        dist.barrier()
    return history


class _DenoisingStep:
    """One optimizer step of noise prediction on a batch: random timesteps, mixed precision on a GPU (and in
    bfloat16 on a CPU that computes it natively, when asked), clipped gradients; returns the batch's mean squared
    error."""

    def __init__(self, model, unet, scheduler, optimizer, device: torch.device, cpu_bfloat16: bool = False):
        self.model, self.unet, self.scheduler, self.optimizer, self.device = model, unet, scheduler, optimizer, device
        cuda = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.amp = cuda or _cpu_bfloat16(cpu_bfloat16)
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.amp_dtype == torch.float16)

    def __call__(self, batch: torch.Tensor, given: dict[str, torch.Tensor]) -> float:
        noise = torch.randn_like(batch)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(batch, noise, steps)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            predicted = self.model(noisy, steps, **given)
            loss = F.mse_loss(getattr(predicted, "sample", predicted).float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return loss.item()


def _cpu_bfloat16(asked: bool) -> bool:
    """Whether CPU training computes in bfloat16: when asked and the CPU computes it natively (elsewhere it is
    emulated and slower than float32, so the run stays float32 and says so)."""
    if asked and not native_bfloat16():
        logger.warning("this CPU does not compute bfloat16 natively (no AVX512-BF16 or AMX): pretraining in float32")
    return asked and native_bfloat16()


STOP_REASONS = {"epochs": "all epochs done", "budget": "the time budget is spent",
                "converged": "the denoising loss stopped improving"}


class _Stop:
    """When a denoiser's training run ends (`PretrainSettings`): its epochs, its time budget or a loss plateau.
    Under torch DDP every process follows rank 0's clock and losses, so all stop at the same batch."""

    def __init__(self, settings: PretrainSettings, earlier_epochs: int, device: torch.device):
        self.settings, self.start, self.first, self.device = settings, time.monotonic(), earlier_epochs, device

    def _rank0(self, value: int) -> int:
        if not dist.is_initialized():
            return value
        shared = torch.tensor([value], device=self.device)
        dist.broadcast(shared, src=0)
        return int(shared.item())

    def out_of_time(self) -> bool:
        minutes = self.settings.max_minutes
        return minutes is not None and bool(self._rank0(int(time.monotonic() - self.start >= 60 * minutes)))

    def progress_bar(self, batches: int, disable: bool) -> tqdm:
        """A bar over the time budget (in seconds) when there is one, else over the batches: with large images an
        epoch takes minutes, and a bar by epochs would sit at 0 % that long."""
        if self.settings.max_minutes is None:
            return tqdm(total=batches, desc="denoiser", unit="batch", disable=disable)
        return tqdm(total=round(60 * self.settings.max_minutes), desc="denoiser", unit="s", disable=disable)

    def tick(self, bar: tqdm) -> None:
        """One batch done."""
        if self.settings.max_minutes is None:
            bar.update()
        else:
            bar.update(min(bar.total, round(time.monotonic() - self.start)) - bar.n)

    def time_left(self) -> str:
        """For the log: how much of the time budget is left ("" without one)."""
        if self.settings.max_minutes is None:
            return ""
        left = max(0.0, 60 * self.settings.max_minutes - (time.monotonic() - self.start))
        return f", {left / 60:.1f} of {self.settings.max_minutes:g} min left"

    def reason(self, history: list[dict], last: bool) -> str | None:
        """Why the run ends after this epoch, or None while it goes on."""
        if self.out_of_time():
            return "budget"
        patience, losses = self.settings.patience, [h["loss"] for h in history[self.first:]]
        plateau = bool(patience) and len(losses) > patience and \
            min(losses[-patience:]) > min(losses[:-patience]) * (1 - self.settings.min_improvement)
        if self._rank0(int(plateau)):
            return "converged"
        return "epochs" if last else None


def _parameter_groups(unet, settings: PretrainSettings) -> list[dict]:
    embedding = [p for name, p in unet.named_parameters() if name.startswith("class_embedding.")]
    rest = [p for name, p in unet.named_parameters() if not name.startswith("class_embedding.")]
    groups = [{"params": rest}]
    if embedding:
        groups.append({"params": embedding, "lr": settings.class_embedding_lr or settings.lr, "weight_decay": 0.0})
    return groups


def _save(unet, ema: EMAModel, scheduler, out: Path, history: list[dict], extra_files: dict[str, str] | None,
          half: bool = False, on_save: Callable[[int], None] | None = None) -> None:
    """Write the EMA weights (what DDPMs are sampled and read out from) with the loss history."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    save_diffusion(unet, scheduler, out, {**(extra_files or {}), "history.json": json.dumps(history, indent=1)}, half)
    if on_save is not None:
        unet.eval()
        with torch.no_grad():
            on_save(len(history))
        unet.train()
    ema.restore(unet.parameters())
