"""The batch run: one task per study, run in this process, in worker processes, or on Dask.

:func:`process_study` is the per-study task: read the chosen series, register each to the
reference, resample onto the reference's box at 1 mm, segment, draw the QC picture and write
``report.json``. It builds everything in a temporary folder inside the output folder and moves
it into place with one rename, so a study folder is either complete or absent. It never
raises for a bad study: it returns a failed :class:`StudyResult` with the reason.

:func:`run_batch` is the driver: it finds the studies, plans them (:mod:`.plan`), skips those
already done (``resume``), hands the rest to the chosen executor, and records each result in
the manifest, ``summary.csv`` and ``errors.csv`` as it arrives. Only the driver writes those
files.

Output folder layout::

    OUTPUT_DIR/manifest.json, summary.csv, errors.csv
    OUTPUT_DIR/<study>/report.json, qc.png
    OUTPUT_DIR/<study>/registered/<sequence>.nii.gz    (reference box, 1 mm voxels by default)
    OUTPUT_DIR/<study>/transforms/<sequence>.tfm       (reference -> sequence, ITK/Slicer)
    OUTPUT_DIR/<study>/segmentation.seg.nrrd, segmentation.nii.gz  (when a model ran)

Exit codes of a run: :data:`EXIT_OK` (every study done), :data:`EXIT_SOME_FAILED` (a study failed, or a
series of a study that was done could not be read: a corrupt or truncated file, named in ``errors.csv``),
:data:`EXIT_NOTHING_DONE` (no study found, or every study failed).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings as pywarnings
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import SimpleITK as sitk

from .. import __version__
from ..errors import DeepEditError, InputError, NotSkullStripped
from ..imageio import read_dicom_series, read_image, write_image, write_segmentation
from .discover import Series, discover_studies
from .identify import SEQUENCES, Mapping, load_mapping
from .manifest import MANIFEST_NAME, TMP_PREFIX, Manifest, remove_tree, study_fingerprint
from .plan import StudyPlan, plan_study
from .register import (QualityThresholds, RegistrationSettings, footprint_on, head_mask, largest_shift_mm, output_grid,
                       register_rigid, registration_quality, resample_onto, transform_parameters, write_transform)
from .report import ERROR_COLUMNS, SUMMARY_COLUMNS, file_record, render_qc, series_sha256, write_csv, write_json
from .segment import Segmenter, SegmentStep, region_volumes_ml, resolve_segment_step

__all__ = [
    "EXIT_OK", "EXIT_SOME_FAILED", "EXIT_NOTHING_DONE",
    "BatchOptions", "StudyResult", "BatchResult", "process_study", "run_batch", "plan_batch", "check_folders",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SOME_FAILED = 4
EXIT_NOTHING_DONE = 5

Progress = Optional[Callable[[str, float], None]]


@dataclass(frozen=True)
class BatchOptions:
    """Options of a batch run that decide its outputs (all are recorded in the manifest).

    Attributes:
        reference: acceptable reference sequences in order of preference (default T1c).
        model: ``--model``: None (installed brain model if any), "none", or a bundle id.
        spacing_mm: voxel size of the registered volumes (None: the reference's own grid).
        registration: registration settings.
        thresholds: the registration verdict's limits.
        device: device for the segmentation model.
        threads: ITK threads per study (0: ITK's default in a single process; with ``--workers N`` the
            machine's cores / N; on Dask each host's cores / the studies that may run there at once).
        segmenter: a Python segmenter (tests, scripts); overrides ``model``.
    """

    reference: Tuple[str, ...] = ("t1c",)
    model: Optional[str] = None
    spacing_mm: Optional[float] = 1.0
    registration: RegistrationSettings = RegistrationSettings()
    thresholds: QualityThresholds = QualityThresholds()
    device: str = "auto"
    threads: int = 0
    segmenter: Optional[Segmenter] = None

    def recorded(self, mapping: Mapping, mapping_sha256: Optional[str]) -> Dict[str, Any]:
        """The options that change outputs, as recorded in the manifest (resume must match them)."""
        seg = self.segmenter
        return {"reference": list(self.reference), "model": self.model if seg is None else f"python:{seg.model_id}",
                "spacing_mm": self.spacing_mm, "registration": self.registration.to_dict(),
                "thresholds": vars(self.thresholds).copy(), "mapping_sha256": mapping_sha256}


@dataclass
class StudyResult:
    """What one study task returns to the driver.

    Attributes:
        name: the study.
        state: "done" or "failed".
        error: why it failed (one line).
        warnings: things to review.
        errors: per-series problems ``{"series", "stage", "error"}`` (a done study can have some).
        outputs: output files (relative to the study folder) -> ``{"bytes", "sha256"}``.
        summary: the study's ``summary.csv`` row.
        seconds: timings.
    """

    name: str
    state: str
    error: Optional[str] = None
    warnings: List[str] = field(default_factory=list)
    errors: List[Dict[str, str]] = field(default_factory=list)
    outputs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    summary: Dict[str, Any] = field(default_factory=dict)
    seconds: Dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> Dict[str, Any]:
        return {"state": self.state, "error": self.error, "warnings": self.warnings, "errors": self.errors,
                "outputs": self.outputs, "summary": self.summary, "seconds": self.seconds}


@dataclass
class BatchResult:
    """The outcome of :func:`run_batch`.

    Attributes:
        exit_code: :data:`EXIT_OK`, :data:`EXIT_SOME_FAILED` or :data:`EXIT_NOTHING_DONE`.
        studies: one dict per study of the input (name, state, seconds, error, skipped).
        plans: the plans (always; the only output of a dry run).
        output_dir: the output folder (None for a dry run).
        without_images: top-level sub-folders of the input that hold no image file and no DICOM
            series (an empty or unfinished copy is said, not silently passed over).
    """

    exit_code: int
    studies: List[Dict[str, Any]]
    plans: List[StudyPlan]
    output_dir: Optional[Path]
    dry_run: bool = False
    without_images: List[str] = field(default_factory=list)  # sub-folders of the input where no study was found

    @property
    def counts(self) -> Dict[str, int]:
        c = {"done": 0, "failed": 0, "skipped": 0, "with_unreadable_files": 0}
        for s in self.studies:
            c["skipped" if s.get("skipped") else s["state"]] = c.get("skipped" if s.get("skipped") else s["state"], 0) + 1
            c["with_unreadable_files"] += bool(s.get("unreadable"))
        return c

    def to_dict(self) -> Dict[str, Any]:
        return {"exit_code": self.exit_code, "dry_run": self.dry_run, "counts": self.counts, "studies": self.studies,
                "output": None if self.output_dir is None else str(self.output_dir),
                "plans": [p.to_dict() for p in self.plans], "without_images": list(self.without_images)}


class _StudyFailed(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


# ------------------------------------------------------------------------------ study task


def _relative(text: str, root: Path) -> str:
    """Error text with the input folder's absolute path removed."""
    return str(text).replace(str(root) + os.sep, "").replace(str(root), ".")


def _clean(text: str, root: Path, series: Any = ()) -> str:
    """A message fit for reports: no input folder prefix, no DICOM UID (its hash instead).

    ``series``: one :class:`Series` or several whose UIDs to hide.
    """
    text = _relative(text, root)
    for s in ([series] if isinstance(series, Series) else series):
        if s.series_uid:
            text = text.replace(s.series_uid, f"uid-sha256:{s.uid_hash}")
    return text


def _read_series(s: Series) -> sitk.Image:
    what = f"series {s.describe()}"
    if s.kind == "dicom":  # its own files: they may lie in several folders
        return read_dicom_series(s.path, s.series_uid, what=what, files=s.files)
    return read_image(s.path, what=what)


def _rounded(t: sitk.Euler3DTransform) -> sitk.Euler3DTransform:
    """The transform with parameters rounded (1e-9 rad, 1e-6 mm).

    The registration differs between runs in the last digits (ITK's threaded metric sums);
    rounding far below any physical meaning removes the differences that stay in the last
    digits, but not all: the optimiser can take a slightly different path (a QA pass measured
    translations 6e-5 mm apart and label maps of repeated runs differing by 34-115 voxels of a
    brain, at the tumour's edge), so repeated or resumed runs are equal to within that, not
    byte for byte.
    """
    p = t.GetParameters()
    out = sitk.Euler3DTransform()
    out.SetCenter([round(float(v), 6) for v in t.GetCenter()])
    out.SetParameters([round(float(v), 9) for v in p[:3]] + [round(float(v), 6) for v in p[3:]])
    return out


def _grid_dict(img: sitk.Image) -> Dict[str, Any]:
    return {"size": list(img.GetSize()), "spacing_mm": [round(float(v), 6) for v in img.GetSpacing()],
            "origin_mm": [round(float(v), 4) for v in img.GetOrigin()],
            "direction": [round(float(v), 6) for v in img.GetDirection()]}


def process_study(plan: StudyPlan, input_dir: str, output_dir: str, options: BatchOptions,
                  step: Optional[SegmentStep] = None, run_token: Optional[str] = None) -> StudyResult:
    """Process one study; never raises for a bad study (returns a failed result).

    Args:
        plan: from :func:`.plan.plan_study`.
        input_dir: the batch input folder (paths in messages are made relative to it).
        output_dir: the batch output folder; the study's folder ``output_dir/<study>`` must not
            exist (the driver removes stale ones).
        options: run options.
        step: the segmentation step (resolved by the driver; resolved here when None).
        run_token: the driver's lock token: the results are moved into ``output_dir`` only while
            the lock still holds it (a task that outlives its killed driver writes nothing).

    Returns:
        The result; on success ``output_dir/<study>`` holds every output.
    """
    t_start = time.perf_counter()
    name = plan.study.name
    root = Path(input_dir)
    out_root = Path(output_dir)
    tmp = out_root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:10]}"
    errors: List[Dict[str, str]] = []
    warnings: List[str] = list(plan.warnings)
    seconds: Dict[str, Any] = {"read": 0.0, "register": {}, "segment": 0.0, "qc": 0.0}
    old_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    # the registration and resampling get these threads explicitly; the process-wide default (for the
    # other filters) may be changed by another study sharing this process (a threaded Dask worker)
    itk_threads = options.threads if options.threads > 0 else old_threads
    if options.threads > 0:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(options.threads)
    try:
        if step is None:
            step = resolve_segment_step(options.model, custom=options.segmenter, device=options.device)
        if not plan.ok:
            raise _StudyFailed("plan", plan.problems[0])
        (tmp / "registered").mkdir(parents=True)
        (tmp / "transforms").mkdir()
        chosen = plan.sequences
        ref_name = plan.reference
        ref_series = chosen[ref_name]
        t0 = time.perf_counter()
        try:
            ref_img = _read_series(ref_series)
        except InputError as e:
            raise _StudyFailed("read", f"the reference ({ref_name}) cannot be read: "
                                       f"{_clean(str(e), root, ref_series)}") from None
        seconds["read"] += time.perf_counter() - t0
        ref_mask = head_mask(ref_img)  # once for all sequences
        grid = output_grid(ref_img, options.spacing_mm)
        ref_out = resample_onto(ref_img, grid, threads=options.threads)
        write_image(ref_out, tmp / "registered" / f"{ref_name}.nii.gz")
        volumes: Dict[str, sitk.Image] = {ref_name: ref_out}
        hashes: Dict[str, str] = {}
        seq_report: Dict[str, Any] = {ref_name: {"series": ref_series.key, "reference": True,
                                                 "file": f"registered/{ref_name}.nii.gz",
                                                 "input_grid": _grid_dict(ref_img), "status": "reference"}}
        captions = {ref_name: "reference"}
        counts = {"registered": 0, "flagged": 0, "refused": 0, "unreadable": 0}
        reg_total = 0.0
        for seq, series in chosen.items():
            if seq == ref_name:
                continue
            entry: Dict[str, Any] = {"series": series.key}
            seq_report[seq] = entry
            t0 = time.perf_counter()
            try:
                img = _read_series(series)
            except InputError as e:
                msg = _clean(str(e), root, series)
                errors.append({"series": series.describe(), "stage": "read", "error": msg})
                entry.update(status="unreadable", error=msg)
                counts["unreadable"] += 1
                warnings.append(f"{seq} ({series.describe()}) cannot be read; left out")
                continue
            seconds["read"] += time.perf_counter() - t0
            entry["input_grid"] = _grid_dict(img)
            try:
                settings = replace(options.registration, threads=options.threads)
                r = register_rigid(ref_img, img, settings, fixed_mask=ref_mask)
            except InputError as e:
                msg = _clean(str(e), root, series)
                errors.append({"series": series.describe(), "stage": "register", "error": msg})
                entry.update(status="failed", error=msg)
                counts["refused"] += 1
                continue
            tf = _rounded(r.transform)
            shift = largest_shift_mm(tf, ref_mask if ref_mask is not None else ref_img)
            aligned_below = ALREADY_ALIGNED_VOXELS * min(ref_img.GetSpacing())
            if shift < aligned_below:
                # a series already on the reference's frame (co-registered data, as BraTS ships): the registration
                # found only its own noise, and resampling through it would blur every voxel for nothing
                entry["already_aligned"] = {"largest_shift_mm": round(shift, 3), "below_mm": round(aligned_below, 3)}
                tf = _rounded(sitk.Euler3DTransform(tf.GetCenter(), 0.0, 0.0, 0.0, (0.0, 0.0, 0.0)))
            reg = resample_onto(img, grid, tf, threads=options.threads)
            fp = footprint_on(img, grid, tf)
            q = registration_quality(ref_out, reg, fp, tf, options.thresholds)
            reg_seconds = time.perf_counter() - t0
            seconds["register"][seq] = round(r.seconds, 3)
            reg_total += reg_seconds
            write_transform(tf, tmp / "transforms" / f"{seq}.tfm")
            entry.update(transform="transforms/" + f"{seq}.tfm", transform_parameters=transform_parameters(tf),
                         quality=q.to_dict(), metric={"mattes_mi": round(r.metric, 4),
                                                      "mattes_mi_initial": round(r.initial_metric, 4),
                                                      "iterations_last_level": r.iterations},
                         status=q.status)
            captions[seq] = f"{q.status}: Dice {q.head_dice:.2f}, edges {q.edge_correlation:.2f}" + \
                (", already aligned" if "already_aligned" in entry else "")
            if q.status == "refused":
                counts["refused"] += 1
                msg = "registration refused: " + "; ".join(q.reasons)
                errors.append({"series": series.describe(), "stage": "register", "error": msg})
                warnings.append(f"{seq}: {msg}; its registered volume is not written")
                continue
            if q.status == "flagged":
                counts["flagged"] += 1
                warnings.append(f"{seq}: registration flagged for review: " + "; ".join(q.reasons))
            counts["registered"] += 1
            write_image(reg, tmp / "registered" / f"{seq}.nii.gz")
            entry["file"] = f"registered/{seq}.nii.gz"
            volumes[seq] = reg

        # segmentation
        t0 = time.perf_counter()
        seg_report: Dict[str, Any] = {"model": step.model_id, "version": step.model_version}
        label, segments = None, []
        unsegmented = False  # a model was asked for but could not run on this study: a person should look
        seg_warned = False  # the model ran and warned (nothing found, an implausible volume, an unusual input...)
        if step.kind == "skip":
            seg_report.update(status="not segmented", reason=step.reason)
        elif step.missing(list(volumes)):
            miss = step.missing(list(volumes))
            seg_report.update(status="not segmented", reason=f"the model needs {', '.join(miss)}, which this study "
                                                              "lacks (or could not be registered)")
            warnings.append(f"not segmented: missing {', '.join(miss)}")
            unsegmented = True
        else:
            try:
                out = step.run(volumes)
            except NotSkullStripped as e:  # registration and QC are still worth keeping
                seg_report.update(status="not segmented", reason=e.message.split(":")[0])  # short: the QC title
                warnings.append(f"not segmented: {e.message}")
                unsegmented = True
            except DeepEditError as e:
                raise _StudyFailed("segment", f"segmentation failed: {e}") from None
        if seg_report.get("status") is None:  # the model ran
            label, segments = out.label, out.segments
            warnings.extend(f"segmentation: {w}" for w in out.warnings)
            seg_warned = bool(out.warnings)
            write_segmentation(label, tmp / "segmentation.seg.nrrd", segments)
            write_segmentation(label, tmp / "segmentation.nii.gz", segments)
            seg_files = ["segmentation.seg.nrrd", "segmentation.nii.gz"]
            if ref_series.kind == "dicom" and ref_series.files:
                # DICOM in, DICOM out: a DICOM SEG on the reference series' own grid
                from ..dicomseg import write_dicom_seg

                try:
                    with pywarnings.catch_warnings():
                        pywarnings.simplefilter("ignore")  # highdicom's remarks on the source's patient name format
                        write_dicom_seg(label, segments, ref_series.files, tmp / "segmentation.dcm",
                                        model_id=str(out.model_id), model_version=str(out.model_version))
                    seg_files.append("segmentation.dcm")
                except InputError as e:  # e.g. anonymised sources without UIDs: the other formats stand
                    warnings.append(f"no DICOM SEG written: {_clean(e.message, root, plan.study.series)}")
            seg_report.update(status="segmented", model=out.model_id, version=out.model_version,
                              files=seg_files,
                              segments=[{"value": int(s["value"]), "name": s["name"],
                                         "color": [float(c) for c in s["color"]]} for s in segments],
                              volumes_ml=region_volumes_ml(label, segments))
        seconds["segment"] = round(time.perf_counter() - t0, 3)

        # QC picture
        t0 = time.perf_counter()
        order = [ref_name] + [s for s in SEQUENCES if s in volumes and s != ref_name]
        seg_line = seg_report["status"] + (f" ({seg_report.get('reason')})" if seg_report.get("reason") else
                                           f" by {seg_report.get('model')} {seg_report.get('version')}")
        render_qc(tmp / "qc.png", {s: volumes[s] for s in order}, label=label, segments=segments,
                  captions=captions, title=f"{name}: {seg_line}")
        seconds["qc"] = round(time.perf_counter() - t0, 3)

        # report.json, written last
        t0 = time.perf_counter()
        for seq, series in chosen.items():
            hashes[series.key] = series_sha256(series.files)
        series_list = []
        for v in plan.verdicts:
            d = v.to_dict()
            d["sha256"] = hashes.get(v.series.key) or series_sha256(v.series.files)
            d["series_uid_sha256"] = v.series.uid_hash or None
            d["folder"] = _relative(str(Path(v.series.path).parent if v.series.kind == "file" else v.series.path), root)
            series_list.append(d)
        seconds["register_total"] = round(reg_total, 3)
        seconds["read"] = round(seconds["read"], 3)
        needs_review = bool(counts["flagged"] or counts["refused"] or counts["unreadable"] or unsegmented or seg_warned)
        report = {
            "format": "deepedit-batch-report", "version": 1, "study": name, "folder": plan.study.folder,
            "software": {"deepedit": __version__, "SimpleITK": sitk.Version.VersionString()},
            "options": {"reference": list(options.reference), "spacing_mm": options.spacing_mm,
                        "registration": options.registration.to_dict()},
            "reference": {"sequence": ref_name, "series": ref_series.key, "registered_grid": _grid_dict(ref_out)},
            "series": series_list, "ignored_files": plan.study.ignored_files,
            "sequences": seq_report, "segmentation": seg_report, "needs_review": needs_review,
            "warnings": warnings, "errors": errors,
        }
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + ["report.json"]
        report["files"] = files
        seconds["total"] = round(time.perf_counter() - t_start, 3)
        seconds["itk_threads"] = itk_threads  # with the timings: how this run was computed, not what
        report["seconds"] = seconds
        write_json(report, tmp / "report.json")
        outputs = {rel: file_record(tmp / rel) for rel in files}
        final = out_root / name
        if not Manifest.holds_lock(out_root, run_token):
            raise _StudyFailed("write", "the batch run that started this study has ended (killed, or taken over by a "
                                        "resumed run); its results were not written")
        if final.exists():
            remove_tree(final)
        os.rename(tmp, final)
        seconds["write_and_hash"] = round(time.perf_counter() - t0, 3)
        vols = seg_report.get("volumes_ml") or {}
        summary = {
            "study": name, "status": "done", "needs_review": "yes" if needs_review else "no", "reference": ref_name,
            "sequences": ";".join(s for s in SEQUENCES if s in chosen), "registered": counts["registered"],
            "flagged": counts["flagged"], "refused": counts["refused"], "unreadable": counts["unreadable"],
            "segmentation": seg_report["status"] + (f": {seg_report['reason']}" if seg_report.get("reason") else ""),
            "volumes_ml": ";".join(f"{k}={v}" for k, v in vols.items()), "seconds_total": seconds["total"],
            "seconds_registration": seconds["register_total"], "seconds_segmentation": seconds["segment"],
            "report": f"{name}/report.json", "error": "",
        }
        return StudyResult(name, "done", None, warnings, errors, outputs, summary, seconds)
    except _StudyFailed as e:
        return _failed(name, plan, e.stage, str(e), warnings, errors, t_start)
    except DeepEditError as e:
        return _failed(name, plan, "study", _clean(str(e), root, plan.study.series), warnings, errors, t_start)
    except Exception as e:  # noqa: BLE001 - one bad study never stops the run
        log.debug("study %s failed", name, exc_info=True)
        return _failed(name, plan, "study", f"internal error: {type(e).__name__}: {_clean(str(e), root, plan.study.series)}",
                       warnings, errors, t_start)
    finally:
        if tmp.exists():
            remove_tree(tmp)
        if options.threads > 0:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_threads)


def _failed(name: str, plan: StudyPlan, stage: str, message: str, warnings: List[str], errors: List[Dict[str, str]],
            t_start: float) -> StudyResult:
    errors = list(errors) + [{"series": "", "stage": stage, "error": message}]
    seconds = {"total": round(time.perf_counter() - t_start, 3)}
    summary = {"study": name, "status": "failed", "needs_review": "yes", "reference": plan.reference or "",
               "sequences": ";".join(seq for seq, _ in plan.chosen), "seconds_total": seconds["total"],
               "error": message}
    return StudyResult(name, "failed", message, warnings, errors, {}, summary, seconds)


# ------------------------------------------------------------------------------- driver


def check_folders(input_dir: Path, output_dir: Optional[Path]) -> Tuple[Path, Optional[Path]]:
    """Resolve the folders and refuse an output folder equal to, inside, or containing the input folder."""
    inp = Path(input_dir).expanduser()
    if not inp.is_dir():
        raise InputError("the input folder does not exist" if not inp.exists() else "the input is not a folder", inp)
    inp = inp.resolve()
    if output_dir is None:
        return inp, None
    out = Path(output_dir).expanduser().absolute()
    out = out.parent.resolve() / out.name if out.parent.exists() else out
    if out == inp:
        raise InputError("the output folder is the input folder; inputs are read-only, choose another folder", out)
    if inp in out.parents:
        raise InputError(f"the output folder is inside the input folder {inp}; inputs are read-only, choose a folder "
                         "outside it", out)
    if out in inp.parents:
        raise InputError(f"the output folder contains the input folder {inp}; choose a folder beside it", out)
    return inp, out


def plan_batch(input_dir: Path, *, reference: Sequence[str] = ("t1c",), mapping: Mapping = Mapping()) -> List[StudyPlan]:
    """Discover and plan every study of an input folder (what ``--dry-run`` shows)."""
    return [plan_study(s, reference=reference, mapping=mapping) for s in discover_studies(input_dir)]


def _decisions(plan: StudyPlan) -> Dict[str, Any]:
    return {"chosen": list(plan.chosen), "reference": plan.reference, "problems": list(plan.problems)}


def _rows(manifest: Manifest) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    summary, errors = [], []
    for name in sorted(manifest.studies):
        rec = manifest.studies[name]
        if rec.get("state") not in ("done", "failed"):
            continue
        summary.append(rec.get("summary") or {"study": name, "status": rec.get("state")})
        for e in rec.get("errors", []):
            errors.append({"study": name, **e})
    return summary, errors


def _write_tables(manifest: Manifest) -> None:
    summary, errors = _rows(manifest)
    out = manifest.path.parent
    write_csv(summary, SUMMARY_COLUMNS, out / "summary.csv")
    write_csv(errors, ERROR_COLUMNS, out / "errors.csv")


def run_batch(input_dir: Path, output_dir: Optional[Path], *, options: BatchOptions = BatchOptions(), workers: int = 1,
              scheduler: Optional[str] = None, resume: bool = False, dry_run: bool = False,
              mapping_file: Optional[Path] = None, progress: Progress = None) -> BatchResult:
    """Run (or plan) a batch.

    Args:
        input_dir: folder of studies (read only).
        output_dir: output folder (must not be inside or equal to the input folder).
        options: see :class:`BatchOptions`.
        workers: studies processed at once in worker processes on this machine (1: in this process).
        scheduler: address of a Dask distributed scheduler (``tcp://host:8786``) to submit the
            studies to, or a ``distributed.Client``; input and output folders must be visible
            to the workers at the same paths.
        resume: continue the run recorded in the output folder.
        dry_run: only discover and plan; nothing is written.
        mapping_file: JSON mapping file overriding identification.
        progress: ``progress(stage, fraction)`` callback (e.g. :class:`progress.StageProgress`).

    Returns:
        The outcome (exit code, per-study states, plans).

    Raises:
        InputError, ModelError: bad folders, options, mapping file or model, before any study runs.
    """
    report = progress or (lambda stage, frac: None)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be a whole number, 1 or more, not {workers!r}")
    if scheduler is not None and workers > 1:
        raise InputError("use either --workers or --scheduler, not both")
    bad = [r for r in options.reference if r not in SEQUENCES]
    if bad or not options.reference:
        raise InputError(f"unknown reference sequence {', '.join(bad) or '(none)'}; use one of {', '.join(SEQUENCES)}")
    sp = options.spacing_mm
    if sp is not None and not (isinstance(sp, (int, float)) and math.isfinite(sp) and sp > 0):
        raise InputError(f"--spacing must be a voxel size above 0 mm, not {sp}")
    inp, out = check_folders(input_dir, None if dry_run and output_dir is None else output_dir)
    mapping = load_mapping(mapping_file)
    report("finding studies", 0.0)
    plans = plan_batch(inp, reference=options.reference, mapping=mapping)
    if not plans:
        raise InputError("no studies found: the folder holds no image files (NIfTI, NRRD, MetaImage) and no DICOM "
                         "series", inp)
    empty = _folders_without_images(inp, plans)
    if dry_run and resume and out is not None and (out / MANIFEST_NAME).is_file():
        # what the real --resume would refuse, said by the dry run too (the model is checked, not loaded)
        Manifest.read_for_resume(out, input_dir=inp, options=options.recorded(mapping, _sha_of(mapping_file)))
    if dry_run:
        rows = [{"study": p.study.name, "state": "planned" if p.ok else "would fail",
                 "error": p.problems[0] if p.problems else None} for p in plans]
        ready = [p.ok for p in plans]
        code = EXIT_OK if ready and all(ready) else EXIT_SOME_FAILED if any(ready) else EXIT_NOTHING_DONE
        return BatchResult(code, rows, plans, None, dry_run=True, without_images=empty)
    assert out is not None
    step = resolve_segment_step(options.model, custom=options.segmenter, device=options.device)
    mapping_sha = _sha_of(mapping_file)
    # the scheduler is reached before anything is written: a wrong address leaves no output folder behind
    client, own_client = _dask_client(scheduler) if scheduler is not None else (None, False)
    try:
        manifest = Manifest.open(out, input_dir=inp, options=options.recorded(mapping, mapping_sha), resume=resume)
        try:
            return replace(_drive(plans, inp, out, manifest, options, step, workers, client, report),
                           without_images=empty)
        finally:
            manifest.close()
    finally:
        if own_client:
            client.close()


def _sha_of(mapping_file: Optional[Path]) -> Optional[str]:
    if mapping_file is None:
        return None
    from ..bundle import sha256_of

    return sha256_of(Path(mapping_file))


def _folders_without_images(inp: Path, plans: List[StudyPlan]) -> List[str]:
    """Top-level sub-folders of ``inp`` (not hidden) in which no study found a series (a second link to
    a study's folder, or a link back up the tree, is no such folder)."""
    used = set()
    for p in plans:
        for s in p.study.series:
            rel = Path(s.path).relative_to(inp).parts if Path(s.path).is_relative_to(inp) else ()
            if rel:
                used.add(rel[0])
    used_real = {os.path.realpath(inp / u) for u in used}
    inp_real = os.path.realpath(inp)

    def counts(d: Path) -> bool:
        real = os.path.realpath(d)
        return not (real in used_real or inp_real == real or inp_real.startswith(real + os.sep))

    return sorted(d.name for d in inp.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in used and counts(d))


def _drive(plans: List[StudyPlan], inp: Path, out: Path, manifest: Manifest, options: BatchOptions, step: SegmentStep,
           workers: int, scheduler: Any, report: Callable[[str, float], None]) -> BatchResult:
    manifest.reset_unfinished()

    todo: List[Tuple[StudyPlan, str]] = []
    rows: Dict[str, Dict[str, Any]] = {}
    for p in plans:
        fp = study_fingerprint([f for s in p.study.series for f in s.files], _decisions(p))
        name = p.study.name
        if manifest.is_done(name, fp):
            rec = manifest.studies[name]
            rows[name] = {"study": name, "state": "done", "skipped": True, "seconds": rec.get("seconds", {}).get("total")}
            continue
        if (out / name).exists():
            log.info("removing the unrecorded output folder of %s", name)
            remove_tree(out / name)
        manifest.mark_running(name, fp)
        todo.append((p, fp))
    manifest.save()
    _write_tables(manifest)

    total = len(todo)
    finished = 0

    def record(plan: StudyPlan, fp: str, res: StudyResult) -> None:
        nonlocal finished
        finished += 1
        manifest.record(plan.study.name, fp, res.to_manifest())
        manifest.save()
        _write_tables(manifest)
        rows[plan.study.name] = {"study": plan.study.name, "state": res.state, "skipped": False,
                                 "seconds": res.seconds.get("total"), "error": res.error,
                                 "needs_review": res.summary.get("needs_review"), "warnings": res.warnings,
                                 "unreadable": int(res.summary.get("unreadable") or 0)}
        report(f"{finished}/{total} studies ({plan.study.name}: {res.state})", finished / max(total, 1))

    try:
        if total:
            report(f"0/{total} studies", 0.0)
        if scheduler is not None:
            _run_dask(todo, inp, out, options, step, scheduler, record, manifest.token)
        elif workers > 1 and total > 1:
            _run_processes(todo, inp, out, options, step, min(workers, total), record, manifest.token)
        else:
            for plan, fp in todo:
                record(plan, fp, process_study(plan, str(inp), str(out), options, step, manifest.token))
    except BaseException:
        manifest.reset_unfinished()
        manifest.save()
        # what the interrupted studies left: their temporary folders, and any finished after the interrupt
        # without being recorded (a resumed run would remove those too)
        manifest.clean_temporary()
        for plan, _fp in todo:
            name = plan.study.name
            if manifest.studies.get(name, {}).get("state") != "done" and (out / name).exists():
                remove_tree(out / name)
        raise

    studies = [rows[p.study.name] for p in plans if p.study.name in rows]
    states = [s["state"] for s in studies]
    if not states or all(s == "failed" for s in states):
        code = EXIT_NOTHING_DONE
    elif any(s == "failed" for s in states) or any(s.get("unreadable") for s in studies):
        code = EXIT_SOME_FAILED  # a file that cannot be read is a bad input, also where the study went on without it
    else:
        code = EXIT_OK
    return BatchResult(code, studies, plans, out)


def _threads_chosen(options: BatchOptions) -> bool:
    """A thread count the user chose: ``threads`` in the options, or ITK's own environment variable."""
    return options.threads > 0 or bool(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"))


def _per_worker_threads(options: BatchOptions, workers: int) -> BatchOptions:
    if _threads_chosen(options):
        return options
    return replace(options, threads=max(1, _usable_cpus() // workers))


#: A registration that moves no corner of the reference's head box by this many of the reference's (smallest)
#: voxels found only its own noise: the series was already aligned and is taken as it is (no transform, so no
#: resampling blur where the grids match). Co-registered 1 mm BraTS-style series register to 0.2-1.0 mm there
#: (0.1-0.2 mm shifts, 0.1-0.3 degree turns); the registration's accuracy is about 0.5-1 mm on the fixtures.
ALREADY_ALIGNED_VOXELS = 1.0

#: Exit status of a worker process that ended because its driver was gone.
ORPHAN_EXIT = 75


def _exit_with_parent(parent: int) -> None:
    """Worker-process initializer: end this process when the driver is gone (kill -9 leaves no other signal)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(ORPHAN_EXIT)

    threading.Thread(target=watch, name="deepedit-parent-watch", daemon=True).start()


def _run_processes(todo, inp: Path, out: Path, options: BatchOptions, step: SegmentStep, workers: int, record,
                   token: Optional[str] = None) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    opts = _per_worker_threads(options, workers)
    ctx = mp.get_context("spawn")  # fresh interpreters: forking a process with live thread pools can deadlock
    pending = list(todo)
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                                  initargs=(os.getpid(),))
    futures = {pool.submit(process_study, plan, str(inp), str(out), opts, step, token): (plan, fp)
               for plan, fp in pending}
    try:
        for fut in cf.as_completed(futures):
            plan, fp = futures[fut]
            try:
                res = fut.result()
            except cf.process.BrokenProcessPool:
                res = _failed(plan.study.name, plan, "study", "the worker process died (out of memory?); "
                              "run again with --resume", [], [], time.perf_counter())
            except Exception as e:  # noqa: BLE001
                res = _failed(plan.study.name, plan, "study", f"internal error: {type(e).__name__}: {e}", [], [],
                              time.perf_counter())
            record(plan, fp, res)
    except BaseException:
        # interrupted (Ctrl-C, Cancel, SIGTERM): stop the studies now rather than let them finish unrecorded
        for f in futures:
            f.cancel()
        # the pool's processes: a private attribute (Python < 3.14 has no public way to stop running tasks)
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        for proc in workers_now:
            proc.terminate()
        deadline = time.monotonic() + 5.0
        for proc in workers_now:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():  # a worker that did not end on SIGTERM
                proc.kill()
                proc.join(timeout=5)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _dask_client(scheduler):
    """(client, whether this run made it): a ``distributed.Client`` is used as given, an address connected to."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("--scheduler needs dask.distributed (pip install 'dask[distributed]')") from None
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(scheduler, timeout="30s"), True
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise InputError(f"cannot reach the Dask scheduler {scheduler}: {e}") from None


def _usable_cpus() -> int:
    """CPUs this process may use: Dask's count (CPU affinity and cgroup quotas, as in a container or a
    SLURM job), else the affinity mask, else every core."""
    try:
        from dask.system import CPU_COUNT

        return max(1, int(CPU_COUNT))
    except (ImportError, TypeError, ValueError):
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=256)
def _host_of(address: str) -> str:
    """The machine of a worker address, as an IP where the name resolves: workers of one machine
    reached as ``localhost``, by its name and by its IP count as one host."""
    import socket

    from distributed.comm import get_address_host

    host = get_address_host(address)
    try:
        return socket.gethostbyname(host)
    except (OSError, UnicodeError):
        return host


def _host_slots(nthreads: Dict[str, int]) -> Dict[str, int]:
    """The studies that may run at once on each host: the threads of its workers (``client.nthreads()``:
    every worker's address and threads, on every distributed version), summed per host."""
    slots: Dict[str, int] = {}
    for address, n in nthreads.items():
        host = _host_of(address)
        slots[host] = slots.get(host, 0) + max(1, int(n or 1))
    return slots


def _dask_study(plan: StudyPlan, input_dir: str, output_dir: str, options: BatchOptions, step,
                run_token) -> StudyResult:
    """:func:`process_study` in a Dask task, its ITK threads (unless chosen) this machine's usable CPUs
    shared among the studies that may run on it at once: every worker's threads on this host, counted
    when the task starts (workers may have joined since submission; ``dask worker --nworkers 8
    --nthreads 1`` on a 16-core machine gives each study 2, not 16 each). Where the count cannot be
    made, 1 thread: never more threads than cores."""
    if not _threads_chosen(options):
        try:
            from distributed import get_client, get_worker

            slots = _host_slots(get_client().nthreads()).get(_host_of(get_worker().address))
            threads = max(1, _usable_cpus() // slots) if slots else 1
        except Exception:  # noqa: BLE001 - not in a worker, or the scheduler out of reach
            threads = 1
        options = replace(options, threads=threads)
    return process_study(plan, input_dir, output_dir, options, step, run_token)


def _run_dask(todo, inp: Path, out: Path, options: BatchOptions, step: SegmentStep, client, record,
              token: Optional[str] = None) -> None:
    from distributed import as_completed

    futures = {}
    for plan, fp in todo:
        f = client.submit(_dask_study, plan, str(inp), str(out), options, step, token, pure=False,
                          key=f"deepedit-batch-{plan.study.name}-{uuid.uuid4().hex[:8]}", retries=0)
        futures[f] = (plan, fp)
    try:
        for f in as_completed(list(futures)):
            plan, fp = futures[f]
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001 - a lost worker, a pickling problem...
                res = _failed(plan.study.name, plan, "study", f"Dask task failed: {type(e).__name__}: {e}", [], [],
                              time.perf_counter())
            record(plan, fp, res)
    except BaseException:
        client.cancel(list(futures))
        raise
