"""Unpacking an uploaded archive without letting it write outside its folder or fill the disk.

MONAI Label 0.8.5 unpacks session uploads with `shutil.unpack_archive`, which on Python 3.11 follows `../` names.
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from textdiff.errors import DataError


class ArchiveError(DataError):
    """An archive that is not one, or that would write outside its folder or more bytes than allowed."""


def extract(archive: Path, target: Path, max_bytes: int) -> None:
    """Unpack a tar (any compression) or zip `archive` into `target`; ArchiveError for an unsafe one."""
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _check([(m.name, m.size) for m in tar.getmembers()], max_bytes)
            try:
                tar.extractall(target, filter="data")  # also refuses links that point outside and device files
            except tarfile.FilterError as err:
                raise ArchiveError(f"refused archive member: {err}") from err
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            _check([(i.filename, i.file_size) for i in zipped.infolist()], max_bytes)
            zipped.extractall(target)
    else:
        raise ArchiveError("not a tar or zip archive")


def _check(members: list[tuple[str, int]], max_bytes: int) -> None:
    """Every (name, size) stays inside the archive's folder, and all together within `max_bytes`."""
    total = sum(size for _, size in members)
    if total > max_bytes:
        raise ArchiveError(f"the archive unpacks to {total:,} bytes: at most {max_bytes:,}")
    for name, _ in members:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise ArchiveError(f"refused archive member '{name}': it would be written outside the archive's folder")
