"""Latency of six points -> segment on this CPU.

Prints:
- warm: median seconds of `annotate()` with the model already loaded (points to mask in the
  full image geometry), over repeated runs with freshly perturbed points;
- moved point: median seconds when a point is moved (the same warm path);
- corrective click: median seconds of a re-run with one click at the centre of the largest error;
- cold: seconds from process start to a written result (`deepedit annotate` in a new process),
  median of a few runs.

Cases: a real brain tumour (brats2013-pat0004 T1c, tumour core) when ../shared/data is present,
and a generated brain case (needs nilearn's MNI template; `--no-generated` leaves it out). Run:
`python benchmarks/annotate.py [--repeats N] [--tta] [--device cpu|cuda] [--no-generated]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def _cases(generated: bool = True):
    from SegmentationDeepEditLib import synthetic
    from SegmentationDeepEditLib.imageio import read_image

    if generated:
        case = synthetic.make_brain_case(7)
        yield "synthetic brain (seed 7) tumour core", case.images["t1c"], synthetic.tumour_core_mask(case.label, "brain")
    data = Path(os.environ.get("DEEPEDIT_SHARED_DATA") or REPO.parent / "shared" / "data")
    d = data / "brain-tumor" / "brats2013-pat0004"
    if d.is_dir():
        img = read_image(d / "t1c.nii.gz")
        seg = read_image(d / "seg.nii.gz", what="label")
        m = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(seg), [1, 3, 4]).astype(np.uint8))
        m.CopyInformation(seg)
        yield "brats2013-pat0004 T1c tumour core (real)", img, m
    else:
        print(f"(real data not found at {data}: real case skipped)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-generated", action="store_true", help="real case only (and no cold-start runs, which use the generated case)")
    args = ap.parse_args()
    dev = args.device
    import torch

    from SegmentationDeepEditLib.annotate import annotate
    from SegmentationDeepEditLib.clicks import next_click
    from SegmentationDeepEditLib.geometry import index_to_physical
    from SegmentationDeepEditLib.metrics import dice
    from SegmentationDeepEditLib.points import extreme_points_from_mask

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, tta {args.tta}, "
          f"device {dev}")
    results = {}
    for name, img, truth in _cases(not args.no_generated):
        pts0 = extreme_points_from_mask(truth)
        annotate(img, pts0, device=dev, tta=args.tta)  # load the model once
        rng = np.random.default_rng(0)
        times, stages, scores = [], [], []
        for _ in range(args.repeats):
            pts = extreme_points_from_mask(truth, rng=rng, jitter_mm=1.0)
            t = time.perf_counter()
            r = annotate(img, pts, device=dev, tta=args.tta)
            times.append(time.perf_counter() - t)
            stages.append(r.seconds)
            scores.append(dice(r.mask, truth))
        # a dragged point: move one point by 3 mm and re-run
        moved = pts0.copy()
        moved[0, 0] -= 3.0
        drag = []
        for _ in range(5):
            t = time.perf_counter()
            annotate(img, moved, device=dev, tta=args.tta)
            drag.append(time.perf_counter() - t)
        # a corrective click where the result is most wrong (positive or negative), as in evaluation
        click_t = []
        first = annotate(img, pts0, device=dev, tta=args.tta)
        c = next_click(sitk.GetArrayViewFromImage(first.mask) > 0, sitk.GetArrayViewFromImage(truth) > 0,
                       truth.GetSpacing()[::-1])
        if c is not None:
            p = index_to_physical(truth, c[0][::-1][None].astype(float))
            kw = {"positive": p} if c[1] else {"negative": p}
            for _ in range(5):
                t = time.perf_counter()
                annotate(img, pts0, device=dev, tta=args.tta, **kw)
                click_t.append(time.perf_counter() - t)
        med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        results[name] = {"warm_median_s": statistics.median(times), "warm_p90_s": float(np.percentile(times, 90)),
                         "moved_point_median_s": statistics.median(drag),
                         "corrective_click_median_s": statistics.median(click_t) if click_t else None,
                         "stages_median_s": med,
                         "dice_median": statistics.median(scores)}
        print(f"{name}: warm median {statistics.median(times):.3f} s (p90 {np.percentile(times, 90):.3f}); "
              f"moved point {statistics.median(drag):.3f} s; "
              + (f"corrective click {statistics.median(click_t):.3f} s; " if click_t else "") + "stages " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"; Dice median {statistics.median(scores):.3f}")
    if args.no_generated:
        print(json.dumps(results, indent=1))
        return
    # cold start: a new process that imports, loads the model, reads the image, annotates and writes
    from SegmentationDeepEditLib.imageio import write_image
    from SegmentationDeepEditLib.points import write_points_json
    from SegmentationDeepEditLib import synthetic

    with tempfile.TemporaryDirectory() as tmp:
        case = synthetic.make_brain_case(7)
        write_image(case.images["t1c"], Path(tmp) / "t1c.nii.gz")
        (Path(tmp) / "p.json").write_text(write_points_json(extreme_points_from_mask(synthetic.tumour_core_mask(case.label, "brain"))))
        cold = []
        for n in range(args.cold_runs):
            out = Path(tmp) / f"out{n}.seg.nrrd"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "SegmentationDeepEditLib.cli", "annotate", "--image", str(Path(tmp) / "t1c.nii.gz"),
                            "--points", str(Path(tmp) / "p.json"), "-o", str(out), "--device", dev, "--json"],
                           check=True, capture_output=True)
            cold.append(time.perf_counter() - t)
    results["cold_start_median_s"] = statistics.median(cold)
    print(f"cold start (new process: imports, model load, read, annotate, write): median {statistics.median(cold):.2f} s over {len(cold)} runs")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
