"""Studies folder -> DICOM (no PACS needed): identifiers, geometry, the report, SEG masks, and refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from textdiff.cli import main as textdiff_cli
from textdiff.data.studies import DataError, read_studies
from textdiff.data.dicom import export_studies, image_datasets, mask_on_sources, seg_dataset, seg_to_mask, uid_for

LABELS = ["background", "infection"]


def test_uids_are_valid_and_reproducible():
    uid = uid_for("case_0001", "study")
    assert uid == uid_for("case_0001", "study") != uid_for("case_0001", "series")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


def test_export_of_a_2d_study_keeps_pixels_report_and_mask(sample_dir, tmp_path):
    studies = sample_dir / "train"
    exported = {s.image_id: s for s in export_studies(studies, tmp_path / "dicom", LABELS, progress=False)}
    cases = {c.id: c for c in read_studies(studies)}
    assert set(exported) == set(cases)
    for key, case in cases.items():
        ds = pydicom.dcmread(exported[key].files[0])
        assert (ds.PatientID, ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID) == (
            key, "DX", uid_for(key, "study"), uid_for(key, "series"))
        assert str(getattr(ds, "ImageComments", "")) == case.report
        np.testing.assert_array_equal(ds.pixel_array, sitk.GetArrayFromImage(sitk.ReadImage(str(case.image))))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))) if case.label else None
        if mask is not None and mask.any():  # SEG holds only non-empty masks
            seg = pydicom.dcmread(exported[key].seg_file)
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ds.SeriesInstanceUID
            np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_to_mask(seg))[0], mask)
        else:
            assert exported[key].seg_file is None


def test_a_volume_becomes_one_instance_per_slice_in_physical_order(tmp_path):
    volume = sitk.GetImageFromArray(np.arange(3 * 8 * 6, dtype=np.int16).reshape(3, 8, 6))
    volume.SetSpacing((0.7, 0.8, 2.5))
    volume.SetOrigin((10.0, -5.0, 30.0))
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(volume, str(path))
    datasets = image_datasets("vol", path, "report", volume_modality="MR")
    assert [ds.Modality for ds in datasets] == ["MR"] * 3
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [30.0, 32.5, 35.0]
    assert [float(v) for v in datasets[0].PixelSpacing] == pytest.approx([0.8, 0.7])
    assert datasets[1].pixel_array.tolist() == sitk.GetArrayFromImage(volume)[1].tolist()
    mask = sitk.Image(volume.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(volume)
    mask[2, 3, 1] = 1
    seg = seg_dataset(mask, datasets, LABELS)
    back = sitk.GetArrayFromImage(seg_to_mask(seg))
    assert back.shape == (3, 8, 6) and back[1, 3, 2] == 1 and back.sum() == 1


def test_float_images_are_rescaled_losslessly_enough(tmp_path):
    values = np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "float.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(values[None]), str(path))
    ds = image_datasets("f", path, "")[0]
    restored = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(restored, values, atol=1e-4)


def test_colour_image_becomes_rgb_dicom_with_its_seg(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)  # rows, columns, RGB
    Image.fromarray(rgb).save(tmp_path / "he.tif")
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 3:9] = 1
    Image.fromarray(mask).save(tmp_path / "he-mask.png")
    (ds,) = image_datasets("he", tmp_path / "he.tif", "The nuclei are evenly distributed.")
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Modality) == (3, "RGB", "OT")
    assert (ds.Rows, ds.Columns) == (12, 16) and "RescaleSlope" not in ds
    written = tmp_path / "he.dcm"
    ds.save_as(written, write_like_original=False)
    assert np.array_equal(pydicom.dcmread(written).pixel_array, rgb)
    seg = seg_dataset(mask_on_sources(tmp_path / "he-mask.png", [ds]), [ds], ["background", "nucleus"])
    assert seg.SegmentSequence[0].SegmentLabel == "nucleus"
    assert np.array_equal(sitk.GetArrayFromImage(seg_to_mask(seg))[0], mask)


def test_refusals_name_the_problem(tmp_path, sample_dir):
    with pytest.raises(DataError, match="modality"):
        image_datasets("x", next((sample_dir / "train").glob("*.png")), "", volume_modality="PT")
    case = next(c for c in read_studies(sample_dir / "train") if c.label is not None)
    sources = image_datasets(case.id, case.image, case.report)
    empty = tmp_path / "empty.png"
    sitk.WriteImage(sitk.Image(*sitk.ReadImage(str(case.image)).GetSize(), sitk.sitkUInt8), str(empty))
    with pytest.raises(DataError, match="empty"):
        seg_dataset(mask_on_sources(empty, sources), sources, LABELS)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        image_datasets("c", tmp_path / "corrupt.png", "")


def test_cli_export_and_an_unreachable_pacs(sample_dir, tmp_path, capsys):
    out = tmp_path / "dicom"
    code = textdiff_cli(["export-dicom", "--data", str(sample_dir / "train"), "--out", str(out),
                         "--stow", "http://127.0.0.1:9/dicom-web"])
    assert code == 2 and "STOW-RS upload" in capsys.readouterr().err
    assert len(list(out.glob("*/*.dcm"))) == len(read_studies(sample_dir / "train"))
