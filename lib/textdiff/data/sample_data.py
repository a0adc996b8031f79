"""Deterministic synthetic chest-radiograph sample data with infection masks and reports.

TextDiff is evaluated on QaTa-COV19 (chest X-rays, infection masks, LViT-style text
reports), which cannot be redistributed.  This module draws a small look-alike data set
from a seed instead, so the project can ship sample data, demo the MONAI Label app and
run benchmarks offline.  Every opacity is drawn from an explicit shape, so its mask and
the sentence that describes it are exact rather than annotated.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm
from textdiff.errors import DataError

SIDES = ("left", "right")  # the patient's sides; the patient's left lung is on the image right
ZONES = ("upper", "middle", "lower")
COUNT_WORDS = ("one", "two", "three", "four")
_SIDE_SIGN = {"left": 1.0, "right": -1.0}  # direction from the midline in image x
_COUNT_PROBS = (0.35, 0.30, 0.20, 0.15)  # how often an abnormal case has 1..4 areas
_ZONE_PROBS = (0.25, 0.35, 0.40)  # infections favour the lower lung, as in COVID-19
_PLACEMENT_TRIES = 40  # shapes tried at one lung zone before giving up on it
_LOCATION_TRIES = 6  # lung zones tried per area before drawing fewer areas
_REGENERATE = "textdiff make-sample-data --out sample-data"
DEFAULT_OPACITY = (0.5, 0.9)  # range of an infected area's peak density (lower: fainter, harder to see)


@dataclass(frozen=True)
class _Case:
    """One drawn radiograph: 8-bit image, 0/1 mask and the (side, zone) of each area."""

    image: np.ndarray
    mask: np.ndarray
    areas: list[tuple[str, str]]


@dataclass(frozen=True)
class _Chest:
    """The healthy anatomy of one case: a float image plus what an infection needs.

    ``air_shadow`` is how much the lung air darkened each pixel; an infection fills
    air spaces, so it gives back a fraction of that shadow.  Each lung is kept as its
    distance transform (pixels to the lung edge, 0 outside) for placing opacities.
    """

    image: np.ndarray
    air_shadow: np.ndarray
    lung_depths: dict[str, np.ndarray]


def make_sample_data(
    out_dir: str | Path,
    n_train: int = 70,
    n_test: int = 30,
    n_labeled: int = 20,
    normal_fraction: float = 0.2,
    size: int = 256,
    seed: int = 0,
    opacity: tuple[float, float] = DEFAULT_OPACITY,
) -> dict:
    """Write the sample data set under ``out_dir`` and return a summary of what was written.

    Train images form a MONAI Label studies folder in which only the first ``n_labeled``
    cases carry a final label (the label-efficient setting); ``train-groundtruth`` keeps
    every train mask for simulated labelling, and the test split is fully labelled.
    ``opacity`` is the range of an infected area's peak density; a lower range makes faint
    opacities, harder to see in the image alone (the masks and reports stay as they are).
    """
    _check_arguments(n_train, n_test, n_labeled, normal_fraction, size)
    if not 0 < opacity[0] <= opacity[1]:
        raise DataError(f"opacity must be a range 0 < low <= high, got {tuple(opacity)}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = _plan_area_counts(rng, n_train, n_test, n_labeled, normal_fraction)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
    written = 0
    for case_id, n_areas in enumerate(tqdm(counts, desc="sample data", unit="img")):
        case = _draw_case(np.random.default_rng([seed, case_id]), size, n_areas, opacity)
        split = "train" if case_id < n_train else "test"
        name = f"case_{case_id:04d}.png"
        written += _write_atomic(out / split / name, _png_bytes(case.image))
        for mask_dir in _mask_dirs(out, split, case_id, n_labeled):
            written += _write_atomic(mask_dir / name, _png_bytes(case.mask))
        label = "infection" if case.areas else "normal"
        rows[split].append((name, _report(case.areas), label))
    for split, split_rows in rows.items():
        written += _write_atomic(out / split / "reports.csv", _csv_bytes(split_rows))
    written += _write_atomic(out / "README.md", _readme(n_train, n_test, n_labeled, size, seed, opacity).encode())
    return {
        "train": n_train,
        "test": n_test,
        "labeled": n_labeled,
        "normal": sum(label == "normal" for split_rows in rows.values() for _, _, label in split_rows),
        "bytes": written,
    }


def _check_arguments(n_train: int, n_test: int, n_labeled: int, normal_fraction: float, size: int) -> None:
    """Reject arguments that would produce an empty or inconsistent data set."""
    if n_train < 1 or n_test < 0:
        raise DataError(f"need n_train >= 1 and n_test >= 0, got {n_train} and {n_test}")
    if not 0 <= n_labeled <= n_train:
        raise DataError(f"n_labeled must be between 0 and n_train={n_train}, got {n_labeled}")
    if not 0.0 <= normal_fraction <= 1.0:
        raise DataError(f"normal_fraction must be in [0, 1], got {normal_fraction}")
    if size < 64:
        raise DataError(f"size must be at least 64 pixels, got {size}")


def _plan_area_counts(
    rng: np.random.Generator, n_train: int, n_test: int, n_labeled: int, normal_fraction: float
) -> list[int]:
    """Number of infected areas per case (0 = normal), in case-id order.

    The labelled subset gets its share of normals (at least two when it has room) and
    every area count from one to four, so a model trained on it sees the whole range;
    the remaining normals are split between unlabelled train and test in proportion.
    """
    n_total = n_train + n_test
    n_rest = n_total - n_labeled
    n_normal = round(normal_fraction * n_total)
    labeled_normal = max(min(2, n_labeled // 2), round(normal_fraction * n_labeled))
    labeled_normal = max(min(n_normal, labeled_normal), n_normal - n_rest)
    rest_normal = n_normal - labeled_normal
    test_normal = min(n_test, round(rest_normal * n_test / n_rest)) if n_rest else 0
    pool_normal = rest_normal - test_normal
    labeled = [0] * labeled_normal + [i % 4 + 1 for i in range(n_labeled - labeled_normal)]
    pool = [0] * pool_normal + _random_counts(rng, n_train - n_labeled - pool_normal)
    test = [0] * test_normal + _random_counts(rng, n_test - test_normal)
    for group in (labeled, pool, test):
        rng.shuffle(group)
    return labeled + pool + test


def _random_counts(rng: np.random.Generator, n: int) -> list[int]:
    """Draw ``n`` abnormal area counts in 1..4, fewer areas being more common."""
    return [int(c) for c in rng.choice(np.arange(1, 5), size=n, p=_COUNT_PROBS)]


def _mask_dirs(out: Path, split: str, case_id: int, n_labeled: int) -> list[Path]:
    """Folders that receive this case's mask: ground truth always, final label if labelled."""
    if split == "test":
        return [out / "test" / "labels" / "final"]
    dirs = [out / "train-groundtruth"]
    if case_id < n_labeled:
        dirs.append(out / "train" / "labels" / "final")
    return dirs


def _draw_case(rng: np.random.Generator, size: int, n_areas: int, opacity_range: tuple[float, float]) -> _Case:
    """Draw one radiograph with ``n_areas`` infected areas (fewer only if no room) and its mask."""
    chest = _draw_chest(rng, size)
    image = chest.image
    mask = np.zeros((size, size), dtype=bool)
    areas: list[tuple[str, str]] = []
    for _ in range(_LOCATION_TRIES * n_areas):
        if len(areas) == n_areas:
            break
        side = SIDES[rng.integers(2)]
        zone = ZONES[rng.choice(3, p=_ZONE_PROBS)]
        drawn = _place_infection(rng, chest.lung_depths[side], zone, mask)
        if drawn is None:
            continue
        opacity, area_mask = drawn
        image = image + rng.uniform(*opacity_range) * opacity * chest.air_shadow
        mask |= area_mask
        areas.append((side, zone))
    return _Case(_expose(rng, image), mask.astype(np.uint8), areas)


def _pose_grid(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (x, y) coordinates in which the anatomy is drawn, with a random pose.

    Positioning varies between radiographs, so each case gets a small rotation, zoom
    and shift; drawing in these coordinates keeps all structures consistent.
    """
    c = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    angle = np.deg2rad(rng.normal(0.0, 1.5))
    zoom = rng.uniform(0.95, 1.05)
    shift_x, shift_y = rng.normal(0.0, 0.015, size=2)
    x = (np.cos(angle) * xx + np.sin(angle) * yy) / zoom + 0.5 - shift_x
    y = (-np.sin(angle) * xx + np.cos(angle) * yy) / zoom + 0.5 - shift_y
    return x, y


def _sigmoid(t: np.ndarray) -> np.ndarray:
    """Soft step used for tissue boundaries."""
    return 0.5 + 0.5 * np.tanh(0.5 * t)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="reflect")
    return field / field.std()


def _low_frequency(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth exposure unevenness across the film: a few random long-wave cosines, unit scale."""
    field = np.zeros_like(x)
    for _ in range(6):
        fx, fy = rng.uniform(-2.0, 2.0, size=2)
        field += np.cos(2.0 * np.pi * (fx * x + fy * y) + rng.uniform(0.0, 2.0 * np.pi))
    return field / np.sqrt(3.0)


def _band(offset: np.ndarray, half_width: float) -> np.ndarray:
    """Flat-topped profile across an air tube such as the trachea."""
    return 1.0 / (1.0 + ((offset / half_width) ** 2) ** 3)


def _draw_chest(rng: np.random.Generator, size: int) -> _Chest:
    """Draw the healthy chest: body, lungs, mediastinum, diaphragm and bones."""
    x, y = _pose_grid(rng, size)
    tissue = rng.uniform(0.58, 0.70)
    heart = _heart(rng, x, y)
    depths = {side: ndimage.distance_transform_edt(_lung_field(rng, x, y, side, heart)) for side in SIDES}
    inside = depths["left"] + depths["right"]
    air = ndimage.gaussian_filter((inside > 0).astype(float), 0.005 * size)
    body = _body(rng, x, y, tissue) + tissue * _breasts(rng, x, y)
    air_shadow = body * rng.uniform(0.5, 0.62) * air * _air_depth(inside, y, size)
    image = body - air_shadow
    image = image + tissue * (_vessels(rng, x, y, size) * air + _bones(rng, x, y, air))
    image = image - tissue * (0.13 * _trachea(x, y) + 0.15 * _gastric_bubble(rng, x, y))
    image = image * (1.0 + 0.05 * _low_frequency(rng, x, y))
    return _Chest(image, air_shadow, depths)


def _body(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, tissue: float) -> np.ndarray:
    """Dark background with neck, sloping shoulders, torso and arms, thickest at the centre."""
    dx = np.abs(x - 0.5)
    half_width = rng.uniform(0.42, 0.46) + 0.04 * (y - 0.5)
    shoulder = 0.08 + rng.uniform(0.8, 1.3) * np.clip(dx - 0.08, 0.0, None) ** 2
    torso = _sigmoid((half_width - dx) / 0.01) * _sigmoid((y - shoulder) / 0.015)
    neck = _sigmoid((0.1 - dx) / 0.01)
    arms = _sigmoid((dx - half_width - 0.012) / 0.012) * _sigmoid((y - shoulder - 0.02) / 0.02)
    thickness = np.sqrt(np.clip(1.0 - (dx / (half_width + 0.03)) ** 2, 0.0, 1.0))
    body = np.maximum(np.maximum(torso, neck * 0.85) * (0.7 + 0.3 * thickness), 0.65 * arms)
    background = rng.uniform(0.02, 0.07)
    return background + (tissue - background) * body


def _breasts(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Extra soft tissue over the lung bases in some patients, with a crisp lower edge."""
    strength = rng.uniform(0.0, 0.12) * (rng.uniform() < 0.4)
    radius = rng.uniform(0.12, 0.17)
    centre_y = rng.uniform(0.7, 0.78)
    lower_half = _sigmoid((y - centre_y + 0.06) / 0.05)
    discs = sum(_sigmoid((radius - np.hypot(x - 0.5 - s * 0.24, y - centre_y)) / 0.012) for s in (-1.0, 1.0))
    return strength * lower_half * discs


def _heart(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elliptic distance of the heart shadow (<1 inside), its apex towards the image right."""
    angle = np.deg2rad(rng.uniform(25.0, 38.0))
    centre_x, centre_y = 0.54 + rng.normal(0.0, 0.01), 0.665 + rng.normal(0.0, 0.01)
    u = np.cos(angle) * (x - centre_x) + np.sin(angle) * (y - centre_y)
    v = -np.sin(angle) * (x - centre_x) + np.cos(angle) * (y - centre_y)
    return (u / rng.uniform(0.14, 0.165)) ** 2 + (v / rng.uniform(0.1, 0.115)) ** 2


def _lung_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, side: str, heart: np.ndarray) -> np.ndarray:
    """Boolean lung field of one side: a rounded-apex egg cut by mediastinum, heart and diaphragm.

    The diaphragm dome peaks mid-lung and falls laterally into a sharp costophrenic
    angle; the patient's right hemidiaphragm (image left) sits higher over the liver,
    and the aortic knob and heart indent the patient's left lung (image right).
    """
    sign = _SIDE_SIGN[side]
    lateral = sign * (x - 0.5)
    width = rng.uniform(0.93, 1.06)
    centre_x = 0.2 * width
    centre_y = 0.52 + rng.normal(0.0, 0.01)
    half_height = 0.37 * rng.uniform(0.94, 1.05)
    half_width = 0.165 * width * (1.0 + 0.25 * (y - centre_y) / half_height)
    egg = np.abs((lateral - centre_x) / half_width) ** 2.4 + np.abs((y - centre_y) / half_height) ** 2.2 < 1.0
    angle_y = centre_y + half_height * (0.82 if side == "right" else 0.87)
    dome_x = centre_x + rng.normal(0.0, 0.015)
    dome_width = np.where(lateral > dome_x, 0.11, 0.3)
    dome = angle_y - rng.uniform(0.09, 0.13) * np.exp(-(((lateral - dome_x) / dome_width) ** 2))
    mediastinum = (lateral < 0.055) | ((x - 0.555) ** 2 + (y - 0.31) ** 2 < 0.04**2)
    return egg & (y < dome) & (heart > 1.0) & ~mediastinum


def _air_depth(inside: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """How much air each lung pixel shows, from its distance to the lung edge in pixels:
    least at the edges and bases, most mid-lung."""
    return (0.55 + 0.45 * np.clip(inside / (0.08 * size), 0.0, 1.0)) * (1.0 - 0.15 * _sigmoid((y - 0.7) / 0.05))


def _vessels(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Vascular markings: branching lines radiating from the hila, tapering outwards.

    Zero crossings of a noise field sampled in polar coordinates around each hilum
    (slow along the radius, fast around it) give radial, branching, curving lines.
    """
    field = ndimage.gaussian_filter(rng.standard_normal((24, 160)), 1.2, mode="wrap")
    field = field / field.std()
    sign = np.where(x > 0.5, 1.0, -1.0)
    hx, hy = 0.5 + sign * 0.1, 0.44
    radius = np.hypot(x - hx, y - hy)
    theta = np.arctan2(y - hy, sign * (x - hx))
    rows = radius * 40.0 + (sign > 0) * 8.0
    cols = (theta + np.pi) / (2.0 * np.pi) * 160.0
    noise = ndimage.map_coordinates(field, [rows, cols], order=1, mode="grid-wrap")
    ridges = np.exp(-((noise / (0.35 * np.exp(-radius / 0.25))) ** 2))
    hilar = np.exp(-(radius / 0.05) ** 2)
    return 0.16 * ridges * np.exp(-radius / 0.2) + 0.1 * hilar


def _rib(offset: np.ndarray, half_width: float | np.ndarray) -> np.ndarray:
    """Profile across a rib: a faint shaft with brighter cortical margins."""
    shaft = 1.0 / (1.0 + ((offset / half_width) ** 2) ** 3)
    cortex = np.exp(-(((np.abs(offset) - 0.8 * half_width) / (0.3 * half_width)) ** 2))
    return 0.6 * shaft + 0.5 * cortex


def _rib_series(position: np.ndarray, spacing: float, count: int, half_width: float, widening: float) -> np.ndarray:
    """``count`` parallel ribs along ``position`` (0 at the first rib), each wider than the last.

    Ribs are far apart compared with their width, so each pixel only needs its
    nearest rib, which costs one profile evaluation instead of one per rib.
    """
    index = np.clip(np.round(position / spacing), 0, count - 1)
    return _rib(position - index * spacing, half_width + widening * index)


def _bones(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, air: np.ndarray) -> np.ndarray:
    """Posterior and anterior ribs, clavicles and spine, more visible against lung air."""
    dx = np.abs(x - 0.5)
    lateral = _sigmoid((dx - 0.04) / 0.01) * _sigmoid((0.46 - dx) / 0.015)
    phase = rng.uniform(-0.02, 0.02)
    spacing = rng.uniform(0.058, 0.066)
    arch = -0.7 * dx + 2.6 * dx**2
    posterior = _rib_series(y - 0.13 - phase - arch, spacing, 11, 0.011, 0.0005)
    slope = 0.45 * (0.44 - dx)
    anterior = _rib_series(y - 0.17 - phase - slope, 1.2 * spacing, 7, 0.012, 0.0)
    anterior = anterior * _sigmoid((dx - 0.2) / 0.03)
    clavicle = _rib(y - (0.185 + phase - 0.28 * (dx - 0.04) + 0.25 * (dx - 0.04) ** 2), 0.015)
    clavicle = clavicle * _sigmoid((dx - 0.04) / 0.01) * _sigmoid((0.36 - dx) / 0.015)
    vertebrae = _rib(x - 0.5, 0.035) * (0.75 + 0.25 * np.cos(2 * np.pi * y / 0.055))
    ribs = lateral * (0.09 * posterior + 0.04 * anterior) * (0.35 + 0.65 * air)
    return ribs + 0.16 * clavicle + 0.06 * vertebrae * _sigmoid((0.9 - y) / 0.03)


def _trachea(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Air column of the trachea down to the carina, plus the two main bronchi."""
    trachea = _band(x - 0.5, 0.017) * _sigmoid((0.36 - y) / 0.01)
    bronchi = sum(
        _band(x - 0.5 - s * 0.7 * (y - 0.36), 0.013) * _sigmoid((y - 0.36) / 0.01) * _sigmoid((0.44 - y) / 0.01)
        for s in (-1.0, 1.0)
    )
    return trachea + bronchi


def _gastric_bubble(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Stomach gas under the patient's left hemidiaphragm (image right), sometimes absent."""
    strength = rng.uniform(0.0, 1.0)
    return strength * np.exp(-(((x - 0.66) / 0.06) ** 2 + ((y - 0.92) / 0.035) ** 2))


def _place_infection(
    rng: np.random.Generator, depth: np.ndarray, zone: str, taken: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Draw one opacity centred in ``zone`` of the lung whose distance map is ``depth``.

    Returns the opacity (peak 1, zero outside the lung) and its mask, the pixels where
    it exceeds half its peak; the mask must be one component clear of ``taken`` so the
    reported count equals the number of visible areas.  None if no room was found.
    """
    size = depth.shape[0]
    lung = depth > 0
    rows = np.flatnonzero(lung.any(axis=1))
    top, height = rows[0], rows[-1] + 1 - rows[0]
    zone_index = ZONES.index(zone)
    band = np.zeros_like(lung)
    band[top + zone_index * height // 3 : top + (zone_index + 1) * height // 3] = True
    clip = np.clip(depth / max(1.0, 0.01 * size), 0.0, 1.0)
    keep_out = ndimage.binary_dilation(taken, iterations=max(2, size // 64))
    for attempt in range(_PLACEMENT_TRIES):
        radius = rng.uniform(0.028, 0.085) * size * 0.97**attempt
        candidates = np.flatnonzero(band & (depth >= 0.5 * radius) & ~keep_out)
        if candidates.size == 0:
            candidates = np.flatnonzero(band & lung & ~keep_out)
        if candidates.size == 0:
            return None
        centre = np.unravel_index(candidates[rng.integers(candidates.size)], lung.shape)
        opacity = _blob(rng, size, centre, radius) * clip
        opacity = opacity / opacity.max()
        mask = opacity > 0.5
        if mask.sum() >= (size / 64) ** 2 * 6 and ndimage.label(mask)[1] == 1 and not (mask & keep_out).any():
            return opacity, mask
    return None


def _blob(rng: np.random.Generator, size: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    """Irregular patchy opacity: a few rotated anisotropic Gaussians with fine texture.

    A flatter top (exponent < 1) gives consolidation, a softer one ground-glass haze.
    """
    pixels = np.arange(size, dtype=float)
    blob = np.zeros((size, size))
    for k in range(rng.integers(2, 5)):
        offset = rng.normal(0.0, 0.55 * radius, size=2) if k else np.zeros(2)
        angle = rng.uniform(0.0, np.pi)
        dv = (pixels - centre[0] - offset[0])[:, None]
        du = (pixels - centre[1] - offset[1])[None, :]
        u = np.cos(angle) * du + np.sin(angle) * dv
        v = -np.sin(angle) * du + np.cos(angle) * dv
        su, sv = radius * rng.uniform(0.55, 1.1), radius * rng.uniform(0.35, 0.8)
        blob += rng.uniform(0.6, 1.0) * np.exp(-0.5 * ((u / su) ** 2 + (v / sv) ** 2))
    texture = np.clip(0.5 + 0.25 * _smooth_noise(rng, size, 0.008 * size), 0.0, 1.0)
    return (blob / blob.max()) ** rng.uniform(0.5, 1.0) * (0.8 + 0.2 * texture)


def _expose(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Turn the drawn attenuation into an 8-bit radiograph: blur, contrast, quantum noise."""
    size = image.shape[0]
    image = ndimage.gaussian_filter(image, 0.003 * size)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.85, 1.15)
    low, high = rng.uniform(0.0, 0.05), rng.uniform(0.88, 1.0)
    image = low + (high - low) * image
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape), 0.5)
    image = image + rng.uniform(0.012, 0.024) * np.sqrt(image + 0.02) * noise / 0.28
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _report(areas: list[tuple[str, str]]) -> str:
    """LViT / QaTa-COV19 style sentence for the drawn areas, e.g.

    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    """
    if not areas:
        return "No pulmonary infection."
    sides = [side for side in SIDES if any(s == side for s, _ in areas)]
    laterality = "Bilateral" if len(sides) == 2 else "Unilateral"
    count = f"{COUNT_WORDS[len(areas) - 1]} infected area{'s' if len(areas) > 1 else ''}"
    places = [
        " ".join(zone for zone in ZONES if (side, zone) in areas) + f" {side} lung" for side in sides
    ]
    return f"{laterality} pulmonary infection, {count}, {' and '.join(places)}."


def _png_bytes(array: np.ndarray) -> bytes:
    """Encode an 8-bit grayscale PNG with fixed settings and no metadata (reproducible bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _csv_bytes(rows: list[tuple[str, str, str]]) -> bytes:
    """The reports table of one split: image file name, report sentence, normal/infection."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("image", "report", "label"))
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> int:
    """Write via a temporary sibling and rename, so an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return len(data)


def _readme(n_train: int, n_test: int, n_labeled: int, size: int, seed: int, opacity: tuple[float, float]) -> str:
    """Describe the layout and how to regenerate it."""
    density = "" if tuple(opacity) == DEFAULT_OPACITY else (
        f"\nOpacity peak density in [{opacity[0]}, {opacity[1]}] (default {list(DEFAULT_OPACITY)}).\n")
    return f"""# TextDiff sample data

Synthetic chest-radiograph-like images ({size}x{size}, 8-bit grayscale) with infection
opacities, masks and LViT/QaTa-COV19-style text reports. Generated deterministically
(seed {seed}); nothing here comes from a patient.
{density}
```
train/                    MONAI Label studies folder: {n_train} training images
  labels/final/           masks of the first {n_labeled} train images only (the labelled minority)
  reports.csv             image,report,label  (label is "normal" or "infection")
train-groundtruth/        masks of all {n_train} train images (for simulated labelling and benchmarks)
test/                     {n_test} held-out images, same layout, every image labelled
```

Masks are 8-bit PNGs with 0 = background and 1 = infection (not 255); normal images
have all-zero masks. Image ids run consecutively across splits.

Regenerate (with the default settings) with:

```
{_REGENERATE}
```
"""
