"""What the experiment scripts that retrain on a seeded draw of labels share: their options, the draw from a pool
and a test split, and the JSON they write."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from textdiff.config import TextDiffConfig, with_overrides
from textdiff.data.studies import Case, read_studies


def seeded_parser(description: str, labels_help: str = "labeled images drawn from the pool") -> argparse.ArgumentParser:
    """--data, --backbone, --labels, --seeds, --set and --out; a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True, help="train/ (the labeled pool) and test/")
    parser.add_argument("--backbone", type=Path, required=True)
    parser.add_argument("--labels", type=int, default=5, help=labels_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", type=json.loads, default={}, help="JSON: config overrides for every run, e.g. "
                        '\'{"train.steps": 400}\'')
    parser.add_argument("--out", type=Path, required=True, help="JSON file; its folder keeps models and features")
    return parser


def base_config(args: argparse.Namespace, seed: int) -> TextDiffConfig:
    """The default config on --backbone with the seed and the --set overrides."""
    return with_overrides(TextDiffConfig(), {"backbone.pretrained": str(args.backbone), "train.seed": seed, **args.set})


def draw(data: Path, labels: int, seed: int) -> tuple[list[Case], list[Case]]:
    """`labels` labeled cases drawn (seeded) from <data>/train, and the labeled cases of <data>/test."""
    pool = [c for c in read_studies(data / "train") if c.label is not None]
    test = [c for c in read_studies(data / "test") if c.label is not None]
    return random.Random(seed).sample(pool, labels), test


def run_folder(args: argparse.Namespace) -> Path:
    """The folder beside --out that keeps a run's models and feature cache."""
    folder = args.out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """--out: the command's options and the rows."""
    command = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
