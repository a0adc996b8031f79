"""A real MRI case with fine boundaries: white or grey matter on axial slices of the MNI152 T1 template (ICBM 2009a).

    python benchmarks/scripts/mni_tissue.py --templates DIR --out runs/mni-wm [--tissue gm] [--noise 0.05 --bias 0.4]

DIR holds `mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz` and the tissue maps `..._wm_...`, `..._gm_...`
(nilearn's wheel ships them in `nilearn/datasets/data/`: `pip download nilearn --no-deps`, unzip). Writes
`<out>/train` (a pool of labeled slices) and `<out>/test` (the slices between them) as studies folders of PNGs,
masks where the tissue's probability exceeds 0.5, for `textdiff-bench benchmark --data <out>`. Slices every `--step` mm;
pool and test alternate, so no test slice is a training slice. White matter is one thick region with a folded
outline; grey matter (the cortical ribbon and deep nuclei) is a few pixels thick. `--tissue deep` labels three small
structures of similar size in the centre of the brain, told apart mostly by where they lie: 1 the deep grey matter
of the patient's left (caudate, putamen, thalamus), 2 the same on the right, 3 the ventricles and basal cisterns
(`--set head.label_names=[background,left deep grey matter,right deep grey matter,ventricles]`). `--noise` and `--bias` make the
smooth average brain look more like one scan: MONAI's Rician noise and bias field, seeded per slice, written as
16-bit PNGs as a scanner's export would be. `--drawn Z ...` also writes `<out>/volume`: the whole T1 as one NIfTI
volume whose mask is drawn on those axial slices only, as a user who labels a few slices in 3D Slicer saves it, and
`<out>/volume-whole`: the same volume drawn on every slice, to evaluate against. `--canvas 256` centres every slice
on a 256x256 field of view, as a scanner's 256² axial slices frame the head.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from monai.transforms import RandBiasField, RandRicianNoise
from PIL import Image

from textdiff.data.studies import write_reports

T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TISSUES = {"wm": "white matter", "gm": "grey matter", "deep": "deep grey matter (left, right) and ventricles"}
DEEP_SLAB_MM = (-10, 26)  # MNI z of the axial slices with deep grey matter labeled: the basal ganglia and thalami
CENTRE_MM, CENTRE_RADII_MM = (0, -8), (32, 38)  # the central ellipse (x, y in MNI mm) that holds both structures
DEPTH_MM = 15  # deep grey matter lies this far inside the brain's outline; the cortex (insula included) does not


def axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice z, anterior at the top and the patient's left on the left (RAS voxels: x runs left to right)."""
    return np.rot90(volume[:, :, z])


def deep_structures(gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Per voxel 0, 1 (left deep grey matter), 2 (right), 3 (ventricles and cisterns), slice by slice: grey matter
    deep inside the brain within the central ellipse, and the holes of the tissue (grey + white > 0.5) there."""
    inv = np.linalg.inv(affine)
    x0, y0, _ = (inv @ [*CENTRE_MM, 0, 1])[:3]
    x, y = np.meshgrid(np.arange(gm.shape[0]), np.arange(gm.shape[1]), indexing="ij")
    centre = ((x - x0) / CENTRE_RADII_MM[0]) ** 2 + ((y - y0) / CENTRE_RADII_MM[1]) ** 2 <= 1
    slab = [round((inv @ [0, 0, mm, 1])[2]) for mm in DEEP_SLAB_MM]
    labels = np.zeros(gm.shape, np.uint8)
    for z in range(gm.shape[2]):
        tissue = gm[..., z] + wm[..., z] > 0.5
        brain = ndimage.binary_fill_holes(tissue)
        holes, count = ndimage.label(brain & ~tissue & centre)
        sizes = ndimage.sum(holes > 0, holes, range(1, count + 1))
        labels[..., z][np.isin(holes, 1 + np.flatnonzero(sizes >= 30))] = 3
        if slab[0] <= z <= slab[1]:
            deep = ndimage.binary_opening((gm[..., z] > 0.5) & centre & (ndimage.distance_transform_edt(brain) > DEPTH_MM))
            labels[..., z][deep] = np.where(x[deep] < x0, 1, 2)  # RAS voxels: x grows toward the patient's right
    return labels


def scan_like(image: np.ndarray, z: int, noise: float, bias: float) -> np.ndarray:
    """A 16-bit slice: a smooth multiplicative field (Legendre coefficients within ±`bias`) and Rician noise of sd
    `noise` x the slice's 99th percentile, seeded by the slice index so every run writes the same images."""
    field = RandBiasField(degree=2, coeff_range=(-bias, bias), prob=1.0).set_random_state(seed=z)
    rician = RandRicianNoise(prob=1.0, std=noise * float(np.percentile(image, 99)), sample_std=False)
    scan = rician.set_random_state(seed=z)(field(image[None].astype(np.float32)))[0]
    return np.clip(np.asarray(scan) * 100, 0, 65535).astype(np.uint16)


def as_mask(tissue: np.ndarray) -> np.ndarray:
    """A probability map thresholded at 0.5, or class indices (the `deep` structures) as they are."""
    return tissue.astype(np.uint8) if tissue.dtype == np.uint8 else (tissue > 0.5).astype(np.uint8)


def write_split(out: Path, slices: list[int], t1: np.ndarray, tissue: np.ndarray, z0: int, noise: float = 0.0,
                bias: float = 0.0) -> None:
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rows, names = {}, {}
    for z in slices:
        name = f"mni-z{z:03d}"
        image = axial(t1, z)
        image = scan_like(image, z, noise, bias) if noise or bias else image.astype(np.uint8)
        Image.fromarray(image).save(out / f"{name}.png")
        Image.fromarray(as_mask(axial(tissue, z))).save(out / "labels" / "final" / f"{name}.png")
        rows[name] = (f"Axial T1-weighted MRI, {z - z0:+d} mm from the AC-PC plane.", None)
        names[name] = f"{name}.png"
    write_reports(out, rows, names)


def write_volume(out: Path, t1: np.ndarray, tissue: np.ndarray, drawn: list[int] | None) -> None:
    """The T1 volume (1 mm voxels) and a mask drawn on the `drawn` slices only (None: on every slice); its axial
    slices read exactly as the PNG slices do (NIfTI's first axis is the PNG's width)."""
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    image = np.stack([axial(t1, z).T for z in range(t1.shape[2])], axis=-1).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    for z in range(t1.shape[2]) if drawn is None else drawn:
        mask[..., z] = as_mask(axial(tissue, z)).T
    nib.save(nib.Nifti1Image(image, np.eye(4)), out / "mni.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), out / "labels" / "final" / "mni.nii.gz")
    write_reports(out, {"mni": ("Axial T1-weighted MRI.", None)}, {"mni": "mni.nii.gz"})


def on_canvas(volume: np.ndarray, size: int) -> np.ndarray:
    """The volume's axial slices centred on a size x size field of view (zeros around), or as they are for 0."""
    if not size:
        return volume
    if size < max(volume.shape[:2]):
        raise SystemExit(f"--canvas {size} is smaller than the {volume.shape[0]}x{volume.shape[1]} slices")
    pad = [((size - n) // 2, size - n - (size - n) // 2) for n in volume.shape[:2]]
    return np.pad(volume, pad + [(0, 0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", required=True, help="folder with the MNI152 T1 and tissue NIfTI files")
    parser.add_argument("--tissue", choices=sorted(TISSUES), default="wm", help="the structure to label")
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", type=int, default=50, help="lowest axial slice (voxel index)")
    parser.add_argument("--last", type=int, default=150, help="highest axial slice (voxel index)")
    parser.add_argument("--step", type=int, default=4, help="mm between consecutive slices (pool and test alternate)")
    parser.add_argument("--noise", type=float, default=0.0, help="Rician noise sd as a fraction of the 99th percentile")
    parser.add_argument("--bias", type=float, default=0.0, help="range of the bias field's coefficients")
    parser.add_argument("--canvas", type=int, default=0, help="centre each slice on a field of view this large")
    parser.add_argument("--drawn", type=int, nargs="*", default=[], help="also write <out>/volume, drawn on these slices")
    args = parser.parse_args()
    t1_image = nib.load(Path(args.templates) / T1)
    t1 = on_canvas(np.asarray(t1_image.dataobj), args.canvas)  # nilearn's copies are 8-bit, probabilities 0..255
    maps = {name: np.asarray(nib.load(Path(args.templates) / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
                             .dataobj) / 255.0 for name in (("gm", "wm") if args.tissue == "deep" else (args.tissue,))}
    tissue = deep_structures(maps["gm"], maps["wm"], t1_image.affine) if args.tissue == "deep" else maps[args.tissue]
    tissue = on_canvas(tissue, args.canvas)
    z0 = int(round(np.linalg.inv(t1_image.affine)[2] @ [0, 0, 0, 1]))  # the slice through MNI z = 0
    slices = list(range(args.first, args.last + 1, args.step))
    for split, chosen in (("train", slices[0::2]), ("test", slices[1::2])):
        write_split(Path(args.out) / split, chosen, t1, tissue, z0, args.noise, args.bias)
    if args.drawn:
        write_volume(Path(args.out) / "volume", t1, tissue, args.drawn)
        write_volume(Path(args.out) / "volume-whole", t1, tissue, None)
    print(f"{TISSUES[args.tissue]}: {len(slices[0::2])} pool slices, {len(slices[1::2])} test slices of {t1.shape[0]}x{t1.shape[1]} -> {args.out}")


if __name__ == "__main__":
    main()
