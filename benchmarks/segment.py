"""Seconds and peak memory of the automatic models on one real case each, on this CPU.

For every (model, setting) a fresh process runs `deepedit segment` end to end (read, resample,
inference, write), so the peak resident memory (ru_maxrss of the child) and the wall time include
everything a user waits for; the time of `segment_images` alone is printed too.

Cases (../shared/data, or $DEEPEDIT_SHARED_DATA):
- glioma-regions: brats2013-pat0004 t1c + flair (240x240x155, 1 mm; no T2), TTA 0 and 1 (flips);
- brain-tumor-2d: the same case (155 axial slices), TTA 0, 1, 2, 3;
- liver-lesion: TotalSegmentator example CT (122x101x30, 3 mm), full and --fast, the
  112-slice ct-full as a larger volume, and ct-full resampled (linear) to 0.78 x 0.78 x 1.25 mm
  (466x385x267 voxels, 96 MB of int16: the size of a thin-slice clinical reconstruction) in a
  temporary folder.
Targets (issue 4): glioma under 30 s with TTA; liver fast under 60 s; 2D with TTA3 under 30 s.
Run: `python benchmarks/segment.py [--repeats N] [--device cpu|cuda]` (median over N runs per setting; with
`--device cuda` the peak GPU memory of torch's allocator is printed too).
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

REPO = Path(__file__).resolve().parents[1]


def _clinical_size_ct(src: Path, folder: Path) -> Path:
    """``src`` resampled (linear) to 0.78 x 0.78 x 1.25 mm over the same extent, written to ``folder``."""
    import SimpleITK as sitk

    im = sitk.ReadImage(str(src))
    spacing = (0.78, 0.78, 1.25)
    size = [int((n - 1) * s / t) + 1 for n, s, t in zip(im.GetSize(), im.GetSpacing(), spacing)]
    out = sitk.Resample(im, size, sitk.Transform(), sitk.sitkLinear, im.GetOrigin(), spacing, im.GetDirection(),
                        -1024, sitk.sitkInt16)
    path = folder / "ct-clinical-size.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _settings(data: Path, tmp: Path, wanted):
    brats = data / "brain-tumor" / "brats2013-pat0004"
    ct = data / "abdomen-ct" / "totalseg-example"
    brain = [f"t1c={brats / 't1c.nii.gz'}", f"flair={brats / 'flair.nii.gz'}"]
    for tta in (0, 1):
        yield "glioma-regions", f"tta {tta}", brain, ["--tta", str(tta)]
    for tta in (0, 1, 2, 3):
        yield "brain-tumor-2d", f"tta {tta}", brain, ["--tta", str(tta)]
    for name in ("ct", "ct-full"):
        if not (ct / f"{name}.nii.gz").is_file():
            print(f"({ct / name}.nii.gz not found: its settings are left out)")
            continue
        for fast in (True, False):
            yield "liver-lesion", f"{name} {'fast' if fast else 'full'}", [f"ct={ct / (name + '.nii.gz')}"], \
                (["--fast"] if fast else [])
    if "liver-lesion" in wanted and (ct / "ct-full.nii.gz").is_file():
        big = _clinical_size_ct(ct / "ct-full.nii.gz", tmp)
        for fast in (True, False):
            yield "liver-lesion", f"466x385x267 {'fast' if fast else 'full'}", [f"ct={big}"], (["--fast"] if fast else [])


_WRAP = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "sys.stderr.write(p.stderr); print(p.stdout.strip()); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def _run(model, inputs, extra, out_dir: Path, device: str = "cpu"):
    """One `deepedit segment` in a fresh process (inside a wrapper that reports that process's peak RSS)."""
    out = out_dir / f"{model}.nii.gz"
    cmd = [sys.executable, "-m", "SegmentationDeepEditLib.cli", "segment", "--model", model, "-o", str(out),
           "--overwrite", "--json", "--device", device] + sum((["--input", i] for i in inputs), []) + list(extra)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    lines = p.stdout.strip().splitlines()
    res = json.loads("\n".join(lines[:-1]))
    if device == "cuda" and res.get("device") != "cuda":
        raise SystemExit(f"{' '.join(cmd)} ran on {res.get('device')}, not on the GPU")
    return wall, res["seconds"]["total"], int(lines[-1]) / 1024, res.get("gpu_peak_mb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--models", default="glioma-regions,brain-tumor-2d,liver-lesion")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    data = Path(os.environ.get("DEEPEDIT_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (data / "brain-tumor").is_dir():
        raise SystemExit(f"real data not found at {data}: the segmentation benchmark needs it")
    wanted = args.models.split(",")
    print(f"torch threads: {os.cpu_count()} cores on this machine; device {args.device}")
    gpu = args.device == "cuda"
    print(f"{'model':16s} {'setting':16s} {'wall s':>8s} {'pipeline s':>10s} {'peak RSS MB':>12s}"
          + (f" {'peak GPU MB':>12s}" if gpu else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for model, setting, inputs, extra in _settings(data, Path(tmp), wanted):
            if model not in wanted:
                continue
            walls, pipes, peaks, gpeaks = [], [], [], []
            for _ in range(args.repeats):
                w, sec, peak, gpeak = _run(model, inputs, extra, Path(tmp), args.device)
                walls.append(w)
                pipes.append(sec)
                peaks.append(peak)
                gpeaks.append(gpeak or 0.0)
            print(f"{model:16s} {setting:16s} {statistics.median(walls):8.1f} {statistics.median(pipes):10.1f} "
                  f"{max(peaks):12.0f}" + (f" {max(gpeaks):12.0f}" if gpu else ""), flush=True)


if __name__ == "__main__":
    main()
