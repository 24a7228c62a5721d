"""Find the studies and their image series in a batch input folder.

Rules:

- Image files (NIfTI, NRRD, MetaImage; see :data:`imageio.READ_EXTENSIONS`) form a study with
  the other image files of the folder that holds them; the study is named after that folder's
  path inside the input folder (``sub-01/ses-1/anat`` -> ``sub-01_ses-1_anat``), or after the
  input folder itself for files directly in it.
- DICOM files are split by SeriesInstanceUID (:func:`imageio.list_dicom_series`, one folder at
  a time; a series whose files lie in several folders, as CD and PACS exports split them, is
  joined into one) and grouped into studies by StudyInstanceUID. A study is named after the top-level
  folder (inside the input folder) that holds its files; when that folder holds several
  studies, or the files lie directly in the input folder, a short hash of the
  StudyInstanceUID is appended. UIDs themselves never appear in names or reports.
- Files that are not images (text, PDF, DICOMDIR, DICOM SEG/SR/presentation states...) are
  counted and ignored; localizers, derived maps and label maps are recognised later by
  :mod:`.identify`.

Only the DICOM attributes needed to identify a sequence are read; patient attributes are never
requested from pydicom. Everything here reads headers only; pixel data are read by the study
task.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import InputError
from ..imageio import READ_EXTENSIONS, list_dicom_series

__all__ = ["Series", "Study", "discover_studies", "identify_dicom_folder", "uid_hash", "safe_name"]

# DICOM attributes read for identification; none of them identifies the patient.
_ID_TAGS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ProtocolName", "Modality",
    "ImageType", "ScanningSequence", "SequenceVariant", "SequenceName", "MRAcquisitionType", "RepetitionTime",
    "EchoTime", "InversionTime", "ContrastBolusAgent", "DiffusionBValue", "SliceThickness", "SOPClassUID",
]
_HEADER_KEYS = ("ImageType", "ScanningSequence", "SequenceVariant", "SequenceName", "MRAcquisitionType",
                "RepetitionTime", "EchoTime", "InversionTime", "ContrastBolusAgent", "DiffusionBValue", "SliceThickness",
                "Modality")


def uid_hash(uid: str, n: int = 12) -> str:
    """A short SHA-256 of a DICOM UID (reports carry this, never the UID)."""
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:n]


def safe_name(text: str) -> str:
    """A file-system safe name: letters, digits, '.', '_' and '-' only."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s or "study"


@dataclass(frozen=True)
class Series:
    """One image series of a study.

    Attributes:
        key: identifier unique within the study: ``dicom-<SeriesNumber>-<uid hash>`` or the
            file's path inside the study folder.
        kind: "dicom" or "file".
        path: the image file, or the folder holding the DICOM files (absolute).
        name: what identification reads as a name: the SeriesDescription, or the file's path
            inside the study folder.
        protocol: DICOM ProtocolName ("" for files).
        number: DICOM SeriesNumber (None for files).
        series_uid: DICOM SeriesInstanceUID, kept to read the series; never written out.
        header: DICOM attributes used for identification (strings/numbers/lists).
        files: the files of the series (absolute; slices sorted by position).
    """

    key: str
    kind: str
    path: str
    name: str
    protocol: str = ""
    number: Optional[int] = None
    series_uid: str = ""
    header: Dict[str, Any] = field(default_factory=dict)
    files: Tuple[str, ...] = ()

    @property
    def uid_hash(self) -> str:
        return uid_hash(self.series_uid) if self.series_uid else ""

    def describe(self) -> str:
        """A short human-readable label (no UIDs)."""
        if self.kind == "dicom":
            return f"#{self.number if self.number is not None else '?'} '{self.name or '(no description)'}'"
        return self.name


@dataclass(frozen=True)
class Study:
    """A study: a name, where it lies, its series and what was ignored.

    Attributes:
        name: file-system safe, unique in the batch; used as the output folder name.
        folder: the study's folder inside the input folder ("." for the input folder itself).
        series: the image series found.
        ignored_files: number of files that are not image series (text, DICOMDIR, SEG, ...) in
            the study's top folder (shared by the studies of one folder).
    """

    name: str
    folder: str
    series: Tuple[Series, ...]
    ignored_files: int = 0

    @property
    def kinds(self) -> List[str]:
        return sorted({s.kind for s in self.series})


def _is_image_file(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(ext) and len(low) > len(ext) for ext in READ_EXTENSIONS)


def _value(v: Any) -> Any:
    """A pydicom value as a JSON-friendly Python value."""
    if v is None:
        return None
    if isinstance(v, (str, int, float)):
        return v
    try:
        from pydicom.multival import MultiValue

        if isinstance(v, (MultiValue, list, tuple)):
            return [_value(x) for x in v]
    except ImportError:  # pragma: no cover
        pass
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _read_header(path: Path) -> Dict[str, Any]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_ID_TAGS)
    except Exception:  # noqa: BLE001 - a file list_dicom_series accepted but pydicom now refuses
        return {}
    out = {}
    for k in _ID_TAGS:
        if k in ds:
            out[k] = _value(ds.get(k))
    return out


def identify_dicom_folder(folder: Path):
    """The :func:`.identify.identify` verdict and SeriesDescription of the one DICOM image series in
    ``folder`` (as the batch identifies it: description, protocol, header), or None when the folder
    holds no DICOM series or several."""
    from .identify import identify

    try:
        infos = list_dicom_series(folder)
    except Exception:  # noqa: BLE001 - not a readable folder: nothing to say here (reading it says why)
        return None
    if len(infos) != 1:
        return None
    hdr = _read_header(Path(infos[0].files[0]))
    desc = str(hdr.get("SeriesDescription") or infos[0].description or "")
    return identify(desc, protocol=str(hdr.get("ProtocolName") or ""),
                    header={k: hdr[k] for k in _HEADER_KEYS if k in hdr}), desc


def _walk(root: Path):
    """Folders under ``root`` (itself included), sorted, skipping hidden ones; yields (folder, files).

    Linked folders are followed (studies linked in from a shared drive are studies), each real
    folder once: a link back up the tree, or a second link to a folder already seen, is skipped."""
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def discover_studies(input_dir: Path) -> List[Study]:
    """Find the studies under ``input_dir`` (see the module docstring for the rules).

    Args:
        input_dir: the batch input folder (read only).

    Returns:
        Studies sorted by name; names are unique and safe as folder names.

    Raises:
        InputError: the input folder does not exist or is not a folder.
    """
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError("the input folder does not exist" if not root.exists() else "the input is not a folder", root)
    file_studies: Dict[Path, List[Series]] = {}
    dicom: Dict[str, List[Tuple[Path, Series]]] = {}  # StudyInstanceUID -> (top folder, series)
    ignored: Dict[Path, int] = {}  # top folder -> ignored files

    for folder, files in _walk(root):
        rel = folder.relative_to(root)
        top = root / rel.parts[0] if rel.parts else root
        images = [f for f in files if _is_image_file(f)]
        others = [f for f in files if not _is_image_file(f)]
        for f in images:
            p = folder / f
            name = str(p.relative_to(folder))
            file_studies.setdefault(folder, []).append(Series(key=name, kind="file", path=str(p), name=name, files=(str(p),)))
        if not others:
            continue
        infos = list_dicom_series(folder)
        used = sum(i.n_files for i in infos)
        ignored[top] = ignored.get(top, 0) + len(others) - used
        for info in infos:
            hdr = _read_header(info.files[0])
            # a blank StudyInstanceUID (anonymised): one study per top-level folder, never one for all
            study_uid = str(hdr.get("StudyInstanceUID") or "") or f"(no StudyInstanceUID) {top}"
            number = hdr.get("SeriesNumber")
            try:
                number = int(number) if number is not None else None
            except (TypeError, ValueError):
                number = None
            key = f"dicom-{number if number is not None else 'x'}-{uid_hash(info.series_uid, 8)}"
            s = Series(key=key, kind="dicom", path=str(folder), name=info.description,
                       protocol=str(hdr.get("ProtocolName") or ""), number=number, series_uid=info.series_uid,
                       header={k: hdr[k] for k in _HEADER_KEYS if k in hdr}, files=tuple(str(f) for f in info.files))
            dicom.setdefault(study_uid, []).append((top, s))

    # one series whose files an export (CD, PACS) split over several folders is read as one
    for uid, items in dicom.items():
        by_series: Dict[str, List[Tuple[Path, Series]]] = {}
        for top, s in items:
            by_series.setdefault(s.series_uid, []).append((top, s))
        if all(len(parts) == 1 for parts in by_series.values()):
            continue
        joined = []
        for parts in by_series.values():
            top, first = parts[0]
            if len(parts) > 1:
                files = tuple(f for _, part in parts for f in part.files)
                first = replace(first, files=files)
            joined.append((top, first))
        dicom[uid] = joined

    # name the studies
    dicom_tops = {t for items in dicom.values() for t, _ in items}
    raw: List[Tuple[str, str, List[Series], int]] = []  # (name, folder, series, ignored files)
    for folder, series in file_studies.items():
        rel = folder.relative_to(root)
        name = "_".join(rel.parts) if rel.parts else root.name
        n_ignored = ignored.get(folder, 0) if len(rel.parts) <= 1 and folder not in dicom_tops else 0
        raw.append((safe_name(name), str(rel) if rel.parts else ".", series, n_ignored))
    tops_per_study: Dict[str, Path] = {}
    for uid, items in dicom.items():
        tops = sorted({t for t, _ in items})
        tops_per_study[uid] = tops[0]
    studies_per_top: Dict[Path, int] = {}
    for top in tops_per_study.values():
        studies_per_top[top] = studies_per_top.get(top, 0) + 1
    for uid, items in sorted(dicom.items(), key=lambda kv: (str(tops_per_study[kv[0]]), uid_hash(kv[0]))):
        top = tops_per_study[uid]
        series = sorted((s for _, s in items), key=lambda s: (s.number if s.number is not None else 1 << 30, s.key))
        base = top.name if top != root else "study"
        name = base if studies_per_top[top] == 1 and top != root else f"{base}-{uid_hash(uid or 'none', 8)}"
        rel = top.relative_to(root)
        raw.append((safe_name(name), str(rel) if rel.parts else ".", series, ignored.get(top, 0)))

    # merge DICOM and file series that landed in the same study name (a folder with both)
    merged: Dict[str, Tuple[str, List[Series], int]] = {}
    for name, folder, series, n_ignored in raw:
        if name in merged and merged[name][0] == folder:
            merged[name][1].extend(series)
            merged[name] = (folder, merged[name][1], merged[name][2] + n_ignored)
            continue
        unique = name
        n = 2
        while unique in merged:
            unique = f"{name}-{n}"
            n += 1
        merged[unique] = (folder, list(series), n_ignored)
    out = [Study(name, folder, tuple(series), n_ignored) for name, (folder, series, n_ignored) in merged.items()]
    return sorted(out, key=lambda s: s.name)
