"""Synthetic image-mask pairs on disk: made by an EMIT-Diff model from labeled images, read back for augmentation.

They go into a folder of their own (`images/`, `masks/`, a SYNTHETIC.json manifest naming each pair's source image,
and a contact sheet), written atomically. `read_studies` refuses such a folder, so synthetic images are never
mistaken for real data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from textdiff.data.studies import SYNTHETIC_MARKER, Case, DataError, is_image_file, load_case
from textdiff.synthesis.emit import SynthModel, condition_map, to_uint8
from textdiff.plots import plot_contact_sheet

CONTACT_SHEET = "contact_sheet.png"
SHEET_ROWS = 8


def _save_png(array, path: Path) -> None:
    """Write an (X, Y) array in MONAI's order as a PNG, which stores rows of y."""
    Image.fromarray(array.T).save(path)


def _check_target(out: Path) -> None:
    if out.exists() and any(is_image_file(p) for p in out.iterdir()):
        raise DataError(f"'{out}' is a studies folder: synthetic pairs must go into a folder of their own")
    if out.exists() and not (out / SYNTHETIC_MARKER).exists() and any(out.iterdir()):
        raise DataError(f"'{out}' exists and is not a synthetic-pairs folder: pick a new folder for synthetic pairs")


def synthesize(model: SynthModel, cases: list[Case], out: str | Path, per_image: int, seed: int = 0,
               guidance_scale: float | None = None, steps: int | None = None, progress: bool = True) -> dict:
    """Draw `per_image` synthetic copies of every labeled case; each copy reuses its source's mask and report.
    Returns the manifest (also written as SYNTHETIC.json)."""
    out = Path(out)
    labeled = [c for c in cases if c.label is not None]
    if not labeled:
        raise DataError("no labeled image to synthesize from: synthetic copies reuse a real mask")
    if per_image < 1:
        raise DataError(f"per_image must be at least 1, got {per_image}")
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    (staging / "images").mkdir()
    (staging / "masks").mkdir()
    size, pairs, sheet = model.cfg.image_size, [], []
    try:
        for index, case in enumerate(tqdm(labeled, desc="synthesize", unit="img", disable=not progress)):
            item = load_case(case, size, model.channels, num_classes=256)
            condition = condition_map(item["image"], item["label"], model.cfg.edge_sigma)[None].expand(per_image, -1, -1, -1)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            images = model.sample(condition, [case.report] * per_image, generator, guidance_scale, steps)
            mask = item["label"][0].to(torch.uint8).numpy()
            copies = []
            for k, image in enumerate(images):
                name = f"{case.id}_syn{k:02d}"
                copies.append(to_uint8(image[0]))
                _save_png(copies[-1], staging / "images" / f"{name}.png")
                _save_png(mask, staging / "masks" / f"{name}.png")
                pairs.append({"id": name, "source": case.id, "image": f"images/{name}.png",
                              "mask": f"masks/{name}.png", "report": case.report})
            if len(sheet) < SHEET_ROWS:
                sheet.append({"id": case.id, "real": to_uint8(item["image"][0]), "mask": mask, "synthetic": copies[:6]})
        manifest = {"synthetic": True, "per_image": per_image, "seed": seed,
                    "guidance_scale": model.cfg.guidance_scale if guidance_scale is None else guidance_scale,
                    "ddim_steps": steps or model.cfg.ddim_steps, "pairs": pairs}
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(manifest, indent=1))
        plot_contact_sheet(sheet, staging / CONTACT_SHEET)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_synthetic(folder: str | Path) -> dict[str, list[Case]]:
    """Source image id -> its synthetic copies (as cases with the reused mask and report)."""
    folder = Path(folder)
    marker = folder / SYNTHETIC_MARKER
    if not marker.is_file():
        raise DataError(f"'{folder}' has no {SYNTHETIC_MARKER}: make synthetic pairs with `textdiff synthesize`")
    copies: dict[str, list[Case]] = {}
    for pair in json.loads(marker.read_text())["pairs"]:
        case = Case(pair["id"], folder / pair["image"], folder / pair["mask"], pair["report"])
        copies.setdefault(pair["source"], []).append(case)
    return copies
