"""How much of the simulated bias field N4 finds on the scan-like MNI slices (`mni_tissue.py --noise --bias`).

    python benchmarks/scripts/bias_field_check.py --data runs/mni-wm-scan --templates /tmp/mni [--bias 0.4]

Each slice's true field is MONAI's `RandBiasField` drawn again with the slice's seed; ITK's N4 (4 levels x 50
iterations) estimates it from the slice alone, once with a head mask (pixels above the 10th percentile, all a user
has) and once with the template's brain mask (grey + white matter > 0.5, which a user would not have). Prints, per
slice, the log field left after correction as a fraction of the true one (sd over the mask; 1: nothing removed).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from monai.transforms import RandBiasField
from PIL import Image

from mni_tissue import axial


def n4_log_field(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The log bias field N4 estimates for `image` over `mask`."""
    itk_image, itk_mask = itk.image_from_array(image), itk.image_from_array(mask.astype(np.uint8))
    n4 = itk.N4BiasFieldCorrectionImageFilter[type(itk_image), type(itk_mask), type(itk_image)].New(
        Input=itk_image, MaskImage=itk_mask)
    n4.SetNumberOfFittingLevels(4)
    n4.SetMaximumNumberOfIterations([50] * 4)
    n4.Update()
    return np.log(np.maximum(image, 1e-3) / np.maximum(itk.array_from_image(n4.GetOutput()), 1e-3))


def field_left(true_log: np.ndarray, estimated_log: np.ndarray, mask: np.ndarray) -> float:
    """sd of (true - estimated) log field over the mask, as a fraction of the true field's sd (means removed)."""
    truth, estimate = true_log[mask], estimated_log[mask]
    return float(np.std((truth - truth.mean()) - (estimate - estimate.mean())) / np.std(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="output folder of mni_tissue.py --noise --bias")
    parser.add_argument("--templates", required=True, help="folder with the MNI152 tissue NIfTI files")
    parser.add_argument("--bias", type=float, default=0.4, help="the --bias the slices were made with")
    args = parser.parse_args()
    brain = sum(np.asarray(nib.load(Path(args.templates) / f"mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz")
                           .dataobj) / 255.0 for t in ("wm", "gm"))
    rows = []
    for path in sorted(Path(args.data).glob("*/mni-z*.png")):
        z = int(re.search(r"z(\d+)", path.name).group(1))
        image = np.asarray(Image.open(path)).astype(np.float32)
        field = RandBiasField(degree=2, coeff_range=(-args.bias, args.bias), prob=1.0).set_random_state(seed=z)
        true_log = np.log(np.asarray(field(np.ones((1, *image.shape), np.float32)))[0])
        masks = {"head": image > np.percentile(image, 10), "brain": axial(brain, z) > 0.5}
        rows.append([field_left(true_log, n4_log_field(image, m), m) for m in masks.values()])
        print(f"{path.parent.name}/{path.name}: field left {rows[-1][0]:.2f} (head mask), {rows[-1][1]:.2f} (brain mask)")
    mean = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} slices: {mean[0]:.2f} with the head mask, {mean[1]:.2f} with the brain mask")


if __name__ == "__main__":
    main()
