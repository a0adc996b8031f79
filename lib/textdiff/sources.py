"""Where pretrained weights come from: a local folder, or the Hugging Face hub only when the user asks for it.

A hospital server is offline, and a typo in a folder name must say "no such folder", not try huggingface.co.
A hub id is therefore written `hf:<org>/<name>`; anything else is a folder that must exist.
"""

from __future__ import annotations

from pathlib import Path
from textdiff.errors import DataError

HUB_PREFIX = "hf:"


def resolve(source: str | Path, what: str) -> tuple[str, bool]:
    """(folder or hub id, True when it is a hub id); FileNotFoundError for a folder that does not exist."""
    source = str(source)
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX):], True
    if not Path(source).is_dir():
        raise FileNotFoundError(f"no {what} folder '{source}' (to download one from the Hugging Face hub, write "
                                f"{HUB_PREFIX}<org>/<name>)")
    return source, False


CHECKPOINT_SUFFIXES = (".pt", ".pth")


def is_checkpoint_file(source: str | Path) -> bool:
    """A single weights file (a guided-diffusion checkpoint), as opposed to a model folder."""
    return str(source).lower().endswith(CHECKPOINT_SUFFIXES)


def resolve_file(source: str | Path, what: str) -> Path:
    """A local weights file, or `hf:<org>/<name>/<path in the repo>` downloaded (with the `.json` of flags beside
    it, when the repo has one); FileNotFoundError for a file that does not exist."""
    source = str(source)
    if not source.startswith(HUB_PREFIX):
        if not Path(source).is_file():
            raise FileNotFoundError(f"no {what} file '{source}' (to download one from the Hugging Face hub, write "
                                    f"{HUB_PREFIX}<org>/<name>/<file>)")
        return Path(source)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    parts = source[len(HUB_PREFIX):].split("/")
    if len(parts) < 3:
        raise DataError(f"a hub file is written {HUB_PREFIX}<org>/<name>/<file>, got '{source}'")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        hf_hub_download(repo, str(Path(filename).with_suffix(".json")))
    except EntryNotFoundError:
        pass
    return Path(hf_hub_download(repo, filename))
