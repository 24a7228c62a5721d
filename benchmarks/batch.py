"""Batch labelling on this CPU: seconds per study, peak memory, speed-up with workers, registration error.

Builds batch input studies from real co-registered cases in ../shared/data (tcga-du-7294 and
brats-gli-00001-000: T1c as the 1 mm reference; T1, T2, FLAIR, and optionally DWI-like and
SWI-like, each after a known random head motion, at the 1.5 T protocol's voxel sizes: T2
0.8x0.6x5 mm, FLAIR 0.9x0.9x5, DWI 1.2x1.2x5, SWI 1.1x0.9x2, T1 1 mm), alternately as DICOM
and NIfTI; then runs ``deepedit batch`` on them in a fresh process, once sequentially and once
with ``--workers N``, and prints:

- seconds per study (total, registration, segmentation) from the reports;
- wall time of each run and the speed-up with workers;
- peak resident memory of the largest process of each run;
- the registration error per sequence (mean/max distance of brain voxels between the
  recovered and the true transform; acceptance: < 1 mm T2 and FLAIR, < 1.5 mm DWI/SWI-like).

Run: ``python benchmarks/batch.py [--studies 2] [--sequences t1,t2,flair] [--workers 2] [--model ID]``.
Segmentation is timed only when an automatic brain model is installed (or given with --model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))

CASES = ["brain-tumor/tcga-du-7294", "brain-tumor/brats-gli-00001-000"]
TARGETS = {"t1": 1.0, "t2": 1.0, "flair": 1.0, "dwi": 1.5, "swi": 1.5}

_RUNNER = r"""
import json, resource, sys, time
from pathlib import Path
from SegmentationDeepEditLib.batch.run import BatchOptions, run_batch
inp, out, workers, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] or None
t0 = time.perf_counter()
r = run_batch(Path(inp), Path(out), options=BatchOptions(model=model), workers=workers)
wall = time.perf_counter() - t0
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"wall": wall, "peak_mb": peak / 1024, "exit": r.exit_code, "states": [s["state"] for s in r.studies]}))
"""


def _run(inp: Path, out: Path, workers: int, model: str) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", _RUNNER, str(inp), str(out), str(workers), model or ""],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"batch run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=2)
    ap.add_argument("--sequences", default="t1,t2,flair", help="moving sequences besides the T1c reference")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="", help="automatic model id (default: the installed brain model, if any)")
    ap.add_argument("--keep", help="folder to keep the inputs and outputs in (default: a temporary folder)")
    args = ap.parse_args()

    import fixtures_batch as fb
    from SegmentationDeepEditLib.batch.register import read_transform

    data = Path(os.environ.get("DEEPEDIT_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (data / CASES[0]).is_dir():
        raise SystemExit(f"real data not found at {data}")
    seqs = ["t1c"] + [s.strip() for s in args.sequences.split(",") if s.strip()]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="deepedit-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "in"
    t0 = time.perf_counter()
    truths, cases = {}, {}
    for n in range(args.studies):
        case_dir = data / CASES[n % len(CASES)]
        cases.setdefault(case_dir, fb.load_case(case_dir, 1.0))
        name = f"study-{n + 1:02d}"
        truths[name] = (fb.build_study(cases[case_dir], inp, name, sequences=seqs, fmt="dicom" if n % 2 == 0 else "nifti",
                                       seed=100 + n), cases[case_dir])
    print(f"built {args.studies} studies ({', '.join(seqs)}; protocol voxel sizes) in {time.perf_counter() - t0:.0f} s "
          f"under {work}")

    runs = {}
    for label, workers in (("sequential", 1), (f"{args.workers} workers", args.workers)):
        out = work / f"out-{workers}"
        runs[label] = (_run(inp, out, workers, args.model), out)
        r = runs[label][0]
        print(f"{label:12s}: wall {r['wall']:6.1f} s, {r['wall'] / args.studies:5.1f} s per study, "
              f"peak memory {r['peak_mb']:.0f} MB (largest process), states {r['states']}")
    seq_wall = runs["sequential"][0]["wall"]
    par_wall = runs[f"{args.workers} workers"][0]["wall"]
    print(f"speed-up with {args.workers} workers: {seq_wall / par_wall:.2f}x on {os.cpu_count()} CPU cores")

    out = runs["sequential"][1]
    print("\nper study (sequential run):")
    print(f"  {'study':10s} {'total s':>8s} {'register s':>11s} {'segment s':>10s}  segmentation")
    errors = {}
    for name, (truth, case) in truths.items():
        rep = json.loads((out / name / "report.json").read_text())
        s = rep["seconds"]
        seg = rep["segmentation"]
        print(f"  {name:10s} {s['total']:8.1f} {s['register_total']:11.1f} {s['segment']:10.1f}  "
              f"{seg['status']}{': ' + seg.get('reason', '') if seg.get('reason') else ''}")
        for seq in seqs[1:]:
            tf = read_transform(out / name / "transforms" / f"{seq}.tfm")
            errors.setdefault(seq, []).append(fb.registration_error_mm(tf, truth.transform(seq), case.brain))
    print("\nregistration error (brain voxels, recovered vs true transform):")
    for seq, vals in errors.items():
        means = [m for m, _ in vals]
        worst = max(w for _, w in vals)
        sp = "x".join(f"{v:g}" for v in fb.PROTOCOL[seq]["spacing"])
        verdict = "ok" if max(means) < TARGETS[seq] else "ABOVE TARGET"
        print(f"  {seq:6s} {sp:12s} mean {np.mean(means):.2f} mm (worst study {max(means):.2f}), max {worst:.2f} mm; "
              f"target < {TARGETS[seq]} mm: {verdict}")


if __name__ == "__main__":
    main()
