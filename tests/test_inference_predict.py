"""Segmentation at each image's own size, Dice/IoU scoring, and writing masks with the image's geometry."""

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from textdiff.data import Case, load_case, read_2d
from textdiff.features import FeatureCache
from textdiff.inference import score_masks, segment_items, to_original_size
from textdiff.predict import mask_extension, overlay_png, save_mask


def test_segment_items_returns_masks_at_original_sizes(make_model, tmp_path, h):
    model = make_model()
    sizes = [(48, 40), (30, 50), (32, 32)]  # PIL (width, height)
    items = [
        load_case(Case(f"i{n}", h.random_png(tmp_path / f"i{n}.png", w, hh, seed=n)), h.size, 1, 2) | {"report": h.normal}
        for n, (w, hh) in enumerate(sizes)
    ]
    masks = segment_items(model, items, batch_size=2)
    assert len(masks) == 3
    for mask, item, (w, hh) in zip(masks, items, sizes):
        assert mask.shape == (1, *item["original_shape"]) == (1, w, hh)
        assert mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1}
    # the same masks come out through a filled cache and with another batch size
    cache = FeatureCache(model.extractor)
    cache.fill(items, progress=False)
    for a, b in zip(masks, segment_items(model, items, cache=cache, batch_size=1)):
        assert torch.equal(a, b)


def test_to_original_size_upsamples_and_takes_argmax():
    logits = torch.zeros(2, 4, 4)
    logits[1, :2, :] = 1.0  # top half foreground
    mask = to_original_size(logits, (8, 6))
    assert mask.shape == (1, 8, 6) and mask.dtype == torch.uint8
    assert mask[0, :3].eq(1).all() and mask[0, 5:].eq(0).all()


def _truth(shape=(12, 10)):
    truth = torch.zeros(1, *shape, dtype=torch.long)
    truth[0, 2:6, 3:7] = 1
    return truth


def test_score_masks_perfect_disjoint_and_empty():
    truth = _truth()
    disjoint = torch.zeros_like(truth, dtype=torch.uint8)
    disjoint[0, 8:11, 0:2] = 1
    half = torch.zeros_like(truth, dtype=torch.uint8)
    half[0, 2:4, 3:7] = 1  # 8 of the 16 true pixels, nothing else
    empty = torch.zeros_like(truth)
    items = [{"id": "perfect", "original_label": truth}, {"id": "disjoint", "original_label": truth},
             {"id": "half", "original_label": truth}, {"id": "normal", "original_label": empty}]
    masks = [truth.to(torch.uint8), disjoint, half, empty.to(torch.uint8)]
    scores = score_masks(masks, items, 2)
    rows = {r["image"]: r for r in scores["images"]}
    assert rows["perfect"]["dice"] == pytest.approx(1.0) and rows["perfect"]["iou"] == pytest.approx(1.0)
    assert rows["disjoint"]["dice"] == pytest.approx(0.0) and rows["disjoint"]["iou"] == pytest.approx(0.0)
    assert rows["half"]["dice"] == pytest.approx(2 * 8 / (8 + 16)) and rows["half"]["iou"] == pytest.approx(0.5)
    assert rows["normal"]["dice"] == pytest.approx(1.0) and rows["normal"]["iou"] == pytest.approx(1.0)
    assert scores["mean"]["dice"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)
    assert scores["mean"]["iou"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_score_masks_false_positive_on_normal_image_scores_zero():
    empty = torch.zeros(1, 6, 6, dtype=torch.long)
    spot = torch.zeros(1, 6, 6, dtype=torch.uint8)
    spot[0, 1, 1] = 1
    assert score_masks([spot], [{"id": "n", "original_label": empty}], 2)["images"][0]["dice"] == 0.0


def test_score_masks_needs_a_truth():
    with pytest.raises(ValueError, match="'u' has no mask"):
        score_masks([torch.zeros(1, 4, 4, dtype=torch.uint8)], [{"id": "u", "original_label": None}], 2)
    assert score_masks([], [], 2) == {"mean": {}, "images": []}


def test_mask_extension():
    from pathlib import Path

    assert mask_extension(Path("a.nii.gz")) == ".nii.gz"
    assert mask_extension(Path("a.jpg")) == ".png"
    assert mask_extension(Path("a.png")) == ".png"
    assert mask_extension(Path("a.nrrd")) == ".nrrd"


def test_save_png_mask_matches_the_image_orientation(tmp_path, h):
    image = read_2d(h.random_png(tmp_path / "img.png", 48, 40), "image")
    mask = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
    mask[0, 5:20, 3:9] = 1  # x 5..19, y 3..8
    path = save_mask(mask, image, tmp_path / "out", "img", ".png")
    assert path == tmp_path / "out" / "img.png"
    saved = np.asarray(Image.open(path))
    assert saved.shape == (40, 48)  # same size as the source PNG
    np.testing.assert_array_equal(saved, mask[0].numpy().T)
    # reading it back the way masks are read gives the mask again
    np.testing.assert_array_equal(read_2d(path, "mask")[0].numpy(), mask[0].numpy())


def _nifti_case(tmp_path):
    affine = np.array([[0.7, 0, 0, 10.0], [0, 1.3, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    array = np.random.default_rng(0).random((20, 24, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "scan.nii.gz")
    image = read_2d(tmp_path / "scan.nii.gz", "image")
    mask = torch.zeros(1, 20, 24, dtype=torch.uint8)
    mask[0, 2:5, 3:9] = 1
    return affine, image, mask


def test_saved_nifti_mask_keeps_affine_and_voxels(tmp_path):
    affine, image, mask = _nifti_case(tmp_path)
    path = save_mask(mask, image, tmp_path / "out", "scan", ".nii.gz")
    assert path.name == "scan.nii.gz"
    saved = nib.load(path)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(saved.dataobj))) == {0, 1}
    assert int(np.asarray(saved.dataobj).sum()) == int(mask.sum())


def test_saved_nifti_mask_has_the_image_shape(tmp_path):
    affine, image, mask = _nifti_case(tmp_path)
    saved = nib.load(save_mask(mask, image, tmp_path / "out", "scan", ".nii.gz"))
    assert saved.shape in {(20, 24), (20, 24, 1)}
    np.testing.assert_array_equal(np.asarray(saved.dataobj).reshape(20, 24), mask[0].numpy())
    np.testing.assert_allclose(saved.affine, nib.load(tmp_path / "scan.nii.gz").affine)


def test_overlay_png_is_rgb_at_image_size(tmp_path, h):
    image = read_2d(h.random_png(tmp_path / "img.png", 48, 40), "image")
    mask = torch.zeros(1, 48, 40, dtype=torch.uint8)
    mask[0, 10:30, 10:30] = 1
    path = overlay_png(image, mask, tmp_path / "overlay.png")
    overlay = Image.open(path)
    assert overlay.mode == "RGB" and overlay.size == (48, 40)
    pixels = np.asarray(overlay).astype(int)
    # inside the mask the red channel dominates; outside the image stays grey
    inside, outside = pixels[15:25, 15:25], pixels[0:5, 0:5]
    assert (inside[..., 0] > inside[..., 2]).all()
    assert (outside[..., 0] == outside[..., 1]).all() and (outside[..., 1] == outside[..., 2]).all()


def test_saved_nrrd_mask_has_the_image_grid(tmp_path):
    import itk

    volume = itk.image_from_array(np.random.default_rng(0).random((1, 20, 24)).astype(np.float32))
    volume.SetSpacing([0.5, 0.8, 2.0])
    itk.imwrite(volume, str(tmp_path / "scan.nrrd"))
    image = read_2d(tmp_path / "scan.nrrd", "image")
    mask = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
    mask[0, 2:5, 3:9] = 1
    saved = itk.imread(str(save_mask(mask, image, tmp_path / "out", "scan", ".nrrd")))
    # MONAI's writer drops the trailing singleton slice: the in-plane grid and spacing must match the image's.
    assert tuple(saved.GetLargestPossibleRegion().GetSize())[:2] == (24, 20)
    np.testing.assert_allclose(tuple(saved.GetSpacing())[:2], (0.5, 0.8))
