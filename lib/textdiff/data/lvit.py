"""Import an LViT-format dataset (QaTa-COV19, MoNuSeg) into a MONAI Label studies folder.

LViT ships an image folder, a mask folder (0/255 PNGs) and an Excel or CSV file with columns `Image` (the mask's
file name) and `Description` (the report). QaTa names masks `mask_<image>`; MoNuSeg uses the image's own name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from textdiff.data.studies import DataError, check_report, image_id, is_image_file, read_reports, write_reports


def read_lvit_text(path: str | Path) -> dict[str, str]:
    """Mask file name -> report, from LViT's .xlsx/.xls or .csv text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file '{path}' does not exist")
    table = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path)
    missing = {"Image", "Description"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: needs columns 'Image' and 'Description', missing {sorted(missing)}")
    return {str(row.Image).strip(): check_report(row.Description, f"{path} row {row.Image}") for row in table.itertuples()}


def _source_image(images_dir: Path, mask_name: str) -> Path:
    for candidate in (mask_name, mask_name.removeprefix("mask_")):
        stem = image_id(candidate)
        for path in sorted(images_dir.iterdir()):
            if is_image_file(path) and image_id(path) == stem:
                return path
    raise DataError(f"no image in '{images_dir}' for mask '{mask_name}'")


def _binary_mask(path: Path) -> Image.Image:
    """LViT masks are 0/255 (sometimes anti-aliased): any non-zero pixel is foreground, stored as class 1."""
    try:
        array = np.asarray(Image.open(path).convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read mask '{path}': {err}") from err
    return Image.fromarray((array > 0).astype(np.uint8))


def import_lvit(images_dir: str | Path, masks_dir: str | Path, text_file: str | Path, out_dir: str | Path,
                allow_missing_reports: bool = False, progress: bool = True) -> int:
    """Copy images, write 0/1 masks under labels/final and the reports to reports.csv; returns the image count.

    Importing into a folder that already holds studies adds to it (e.g. LViT's Train_Folder and Val_Folder into one
    training pool); an image of the same id is replaced, with its mask and report."""
    images_dir, masks_dir, out_dir = Path(images_dir), Path(masks_dir), Path(out_dir)
    reports = read_lvit_text(text_file)
    masks = sorted(p for p in masks_dir.iterdir() if is_image_file(p)) if masks_dir.is_dir() else []
    if not masks:
        raise DataError(f"no mask images in '{masks_dir}'")
    without = [m.name for m in masks if m.name not in reports]
    if without and not allow_missing_reports:
        raise DataError(f"{len(without)} mask(s) have no Description in '{text_file}', e.g. {without[:3]}; "
                        "pass --allow-missing-reports to import them with an empty report")
    labels_dir = out_dir / "labels" / "final"
    labels_dir.mkdir(parents=True, exist_ok=True)
    rows = read_reports(out_dir)
    names = {image_id(path): path.name for path in out_dir.iterdir() if is_image_file(path)}
    for mask in tqdm(masks, desc="import", unit="img", disable=not progress):
        source = _source_image(images_dir, mask.name)
        key = image_id(source)
        target = out_dir / source.name
        tmp_image, tmp_mask = target.with_name(f".{target.name}.tmp"), labels_dir / f".{key}.png.tmp"
        shutil.copyfile(source, tmp_image)
        _binary_mask(mask).save(tmp_mask, format="PNG")
        os.replace(tmp_image, target)
        os.replace(tmp_mask, labels_dir / f"{key}.png")
        rows[key], names[key] = (reports.get(mask.name, ""), None), source.name
    write_reports(out_dir, rows, {key: names.get(key, key) for key in rows})
    return len(masks)
