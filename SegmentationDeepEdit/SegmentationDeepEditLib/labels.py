"""Label conventions of the data we read, mapped explicitly to named regions (never guessed).

Each convention maps a region name to the label values it is made of:
- ``brats2013``: 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing tumour;
- ``brats2017`` (2017-2021): 1 necrotic/non-enhancing core, 2 edema, 4 enhancing;
- ``brats2023``: 1 non-enhancing/necrotic core, 2 edema (SNFH), 3 enhancing;
- ``binary``: any non-zero value is the object;
- ``liver-lesion``: 1 liver, 2 lesion (lesions lie inside the liver; our CT output and the synthetic CT);
- ``totalsegmentator``: a few TotalSegmentator (v2) classes by name.
Regions: ET enhancing tumour, TC tumour core (= necrotic/non-enhancing core + enhancing),
WT whole tumour (= TC + edema).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["CONVENTIONS", "check_label_values", "region_mask", "values_mask"]

CONVENTIONS: Dict[str, Dict[str, List[int]]] = {
    "brats2013": {"ET": [4], "TC": [1, 3, 4], "WT": [1, 2, 3, 4]},
    "brats2017": {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]},
    "brats2023": {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]},
    "binary": {"object": list(range(1, 256))},
    "liver-lesion": {"liver": [1, 2], "lesion": [2]},
    "totalsegmentator": {"spleen": [1], "kidney_right": [2], "kidney_left": [3], "gallbladder": [4], "liver": [5],
                         "stomach": [6], "pancreas": [7]},
}


# the values a label map of each convention may hold besides 0: those of its regions, except that a binary
# mask may use any positive value and a TotalSegmentator map all 117 classes (None: any positive integer)
_VALUES: Dict[str, object] = {**{c: set().union(*map(set, regions.values())) for c, regions in CONVENTIONS.items()},
                              "binary": None, "totalsegmentator": set(range(1, 118))}


def check_label_values(label: sitk.Image, convention: str, path=None) -> None:
    """Refuse a label map that cannot be of ``convention``: non-integer or negative values, or values the
    convention does not have (a BraTS 2013 map, 1-4, declared BraTS 2023, 1-3, would be scored wrongly).

    Raises:
        InputError: naming ``path``, the values found and the convention's values.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"unknown label convention {convention!r} (known: {', '.join(CONVENTIONS)})", path)
    arr = sitk.GetArrayViewFromImage(label)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or np.any(np.abs(arr - np.rint(arr)) > 1e-3):  # rounding noise is fine
            raise InputError(f"holds non-integer values ({float(np.nanmin(arr)):g} to {float(np.nanmax(arr)):g}): "
                             "an image, not a label map?", path)
    values = {int(v) for v in np.unique(np.rint(arr) if arr.dtype.kind == "f" else arr)} - {0}
    negative = sorted(v for v in values if v < 0)
    if negative:
        raise InputError(f"holds negative values ({', '.join(map(str, negative[:5]))}): not a label map", path)
    allowed = _VALUES[convention]
    bad = sorted(values - allowed) if allowed is not None else []
    if bad:
        which = [c for c, vals in _VALUES.items() if vals is not None and values <= vals and c not in (convention, "totalsegmentator")]
        raise InputError(f"holds label value(s) {', '.join(map(str, bad[:5]))}, which convention {convention!r} does not "
                         f"have (its values: {', '.join(map(str, sorted(allowed)))}); is the convention right?"
                         + (f" (these values fit {', '.join(which)})" if which else ""), path)


def region_mask(label: sitk.Image, convention: str, region: str) -> sitk.Image:
    """Binary uint8 mask of a named region of a label map.

    Raises:
        InputError: unknown convention or region.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"unknown label convention {convention!r} (known: {', '.join(CONVENTIONS)})")
    regions = CONVENTIONS[convention]
    if region not in regions:
        raise InputError(f"convention {convention!r} has no region {region!r} (it has {', '.join(regions)})")
    return values_mask(label, regions[region])


def values_mask(label: sitk.Image, values) -> sitk.Image:
    """Binary uint8 mask (label's geometry) of the voxels whose rounded value is in ``values``."""
    arr = np.rint(sitk.GetArrayViewFromImage(label)).astype(np.int64)
    m = sitk.GetImageFromArray(np.isin(arr, list(values)).astype(np.uint8))
    m.CopyInformation(label)
    return m
