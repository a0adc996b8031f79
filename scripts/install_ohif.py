"""Install the OHIF viewer the app serves at /viewer/: the prebuilt `@ohif/app` from npm (its `dist/` is the whole
static site, nothing to compile), pinned by version and checked against the registry's sha512.

The build assumes it is served at the site root (`window.PUBLIC_URL="/"`, absolute asset paths, webpack's public
path "/"), so those few strings are rewritten to /viewer/; the app serves its own `app-config.js` in place of the
shipped one. Safe to run again: it returns at once when this version, installed by this script, is there.

    python3 scripts/install_ohif.py [--dest apps/textdiff/viewer]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "3.13.2"
TARBALL = f"https://registry.npmjs.org/@ohif/app/-/app-{VERSION}.tgz"
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
PREFIX = "/viewer/"
# The onnxruntime-web files behind OHIF's in-browser AI tools (136 MB): this app's models run on the server.
LEFT_OUT = ("package/dist/ort/",)
WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/";'
DEFAULT = Path(__file__).resolve().parents[1] / "apps" / "textdiff" / "viewer"


def download() -> bytes:
    with urllib.request.urlopen(TARBALL, timeout=120) as answer:
        data = answer.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        raise SystemExit(f"error: {TARBALL} does not match its pinned sha512 (got {digest})")
    return data


def extract(data: bytes, folder: Path) -> None:
    """`package/dist/*` into `folder`, refusing any member that would land outside it."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if not member.name.startswith("package/dist/") or member.name.startswith(LEFT_OUT):
                continue
            if not (member.isfile() or member.isdir()) or ".." in Path(member.name).parts:
                raise SystemExit(f"error: unexpected member {member.name!r} in {TARBALL}")
            member.name = member.name[len("package/dist/"):]
            archive.extract(member, folder)


def serve_under_prefix(folder: Path) -> None:
    """Point the page and webpack's chunk loader at /viewer/ instead of the site root."""
    index = folder / "index.html"
    html = index.read_text()
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"')
    html = html.replace('href="/', f'href="{PREFIX}').replace('src="/', f'src="{PREFIX}')
    index.write_text(html)
    patched = 0
    for bundle in folder.glob("*.js"):
        text = bundle.read_text()
        if WEBPACK_PUBLIC_PATH in text:
            bundle.write_text(text.replace(WEBPACK_PUBLIC_PATH, f'__webpack_require__.p = "{PREFIX}";'))
            patched += 1
    for sheet in folder.glob("*.css"):  # fonts
        sheet.write_text(sheet.read_text().replace("url(/", f"url({PREFIX}"))
    if patched == 0 or f'window.PUBLIC_URL="{PREFIX}"' not in html:
        raise SystemExit("error: the OHIF build does not look as expected; cannot serve it under " + PREFIX)
    (folder / "app-config.js").unlink()  # the app answers /viewer/app-config.js with its own, locked-down config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT)
    dest = parser.parse_args(argv).dest.resolve()
    marker, installed = dest / "INSTALLED", f"@ohif/app {VERSION}, {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}"
    if marker.is_file() and marker.read_text().strip() == installed:  # this version, by this very installer
        return 0
    print(f"installing OHIF {VERSION} (@ohif/app from npm) into {dest}")
    work = Path(tempfile.mkdtemp(prefix=".ohif-", dir=dest.parent))
    try:
        extract(download(), work)
        serve_under_prefix(work)
        (work / "INSTALLED").write_text(installed + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)  # whole or not at all: a failed install leaves the previous one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
