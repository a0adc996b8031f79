"""Weak supervision from the reports of images nobody drew a mask for.

An LViT report names the lungs its infected areas are in ("Unilateral pulmonary infection, one infected area, lower
left lung."), so it is a partial mask: a lung it does not name holds nothing to segment, and a lung it names holds at
least one area. With `train.report_weight` > 0 the unlabeled images' reports add both as a loss term. A handful of
masks then comes with many more image-report pairs, from which the model can learn what a report's sides mean on the
image. Sides only, not zones: a zone is a third of a lung's height, and where a lung ends is not known without a mask.
With `head.obey_report` the model's masks also obey the same sides outside training (`obey_reports`).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from scipy import ndimage

from textdiff.errors import DataError
from textdiff.model.features import LEFT_RIGHT_AXIS

SIDES = ("left", "right")  # the patient's; as loaded, the patient's left lies at the high end of LEFT_RIGHT_AXIS
_NO_FINDING = re.compile(r"^\s*no\b", re.IGNORECASE)  # "No pulmonary infection."
_SIDE_WORDS = re.compile(r"\b(left|right|bilateral)\b", re.IGNORECASE)
_LUNG_WORDS = re.compile(r"\b(lungs?|pulmonary)\b", re.IGNORECASE)


def named_sides(report: str) -> frozenset[str] | None:
    """The lungs a report puts a finding in: empty for a report of no finding, None when it says nothing a mask must
    obey (an empty report, one that names no side, or one that is not about the lungs: "the nuclei density in the
    lower left is high" names a place in a tissue tile, not a lung)."""
    if not _LUNG_WORDS.search(report):
        return None
    if _NO_FINDING.match(report):
        return frozenset()
    words = {word.lower() for word in _SIDE_WORDS.findall(report)}
    if "bilateral" in words:
        return frozenset(SIDES)
    return frozenset(words & set(SIDES)) or None


def check_reports_readable(reports: list[str], setting: str) -> None:
    """The lung rules read chest radiograph reports; refuse a run that asks for them on data whose reports name no
    lung's side (they would silently do nothing). Empty reports are no reports (the empty-report ablation)."""
    written = [report for report in reports if report.strip()]
    if written and not any(named_sides(report) is not None for report in written):
        raise DataError(f"{setting} reads which lungs a chest radiograph report names (\"... left lung.\", \"No "
                         "pulmonary infection.\"), and no report of this data does: turn it off for this data")


def side_slice(side: str, size: int) -> slice:
    """Where `side`'s lung lies along the left-right axis, less a central band (1/16 of the width each way) that the
    mediastinum and a tilted pose may push either way."""
    centre, margin = size // 2, max(1, size // 16)
    return slice(centre + margin, size) if side == "left" else slice(0, centre - margin)


def side_region(side: str, size: int) -> tuple[slice, slice]:
    """Index of `side`'s lung in an (X, Y) map."""
    index = [slice(None), slice(None)]
    index[LEFT_RIGHT_AXIS] = side_slice(side, size)
    return tuple(index)


def report_loss(logits: torch.Tensor, sides: list[frozenset[str]], top_k: int) -> torch.Tensor:
    """Loss of logits (B, classes, X, Y) against what each image's report says, averaged over images and sides:
    cross-entropy toward background over a side the report does not name, and over a side it names the negative
    mean log-probability of foreground (any class but 0) at the `top_k` most confident pixels (at least one area)."""
    if len(sides) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} images but {len(sides)} reports' sides")
    log_probs = logits.log_softmax(1)
    size = logits.shape[2 + LEFT_RIGHT_AXIS]
    terms = []
    for image_log_probs, named in zip(log_probs, sides):
        for side in SIDES:
            half = image_log_probs[(slice(None), *side_region(side, size))]
            if side in named:
                foreground = half[1:].logsumexp(0).flatten()
                terms.append(-foreground.topk(min(top_k, foreground.numel())).values.mean())
            else:
                terms.append(-half[0].mean())
    return torch.stack(terms).mean()


def obey_reports(logits: torch.Tensor, reports: list[str]) -> torch.Tensor:
    """Logits (B, classes, X, Y) whose argmax agrees with each report's sides, both ways.

    Nothing where a report rules it out (in a lung it does not name; anywhere under a report of no finding): the
    foreground logits there sit far below background, finite, so a softmax stays exact elsewhere and an entropy stays
    defined. And something in each lung it names: where the argmax draws nothing there, the area around the lung's
    most likely foreground pixel (the connected pixels at least half as likely) gets its best foreground class. A
    faint area the model saw but did not trust is then drawn because the report says it is there.
    """
    if len(reports) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} images but {len(reports)} reports")
    size = logits.shape[2 + LEFT_RIGHT_AXIS]
    ruled_out = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.bool, device=logits.device)
    for image, report in enumerate(reports):
        named = named_sides(report)
        if named is not None and not named:
            ruled_out[image] = True
        for side in SIDES if named else ():
            if side not in named:
                ruled_out[image][side_region(side, size)] = True
    foreground = torch.arange(logits.shape[1], device=logits.device) > 0
    obeyed = torch.where(ruled_out[:, None] & foreground[:, None, None], logits[:, :1] - 30.0, logits)
    for image, report in enumerate(reports):
        for side in named_sides(report) or ():
            _draw_most_likely_area(obeyed[image], side_region(side, size))
    return obeyed


def _draw_most_likely_area(logits: torch.Tensor, region: tuple[slice, slice]) -> None:
    """In place on one image's logits (classes, X, Y): if the argmax draws no foreground in `region`, lower the
    background logit just below the best foreground one over the most likely area there."""
    lung = logits[(slice(None), *region)]
    if (lung.argmax(0) > 0).any():
        return
    probability = 1 - lung.softmax(0)[0]
    likely, _ = ndimage.label((probability >= 0.5 * probability.max()).cpu().numpy())
    peak = np.unravel_index(probability.argmax().item(), probability.shape)
    area = torch.as_tensor(likely == likely[peak], device=logits.device)
    lung[0][area] = lung[1:].max(0).values[area] - 1.0
