"""Reading studies folders and images/masks/reports, with clear DataErrors for bad input."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from textdiff.data.studies import (
    MAX_REPORT_CHARS, Case, DataError, check_drawn_in_slices, check_report, image_id, load_case, read_2d, read_reports,
    read_studies, write_reports,
)


def _studies(tmp_path, h):
    """a.png (mask + report), b.png (report, no mask), c.png (mask, no report)."""
    folder = tmp_path / "studies"
    for i, name in enumerate("abc"):
        h.random_png(folder / f"{name}.png", 40, 30, seed=i)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:12, 8:20] = 1
    h.write_png(folder / "labels" / "final" / "a.png", mask)
    h.write_png(folder / "labels" / "final" / "c.png", np.zeros((30, 40), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    with open(folder / "reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report", "label"])
        writer.writerow(["a.png", "  Unilateral pulmonary infection, one infected area, upper left lung. ", "infection"])
        writer.writerow(["b.png", "No pulmonary infection.", "normal"])
    return folder


def test_image_id_strips_double_extensions():
    assert image_id("x/case_1.nii.gz") == "case_1"
    assert image_id("case.2.PNG") == "case.2"
    assert image_id("scan.nrrd") == "scan"
    assert image_id("file.tif") == "file"


def test_read_studies_finds_images_masks_and_reports(tmp_path, h):
    folder = _studies(tmp_path, h)
    cases = read_studies(folder)
    assert [c.id for c in cases] == ["a", "b", "c"]
    a, b, c = cases
    assert a.label == folder / "labels" / "final" / "a.png"
    assert b.label is None
    assert c.label == folder / "labels" / "final" / "c.png"
    assert a.report == "Unilateral pulmonary infection, one infected area, upper left lung."  # stripped
    assert (a.image_label, b.image_label) == ("infection", "normal")
    assert c.report == "" and c.image_label is None  # an image without a report gets the empty text


def test_read_studies_errors(tmp_path, h):
    with pytest.raises(DataError, match="does not exist"):
        read_studies(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        read_studies(tmp_path / "empty")


def test_load_case_shapes_and_ranges(tmp_path, h):
    folder = _studies(tmp_path, h)
    item = load_case(read_studies(folder)[0], 32, 1, 2)
    assert item["id"] == "a"
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert item["image"].min() < -0.5 and item["image"].max() > 0.5  # uses the range
    assert item["original_shape"] == (40, 30)  # MONAI's (x, y) indexing of a 40 wide, 30 high PNG
    assert item["label"].shape == (1, 32, 32) and item["label"].dtype == torch.long
    assert set(item["label"].unique().tolist()) == {0, 1}
    assert item["original_label"].shape == (1, 40, 30)
    assert int(item["original_label"].sum()) == 7 * 12
    unlabeled = load_case(read_studies(folder)[1], 32, 1, 2)
    assert unlabeled["label"] is None and unlabeled["original_label"] is None
    assert unlabeled["report"] == "No pulmonary infection."
    # grey images can feed a 3-channel backbone
    assert load_case(read_studies(folder)[1], 32, 3, 2)["image"].shape == (3, 32, 32)


def test_grey_stored_as_rgb_feeds_a_grey_backbone_but_colour_is_refused(tmp_path, h):
    grey = np.random.default_rng(0).integers(0, 256, size=(30, 40), dtype=np.uint8)
    path = h.write_png(tmp_path / "grey-rgb.png", np.stack([grey] * 3, axis=-1))
    item = load_case(Case("grey-rgb", path), 32, 1, 2)
    assert item["image"].shape == (1, 32, 32)
    assert item["original_shape"] == (40, 30)
    colour = h.write_png(tmp_path / "he.png", np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="he.png' is in colour but the backbone reads grey"):
        load_case(Case("he", colour), 32, 1, 2)
    assert load_case(Case("he", colour), 32, 3, 2)["image"].shape == (3, 32, 32)


def test_corrupt_image_names_the_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="x.png") as err:
        load_case(Case("x", path), 32, 1, 2)
    assert "corrupt" in str(err.value)


def test_missing_image_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_2d(tmp_path / "gone.png", "image")


def test_mask_of_wrong_size(tmp_path, h):
    image = h.random_png(tmp_path / "a.png", 40, 30)
    mask = h.write_png(tmp_path / "labels" / "a.png", np.zeros((30, 41), np.uint8))
    with pytest.raises(DataError, match="a.png' is") as err:
        load_case(Case("a", image, mask), 32, 1, 2)
    assert "(41, 30)" in str(err.value) and "(40, 30)" in str(err.value)


@pytest.mark.parametrize("value, hint", [(7, False), (255, True)])
def test_mask_with_unknown_label_value(tmp_path, h, value, hint):
    image = h.random_png(tmp_path / "a.png", 40, 30)
    array = np.zeros((30, 40), np.uint8)
    array[:4, :4] = value
    mask = h.write_png(tmp_path / "labels" / "m.png", array)
    with pytest.raises(DataError, match="m.png") as err:
        load_case(Case("a", image, mask), 32, 1, 2)
    message = str(err.value)
    assert str(value) in message and "0..1" in message
    assert ("import-lvit" in message) == hint


def test_multiclass_mask_is_accepted_with_enough_classes(tmp_path, h):
    image = h.random_png(tmp_path / "a.png", 40, 30)
    array = np.zeros((30, 40), np.uint8)
    array[:4, :4] = 2
    mask = h.write_png(tmp_path / "m.png", array)
    item = load_case(Case("a", image, mask), 32, 1, 3)
    assert set(item["original_label"].unique().tolist()) == {0, 2}


def test_check_report():
    assert check_report(None, "here") == ""
    assert check_report(float("nan"), "here") == ""
    assert check_report("  text \n", "here") == "text"
    with pytest.raises(DataError, match="row 3: the report must be text"):
        check_report(42, "row 3")
    with pytest.raises(DataError, match=f"at most {MAX_REPORT_CHARS}"):
        check_report("x" * (MAX_REPORT_CHARS + 1), "row 4")


def test_reports_csv_errors_name_the_file(tmp_path):
    (tmp_path / "reports.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(DataError, match="needs columns 'image' and 'report'") as err:
        read_reports(tmp_path)
    assert "reports.csv" in str(err.value)
    (tmp_path / "reports.csv").write_text("image,report\na.png,hello\nb.png," + "y" * (MAX_REPORT_CHARS + 5) + "\n")
    with pytest.raises(DataError, match="line 3"):
        read_reports(tmp_path)


def test_reports_csv_round_trip(tmp_path):
    rows = {"b": ("No pulmonary infection.", "normal"), "a": ('Text, with "quotes", commas', None)}
    write_reports(tmp_path, rows, {"a": "a.nii.gz", "b": "b.png"})
    assert read_reports(tmp_path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["reports.csv"]


def test_reports_csv_without_file_is_empty(tmp_path):
    assert read_reports(tmp_path) == {}


def test_reports_csv_with_byte_order_mark(tmp_path):
    (tmp_path / "reports.csv").write_bytes("image,report\na.png,hello\n".encode("utf-8-sig"))
    assert read_reports(tmp_path) == {"a": ("hello", None)}


def test_single_slice_nifti_loads_as_2d(tmp_path):
    array = np.random.default_rng(0).random((20, 24, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([0.7, 1.3, 2.5, 1.0])), tmp_path / "s.nii.gz")
    image = read_2d(tmp_path / "s.nii.gz", "image")
    assert image.shape == (1, 20, 24)
    np.testing.assert_allclose(image[0].numpy(), array[..., 0])
    item = load_case(Case("s", tmp_path / "s.nii.gz"), 32, 1, 2)
    assert item["image"].shape == (1, 32, 32) and item["original_shape"] == (20, 24)


def test_single_slice_nrrd_loads_as_2d(tmp_path):
    import itk

    array = np.random.default_rng(1).random((1, 20, 24)).astype(np.float32)  # itk order: z, y, x
    volume = itk.image_from_array(array)
    volume.SetSpacing([0.5, 0.8, 2.0])
    itk.imwrite(volume, str(tmp_path / "s.nrrd"))
    image = read_2d(tmp_path / "s.nrrd", "image")
    assert image.shape == (1, 24, 20)
    np.testing.assert_allclose(image[0].numpy(), array[0].T)


def test_true_volume_is_rejected(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(DataError, match=r"v.nii.gz' has spatial shape \(8, 8, 3\)"):
        read_2d(tmp_path / "v.nii.gz", "image")


def test_constant_image_stays_in_range(tmp_path, h):
    path = h.write_png(tmp_path / "flat.png", np.full((30, 40), 77, np.uint8))
    image = load_case(Case("flat", path), 32, 1, 2)["image"]
    assert torch.isfinite(image).all() and image.min() >= -1 and image.max() <= 1


def test_sixteen_bit_grey_png_uses_its_whole_range(tmp_path, h):
    ramp = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # up to 59950: beyond 8 bits
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16") or Image.open(path).mode == "I"
    item = load_case(Case("ramp16", path), 32, 1, 2)
    assert item["image"].shape == (1, 32, 32)
    assert item["image"].min() == -1.0 and item["image"].max() == 1.0
    assert len(torch.unique(item["image"])) > 256  # the 16-bit steps survive, not 8-bit ones


def test_multi_page_tiff_is_a_volume_of_planes(tmp_path):
    from textdiff.data.studies import read_planes

    frames = [Image.fromarray(np.full((6, 8), 40 * z, np.uint8)) for z in range(4)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    planes = read_planes(tmp_path / "stack.tif", "image")
    assert len(planes) == 4 and all(p.shape == (1, 8, 6) for p in planes)
    assert [int(p.max()) for p in planes] == [0, 40, 80, 120]
    with pytest.raises(DataError, match="volumes go slice by slice"):
        read_2d(tmp_path / "stack.tif", "image")


def _drawn(*regions):
    mask = torch.zeros(1, 20, 24, 30, dtype=torch.uint8)
    for region in regions:
        mask[(0, *region)] = 1
    return [mask[..., z] for z in range(30)]


@pytest.mark.parametrize("what, regions, refused", [
    ("three axial slices", [(slice(5, 15), slice(5, 20), z) for z in (3, 10, 20)], False),
    ("one axial slice", [(slice(5, 15), slice(5, 20), 10)], False),
    ("a structure drawn whole", [(slice(5, 15), slice(5, 20), slice(4, 25))], False),
    ("two structures apart", [(slice(2, 6), slice(5, 20), slice(4, 25)), (slice(12, 18), slice(5, 20), slice(4, 25))],
     False),
    ("three coronal slices", [(slice(5, 15), y, slice(4, 25)) for y in (3, 10, 20)], True),
    ("one sagittal slice", [(9, slice(5, 20), slice(4, 25))], True),
])
def test_a_volume_drawn_across_the_slices_the_model_reads_is_refused(what, regions, refused):
    if refused:
        with pytest.raises(DataError, match="draw in those slices"):
            check_drawn_in_slices(_drawn(*regions), "mask.nii.gz")
    else:
        check_drawn_in_slices(_drawn(*regions), "mask.nii.gz")
