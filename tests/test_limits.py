"""Header-only image size checks, safe archive unpacking and offline weight sources."""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image
from textdiff import sources
from textdiff.data.studies import ImageTooLarge, image_extent, read_image

sys.path.insert(0, str(Path(__file__).parents[1] / "apps" / "textdiff"))
from lib.archives import ArchiveError, extract  # noqa: E402


def test_a_huge_png_is_refused_from_its_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (13000, 13000)).save(path)
    assert path.stat().st_size < 1 << 20
    assert image_extent(path) == (13000, 13000, 1)
    with pytest.raises(ImageTooLarge, match="13000x13000"):
        read_image(path, "image")


def test_image_extent_reads_volumes_and_colour_tiffs(tmp_path):
    nibabel.save(nibabel.Nifti1Image(np.zeros((64, 48, 5), np.uint8), np.eye(4)), tmp_path / "v.nii.gz")
    Image.new("RGB", (30, 20)).save(tmp_path / "c.tif")
    assert image_extent(tmp_path / "v.nii.gz") == (64, 48, 5)
    assert image_extent(tmp_path / "c.tif") == (20, 30, 1)
    assert read_image(tmp_path / "c.tif", "image").shape[0] == 3


def _tar(*names: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            member = tarfile.TarInfo(name)
            member.size = 1
            tar.addfile(member, io.BytesIO(b"x"))
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../escaped.txt", "a/../../escaped.txt", "/tmp/escaped.txt"])
def test_an_archive_member_leaving_its_folder_is_refused(tmp_path, name):
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(_tar("fine.txt", name))
    with pytest.raises(ArchiveError, match="outside"):
        extract(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "escaped.txt").exists()


def test_archives_unpack_inside_their_folder_within_the_byte_limit(tmp_path):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("images/a.png", b"x" * 100)
    extract(archive, tmp_path / "out", max_bytes=1000)
    assert (tmp_path / "out" / "images" / "a.png").stat().st_size == 100
    with pytest.raises(ArchiveError, match="at most 10"):
        extract(archive, tmp_path / "small", max_bytes=10)
    (tmp_path / "plain.txt").write_text("not an archive")
    with pytest.raises(ArchiveError, match="not a tar or zip"):
        extract(tmp_path / "plain.txt", tmp_path / "other", max_bytes=1000)


def test_weights_come_from_a_folder_unless_the_hub_is_asked_for_by_name(tmp_path):
    assert sources.resolve(tmp_path, "backbone") == (str(tmp_path), False)
    assert sources.resolve("hf:google/ddpm-cifar10-32", "backbone") == ("google/ddpm-cifar10-32", True)
    with pytest.raises(FileNotFoundError, match="no backbone folder 'google/ddpm-cifar10-32'"):
        sources.resolve("google/ddpm-cifar10-32", "backbone")


def test_remote_clients_are_answered_from_trusted_networks_or_with_a_login():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib.endpoints.local_only import LocalOnly, trusted_networks

    server = FastAPI()
    server.get("/ping")(lambda: {"ok": True})
    trusted = trusted_networks("10.0.0.0/8, 2001:db8::/32")
    cases = [("10.1.2.3", False, 200), ("::ffff:10.1.2.3", False, 200), ("2001:db8::5", False, 200),
             ("198.51.100.7", False, 403), ("198.51.100.7", True, 200), ("127.0.0.1", False, 200)]
    for host, login, status in cases:
        answer = TestClient(LocalOnly(server, trusted, login), client=(host, 5000)).get("/ping")
        assert answer.status_code == status, (host, login)
    with pytest.raises(ValueError, match="'10.0.0.300/8' is not a network"):
        trusted_networks("10.0.0.0/8,10.0.0.300/8")
