"""Importing an LViT-format dataset (images, 0/255 masks, CSV/Excel descriptions) into a studies folder."""

import csv

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from textdiff.data.studies import DataError, read_reports, read_studies
from textdiff.data.lvit import import_lvit, read_lvit_text

REPORTS = {
    "mask_img_1.png": "Unilateral pulmonary infection, one infected area, upper left lung.",
    "mask_img_2.png": "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
    "mask_img_3.png": "No pulmonary infection.",
}


def _lvit(tmp_path, h, text="csv", reports=REPORTS):
    images, masks = tmp_path / "Images", tmp_path / "GTs"
    for i in (1, 2, 3):
        h.random_png(images / f"img_{i}.png", 24, 20, seed=i)
        mask = np.zeros((20, 24), np.uint8)
        if i < 3:
            mask[2 : 6 * i, 3:10] = 255
            mask[15, 15] = 200  # an anti-aliased edge pixel
        h.write_png(masks / f"mask_img_{i}.png", mask)
    table = pd.DataFrame({"Image": list(reports), "Description": list(reports.values())})
    path = tmp_path / f"text.{text}"
    table.to_csv(path, index=False) if text == "csv" else table.to_excel(path, index=False)
    return images, masks, path


@pytest.mark.parametrize("text", ["csv", "xlsx"])
def test_import_lvit(tmp_path, h, text):
    images, masks, text_file = _lvit(tmp_path, h, text)
    out = tmp_path / "studies"
    assert import_lvit(images, masks, text_file, out, progress=False) == 3
    for i in (1, 2, 3):
        assert (out / f"img_{i}.png").read_bytes() == (images / f"img_{i}.png").read_bytes()
        mask = np.asarray(Image.open(out / "labels" / "final" / f"img_{i}.png"))
        source = np.asarray(Image.open(masks / f"mask_img_{i}.png"))
        assert mask.shape == source.shape
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, (source > 127).astype(np.uint8))
    assert read_reports(out) == {f"img_{i}": (REPORTS[f"mask_img_{i}.png"], None) for i in (1, 2, 3)}
    with open(out / "reports.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["image", "report", "label"]
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    # and the result is a valid studies folder
    cases = read_studies(out)
    assert [c.id for c in cases] == ["img_1", "img_2", "img_3"]
    assert all(c.label is not None for c in cases)


def test_missing_description_raises_unless_allowed(tmp_path, h):
    reports = {k: v for k, v in REPORTS.items() if k != "mask_img_2.png"}
    images, masks, text_file = _lvit(tmp_path, h, reports=reports)
    with pytest.raises(DataError, match="mask_img_2.png") as err:
        import_lvit(images, masks, text_file, tmp_path / "out", progress=False)
    assert "--allow-missing-reports" in str(err.value)
    assert not (tmp_path / "out" / "reports.csv").exists()
    assert import_lvit(images, masks, text_file, tmp_path / "out", allow_missing_reports=True, progress=False) == 3
    assert read_reports(tmp_path / "out")["img_2"] == ("", None)


def test_missing_columns_raise(tmp_path):
    path = tmp_path / "text.csv"
    pd.DataFrame({"Image": ["mask_a.png"], "Text": ["x"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="Description"):
        read_lvit_text(path)
    with pytest.raises(DataError, match="does not exist"):
        read_lvit_text(tmp_path / "absent.xlsx")


def test_empty_description_cell_becomes_empty_report(tmp_path):
    path = tmp_path / "text.csv"
    path.write_text("Image,Description\nmask_a.png,\nmask_b.png, hello \n")
    assert read_lvit_text(path) == {"mask_a.png": "", "mask_b.png": "hello"}


def test_mask_without_image_and_empty_mask_folder(tmp_path, h):
    images, masks, text_file = _lvit(tmp_path, h)
    (images / "img_3.png").unlink()
    with pytest.raises(DataError, match="mask_img_3.png"):
        import_lvit(images, masks, text_file, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no mask images"):
        import_lvit(images, tmp_path / "nomasks", text_file, tmp_path / "out2", progress=False)


def test_corrupt_mask_names_the_file(tmp_path, h):
    images, masks, text_file = _lvit(tmp_path, h)
    (masks / "mask_img_1.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="mask_img_1.png"):
        import_lvit(images, masks, text_file, tmp_path / "out", progress=False)


def test_monuseg_style_masks_named_like_their_images(tmp_path, h):
    images, masks = tmp_path / "img", tmp_path / "mask"
    h.random_png(images / "TCGA-1.png", 16, 16)
    h.write_png(masks / "TCGA-1.png", np.full((16, 16), 255, np.uint8))
    text = tmp_path / "t.csv"
    text.write_text("Image,Description\nTCGA-1.png,nuclei\n")
    assert import_lvit(images, masks, text, tmp_path / "out", progress=False) == 1
    assert np.asarray(Image.open(tmp_path / "out" / "labels" / "final" / "TCGA-1.png")).min() == 1


def test_zero_one_masks_keep_their_foreground(tmp_path, h):
    images, masks = tmp_path / "img", tmp_path / "mask"
    h.random_png(images / "a.png", 16, 16)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    h.write_png(masks / "mask_a.png", mask)
    text = tmp_path / "t.csv"
    text.write_text("Image,Description\nmask_a.png,hello\n")
    import_lvit(images, masks, text, tmp_path / "out", progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "labels" / "final" / "a.png")), mask)


def test_mask_is_paired_with_the_image_of_the_same_id(tmp_path, h):
    images, masks = tmp_path / "img", tmp_path / "mask"
    h.random_png(images / "a.png", 16, 16, seed=1)
    h.random_png(images / "a.b.png", 16, 16, seed=2)
    h.write_png(masks / "mask_a.png", np.zeros((16, 16), np.uint8))
    text = tmp_path / "t.csv"
    text.write_text("Image,Description\nmask_a.png,hello\n")
    import_lvit(images, masks, text, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "labels" / "final" / "a.png").exists()
    assert (tmp_path / "out" / "a.png").read_bytes() == (images / "a.png").read_bytes()


def test_tiff_images_named_png_in_the_text_and_two_folders_into_one(tmp_path, h):
    """MoNuSeg's test images are TIFF while its text file names .png; Train and Val import into one pool."""
    images, masks, text_file = _lvit(tmp_path, h)
    tiffs = tmp_path / "tiff_images"
    tiffs.mkdir()
    for path in images.glob("*.png"):
        Image.open(path).convert("RGB").save(tiffs / f"{path.stem}.tif")
    out = tmp_path / "studies"
    assert import_lvit(tiffs, masks, text_file, out, progress=False) == 3
    assert sorted(p.name for p in out.glob("img_*")) == ["img_1.tif", "img_2.tif", "img_3.tif"]
    cases = read_studies(out)
    assert [c.image.suffix for c in cases] == [".tif"] * 3 and all(c.label is not None for c in cases)
    # a second folder (other ids) adds to the first instead of replacing its reports
    other = tmp_path / "other"
    h.random_png(other / "img" / "val_1.png", 24, 20)
    h.write_png(other / "masks" / "val_1.png", np.full((20, 24), 255, np.uint8))
    pd.DataFrame({"Image": ["val_1.png"], "Description": ["The nuclei are evenly distributed."]}).to_csv(
        other / "text.csv", index=False)
    assert import_lvit(other / "img", other / "masks", other / "text.csv", out, progress=False) == 1
    reports = read_reports(out)
    assert len(reports) == 4 and reports["val_1"][0] == "The nuclei are evenly distributed."
    assert reports["img_1"][0] == REPORTS["mask_img_1.png"]
