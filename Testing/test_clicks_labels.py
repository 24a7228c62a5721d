"""Corrective-click placement and label conventions."""

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.clicks import next_click
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.evaluate import summarise
from SegmentationDeepEditLib.labels import region_mask


def test_click_goes_to_the_centre_of_the_largest_missed_region():
    truth = np.zeros((30, 30, 30), bool)
    truth[5:25, 5:25, 5:25] = True
    pred = truth.copy()
    pred[5:25, 5:25, 15:25] = False   # a missed slab 20x20x10: centre at i = 19 or 20
    pred[0:2, 0:2, 0:2] = True        # a tiny false positive
    (k, j, i), positive = next_click(pred, truth)
    assert positive
    assert 14 <= k <= 15 and 14 <= j <= 15 and 19 <= i <= 20


def test_click_is_negative_when_the_largest_error_is_a_false_positive():
    truth = np.zeros((20, 20, 20), bool)
    truth[8:12, 8:12, 8:12] = True
    pred = truth.copy()
    pred[0:6, 0:6, 0:6] = True
    (k, j, i), positive = next_click(pred, truth)
    assert not positive and pred[k, j, i] and not truth[k, j, i]


def test_no_error_no_click():
    m = np.zeros((5, 5, 5), bool)
    m[1:3, 1:3, 1:3] = True
    assert next_click(m, m) is None


def test_spacing_moves_the_click_to_the_physical_centre():
    truth = np.zeros((10, 40, 40), bool)
    truth[:, 10:30, 10:30] = True
    (k, _, _), _ = next_click(np.zeros_like(truth), truth, spacing_kji=(5.0, 1.0, 1.0))
    assert 4 <= k <= 5


@pytest.mark.parametrize("convention,region,expected", [
    ("brats2013", "TC", {1, 3, 4}), ("brats2013", "WT", {1, 2, 3, 4}), ("brats2013", "ET", {4}),
    ("brats2017", "TC", {1, 4}), ("brats2023", "TC", {1, 3}), ("brats2023", "ET", {3}),
])
def test_region_masks(convention, region, expected):
    arr = np.arange(6, dtype=np.uint8).reshape(1, 1, 6)
    img = sitk.GetImageFromArray(arr)
    m = sitk.GetArrayFromImage(region_mask(img, convention, region))
    assert {int(v) for v in arr[m > 0]} == expected


def test_unknown_convention_or_region():
    img = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    with pytest.raises(InputError, match="unknown label convention"):
        region_mask(img, "brats1999", "TC")
    with pytest.raises(InputError, match="no region 'XX'"):
        region_mask(img, "brats2013", "XX")


def test_summary_carries_the_last_dice_forward():
    rows = [{"case": "a", "region": "TC", "clicks": 0, "dice": 0.8, "seconds": 0.3},
            {"case": "a", "region": "TC", "clicks": 1, "dice": 0.9, "seconds": 0.3},
            {"case": "b", "region": "TC", "clicks": 0, "dice": 0.6, "seconds": 0.3}]
    s = {(r["region"], r["clicks"]): r for r in summarise(rows)}
    assert s[("TC", 0)]["mean"] == pytest.approx(0.7)
    assert s[("TC", 1)]["mean"] == pytest.approx(0.75)  # b stopped: its 0.6 counts for click 1
