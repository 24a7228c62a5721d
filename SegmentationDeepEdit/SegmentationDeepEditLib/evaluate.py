"""``deepedit evaluate``: an annotation model on cases with a ground truth, honestly.

For each case and region: six extreme points are taken from the ground-truth region with a
fixed, documented perturbation (ties between extreme voxels broken and every point moved by
Gaussian noise of ``jitter_mm`` mm per axis, from a random stream seeded by
``(seed, case number, region number)``), the pipeline runs, and Dice is measured on the
image's own grid. Then up to ``clicks`` corrective clicks are simulated, each at the centre
of the largest error region (:func:`clicks.next_click`), with Dice after each click.

Outputs: ``per_case.csv`` (one row per case, region and click count), ``summary.csv`` (mean,
std, 25th/75th percentile of Dice per region and click count, seconds per case) and
``summary.json``. A region missing from the ground truth has no extreme points to place: it is
reported as not scored (empty Dice, with a note) and left out of the summary.

Every label map is checked against its declared convention first (integer values the
convention has: a BraTS 2013 map declared BraTS 2023 would be scored wrongly).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import geometry_differences, grid_of, resample_to_grid, same_geometry, same_lattice
from .jsonfile import read_json
from .labels import CONVENTIONS, check_label_values

__all__ = ["EvalCase", "load_cases", "evaluate", "summarise", "format_table", "write_results", "AutoCase",
           "load_auto_cases", "evaluate_automatic", "summarise_automatic", "format_auto_table", "write_auto_results"]


@dataclass
class EvalCase:
    """One case: image, label map, its convention and the regions to score."""

    name: str
    image: Path
    label: Path
    convention: str
    regions: List[str]
    source: Optional[Path] = None  # the cases file


def _case_entries(path: Path, required, hint: str = "") -> list:
    """(number from 1, entry) of a cases file's ``cases``, each checked to be an object with the
    ``required`` keys, paths as strings, a known convention and regions as a list or object of names.

    Raises:
        InputError: unreadable file, a wrong shape, an entry lacking a key (``hint`` is appended), or no cases.
    """
    p = Path(path)
    doc = read_json(p, "cases file")
    if not isinstance(doc, dict) or not isinstance(doc.get("cases", []), list):
        raise InputError('expected an object {"cases": [ {case}, ... ]}', p)
    entries = list(enumerate(doc.get("cases", []), start=1))
    for n, c in entries:
        if not isinstance(c, dict):
            raise InputError(f"case {n} is not an object", p)
        what = f"case {n} ({c['name']!r})" if isinstance(c.get("name"), str) else f"case {n}"
        missing = [k for k in required if k not in c]
        if missing:
            if "image" in missing and "images" in c:
                hint = (" (it has 'images', as the automatic models' cases files do: add --model ID to evaluate an "
                        "automatic model, or give one 'image' for the annotation model)")
            raise InputError(f"{what} lacks {', '.join(missing)}{hint}", p)
        paths = [c[k] for k in ("image", "label") if k in c] + \
            (list(c["images"].values()) if isinstance(c.get("images"), dict) else [None] if "images" in c else [])
        if not all(isinstance(v, str) and v for v in paths):
            raise InputError(f"{what}: image and label paths must be strings"
                             + (" ('images' is an object {input: path})" if "images" in c else ""), p)
        if c["convention"] not in CONVENTIONS:
            raise InputError(f"{what}: unknown label convention {c['convention']!r} (known: {', '.join(CONVENTIONS)})", p)
        regions = c["regions"]
        names = list(regions.values()) if isinstance(regions, dict) else regions
        if not isinstance(names, list) or not names or not all(isinstance(r, str) for r in names):
            raise InputError(f"{what}: 'regions' must be a non-empty list of region names, e.g. [\"TC\"]", p)
        unknown = [r for r in names if r not in CONVENTIONS[c["convention"]]]
        if unknown:
            raise InputError(f"{what}: convention {c['convention']!r} has no region {unknown[0]!r} (it has "
                             f"{', '.join(CONVENTIONS[c['convention']])})", p)
    if not entries:
        raise InputError("no cases in the file", p)
    return entries


class _about_case:
    """Context: an InputError about no particular file gets the case's name and the cases file."""

    def __init__(self, case):
        self.case = case

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, InputError) and exc.path is None:
            raise InputError(f"case {self.case.name!r}: {exc.message}", self.case.source) from None
        return False


def _resolver(path: Path, data_root: Path, also_beside: bool):
    """Where a relative path of a cases file points: under ``data_root``; with ``also_beside`` (no
    --data-root given) a path missing there but present beside the cases file is taken from there
    (a user's own cases file lists its images relative to itself)."""
    beside = Path(path).expanduser().resolve().parent

    def resolve(rel) -> Path:
        first = Path(data_root) / rel
        if also_beside and not first.exists() and (beside / rel).exists():
            return beside / rel
        return first
    return resolve


def load_cases(path: Path, data_root: Path, also_beside: bool = False) -> List[EvalCase]:
    """Read a cases file: ``{"cases": [{"name", "image", "label", "convention", "regions"}]}``.

    Relative paths are taken relative to ``data_root`` (with ``also_beside``, one missing there is taken
    beside the cases file when it is there).
    """
    at = _resolver(path, data_root, also_beside)
    return [EvalCase(c.get("name", f"case{n}"), at(c["image"]), at(c["label"]), c["convention"],
                     list(c["regions"]), Path(path))
            for n, c in _case_entries(path, ("image", "label", "convention", "regions"))]


def evaluate(cases: List[EvalCase], model=None, *, clicks: int = 5, seed: int = 0, jitter_mm: float = 1.0,
             device: str = "auto", tta: bool = False, progress=None) -> List[dict]:
    """Run the evaluation; returns one row per (case, region, number of clicks)."""
    from .annotate import annotate
    from .geometry import index_to_physical
    from .imageio import read_image
    from .labels import region_mask
    from .metrics import dice
    from .points import extreme_points_from_mask

    from .bundle import load_bundle

    from .annotate import default_model_for

    named = load_bundle(model) if model is not None else None
    rows: List[dict] = []
    for ci, case in enumerate(cases):
        image = read_image(case.image)
        bundle = named or default_model_for(image)  # no model named: the one `deepedit annotate` would use
        n_clicks = clicks if "positive" in bundle.meta.get("guidance", {}).get("channels", []) else 0
        note = "" if named else f"model {bundle.id} {bundle.version}"
        label = label_on_grid_of(read_image(case.label, what="label"), image, case.name, case.label, case.image.name)
        check_label_values(label, case.convention, case.label)
        for ri, region in enumerate(case.regions):
            truth = region_mask(label, case.convention, region)
            t_arr = sitk.GetArrayViewFromImage(truth) > 0
            if not t_arr.any():
                rows.append({"case": case.name, "region": region, "clicks": 0, "dice": None, "seconds": 0.0,
                             "note": "not scored: region absent from the truth (no extreme points to place)"})
                continue
            rng = np.random.default_rng([seed, ci, ri])
            pts = extreme_points_from_mask(truth, rng=rng, jitter_mm=jitter_mm)
            pos: List[np.ndarray] = []
            neg: List[np.ndarray] = []
            t0 = time.perf_counter()
            for k in range(n_clicks + 1):
                t = time.perf_counter()
                r = annotate(image, pts, bundle, device=device, tta=tta,
                             positive=np.asarray(pos).reshape(-1, 3) if pos else None,
                             negative=np.asarray(neg).reshape(-1, 3) if neg else None)
                pred = sitk.GetArrayViewFromImage(r.mask) > 0
                d = dice(pred, t_arr)
                rows.append({"case": case.name, "region": region, "clicks": k, "dice": round(d, 4),
                             "seconds": round(time.perf_counter() - t, 3), "note": note})
                if k == n_clicks:
                    break
                c = _click(pred, t_arr, truth)
                if c is None:
                    break
                kji, positive = c
                p_lps = index_to_physical(truth, kji[::-1][None].astype(float))[0]
                (pos if positive else neg).append(p_lps)
            if progress:
                progress(f"{case.name} {region}", (ci + 1) / len(cases))
            rows[-1]["case_seconds"] = round(time.perf_counter() - t0, 3)
    return rows


def _click(pred: np.ndarray, truth: np.ndarray, truth_img: sitk.Image):
    """Next click, computed inside the bounding box of prediction and truth (for speed)."""
    from .clicks import next_click

    both = np.argwhere(pred | truth)
    lo = np.maximum(both.min(axis=0) - 2, 0)
    hi = np.minimum(both.max(axis=0) + 3, pred.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    c = next_click(pred[sl], truth[sl], truth_img.GetSpacing()[::-1])
    if c is None:
        return None
    return c[0] + lo, c[1]


def _stats(values, digits: int) -> dict:
    """n, mean, std, 25th and 75th percentile of ``values``, rounded to ``digits`` (std None for one value:
    a spread needs two)."""
    a = np.asarray(list(values), float)
    return {"n": len(a), "mean": round(float(a.mean()), digits),
            "std": round(float(a.std()), digits) if len(a) > 1 else None,
            "p25": round(float(np.percentile(a, 25)), digits), "p75": round(float(np.percentile(a, 75)), digits)}


def _write_tables(rows: List[dict], row_fields: List[str], summary: List[dict], out_dir: Path) -> None:
    """per_case.csv, summary.csv and summary.json into ``out_dir`` (created), each written atomically."""
    from .imageio import atomic_output

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data, cols in (("per_case.csv", rows, row_fields), ("summary.csv", summary, list(summary[0]))):
        with atomic_output(out_dir / name, overwrite=True) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(data)
    with atomic_output(out_dir / "summary.json", overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


def summarise(rows: List[dict]) -> List[dict]:
    """Mean, std, 25th and 75th percentile of Dice per region and click count.

    A case that stopped early (no error left to click) keeps its last Dice for later counts.
    """
    rows = [r for r in rows if r["dice"] is not None]  # regions absent from the truth are not scored
    if not rows:
        raise InputError("nothing to score: every region asked for is absent from its ground truth "
                         "(wrong label files, or the wrong convention?)")
    max_k = max(r["clicks"] for r in rows)
    last: Dict[tuple, float] = {}
    for r in rows:
        last[(r["case"], r["region"], r["clicks"])] = r["dice"]
    keys = sorted({(r["case"], r["region"]) for r in rows})
    out = []
    for region in sorted({r["region"] for r in rows}):
        for k in range(max_k + 1):
            vals = []
            for case, reg in keys:
                if reg != region:
                    continue
                v = None
                for kk in range(k, -1, -1):
                    if (case, reg, kk) in last:
                        v = last[(case, reg, kk)]
                        break
                vals.append(v)
            out.append({"region": region, "clicks": k, **_stats(vals, 4)})
    secs = [r["seconds"] for r in rows if r["clicks"] == 0]
    out.append({"region": "(seconds per annotation)", "clicks": 0, **_stats(secs, 3)})
    return out


def _std_cell(s: dict) -> str:
    """The std column of a table row: '-' where one case gives no spread."""
    return f"{'-':>7s}" if s["std"] is None else f"{s['std']:7.3f}"


def format_table(summary: List[dict]) -> str:
    """The summary as a fixed-width text table."""
    buf = io.StringIO()
    buf.write(f"{'region':26s} {'clicks':>6s} {'n':>3s} {'mean':>7s} {'std':>7s} {'p25':>7s} {'p75':>7s}\n")
    for s in summary:
        buf.write(f"{s['region']:26s} {s['clicks']:6d} {s['n']:3d} {s['mean']:7.3f} {_std_cell(s)} {s['p25']:7.3f} {s['p75']:7.3f}\n")
    return buf.getvalue()


def write_results(rows: List[dict], out_dir: Path) -> List[dict]:
    """Write per_case.csv, summary.csv and summary.json into a new folder; returns the summary."""
    summary = summarise(rows)
    _write_tables(rows, ["case", "region", "clicks", "dice", "seconds", "case_seconds", "note"], summary, out_dir)
    return summary


# ----------------------------------------------------------------------------------------------
# Automatic models
# ----------------------------------------------------------------------------------------------

def label_on_grid_of(label: sitk.Image, image: sitk.Image, case: str, label_path: Path, image_name: str) -> sitk.Image:
    """The truth on the image's grid: as it is when the grids agree; moved voxel for voxel when it holds
    the same voxels stored another way (RAS vs LPS, axes permuted or flipped: nearest neighbour, exact);
    else an InputError naming the case and what differs (resampling a label would change the truth)."""
    if same_geometry(label, image, tol=1e-3):
        return label
    if same_lattice(label, image):
        return resample_to_grid(label, grid_of(image), interpolator=sitk.sitkNearestNeighbor,
                                pixel_type=label.GetPixelID())
    raise InputError(f"case {case!r}: the label is not on the grid of {image_name} ({geometry_differences(label, image)}); "
                     "give the label on the image's grid", label_path)


@dataclass
class AutoCase:
    """One case for an automatic model: named input images, label map, convention and regions.

    ``regions`` maps a region of the model's output convention to the region of the truth's
    convention it is compared with (usually the same name; e.g. ``{"liver": "object"}`` for a
    binary liver mask).
    """

    name: str
    images: Dict[str, Path]
    label: Path
    convention: str
    regions: Dict[str, str]
    source: Optional[Path] = None  # the cases file


def load_auto_cases(path: Path, data_root: Path, also_beside: bool = False) -> List[AutoCase]:
    """Read a cases file for automatic models: ``{"cases": [{"name", "images": {input: path}, "label",
    "convention", "regions": [names] or {output region: truth region}}]}`` (paths relative to ``data_root``;
    with ``also_beside``, one missing there is taken beside the cases file when it is there)."""
    at = _resolver(path, data_root, also_beside)
    out = []
    for n, c in _case_entries(path, ("images", "label", "convention", "regions"),
                              " (automatic models need 'images': {input: path})"):
        regions = c["regions"] if isinstance(c["regions"], dict) else {r: r for r in c["regions"]}
        out.append(AutoCase(c.get("name", f"case{n}"), {k: at(v) for k, v in c["images"].items()},
                            at(c["label"]), c["convention"], dict(regions), Path(path)))
    return out


def _warm_up(bundle, device: str) -> None:
    """Load the network and run it once on one window of zeros, untimed, so that the first timed setting does
    not also pay for loading the weights and the first pass (4.3 s against 0.9 s for glioma-regions here)."""
    import numpy as np

    from .bundle import get_network
    from .device import pick_device
    from .segment import predict_volume

    meta = bundle.meta
    dev = pick_device(device)
    seg = meta["segmentation"]
    d = int(meta.get("divisible_by", 16))
    # 3D: one sliding window; 2D: a few slices of a small square (every slice is one pass)
    shape = [int(r) for r in seg["roi"]] if "roi" in seg else [2, 8 * d, 8 * d]
    window = np.zeros((len(meta["inputs"]), *shape), np.float32)
    try:
        predict_volume(get_network(bundle, dev), window, meta, dev, tta=0)
    except RuntimeError:  # a device that cannot run it: the timed run will fall back and say so
        pass


def evaluate_automatic(cases: List[AutoCase], model, *, tta_levels=(None,), fast: bool = False, device: str = "auto",
                       progress=None, picture_dir: Optional[Path] = None) -> List[dict]:
    """Dice per case, region and TTA level of an automatic model, on each case's reference grid.

    Region rule: a region absent from the truth scores 1 when the prediction is empty too, else 0.
    Returns rows ``{case, region, setting, dice, seconds, note}``; the network is loaded and run once
    before the first timed case (:func:`_warm_up`), so every setting's seconds are warm. With ``picture_dir``, one PNG
    per case and region at the last TTA level: three orthogonal slices of the reference input
    with the model's outline (yellow) and the truth's (green), the Dice in the title.
    """
    from .bundle import load_bundle
    from .imageio import read_image
    from .labels import region_mask
    from .metrics import dice
    from .segment import check_input_names, resolve_input_names, segment_images

    bundle = load_bundle(model)
    if bundle.task != "segmentation":
        raise InputError(f"model {bundle.id!r} is an annotation model; evaluate it with a points cases file")
    out_conv = bundle.meta["segmentation"].get("output_convention")
    if out_conv not in CONVENTIONS:
        raise InputError(f"model {bundle.id!r} declares no known output_convention")
    _warm_up(bundle, device)
    rows: List[dict] = []
    for ci, case in enumerate(cases):
        with _about_case(case):
            paths, _ = resolve_input_names(bundle.meta, list(case.images.items()), ignore_unknown=True)
            check_input_names(bundle.meta, paths, how="add each to the case's 'images'")
            unknown = [r for r in case.regions if r not in CONVENTIONS[out_conv]]
            if unknown:
                raise InputError(f"model {bundle.id!r} has no region {unknown[0]!r} (its regions: "
                                 f"{', '.join(CONVENTIONS[out_conv])})")
        images = {k: read_image(v) for k, v in paths.items()}
        label = read_image(case.label, what="label")
        check_label_values(label, case.convention, case.label)
        ref_name = bundle.meta["segmentation"]["reference"]
        ref = images.get(ref_name)
        if ref is not None:
            label = label_on_grid_of(label, ref, case.name, case.label, f"the reference input {ref_name!r}")
        note = "" if all(i["name"] in images for i in bundle.meta["inputs"]) else \
            "missing: " + ",".join(i["name"] for i in bundle.meta["inputs"] if i["name"] not in images)
        for level in tta_levels:
            t = time.perf_counter()
            with _about_case(case):
                r = segment_images(bundle, images, device=device, tta=level, fast=fast,
                                   sources={k: str(v) for k, v in paths.items()})
            secs = time.perf_counter() - t
            for pred_region, truth_region in case.regions.items():
                pred_img = region_mask(r.label, out_conv, pred_region)
                truth_img = region_mask(label, case.convention, truth_region)
                pred = sitk.GetArrayFromImage(pred_img) > 0
                truth = sitk.GetArrayFromImage(truth_img) > 0
                d = (1.0 if not pred.any() else 0.0) if not truth.any() else dice(pred, truth)
                if picture_dir is not None and level == tta_levels[-1]:
                    from .render import display_windows, render_overlay

                    stem = re.sub(r"[^A-Za-z0-9._]+", "-", f"{case.name} {pred_region}").strip("-")
                    render_overlay(ref, [truth_img, pred_img], Path(picture_dir) / f"{stem}.png",  # centred on the truth
                                   colors=((0.2, 0.9, 0.3), (1.0, 0.8, 0.1)),
                                   labels=(f"truth {truth_region}", f"{bundle.id} {pred_region}"),
                                   title=f"{case.name}: {pred_region}, tta {r.tta}{' fast' if fast else ''}, Dice {d:.3f}",
                                   window=display_windows(bundle.meta).get(bundle.meta["segmentation"]["reference"]))
                rows.append({"case": case.name, "region": pred_region, "setting": f"tta={r.tta}" + (" fast" if fast else ""),
                             "dice": round(float(d), 4), "seconds": round(secs, 2),
                             "note": (note + ("; " if note and not truth.any() else "") +
                                      ("region absent from the truth" if not truth.any() else "")).strip()})
        if progress:
            progress(case.name, (ci + 1) / len(cases))
    return rows


def summarise_automatic(rows: List[dict]) -> List[dict]:
    """Mean, std, 25th/75th percentile of Dice per region and setting, plus seconds per case."""
    out = []
    for setting in sorted({r["setting"] for r in rows}):
        for region in sorted({r["region"] for r in rows}):
            vals = [r["dice"] for r in rows if r["setting"] == setting and r["region"] == region]
            if vals:
                out.append({"region": region, "setting": setting, **_stats(vals, 4)})
        per_case = {r["case"]: r["seconds"] for r in rows if r["setting"] == setting}  # one time per case run
        out.append({"region": "(seconds per case)", "setting": setting, **_stats(per_case.values(), 2)})
    return out


def format_auto_table(summary: List[dict]) -> str:
    """The automatic-model summary as a fixed-width text table."""
    buf = io.StringIO()
    buf.write(f"{'region':20s} {'setting':>12s} {'n':>3s} {'mean':>7s} {'std':>7s} {'p25':>7s} {'p75':>7s}\n")
    for s in summary:
        buf.write(f"{s['region']:20s} {s['setting']:>12s} {s['n']:3d} {s['mean']:7.3f} {_std_cell(s)} "
                  f"{s['p25']:7.3f} {s['p75']:7.3f}\n")
    return buf.getvalue()


def write_auto_results(rows: List[dict], out_dir: Path) -> List[dict]:
    """Write per_case.csv, summary.csv and summary.json for an automatic model; returns the summary."""
    summary = summarise_automatic(rows)
    _write_tables(rows, ["case", "region", "setting", "dice", "seconds", "note"], summary, out_dir)
    return summary
