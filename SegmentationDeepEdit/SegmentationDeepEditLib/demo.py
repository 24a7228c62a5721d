"""``deepedit demo``: the whole annotation workflow on a generated case, no data needed.

Writes into the output folder: the generated image (``image.nrrd``: NRRD keeps an oblique,
mirrored direction exactly, where NIfTI's float32 qform would move it by a fraction of a mm) and truth
(``truth.seg.nrrd``), the six points (``points.json``, LPS mm), the result
(``segmentation.seg.nrrd``), a picture (``overview.png``: three orthogonal slices with the
result and truth outlines) and ``result.json`` (Dice against the truth, timings, device).
All files are made in a temporary folder beside the output and moved in only when every one
of them is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = ["run_demo", "DEMO_FILES"]

DEMO_FILES = ("image.nrrd", "truth.seg.nrrd", "points.json", "segmentation.seg.nrrd", "overview.png", "result.json")


def run_demo(out_dir: Path, *, seed: int = 7, kind: str = "brain", model: Optional[str] = None,
             device: str = "auto", tta: bool = False, overwrite: bool = False, progress=None) -> dict:
    """Generate a case, take six extreme points from its truth, annotate, write the outputs.

    Args:
        out_dir: folder to write (created if missing; existing demo files are refused
            unless ``overwrite``).
        seed: generator seed.
        kind: "brain" (tumour core on T1c) or "ct" (liver).
        model, device, tta: as for :func:`annotate.annotate`.

    Returns:
        The summary also written to ``result.json``.
    """
    from . import synthetic
    from .annotate import annotate
    from .imageio import write_image, write_segmentation
    from .metrics import dice
    from .points import extreme_points_from_mask, write_points_json
    from .render import render_overlay

    report = progress or (lambda stage, frac: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output exists and is not a folder", out_dir)
    if not out_dir.parent.is_dir():
        raise InputError("the folder that should hold the output does not exist", out_dir.parent)
    clash = [f for f in DEMO_FILES if (out_dir / f).exists()]
    if clash and not overwrite:
        raise InputError(f"already holds {', '.join(clash)} (use --overwrite to replace)", out_dir)
    t0 = time.perf_counter()
    report("generating a synthetic case", 0.05)
    if kind == "brain":
        case = synthetic.make_brain_case(seed)
        image, channel = case.images["t1c"], "t1c"
    elif kind == "ct":
        case = synthetic.make_ct_case(seed)
        image, channel = case.images["ct"], "ct"
    else:
        raise InputError(f"unknown demo kind {kind!r} (brain or ct)")
    truth = synthetic.tumour_core_mask(case.label, kind)
    pts = extreme_points_from_mask(truth)
    truth_ml = float((sitk.GetArrayViewFromImage(truth) > 0).sum()) * float(np.prod(truth.GetSpacing())) / 1000.0
    t_gen = time.perf_counter() - t0
    report("annotating", 0.3)
    result = annotate(image, pts, model, device=device, tta=tta)
    d = dice(result.mask, truth)
    report("writing", 0.8)
    tmp = Path(tempfile.mkdtemp(prefix=".deepedit-demo-", dir=out_dir.parent))
    try:
        write_image(image, tmp / "image.nrrd")
        target = "Tumor core" if kind == "brain" else "Liver"
        write_segmentation(truth, tmp / "truth.seg.nrrd", [{"value": 1, "name": f"{target} (truth)", "color": (0.2, 0.9, 0.3)}])
        write_segmentation(result.mask, tmp / "segmentation.seg.nrrd", [result.segment_description(target)])
        (tmp / "points.json").write_text(write_points_json(pts), encoding="utf-8")
        render_overlay(image, [result.mask, truth], tmp / "overview.png",
                       title=f"demo {kind} seed {seed}: {channel}, Dice {d:.3f} ({result.model_id} {result.model_version})")
        summary = {
            "kind": kind, "seed": seed, "image": channel, "object": target, "dice": round(d, 4),
            "volume_ml": {"result": round(result.volume_ml, 2),
                          "truth": round(truth_ml, 2)},
            "model": {"id": result.model_id, "version": result.model_version}, "device": result.device, "tta": tta,
            "seconds": {"generate": round(t_gen, 3), **{k: round(v, 3) for k, v in result.seconds.items()}},
            "points_lps_mm": np.round(pts, 2).tolist(), "warnings": result.warnings,
            "files": list(DEMO_FILES),
        }
        (tmp / "result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        out_dir.mkdir(exist_ok=True)
        for f in DEMO_FILES:
            os.replace(tmp / f, out_dir / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report("done", 1.0)
    summary["output"] = str(out_dir)
    return summary
