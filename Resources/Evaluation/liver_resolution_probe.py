"""Does the coarse (3 mm) resolution of the held-out CT cost the liver model accuracy?

A measurement behind the liver-lesion card: newly generated CTs (portal seeds 9700-9702, native
9800-9802; no training run used them) are segmented as generated (in-plane 0.7-1.0 mm), resampled
to 3 mm isotropic without smoothing, and blurred with a 3 mm box-equivalent Gaussian then
resampled to 3 mm (a coarse reconstruction, like the TotalSegmentator example CT); full and fast
mode. The truth follows each image (nearest neighbour).

Run: python Resources/Evaluation/liver_resolution_probe.py [MODEL]   (about 1 min on 2 CPU cores)
"""

from __future__ import annotations

import sys

import SimpleITK as sitk

from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.segment import segment_images
from SegmentationDeepEditLib.synthetic import make_ct_case

CASES = [(9700, "portal"), (9701, "portal"), (9702, "portal"), (9800, "native"), (9801, "native"), (9802, "native")]


def coarse(img: sitk.Image, mm: float = 3.0, blur: bool = True) -> sitk.Image:
    """The CT resampled to ``mm`` isotropic, first blurred with a Gaussian of the variance of an ``mm``-wide box."""
    src = sitk.Cast(img, sitk.sitkFloat32)
    if blur:
        variance = [max(mm**2 - s**2, 0.0) / 12.0 for s in img.GetSpacing()]  # mm^2; 0 along an axis already that coarse
        src = sitk.DiscreteGaussian(src, variance, 64, 0.01, True)
    size = [int(round(n * s / mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (mm,) * 3, img.GetDirection(), -1000.0)
    return sitk.Cast(out, sitk.sitkInt16)


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "liver-lesion"
    variants = (("as generated", None), ("3 mm", False), ("3 mm blurred", True))
    print(f"liver Dice (full / fast) of {model}\n{'case':14s}" + "".join(f"{v:>18s}" for v, _ in variants))
    for seed, phase in CASES:
        case = make_ct_case(seed, phase=phase)
        cells = []
        for _, blur in variants:
            img = case.images["ct"] if blur is None else coarse(case.images["ct"], blur=blur)
            truth = sitk.GetArrayFromImage(sitk.Resample(case.label, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
            d = [dice(sitk.GetArrayFromImage(segment_images(model, {"ct": img}, fast=f).label) > 0, truth) for f in (False, True)]
            cells.append(f"{d[0]:.3f} / {d[1]:.3f}")
        print(f"{seed} {phase:9s}" + "".join(f"{c:>18s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
