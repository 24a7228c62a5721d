"""Dice of brain bundles (3D or 2D) side by side on the glioma case sets, each at its default settings.

Each case runs through ``segment_images`` exactly as ``deepedit segment`` does (the bundle's default
TTA, clean-up and thresholds; the sequences the bundle takes, others left out). Case sets as in
glioma_threshold_calibration.py: ``seen`` (BraTS 2013 pat0001-0003), ``generated`` (12 generated
gliomas no run used: seeds 9400-9403 standard, 9420-9423 rim absent and 9440-9443 rim partial,
core_contrast varied), ``held-out`` (BraTS 2013 pat0004, TCGA-DU-7294). Seven of the generated cases
are drawn with a noisy background instead of a skull-stripped one, which the brain bundles refuse
since glioma-regions 0.2.2 / brain-tumor-2d 0.1.2 (as any raw MRI): here they are skull-stripped
with their own brain mask (everything outside set to 0), as a user would have to.

Run: python Resources/Evaluation/compare_brain_models.py brain-tumor-2d runs/b2d-v2/bundle --sets seen generated held-out
(about 10 s per case and model on 2 CPU cores at TTA3; --json FILE keeps every score).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib.bundle import load_bundle
from SegmentationDeepEditLib.labels import region_mask
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.segment import segment_images

_spec = importlib.util.spec_from_file_location("glioma_cases", Path(__file__).with_name("glioma_threshold_calibration.py"))
_cal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cal)
REGIONS = ("WT", "TC", "ET")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="bundle ids or folders")
    ap.add_argument("--sets", nargs="+", default=["seen", "generated", "held-out"], choices=("seen", "generated", "held-out"))
    ap.add_argument("--json", type=Path, help="write every per-case score here")
    args = ap.parse_args()
    bundles = [load_bundle(m) for m in args.models]
    scores: dict = {}
    for which in args.sets:
        for name, images, label, convention in _cal.cases(which, skull_stripped=True):
            truths = {r: sitk.GetArrayFromImage(region_mask(label, convention, r)) > 0 for r in REGIONS}
            cells = []
            for model, b in zip(args.models, bundles):
                names = {i["name"] for i in b.meta["inputs"]}
                res = segment_images(b, {k: v for k, v in images.items() if k in names})
                pred = sitk.GetArrayFromImage(res.label)
                values = {r["name"]: r["values"] for r in res.regions}
                for r in REGIONS:
                    d = dice(np.isin(pred, values[r]), truths[r])
                    scores.setdefault(which, {}).setdefault(model, {}).setdefault(r, []).append(d)
                cells.append(" ".join(f"{r} {scores[which][model][r][-1]:.3f}" for r in REGIONS))
            print(f"  {which:10s} {name:32s} " + " | ".join(cells), flush=True)
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1))
    print(f"\nmean Dice at each bundle's defaults\n{'set':11s}{'region':8s}" + "".join(f"{m[-28:]:>30s}" for m in args.models))
    for which, per_model in scores.items():
        for r in REGIONS:
            print(f"{which:11s}{r:8s}" + "".join(f"{np.mean(per_model[m][r]):30.3f}" for m in args.models))


if __name__ == "__main__":
    main()
