"""How much of the liver model's gap on the real CT is its non-contrast phase? A measurement.

The held-out real CT (TotalSegmentator example, liver 46 HU) is non-contrast, while the model is for
portal-venous CT (liver 90-130 HU). Here portal-venous enhancement is simulated on the same real
anatomy: per-organ HU offsets are added using the CT's own TotalSegmentator labels (v2 classes:
1 spleen, 2-3 kidneys, 5 liver, 7 pancreas, 52 aorta, 63 IVC, 64 portal and splenic vein, 86-89 back
and psoas muscles), the offset map smoothed with a 1-voxel Gaussian (partial volume), and the liver
Dice is measured in full and --fast mode. Texture and anatomy stay real; the enhancement pattern is
a simple model (uniform per organ), so the numbers say how much the phase matters, not what a real
portal-venous CT would score. Nothing is tuned or shipped from it.

Run: python Resources/Evaluation/liver_portal_simulation.py [bundle]   (about 1 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SegmentationDeepEditLib.cli import DEFAULT_DATA_ROOT
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.segment import segment_images

PORTAL = {5: 60.0, 1: 75.0, 2: 140.0, 3: 140.0, 7: 50.0, 52: 120.0, 63: 120.0, 64: 120.0,
          86: 10.0, 87: 10.0, 88: 10.0, 89: 10.0}
SCENARIOS = {
    "as acquired (non-contrast)": {},
    "liver +30 HU only": {5: 30.0},
    "liver +60 HU only": {5: 60.0},
    "portal-venous (all organs)": PORTAL,
}


def enhanced(ct: sitk.Image, organs: np.ndarray, offsets: dict) -> sitk.Image:
    """The CT with ``offsets`` (TotalSegmentator class -> HU) added, edges smoothed by one voxel."""
    add = np.zeros(organs.shape, np.float32)
    for value, hu in offsets.items():
        add[organs == value] = hu
    add = ndimage.gaussian_filter(add, 1.0)
    out = sitk.GetImageFromArray((sitk.GetArrayFromImage(ct).astype(np.float32) + add).round().astype(np.int16))
    out.CopyInformation(ct)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default="liver-lesion")
    args = ap.parse_args()
    data = DEFAULT_DATA_ROOT / "abdomen-ct" / "totalseg-example"
    if not (data / "seg-totalsegmentator.nii.gz").is_file():
        raise SystemExit(f"real CT not found at {data}: the measurement needs ../shared/data")
    ct = sitk.ReadImage(str(data / "ct.nii.gz"))
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "seg-totalsegmentator.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "liver.nii.gz"))) > 0
    print(f"{'real CT':32s}{'liver HU':>10s}{'Dice full':>11s}{'fast':>7s}")
    for name, offsets in SCENARIOS.items():
        img = enhanced(ct, organs, offsets)
        hu = float(np.median(sitk.GetArrayViewFromImage(img)[truth]))
        scores = [dice(sitk.GetArrayFromImage(segment_images(args.bundle, {"ct": img}, fast=fast, device="cpu").label) > 0,
                       truth) for fast in (False, True)]
        print(f"{name:32s}{hu:10.0f}{scores[0]:11.3f}{scores[1]:7.3f}")


if __name__ == "__main__":
    main()
