"""Where pretrained weights come from: a local folder, or the Hugging Face hub only when the user asks for it.

A hospital server is offline, and a typo in a folder name must say "no such folder", not try huggingface.co.
A hub id is therefore written `hf:<org>/<name>`; anything else is a folder that must exist.
"""

from __future__ import annotations

from pathlib import Path

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
