"""Plots people would rather look at than read: training curves, Dice-vs-labels curves, paired runs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def plot_training(history: list[dict], path: str | Path) -> Path:
    """Training loss and validation Dice per round of optimizer steps."""
    steps = [h["step"] for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(steps, [h["loss"] for h in history], color="tab:red", label="train loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("DiceCE loss", color="tab:red")
    dice_ax = loss_ax.twinx()
    scored = [h for h in history if h["val_dice"] is not None]  # a run that keeps its last round scores only that
    dice_ax.plot([h["step"] for h in scored], [h["val_dice"] for h in scored], "o-", color="tab:blue", label="Dice")
    dice_ax.set_ylabel("Dice on the selection images", color="tab:blue")
    dice_ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(curves: dict[str, dict[int, tuple[float, float]]], path: str | Path, xlabel: str, title: str,
                references: dict[str, float] | None = None) -> Path:
    """One line per method: x -> (mean, std), with a shaded band for the spread over seeds; `references` (name ->
    value, e.g. published full-label results) as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{7 + index % 3}", label=f"{name}: {value:.3f}")
    _mean_lines(ax, {name: [(x, *points[x]) for x in sorted(points)] for name, points in curves.items()})
    return _save_lines(fig, ax, path, xlabel, title)


def plot_timelines(curves: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Dice against minutes: one line per method through its budgets (mean minutes, mean Dice, a band of one sd).
    Minutes on a log axis, so that seconds of head training and half an hour of pretraining both read."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _mean_lines(ax, {name: sorted((p["minutes"], p["dice"], p["sd"]) for p in points) for name, points in curves.items()})
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    return _save_lines(fig, ax, path, "minutes of training (wall clock, log scale)", title, title_size=9)


def _mean_lines(ax, curves: dict[str, list[tuple[float, float, float]]]) -> None:
    """One line per curve through its (x, mean, sd) points, with a band of one sd."""
    for name, points in curves.items():
        xs, means, sds = zip(*points)
        ax.plot(xs, means, marker="o", label=name)
        ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], alpha=0.15)


def _save_lines(fig, ax, path: str | Path, xlabel: str, title: str, title_size: float | None = None) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean Dice (test split)")
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_bars(values: dict[str, float], path: str | Path, ylabel: str, title: str) -> Path:
    """One bar per method, its value written on top."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bars = ax.bar(range(len(values)), list(values.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_xticks(range(len(values)), list(values), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_map_examples(rows: list[dict], path: str | Path) -> Path:
    """A grid: per image, the image with the true mask outlined, then each method's soft map.

    Each row is {"image": (C, X, Y), "truth": (1, X, Y), "maps": {name: (X, Y)}}, in MONAI's (x, y) order.
    """
    names = list(rows[0]["maps"])
    fig, axes = plt.subplots(len(rows), 1 + len(names), figsize=(2.4 * (1 + len(names)), 2.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"][0].T, cmap="gray")
        axes[r, 0].contour(row["truth"][0].T, levels=[0.5], colors="red", linewidths=0.8)
        for c, name in enumerate(names, start=1):
            axes[r, c].imshow(row["maps"][name].T, cmap="inferno", vmin=0, vmax=1)
            axes[r, c].contour(row["truth"][0].T, levels=[0.5], colors="cyan", linewidths=0.6)
        for c, title in enumerate(["image + true mask", *names]):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_contact_sheet(rows: list[dict], path: str | Path) -> Path:
    """Per source image: the real image, then its synthetic copies, each with the (shared) mask outlined.

    Each row is {"id": str, "real": (X, Y), "mask": (X, Y), "synthetic": [(X, Y), ...]}, in MONAI's (x, y) order.
    """
    columns = 1 + max(len(row["synthetic"]) for row in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.0 * columns, 2.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c > len(row["synthetic"]):
                ax.axis("off")
                continue
            ax.imshow((row["real"] if c == 0 else row["synthetic"][c - 1]).T, cmap="gray", vmin=0, vmax=255)
            if row["mask"].any():
                ax.contour(row["mask"].T, levels=[0.5], colors="red", linewidths=0.7)
            if c == 0:
                ax.set_ylabel(row["id"], fontsize=7)
            if r == 0:
                ax.set_title("real" if c == 0 else f"synthetic {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def plot_paired(points: list[tuple[float, float]], path: str | Path, xlabel: str, ylabel: str,
                ceilings: list[tuple[float, float]] | None = None) -> Path:
    """One dot per paired run (x: method b, y: method a); above the diagonal, a did better. `ceilings` (x: b's Dice,
    y: its area-oracle Dice) mark per run the most that fixing whole areas, all a report can tell, would give b."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1)
    if ceilings:
        ax.scatter([x for x, _ in ceilings], [y for _, y in ceilings], marker="_", s=120, color="tab:red",
                   label=f"{xlabel}, whole areas fixed (area oracle)")
    ax.scatter([x for x, _ in points], [y for _, y in points], color="tab:blue", s=18, label=f"{ylabel}")
    ax.set_xlabel(f"{xlabel} (Dice)")
    ax.set_ylabel("Dice")
    low = math.floor(10 * min(v for point in points + (ceilings or []) for v in point) - 0.5) / 10
    ax.set_xlim(max(low, 0), 1)  # zoomed to the runs: at a few labels the differences are small
    ax.set_ylim(max(low, 0), 1)
    ax.set_title("paired runs (same labels and seed)")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
