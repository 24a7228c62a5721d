"""Liver Dice of one or more liver bundles on generated CTs and on the real held-out CT, side by side.

The comparison behind the liver model card's shipping rules: generated CTs that no training run
used (standard portal-venous seeds 9700-9702, varied liver shapes 9900-9902, native phase
9800-9802; `SegmentationDeepEditLib.synthetic.make_ct_case`) and the TotalSegmentator example CT
(../shared/data, or $DEEPEDIT_SHARED_DATA) in full and --fast mode. Liver = label 1 or 2. The
generated sets are also scored for the lesions (label 2), the only lesion truth there is, and every
set in --fast mode too.

Run: python Resources/Evaluation/compare_liver_models.py liver-lesion runs/liver-v4/bundle
(bundle ids or bundle folders, or weight files such as runs/liver-v7/snapshots/step-01500.safetensors,
which are scored with the shipped liver-lesion bundle's settings; about 1 min per model on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegmentationDeepEditLib.bundle import load_bundle, sha256_of
from SegmentationDeepEditLib.cli import DEFAULT_DATA_ROOT
from SegmentationDeepEditLib.labels import region_mask
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.segment import segment_images
from SegmentationDeepEditLib.synthetic import make_ct_case

GENERATED = {
    "generated standard portal": [(s, {}) for s in (9700, 9701, 9702)],
    "generated varied shapes": [(s, {"liver_shape": "varied"}) for s in (9900, 9901, 9902)],
    "generated native phase": [(s, {"phase": "native"}) for s in (9800, 9801, 9802)],
}


def liver(label: sitk.Image, region: str = "liver") -> np.ndarray:
    return sitk.GetArrayFromImage(region_mask(label, "liver-lesion", region)) > 0


def _bundle_with_weights(weights: Path, folder: Path) -> str:
    """A copy of the shipped liver-lesion bundle in ``folder`` with other weights (and their hash)."""
    src = load_bundle("liver-lesion")
    folder.mkdir(parents=True)
    meta = dict(src.meta, weights={"file": "model.safetensors", "sha256": sha256_of(weights)})
    shutil.copyfile(weights, folder / "model.safetensors")
    shutil.copyfile(src.path / "README.md", folder / "README.md")
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="bundle ids or folders, or .safetensors weight files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = {m: (_bundle_with_weights(Path(m), Path(tmp) / f"w{n}") if m.endswith(".safetensors") else m)
                 for n, m in enumerate(args.models)}
        _compare(args.models, names)


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
    rows = [n + f + r for n in GENERATED for r in ("", " lesion") for f in ("", " --fast")] + ["real CT", "real CT --fast"]
    print(f"{'set':40s}" + "".join(f"{m[-24:]:>26s}" for m in models))
    for r in rows:
        print(f"{r:40s}" + "".join(f"{np.mean(scores[m][r]):26.3f}" for m in models))


if __name__ == "__main__":
    main()
