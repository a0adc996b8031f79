"""What flows between data, model, training and inference: one image, slice or window as an `Item`.

An item is a dict (so MONAI's dictionary transforms and `{**item, ...}` copies work on it) whose fields are all
declared here. `textdiff.data.studies.load_case` and `TextDiffModel.load_planes` make items of labeled images,
`TextDiffModel.plane_item` of an image to segment, `textdiff.data.tiling.window_items` cuts them into windows, and
training adds `origin` to the ones that are not plain labeled images.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch


class Item(TypedDict, total=False):
    id: str  # the feature cache's key: image id, "<id>#z<k>" for a slice, "<id>@<grid>:<x>,<y>" for a window
    image: torch.Tensor  # (C, *grid) in [-1, 1] on the working grid (`textdiff.data.tiling`)
    report: str  # the image's diagnostic text ("" when there is none)
    label: torch.Tensor | None  # (1, *grid) class indices on the working grid; None when unlabeled
    original_shape: tuple[int, ...]  # the plane's own in-plane size, where its mask goes back to
    original_image: torch.Tensor  # the plane as read, for blank checks and pictures
    original_label: torch.Tensor | None  # (1, *original_shape) the mask as drawn, for scoring at full resolution
    source: str  # a window's image id
    box: torch.Tensor  # a window's place in its grid: (first, last) pixel centre per axis in [-1, 1]
    origin: Literal["pseudo", "healthy", "intensity"]  # training items that are not a drawn mask of a real image
