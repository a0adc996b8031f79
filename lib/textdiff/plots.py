"""Plots people would rather look at than read: training curves and Dice-vs-labels curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: list[dict], path: str | Path) -> Path:
    """Training loss and validation Dice per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(epochs, [h["loss"] for h in history], color="tab:red", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("DiceCE loss", color="tab:red")
    dice_ax = loss_ax.twinx()
    dice_ax.plot(epochs, [h["val_dice"] for h in history], color="tab:blue", label="val Dice")
    dice_ax.set_ylabel("validation Dice", color="tab:blue")
    dice_ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(curves: dict[str, dict[int, tuple[float, float]]], path: str | Path, xlabel: str, title: str) -> Path:
    """One line per method: x -> (mean, std), with a shaded band for the spread over seeds."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        xs = sorted(points)
        means = [points[x][0] for x in xs]
        stds = [points[x][1] for x in xs]
        ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean Dice (test split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
