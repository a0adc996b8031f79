"""A real MRI case with fine boundaries: white matter on axial slices of the MNI152 T1 template (ICBM 2009a).

    python scripts/mni_white_matter.py --templates DIR --out runs/mni-wm

DIR holds `mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` and `..._wm_...` (nilearn's wheel ships both in
`nilearn/datasets/data/`: `pip download nilearn --no-deps`, unzip). Writes `<out>/train` (a pool of labeled slices)
and `<out>/test` (the slices between them) as studies folders of 8-bit PNGs, masks white matter probability > 0.5,
for `textdiff benchmark --data <out>`. Slices every `--step` mm; pool and test alternate, so no test slice is a
training slice and neighbours differ by `--step` mm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from textdiff.data.studies import write_reports

T1, WM = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice z, anterior at the top and the patient's left on the left (RAS voxels: x runs left to right)."""
    return np.rot90(volume[:, :, z])


def write_split(out: Path, slices: list[int], t1: np.ndarray, wm: np.ndarray, z0: int) -> None:
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rows, names = {}, {}
    for z in slices:
        name = f"mni-z{z:03d}"
        Image.fromarray(axial(t1, z).astype(np.uint8)).save(out / f"{name}.png")
        Image.fromarray((axial(wm, z) > 0.5).astype(np.uint8)).save(out / "labels" / "final" / f"{name}.png")
        rows[name] = (f"Axial T1-weighted MRI, {z - z0:+d} mm from the AC-PC plane.", None)
        names[name] = f"{name}.png"
    write_reports(out, rows, names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", required=True, help="folder with the MNI152 T1 and white matter NIfTI files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", type=int, default=50, help="lowest axial slice (voxel index)")
    parser.add_argument("--last", type=int, default=150, help="highest axial slice (voxel index)")
    parser.add_argument("--step", type=int, default=4, help="mm between consecutive slices (pool and test alternate)")
    args = parser.parse_args()
    t1_image = nib.load(Path(args.templates) / T1)
    t1 = np.asarray(t1_image.dataobj)  # nilearn's copies are 8-bit, the probabilities scaled to 0..255
    wm = np.asarray(nib.load(Path(args.templates) / WM).dataobj) / 255.0
    z0 = int(round(np.linalg.inv(t1_image.affine)[2] @ [0, 0, 0, 1]))  # the slice through MNI z = 0
    slices = list(range(args.first, args.last + 1, args.step))
    write_split(Path(args.out) / "train", slices[0::2], t1, wm, z0)
    write_split(Path(args.out) / "test", slices[1::2], t1, wm, z0)
    print(f"{len(slices[0::2])} pool slices, {len(slices[1::2])} test slices of {t1.shape[0]}x{t1.shape[1]} -> {args.out}")


if __name__ == "__main__":
    main()
