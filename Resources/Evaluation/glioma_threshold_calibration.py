"""Dice of a region bundle's ET / TC / WT as a function of the sigmoid threshold, per case set.

The experiment behind the glioma-regions card's "threshold calibration" paragraph: the network
runs once per case and TTA level, then the bundle's own post-processing (resampling to the
reference grid, painting, component clean-up, hole filling) is repeated for each threshold in
0.20, 0.25, ..., 0.60. Case sets:

- ``seen``: BraTS 2013 pat0001-0003 (trained on), t1c + flair, as in their data;
- ``generated``: 12 generated gliomas no training or validation run used (seeds 9400-9403
  standard, 9420-9423 rim absent + core_contrast varied, 9440-9443 rim partial + varied);
- ``held-out``: the first two cases of Resources/Evaluation/real-glioma-cases.json.

The rule the card quotes picks, per region, the threshold maximising
0.5 * mean(seen) + 0.5 * mean(generated) at TTA1; held-out cases only report.

Run: python Resources/Evaluation/glioma_threshold_calibration.py glioma-regions seen generated held-out
(about 1 min per real case and per generated case on 2 CPU cores; --json FILE keeps every score).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib import segment as S
from SegmentationDeepEditLib.bundle import load_bundle
from SegmentationDeepEditLib.cli import DEFAULT_DATA_ROOT
from SegmentationDeepEditLib.device import pick_device
from SegmentationDeepEditLib.labels import region_mask
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.synthetic import make_brain_case

REPO = Path(__file__).resolve().parents[2]
THRESHOLDS = [round(0.20 + 0.05 * i, 2) for i in range(9)]
GENERATED = [(s, {}) for s in range(9400, 9404)] + \
    [(s, {"rim": "absent", "core_contrast": "varied"}) for s in range(9420, 9424)] + \
    [(s, {"rim": "partial", "core_contrast": "varied"}) for s in range(9440, 9444)]


def cases(which: str, skull_stripped: bool = False):
    """(name, {sequence: image}, label, convention) of one case set (every sequence it has: t1, t1c, t2, flair).

    ``skull_stripped``: generated cases drawn with a noisy background get every voxel outside their
    own brain mask set to 0, as skull stripping leaves them (the real cases are stripped already).
    """
    if which == "generated":
        for seed, opts in GENERATED:
            c = make_brain_case(seed, **opts)
            images = dict(c.images)
            if skull_stripped:
                brain = sitk.Cast(c.masks["brain"] > 0, sitk.sitkUInt8)
                images = {k: sitk.Mask(v, brain, 0) for k, v in images.items()}
            yield f"generated {seed}", images, c.label, "brats2017"
        return
    listed = json.loads((REPO / "Resources" / "Evaluation" / "real-glioma-cases.json").read_text())["cases"]
    for c in listed:
        if c["seen_in_training"] != (which == "seen"):
            continue
        paths = {k: DEFAULT_DATA_ROOT / v for k, v in c["images"].items()}
        missing = [str(p) for p in list(paths.values()) + [DEFAULT_DATA_ROOT / c["label"]] if not p.is_file()]
        if missing:
            raise SystemExit(f"{missing[0]} not found: the {which} set needs ../shared/data")
        yield (c["name"], {k: sitk.ReadImage(str(p)) for k, p in paths.items()},
               sitk.ReadImage(str(DEFAULT_DATA_ROOT / c["label"])), c["convention"])


def region_values(meta: dict) -> dict:
    return {r["name"]: r["values"] for r in meta["segmentation"]["regions"]}


def prepared_cases(meta: dict, which: str):
    """(name, reference image, model grid, network input, {region: truth mask}) of each case of a set."""
    names = {i["name"] for i in meta["inputs"]}
    for name, images, label, convention in cases(which):
        checked, _ = S.check_inputs(meta, {k: v for k, v in images.items() if k in names}, None)
        aligned = S.align_inputs(checked, meta["segmentation"]["reference"], None)
        ref = aligned[meta["segmentation"]["reference"]]
        grid = S.model_grid(meta, ref)
        truths = {r: sitk.GetArrayFromImage(region_mask(label, convention, r)) > 0 for r in region_values(meta)}
        yield name, ref, grid, S.prepare_volume(meta, aligned, grid), truths


def score_into(out: dict, key: str, meta: dict, probs, grid, ref, truths) -> None:
    """Append each region's Dice of the bundle's own post-processing of ``probs`` to out["REGION key"]."""
    pred = S.clean_label(meta, S._postprocess(meta, probs, grid, ref), voxel_ml=float(np.prod(ref.GetSpacing())) / 1000)
    for r, vals in region_values(meta).items():
        out.setdefault(f"{r} {key}", []).append(dice(np.isin(pred, vals), truths[r]))


def arguments(description: str, model_help: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=model_help)
    ap.add_argument("sets", nargs="+", choices=("seen", "generated", "held-out"))
    ap.add_argument("--json", type=Path, help="write every per-case score here")
    return ap.parse_args()


def scores_of(model: str, which: str, ttas=(0, 1)) -> dict:
    """{"REGION ttaT tX": [Dice per case]} for every threshold X."""
    bundle = load_bundle(model)
    meta = bundle.meta
    dev = pick_device("cpu")
    net = S.get_network(bundle, dev)
    out: dict = {}
    for name, ref, grid, arr, truths in prepared_cases(meta, which):
        for tta in ttas:
            probs = S.predict_volume(net, arr, meta, dev, tta=tta)
            for t in THRESHOLDS:
                m = copy.deepcopy(meta)
                m["output"]["threshold"] = t
                score_into(out, f"tta{tta} t{t}", m, probs, grid, ref, truths)
        print(f"  {which}: {name} done", flush=True)
    return out


def main() -> None:
    args = arguments(__doc__, "bundle id or folder (a bundle with output_kind 'regions')")
    if load_bundle(args.model).meta["segmentation"].get("output_kind") != "regions":
        raise SystemExit(f"{args.model}: not a region (sigmoid) bundle; thresholds do not apply")
    allsets = {w: scores_of(args.model, w) for w in args.sets}
    if args.json:
        args.json.write_text(json.dumps(allsets, indent=1))
    regions = sorted({k.split()[0] for s in allsets.values() for k in s})
    for tta in (0, 1):
        print(f"\nTTA{tta}: mean Dice per threshold")
        print(f"{'set':12s}{'region':8s}" + "".join(f"{t:>7.2f}" for t in THRESHOLDS))
        for w, s in allsets.items():
            for r in regions:
                print(f"{w:12s}{r:8s}" + "".join(f"{np.mean(s[f'{r} tta{tta} t{t}']):7.3f}" for t in THRESHOLDS))
    if {"seen", "generated"} <= set(allsets):
        print("\nrule (TTA1): argmax over t of 0.5 * mean(seen) + 0.5 * mean(generated)")
        for r in regions:
            combined = [0.5 * np.mean(allsets["seen"][f"{r} tta1 t{t}"]) + 0.5 * np.mean(allsets["generated"][f"{r} tta1 t{t}"])
                        for t in THRESHOLDS]
            print(f"  {r}: t = {THRESHOLDS[int(np.argmax(combined))]:.2f} (combined {max(combined):.3f}; "
                  f"at 0.50: {combined[THRESHOLDS.index(0.5)]:.3f})")


if __name__ == "__main__":
    main()
