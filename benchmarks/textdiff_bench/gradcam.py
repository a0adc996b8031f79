"""Grad-CAM baseline for weak supervision: a MONAI ResNet classifier trained on the same image-level labels as the
CDM, whose class activation map (MONAI GradCAM) is thresholded the same way as the CDM map."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from monai.networks.nets import ResNet
from monai.visualize import GradCAM
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class ClassifierSettings:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    target_layer: str = "layer4"  # the last convolutional stage, as Grad-CAM is usually read


def build_classifier(classes: int, channels: int) -> ResNet:
    """A small 2D ResNet (one basic block per stage), sized like the diffusion backbone."""
    return ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=channels,
                  num_classes=classes)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int, settings: ClassifierSettings,
                     progress: bool = True) -> ResNet:
    """Cross-entropy with class weights (normal images are the minority), seeded; returns the model in eval mode."""
    torch.manual_seed(settings.seed)
    device = images.device
    net = build_classifier(classes, images.shape[1]).to(device)
    counts = torch.bincount(labels, minlength=classes).float().clamp_min(1)
    loss_fn = torch.nn.CrossEntropyLoss(weight=(counts.sum() / counts / classes).to(device))
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    rng = random.Random(settings.seed)
    bar = tqdm(range(settings.epochs), desc="classifier", unit="epoch", disable=not progress)
    for epoch in bar:
        net.train()
        order = list(range(len(labels)))
        rng.shuffle(order)
        correct, total = 0, 0.0
        for begin in range(0, len(order), settings.batch_size):
            index = torch.tensor(order[begin : begin + settings.batch_size])
            logits = net(images[index])
            loss = loss_fn(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            correct += int((logits.argmax(1).cpu() == labels[index]).sum())
        bar.set_postfix(loss=f"{total / len(labels):.3f}", accuracy=f"{correct / len(labels):.2f}")
        logger.info("epoch %d/%d: loss %.4f, training accuracy %.3f", epoch + 1, settings.epochs,
                    total / len(labels), correct / len(labels))
    return net.eval()


def cam_maps(net: ResNet, images: torch.Tensor, class_index: int, target_layer: str = "layer4") -> torch.Tensor:
    """Grad-CAM of `class_index` for images (B, C, S, S): (B, S, S) in [0, 1], upsampled by MONAI to the input."""
    cam = GradCAM(nn_module=net, target_layers=target_layer)
    return cam(images, class_idx=class_index)[:, 0].detach()
