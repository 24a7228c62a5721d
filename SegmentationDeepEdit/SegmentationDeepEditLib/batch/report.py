"""What a batch run leaves for people: report.json and a QC picture per study, summary.csv and errors.csv.

Nothing here writes a patient name or ID: studies are named after their folders, DICOM UIDs
appear only as SHA-256 hashes, and the DICOM attributes read by discovery exclude every
patient attribute. Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..geometry import resample_to_grid
from ..imageio import atomic_output
from ..render import _lps_grid
from .identify import SEQUENCES

__all__ = [
    "SUMMARY_COLUMNS",
    "ERROR_COLUMNS",
    "series_sha256",
    "file_record",
    "write_json",
    "write_csv",
    "render_qc",
    "format_plans",
    "format_result",
    "TABLE_COLUMNS",
    "table_rows",
    "review_files",
]

SUMMARY_COLUMNS = [
    "study", "status", "needs_review", "reference", "sequences", "registered", "flagged", "refused", "unreadable",
    "segmentation", "volumes_ml", "seconds_total", "seconds_registration", "seconds_segmentation", "report", "error",
]
ERROR_COLUMNS = ["study", "series", "stage", "error"]


def series_sha256(files: Sequence[str]) -> str:
    """SHA-256 of a series: of one file, or of the concatenated SHA-256 digests of its files in slice order."""
    from ..bundle import sha256_of

    if len(files) == 1:
        return sha256_of(Path(files[0]))
    h = hashlib.sha256()
    for f in files:
        h.update(bytes.fromhex(sha256_of(Path(f))))
    return h.hexdigest()


def file_record(path: Path) -> Dict[str, Any]:
    """Size and SHA-256 of an output file (the manifest checks both on --resume)."""
    from ..bundle import sha256_of

    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def write_json(data: Any, path: Path, *, overwrite: bool = False) -> Path:
    """Write JSON (sorted keys, 2-space indent) atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    with atomic_output(path, overwrite) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(rows: Iterable[Dict[str, Any]], columns: Sequence[str], path: Path, *, overwrite: bool = True) -> Path:
    """Write a CSV with a header row atomically; missing values are empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    with atomic_output(path, overwrite) as tmp:
        Path(tmp).write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def _window(a: np.ndarray) -> tuple:
    v = a[np.isfinite(a) & (a != 0)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def render_qc(path: Path, volumes: Dict[str, sitk.Image], *, label: Optional[sitk.Image] = None,
              segments: Sequence[Dict[str, Any]] = (), captions: Optional[Dict[str, str]] = None,
              title: str = "", windows: Optional[Dict[str, Tuple[float, float]]] = None) -> Path:
    """Write the QC picture: axial, coronal and sagittal rows, one column per registered sequence.

    All volumes must share one grid (the registered grid). Slices go through the centre of the
    segmentation when there is one, else through the centre of the reference's bright voxels.
    Segment outlines are drawn on every column in the segments' colours. Views are
    radiological (patient right on the left of axial and coronal views), superior up.

    Args:
        path: the PNG to write (atomically; must not exist).
        volumes: sequence name -> image, in display order (reference first).
        label: optional label map on the same grid.
        segments: descriptions of the label values (value, name, color).
        captions: sequence name -> a line under its name (e.g. registration quality).
        title: a line above the picture.
        windows: sequence name -> (low, high) grey-scale window (e.g. a CT soft-tissue window in HU);
            the others are windowed from their own intensities.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(volumes)
    first = volumes[names[0]]
    grid = _lps_grid(first, max_size=200)
    arrays = {n: sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(v, sitk.sitkFloat32), grid, default=np.nan))
              for n, v in volumes.items()}
    lab = None
    if label is not None:
        lab = sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(label, sitk.sitkUInt8), grid,
                                                      interpolator=sitk.sitkNearestNeighbor))
    ref = arrays[names[0]]
    if lab is not None and lab.any():
        centre = np.argwhere(lab > 0).mean(axis=0).round().astype(int)
    else:
        fin = np.nan_to_num(ref, nan=0.0)
        lo, hi = _window(fin)
        bright = fin > lo + 0.2 * (hi - lo)
        centre = (np.argwhere(bright).mean(axis=0).round().astype(int) if bright.any()
                  else np.asarray(ref.shape) // 2)
    k, j, i = (int(c) for c in centre)
    views = [("axial", lambda a: a[k], False), ("coronal", lambda a: a[:, j, :], True),
             ("sagittal", lambda a: a[:, :, i], True)]
    ncol = len(names)
    fig, axes = plt.subplots(3, ncol, figsize=(max(2.6 * ncol, 5.2), 2.6 * 3 + 0.9), dpi=90, squeeze=False)
    for c, n in enumerate(names):
        arr = arrays[n]
        vmin, vmax = (windows or {}).get(n) or _window(np.nan_to_num(arr, nan=0.0))
        for r, (vname, take, flip) in enumerate(views):
            ax = axes[r][c]
            sl = np.nan_to_num(take(arr), nan=vmin)
            sl = sl[::-1] if flip else sl
            ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            if lab is not None:
                m = take(lab)
                m = m[::-1] if flip else m
                for s in segments:
                    mk = (m == int(s["value"])).astype(np.uint8)
                    if mk.any() and mk.min() != mk.max():
                        ax.contour(mk, levels=[0.5], colors=[tuple(s["color"])], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(vname)
            if r == 0:
                cap = (captions or {}).get(n, "")
                ax.set_title(n + (f"\n{cap}" if cap else ""), fontsize=8)
    if segments and lab is not None:
        handles = [plt.Line2D([], [], color=tuple(s["color"]), label=str(s["name"])) for s in segments]
        fig.legend(handles=handles, loc="lower center", ncol=max(1, min(len(handles), 6, ncol)), frameon=False, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    with atomic_output(path) as tmp:
        fig.savefig(str(tmp), format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def format_plans(plans: Sequence[Any], without_images: Sequence[str] = ()) -> str:
    """The text ``deepedit batch --dry-run`` prints: per study, each series and its verdict."""
    lines = []
    for p in plans:
        st = p.study
        head = f"{st.name} ({'+'.join(st.kinds) or 'no series'}, {len(st.series)} series"
        head += f", {st.ignored_files} other files)" if st.ignored_files else ")"
        head += f": WOULD FAIL: {p.problems[0]}" if p.problems else f": reference {p.reference}"
        lines.append(head)
        for v in p.verdicts:
            ident = v.identification
            seq = ident.sequence or ("?" if not ident.ambiguous else "ambiguous")
            lines.append(f"  {v.series.describe()[:46]:46s} -> {seq:9s} {ident.confidence:4.2f} {ident.source:11s} "
                         f"{v.role}{': ' + v.note if v.note and v.role != 'used' else ''}")
    ready = sum(1 for p in plans if p.ok)
    lines.extend(_without_images(without_images))
    lines.append(f"{len(plans)} studies: {ready} ready, {len(plans) - ready} would fail")
    return "\n".join(lines)


def _without_images(folders: Sequence[str]) -> List[str]:
    return [f"  {f[:40]:40s} not a study: no image file and no DICOM series found" for f in folders]


def format_result(result: Any) -> str:
    """The text ``deepedit batch`` prints at the end of a run."""
    lines = []
    for s in result.studies:
        state = "done (earlier run)" if s.get("skipped") else s["state"]
        if s.get("needs_review") == "yes" and s["state"] == "done":
            state += ", review"
        secs = s.get("seconds")
        lines.append(f"  {s['study'][:40]:40s} {state:22s} {'' if secs is None else f'{secs:7.1f} s'}"
                     f"{'  ' + s['error'] if s.get('error') else ''}")
        lines.extend(f"      warning: {w}" for w in (s.get("warnings") or []) if not s.get("error"))
    lines.extend(_without_images(getattr(result, "without_images", ())))
    c = result.counts
    out = result.output_dir
    bad = c.get("with_unreadable_files", 0)
    lines.append(f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('skipped', 0)} already done"
                 f"{f', {bad} with files that could not be read' if bad else ''}; "
                 f"see {out / 'summary.csv'} and {out / 'errors.csv'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- study table and review

TABLE_COLUMNS = ["study", "status", "sequences", "seconds", "qc"]
"""Columns of the study table (the Slicer module's Batch tab): one row per study."""


def _plan_row(plan: Dict[str, Any]) -> Dict[str, str]:
    seqs = list((plan.get("sequences") or {}).keys())
    ref = plan.get("reference")
    problems = plan.get("problems") or []
    return {"study": str(plan.get("study", "")),
            "status": "ready" if ref and not problems else f"will fail: {problems[0] if problems else 'no reference'}",
            "sequences": ", ".join(f"{s} (reference)" if s == ref else s for s in seqs),
            "seconds": "", "qc": "; ".join(plan.get("warnings") or [])}


def _qc_text(summary: Dict[str, Any]) -> str:
    if summary.get("status") == "failed":
        return str(summary.get("error") or "failed")
    counts = [f"{summary.get(k)} {k}" for k in ("flagged", "refused", "unreadable") if str(summary.get(k, 0)) not in ("0", "")]
    parts = [("review: " + ", ".join(counts)) if counts else
             ("review" if summary.get("needs_review") == "yes" else "registration ok")]
    seg = str(summary.get("segmentation") or "")
    vols = str(summary.get("volumes_ml") or "")
    if vols:
        parts.append(", ".join(f"{v} mL" for v in vols.split(";")))
    elif seg and seg != "segmented":
        parts.append(seg)
    return "; ".join(parts)


def table_rows(plans: Sequence[Dict[str, Any]] = (), output_dir: Optional[Path] = None) -> list:
    """The study table: each planned study (``StudyPlan.to_dict()``, from a dry run) with its state in the run.

    The state comes from the output folder's ``manifest.json`` (written atomically by the driver
    after each study, so it can be read while a run goes on): ``running`` (started; after a cancel
    or a kill, ``--resume`` finishes it), ``done`` or ``failed``, with seconds and Dice-free QC
    figures (registration verdicts, region volumes) or the reason of the failure. Studies of the
    output folder that the plans do not list come after the planned ones.

    Returns:
        Rows ``{column: text}`` with the keys :data:`TABLE_COLUMNS`.
    """
    from .manifest import MANIFEST_NAME  # not at the top: manifest imports this module (write_json)

    rows: Dict[str, Dict[str, str]] = {}
    for plan in plans:
        row = _plan_row(plan)
        rows[row["study"]] = row
    studies: Dict[str, Any] = {}
    if output_dir is not None:
        mpath = Path(output_dir) / MANIFEST_NAME
        if mpath.is_file():
            try:
                studies = json.loads(mpath.read_text(encoding="utf-8")).get("studies") or {}
            except ValueError:
                studies = {}  # being replaced right now: the next refresh reads it
    for name, rec in studies.items():
        row = rows.setdefault(name, {"study": name, "status": "", "sequences": "", "seconds": "", "qc": ""})
        state = rec.get("state") or ""
        summary = rec.get("summary") or {}
        if state == "done" and summary.get("needs_review") == "yes":
            state = "done, review"
        row["status"] = state
        if summary.get("sequences") and not row["sequences"]:
            row["sequences"] = ", ".join(str(summary["sequences"]).split(";"))
        total = (rec.get("seconds") or {}).get("total")
        row["seconds"] = "" if total is None else f"{float(total):.1f}"
        if state != "running":
            row["qc"] = _qc_text(summary or {"status": state, "error": rec.get("error")})
    return list(rows.values())


def review_files(output_dir: Path, study: str) -> Dict[str, Any]:
    """What to load to review one finished study: its registered volumes (reference first) and segmentation.

    Returns:
        ``{"study", "reference", "volumes": [(sequence, path), ...], "segmentation": path or None,
        "qc": path or None}``; paths are absolute.

    Raises:
        InputError: the study has no finished output in ``output_dir``.
    """
    from ..errors import InputError
    from ..jsonfile import read_json

    folder = Path(output_dir) / study
    rpath = folder / "report.json"
    if not study or not rpath.is_file():
        raise InputError(f"study {study!r} has no finished output here (no report.json); run the batch first", folder)
    report = read_json(rpath, f"report of study {study!r}")
    files = set(report.get("files") or [])
    ref = (report.get("reference") or {}).get("sequence")
    order = ([ref] if ref else []) + [s for s in SEQUENCES if s != ref]
    volumes = [(s, str(folder / f"registered/{s}.nii.gz")) for s in order if f"registered/{s}.nii.gz" in files]
    seg = next((str(folder / f) for f in ("segmentation.seg.nrrd", "segmentation.nii.gz") if f in files), None)
    return {"study": study, "reference": ref, "volumes": volumes, "segmentation": seg,
            "qc": str(folder / "qc.png") if "qc.png" in files else None}
