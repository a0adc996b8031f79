"""The best Dice a model can score when it predicts on a coarser grid than the image: masks against themselves.

    python benchmarks/scripts/resolution_ceiling.py runs/monuseg/train --sizes 64 128 256 512

Each final mask of the studies folder is averaged down to size² (area interpolation, as a perfect low-resolution
prediction would be), upsampled bilinearly back to the mask's own grid as the product upsamples its logits, and
thresholded at 0.5. Prints the mean Dice per size: the ceiling of reading a whole image at that size.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from monai.metrics import DiceHelper

from textdiff.data.studies import read_2d, read_studies


def ceiling(mask: torch.Tensor, size: int) -> float:
    """Dice of a (1, X, Y) binary mask against itself seen through a size² grid."""
    truth = (mask > 0).float()[None]
    coarse = F.interpolate(truth, size=(size, size), mode="area")
    back = F.interpolate(coarse, size=truth.shape[-2:], mode="bilinear", align_corners=False) > 0.5
    return float(DiceHelper(include_background=False, get_not_nans=False, apply_argmax=False)(back.float(), truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a studies folder with final masks")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args()
    masks = [read_2d(case.label, "mask") for case in read_studies(args.folder) if case.label is not None]
    print(json.dumps({"folder": args.folder, "masks": len(masks),
                      **{str(size): round(sum(ceiling(m, size) for m in masks) / len(masks), 4) for size in args.sizes}}))


if __name__ == "__main__":
    main()
