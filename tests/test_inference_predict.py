"""Segmentation at each image's own size, Dice/IoU scoring, and writing masks with the image's geometry."""

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from textdiff.data.studies import Case, DataError, read_2d
from textdiff.model.features import FeatureCache
from textdiff.evaluation import label_map, score_masks, segment_items
from textdiff.inference import segment_image
from textdiff.writers import mask_extension, overlay_png, save_mask


def test_segment_items_returns_masks_at_original_sizes(make_model, tmp_path, h):
    model = make_model()
    sizes = [(48, 40), (30, 50), (32, 32)]  # PIL (width, height)
    items = [
        model.load(Case(f"i{n}", h.random_png(tmp_path / f"i{n}.png", w, hh, seed=n))) | {"report": h.normal}
        for n, (w, hh) in enumerate(sizes)
    ]
    masks = segment_items(model, items)
    assert len(masks) == 3
    for mask, item, (w, hh) in zip(masks, items, sizes):
        assert mask.shape == (1, *item["original_shape"]) == (1, w, hh)
        assert mask.dtype == torch.uint8
        assert set(mask.unique().tolist()) <= {0, 1}
    # the same masks come out through a filled cache
    cache = FeatureCache(model.extractor)
    for a, b in zip(masks, segment_items(model, items, cache=cache)):
        assert torch.equal(a, b)


def test_label_map_upsamples_and_takes_argmax():
    logits = torch.zeros(2, 4, 4)
    logits[1, :2, :] = 1.0  # top half foreground
    mask = label_map(logits, (8, 6))
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


def test_mask_extension(tmp_path):
    from pathlib import Path

    assert mask_extension(Path("a.nii.gz")) == ".nii.gz"
    assert mask_extension(Path("a.jpg")) == ".png"
    assert mask_extension(Path("a.bmp")) == ".png"
    assert mask_extension(Path("a.png")) == ".png"
    assert mask_extension(Path("a.nrrd")) == ".nrrd"
    assert mask_extension(Path("a.dcm")) == ".nrrd"
    frames = [Image.fromarray(np.full((6, 8), v, np.uint8)) for v in (0, 80, 160)]
    frames[0].save(tmp_path / "tile.tif")
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    assert mask_extension(tmp_path / "tile.tif") == ".png"
    assert mask_extension(tmp_path / "stack.tif") == ".nrrd"  # a multi-page TIFF is a volume


def test_save_png_mask_matches_the_image_orientation(tmp_path, h):
    image = read_2d(h.random_png(tmp_path / "img.png", 48, 40), "image")
    mask = torch.zeros(1, *image.shape[1:], dtype=torch.uint8)
    mask[0, 5:20, 3:9] = 1  # x 5..19, y 3..8
    path = save_mask(mask, tmp_path / "img.png", tmp_path / "out" / "img.png")
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
    path = save_mask(mask, tmp_path / "scan.nii.gz", tmp_path / "out" / "scan.nii.gz")
    assert path.name == "scan.nii.gz"
    saved = nib.load(path)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(saved.dataobj))) == {0, 1}
    assert int(np.asarray(saved.dataobj).sum()) == int(mask.sum())


def test_saved_nifti_mask_has_the_image_shape(tmp_path):
    affine, image, mask = _nifti_case(tmp_path)
    saved = nib.load(save_mask(mask, tmp_path / "scan.nii.gz", tmp_path / "out" / "scan.nii.gz"))
    assert saved.shape == (20, 24, 1)
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


def _itk_geometry(image) -> tuple:
    """Size, spacing, origin, direction, rounded so that float32 file headers compare equal."""
    return (tuple(image.GetLargestPossibleRegion().GetSize()), np.round(tuple(image.GetSpacing()), 5).tolist(),
            np.round(tuple(image.GetOrigin()), 5).tolist(), itk.array_from_matrix(image.GetDirection()).round(5).tolist())


@pytest.mark.parametrize("source", [".nrrd", ".nii.gz", ".png", ".dcm"])
@pytest.mark.parametrize("target", [".nrrd", ".nii.gz"])
def test_saved_mask_lies_on_the_image_in_any_format(tmp_path, h, source, target):
    """Whatever the image and mask formats, the mask has the image's ITK grid and its voxels sit where the image's
    bright pixels are (checks the index order as well as the geometry)."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((20, 24)) * 100).astype(np.uint8)  # ITK order (y, x)
    pixels[3:7, 15:22] = 255
    if source == ".png":
        Image.fromarray(pixels).save(tmp_path / "img.png")
    elif source == ".dcm":
        h.write_dicom(tmp_path / "img.dcm", pixels)
    else:
        volume = itk.image_from_array(pixels[None].astype(np.float32))
        volume.SetSpacing([0.5, 0.8, 2.0])
        volume.SetOrigin([10.0, -4.0, 7.5])
        volume.SetDirection(itk.matrix_from_array(np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])))
        itk.imwrite(volume, str(tmp_path / f"img{source}"))
    reference = tmp_path / f"img{source}"
    image = read_2d(reference, "image")
    mask = (image[:1] > 200).to(torch.uint8)  # in MONAI's index order, as the model's masks are
    saved = itk.imread(str(save_mask(mask, reference, tmp_path / f"mask{target}")))
    original = itk.imread(str(reference))
    assert _itk_geometry(saved) == _itk_geometry(original)
    np.testing.assert_array_equal(itk.array_from_image(saved).reshape(20, 24), (pixels == 255).astype(np.uint8))


def test_a_volume_mask_cannot_be_a_png(tmp_path):
    itk.imwrite(itk.image_from_array(np.zeros((3, 8, 8), np.float32)), str(tmp_path / "vol.nrrd"))
    with pytest.raises(DataError, match="volume"):
        save_mask(np.zeros((1, 8, 8, 3)), tmp_path / "vol.nrrd", tmp_path / "m.png")


def test_a_mask_of_the_wrong_size_is_refused(tmp_path, h):
    with pytest.raises(DataError, match="does not fit"):
        save_mask(np.zeros((1, 5, 5)), h.random_png(tmp_path / "img.png", 48, 40), tmp_path / "m.png")


@pytest.mark.parametrize("shape", [(40, 48), (40, 48, 1), (40, 48, 5)])
def test_segment_image_gives_a_mask_of_the_image_shape(make_model, h, shape):
    """2D images, single-slice files and volumes (slice by slice) all get a label map of exactly their shape."""
    model = make_model()
    image = torch.rand(1, *shape)
    mask = segment_image(model, image, h.infected)
    assert mask.shape == (1, *shape) and mask.dtype == torch.uint8
    assert set(mask.unique().tolist()) <= {0, 1}


def test_segment_image_volume_equals_its_slices_one_by_one(make_model, h):
    model = make_model()
    volume = torch.rand(1, 40, 48, 3)
    whole = segment_image(model, volume, h.infected)
    for z in range(3):
        torch.testing.assert_close(whole[..., z], segment_image(model, volume[..., z], h.infected))


def test_a_blank_slice_of_a_volume_is_background_without_a_backbone_pass(make_model, h):
    """Slices outside the body (one value throughout) cost nothing and draw nothing."""
    model = make_model()
    volume = torch.rand(1, 40, 48, 3)
    volume[..., 1] = 0.0
    calls, handle = h.count_calls(model.extractor.unet)
    try:
        mask = segment_image(model, volume, h.infected)
    finally:
        handle.remove()
    assert mask[..., 1].sum() == 0
    torch.testing.assert_close(mask[..., 2], segment_image(model, volume[..., 2], h.infected))
    assert sum(calls) == 2 * len(model.cfg.backbone.timesteps)  # two slices, one pass per noise step


def test_a_volume_logs_its_progress_with_the_blank_slices_it_skipped(make_model, h, caplog):
    model = make_model()
    volume = torch.rand(1, 40, 48, 3)
    volume[..., 0] = 0.0
    with caplog.at_level("INFO", logger="textdiff.progress"):
        segment_image(model, volume, h.infected)
    assert any("segmented 3/3 slices (1 blank, skipped)" in line for line in caplog.messages), caplog.messages


def test_fast_reading_is_bfloat16_only_where_the_cpu_computes_it(make_model, h, monkeypatch):
    """On a CPU without native bfloat16 the fast path is float32 exactly; with it, nearly the same mask."""
    from textdiff import inference

    model = make_model()
    image = torch.rand(1, 40, 48)
    reference = segment_image(model, image, h.infected, fast=False)
    monkeypatch.setattr(inference, "native_bfloat16", lambda: False)
    torch.testing.assert_close(segment_image(model, image, h.infected), reference)
    monkeypatch.setattr(inference, "native_bfloat16", lambda: True)
    fast = segment_image(model, image, h.infected)
    assert fast.shape == reference.shape and (fast != reference).float().mean() < 0.1


def test_a_volumes_slices_read_side_by_side_give_the_mask_of_one_at_a_time(make_model, h, monkeypatch):
    """Slices (and their windows) read two at a time on the CPU, each in the caller's precision: the same mask as one
    at a time, voxel for voxel."""
    from textdiff.model import backbone

    model, volume = make_model(), torch.rand(1, 40, 48, 5)
    volume[..., 2] = 0.0
    side_by_side = [segment_image(model, volume, h.infected, fast=fast) for fast in (False, True)]
    monkeypatch.setattr(backbone, "SIDE_BY_SIDE", 1)
    for fast, mask in zip((False, True), side_by_side):
        assert torch.equal(segment_image(model, volume, h.infected, fast=fast), mask)


def test_fast_reading_reads_a_volumes_slices_in_windows_side_by_side(make_model, h, monkeypatch):
    """A volume served fast: windows side by side (half the passes of a 256² slice); a 2D image, and every image in
    the float32 reading, keeps the model's overlap."""
    from textdiff import inference

    model, overlaps, real = make_model(), [], inference.sliding_logits
    monkeypatch.setattr(inference, "sliding_logits",
                        lambda item, window, overlap, read: overlaps.append(overlap) or real(item, window, overlap, read))
    segment_image(model, torch.rand(1, 40, 48, 2), h.infected)
    segment_image(model, torch.rand(1, 40, 48), h.infected)
    segment_image(model, torch.rand(1, 40, 48, 2), h.infected, fast=False)
    own = model.cfg.backbone.window_overlap
    assert own > 0 and overlaps == [0.0, 0.0, own, own, own]


def test_a_dx_file_with_only_pixel_spacing_gets_its_mask_at_that_spacing(tmp_path, h, make_model):
    """ITK reads a DX file's spacing from ImagerPixelSpacing only; PixelSpacing alone must not become 1 mm."""
    path = h.write_dicom(tmp_path / "dx.dcm", np.zeros((30, 40), np.uint16), spacing=(0.2, 0.3))
    ds = pydicom.dcmread(path)
    ds.Modality, ds.SOPClassUID = "DX", "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(path, write_like_original=False)
    mask = torch.zeros(1, 40, 30, dtype=torch.uint8)
    out = save_mask(mask, path, tmp_path / "dx-mask.nrrd")
    assert np.allclose(tuple(itk.imread(str(out)).GetSpacing())[:2], (0.3, 0.2))  # columns, rows
