"""How far colour alone goes on an H&E nuclei set: Otsu's threshold on the haematoxylin channel, no training at all.

    python benchmarks/scripts/stain_threshold_baseline.py runs/monuseg/test runs/monuseg-dev/test

Each studies folder's images are unmixed into haematoxylin, eosin and DAB (scikit-image's `rgb2hed`); pixels above
the image's own Otsu threshold on haematoxylin are called nuclei. Prints mean Dice and IoU per folder, scored as the
benchmark scores (`textdiff.evaluation.score_masks`). A learned model that does not clear this line has learned
little beyond the stain.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from textdiff.data.studies import read_2d, read_studies
from textdiff.evaluation import score_masks


def haematoxylin_mask(image: torch.Tensor) -> torch.Tensor:
    """(3, X, Y) RGB in any range -> (1, X, Y) uint8 mask of the pixels above Otsu's threshold on haematoxylin."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float64)
    haematoxylin = rgb2hed(rgb / max(rgb.max(), 1.0))[..., 0]
    return torch.as_tensor(haematoxylin > threshold_otsu(haematoxylin)).to(torch.uint8)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="studies folders with colour images and final masks")
    for folder in parser.parse_args().folders:
        cases = [case for case in read_studies(folder) if case.label is not None]
        masks = [haematoxylin_mask(read_2d(case.image, "image")) for case in cases]
        items = [{"id": case.id, "original_label": read_2d(case.label, "mask").long()} for case in cases]
        print(json.dumps({"folder": folder, "images": len(cases), **score_masks(masks, items, 2)["mean"]}))


if __name__ == "__main__":
    main()
