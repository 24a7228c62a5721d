"""Dice of a 3D region bundle's ET / TC / WT for each choice of test-time augmentation flips.

The experiment behind the glioma-regions card's "which flips" paragraph: each case runs the
network four times (the identity and one flip along each model-grid axis: i left-right,
j anterior-posterior, k inferior-superior), and every combination the rule compares is the mean
of those probabilities, followed by the bundle's own post-processing (threshold, painting,
clean-up). Combinations: ``none`` (identity), ``i`` (identity + left-right flip), ``ijk``
(identity + all three flips: the default before 0.2.2). Case sets as in
glioma_threshold_calibration.py (seen, generated, held-out).

Rule quoted in the card: score = 0.5 * mean over seen of (WT + TC) / 2 + 0.5 * the same over
generated; held-out cases only report (and may veto).

Run: python Resources/Evaluation/glioma_tta_flips.py glioma-regions seen generated held-out
(about 15 s per case on 2 CPU cores; --json FILE keeps every score).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from SegmentationDeepEditLib import segment as S
from SegmentationDeepEditLib.bundle import load_bundle
from SegmentationDeepEditLib.device import pick_device

_spec = importlib.util.spec_from_file_location("glioma_cases", Path(__file__).with_name("glioma_threshold_calibration.py"))
_cal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cal)

COMBOS = {"none": (), "i": ("i",), "ijk": ("i", "j", "k")}
_DIM = {"i": -1, "j": -2, "k": -3}  # axis of a [C, k, j, i] array


def scores_of(model: str, which: str) -> dict:
    """{"REGION COMBO": [Dice per case]}."""
    bundle = load_bundle(model)
    meta = bundle.meta
    dev = pick_device("cpu")
    net = S.get_network(bundle, dev)
    out: dict = {}
    for name, ref, grid, arr, truths in _cal.prepared_cases(meta, which):
        passes = {"": S.predict_volume(net, arr, meta, dev, tta=0)}
        for a, d in _DIM.items():  # one flipped pass per axis, flipped back: what predict_volume does inside
            flipped = np.ascontiguousarray(np.flip(arr, d))
            passes[a] = np.flip(S.predict_volume(net, flipped, meta, dev, tta=0), d)
        for combo, axes in COMBOS.items():
            _cal.score_into(out, combo, meta, np.mean([passes[""]] + [passes[a] for a in axes], axis=0), grid, ref, truths)
        print(f"  {which}: {name} " + " ".join(f"{k}={v[-1]:.3f}" for k, v in out.items() if not k.startswith("ET")), flush=True)
    return out


def main() -> None:
    args = _cal.arguments(__doc__, "bundle id or folder (a 3D bundle with output_kind 'regions')")
    seg = load_bundle(args.model).meta["segmentation"]
    if seg.get("output_kind") != "regions" or int(seg.get("dims", 3)) != 3:
        raise SystemExit(f"{args.model}: not a 3D region bundle")
    allsets = {w: scores_of(args.model, w) for w in args.sets}
    if args.json:
        args.json.write_text(json.dumps(allsets, indent=1))
    described = ", ".join(f"{k}: identity + {'/'.join(v) or 'nothing'}" for k, v in COMBOS.items())
    print(f"\nmean Dice per flip set ({described})")
    print(f"{'set':12s}{'region':8s}" + "".join(f"{c:>8s}" for c in COMBOS))
    for w, s in allsets.items():
        for r in ("ET", "TC", "WT"):
            print(f"{w:12s}{r:8s}" + "".join(f"{np.mean(s[f'{r} {c}']):8.3f}" for c in COMBOS))
    if {"seen", "generated"} <= set(allsets):
        print("\nrule score 0.5 * mean_seen((WT+TC)/2) + 0.5 * mean_generated((WT+TC)/2):")
        for c in COMBOS:
            sc = 0.5 * np.mean([(allsets["seen"][f"WT {c}"][n] + allsets["seen"][f"TC {c}"][n]) / 2
                                for n in range(len(allsets["seen"][f"WT {c}"]))]) + \
                 0.5 * np.mean([(allsets["generated"][f"WT {c}"][n] + allsets["generated"][f"TC {c}"][n]) / 2
                                for n in range(len(allsets["generated"][f"WT {c}"]))])
            print(f"  {c:5s} {sc:.4f}")


if __name__ == "__main__":
    main()
