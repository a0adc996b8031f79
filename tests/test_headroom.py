"""The area oracle: it fixes whole areas missed or drawn falsely, the only errors a report naming zones can correct,
and keeps every boundary error."""

from __future__ import annotations

import pytest
import torch

from textdiff_bench.headroom import area_oracle, fix_whole_areas


def _square(mask: torch.Tensor, rows: slice, cols: slice, value: int = 1) -> torch.Tensor:
    mask[0, rows, cols] = value
    return mask


def test_missed_areas_are_added_false_areas_erased_and_boundaries_kept():
    truth = _square(_square(torch.zeros(1, 16, 16, dtype=torch.uint8), slice(2, 6), slice(2, 6)), slice(10, 14), slice(10, 14))
    drawn = _square(torch.zeros(1, 16, 16, dtype=torch.uint8), slice(2, 5), slice(2, 7))  # area A, boundary off
    drawn = _square(drawn, slice(1, 4), slice(11, 15))  # a false area; area B is missed
    fixed, areas, missed, false = fix_whole_areas(drawn, truth, 2)
    assert (areas, missed, false) == (2, 1, 1)
    expected = _square(_square(torch.zeros(1, 16, 16, dtype=torch.uint8), slice(2, 5), slice(2, 7)), slice(10, 14), slice(10, 14))
    assert torch.equal(fixed, expected)  # A keeps its wrong boundary: a report cannot fix that


def test_each_class_has_its_own_areas():
    truth = _square(torch.zeros(1, 12, 12, dtype=torch.uint8), slice(2, 6), slice(2, 6), value=2)
    drawn = _square(torch.zeros(1, 12, 12, dtype=torch.uint8), slice(2, 6), slice(2, 6), value=1)  # right place, wrong class
    fixed, areas, missed, false = fix_whole_areas(drawn, truth, 3)
    assert (areas, missed, false) == (1, 1, 1) and torch.equal(fixed, truth)
    # the other way round: the missed class-1 area, once added, is not erased as class 2's false area
    fixed, *_ = fix_whole_areas(truth, drawn, 3)
    assert torch.equal(fixed, drawn)
    with pytest.raises(ValueError, match="differ in shape"):
        fix_whole_areas(drawn, truth[:, :6], 3)


def test_the_oracle_scores_at_least_the_masks_and_a_clean_normal_image_scores_one():
    infected = _square(torch.zeros(1, 16, 16, dtype=torch.uint8), slice(4, 10), slice(4, 10))
    normal = torch.zeros(1, 16, 16, dtype=torch.uint8)
    items = [{"id": "infected", "original_label": infected}, {"id": "normal", "original_label": normal}]
    masks = [torch.zeros_like(infected), _square(torch.zeros_like(normal), slice(0, 3), slice(0, 3))]  # both wrong
    result = area_oracle(masks, items, 2)
    assert result["per_image_dice"] == {"infected": 1.0, "normal": 1.0} and result["dice"] == 1.0
    assert (result["areas"], result["missed_areas"], result["false_areas"]) == (1, 1, 1)
