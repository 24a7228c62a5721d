"""What will be done with each series of a study: identification, choice between repeats, reference.

The plan is what ``deepedit batch --dry-run`` prints and what the study task carries out. It is
made from headers only, in the driver process, so that every worker gets the same decisions.

Choice between series identified as the same sequence: the most confident wins; among equally
confident ones the one acquired last (highest SeriesNumber) wins, since a sequence is usually
repeated because the first run was spoiled (motion). Image files have no acquisition order:
the first by name wins. Every series not used is reported with the reason, and a mapping file
(:class:`.identify.Mapping`) can force any choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .discover import Series, Study
from .identify import IGNORE, SEQUENCES, Identification, Mapping, identify, series_modality

__all__ = ["SeriesVerdict", "StudyPlan", "plan_study", "MIN_SLICES"]

#: A DICOM series with fewer slices than this is not a volume (single-slice captures, scouts).
MIN_SLICES = 3


@dataclass(frozen=True)
class SeriesVerdict:
    """One series with its identification and what the study does with it.

    Attributes:
        series: the series.
        identification: the verdict of :func:`.identify.identify` (or the mapping file).
        role: "used", "not used" (another series was chosen), "ignored", "unknown" or "ambiguous".
        note: why, in words.
    """

    series: Series
    identification: Identification
    role: str
    note: str = ""

    def to_dict(self) -> dict:
        s = self.series
        return {"key": s.key, "kind": s.kind, "name": s.name, "protocol": s.protocol or None, "number": s.number,
                "files": len(s.files), "identified": self.identification.to_dict(), "role": self.role,
                "note": self.note}


@dataclass(frozen=True)
class StudyPlan:
    """The decisions for one study.

    Attributes:
        study: the study found by discovery.
        verdicts: one per series, in the study's order.
        chosen: (sequence, series key) pairs in :data:`SEQUENCES` order.
        reference: the sequence registration aligns everything to; None when none of the
            requested reference sequences was found (the study then fails).
        problems: reasons the study cannot be processed (empty when it can).
        warnings: things a reviewer should know (repeats, unknown series...).
    """

    study: Study
    verdicts: Tuple[SeriesVerdict, ...]
    chosen: Tuple[Tuple[str, str], ...]
    reference: Optional[str]
    problems: Tuple[str, ...] = ()
    warnings: Tuple[str, ...] = ()

    @property
    def sequences(self) -> Dict[str, Series]:
        by_key = {s.key: s for s in self.study.series}
        return {seq: by_key[key] for seq, key in self.chosen}

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"study": self.study.name, "folder": self.study.folder, "reference": self.reference,
                "sequences": {seq: key for seq, key in self.chosen}, "problems": list(self.problems),
                "warnings": list(self.warnings), "series": [v.to_dict() for v in self.verdicts],
                "ignored_files": self.study.ignored_files}


def _identify_series(study: Study, s: Series, mapping: Mapping) -> Identification:
    rule = mapping.lookup(study.name, s.name, s.number)
    if rule is not None:
        return mapping.identification(rule)
    if s.kind == "dicom":
        return identify(s.name, protocol=s.protocol, header=s.header)
    return identify(file_name=s.name)


def _subject_of(file_name: str) -> Tuple[str, ...]:
    """What names the subject in an image file's name: its words without the extension and without
    those naming a sequence or a label (``BraTS2021_00007_t1ce.nii.gz`` -> (brats2021, 00007))."""
    stem = file_name.split("/")[-1]
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    words = [w for w in re.split(r"[-_. ]+", stem) if w]
    return tuple(w for w in words if identify(file_name=w).sequence is None)


def _mixed_subjects(candidates: Dict[str, List[Tuple[Series, Identification]]]) -> List[str]:
    """Subjects of a folder of image files that holds several subjects' studies: two or more name
    stems, each with two or more sequences, one sequence under two of them (else: []). Each is
    named as its first file spells it (``BraTS-GLI-00001-000``)."""
    by_subject: Dict[Tuple[str, ...], set] = {}
    spelt: Dict[Tuple[str, ...], str] = {}
    for seq, items in candidates.items():
        for s, _ in sorted(items, key=lambda it: it[0].name):
            if s.kind == "file":
                words = _subject_of(s.name)
                key = tuple(w.lower() for w in words)
                by_subject.setdefault(key, set()).add(seq)
                spelt.setdefault(key, _spelling(s.name, words))
    full = {k: v for k, v in by_subject.items() if len(v) >= 2}
    if len(full) < 2:
        return []
    seqs = [q for v in full.values() for q in v]
    return sorted(spelt[k] for k in full) if len(seqs) != len(set(seqs)) else []


def _spelling(file_name: str, words: Tuple[str, ...]) -> str:
    """The subject's words as the file name writes them, with its own separators between them
    (``BraTS-GLI-00001-000-t2f.nii.gz`` -> ``BraTS-GLI-00001-000``), or ``(no name)``."""
    if not words:
        return "(no name)"
    name = file_name.split("/")[-1]
    start = name.find(words[0])
    end = start
    for w in words:
        end = name.find(w, end) + len(w)
    return name[start:end] if start >= 0 else "_".join(words)


def plan_study(study: Study, *, reference: Sequence[str] = ("t1c",), mapping: Mapping = Mapping()) -> StudyPlan:
    """Identify every series of ``study``, choose one per sequence and the reference.

    Args:
        study: from :func:`.discover.discover_studies`.
        reference: acceptable reference sequences, in order of preference (default T1c only).
        mapping: user overrides.

    Returns:
        The plan; ``plan.problems`` says why a study cannot be processed (no reference).
    """
    ids: List[Tuple[Series, Identification]] = [(s, _identify_series(study, s, mapping)) for s in study.series]
    roles: Dict[str, Tuple[str, str]] = {}
    candidates: Dict[str, List[Tuple[Series, Identification]]] = {}
    warnings: List[str] = []
    for s, ident in ids:
        if ident.sequence == IGNORE:
            why = next((r.split(": ", 1)[-1] for r in ident.reasons), "ignored")
            roles[s.key] = ("ignored", why)
        elif s.kind == "dicom" and len(s.files) < MIN_SLICES and ident.source != "mapping":
            roles[s.key] = ("ignored", f"{len(s.files)} slice(s): not a volume")
        elif ident.sequence is None and ident.ambiguous:
            cands = " or ".join(ident.candidates[:3])
            roles[s.key] = ("ambiguous", f"could be {cands}; name it in a mapping file")
            warnings.append(f"series {s.describe()} is ambiguous ({cands}); not used")
        elif ident.sequence is None:
            best = ident.scores[0][0] if ident.scores else None
            note = "not one of " + ", ".join(SEQUENCES) + (" (looks like T2* gradient echo)" if best == "other" else "")
            roles[s.key] = ("unknown", note)
            warnings.append(f"series {s.describe()} was not identified; not used")
        else:
            candidates.setdefault(ident.sequence, []).append((s, ident))
    chosen: Dict[str, str] = {}
    for seq, items in candidates.items():
        order = sorted(items, key=lambda it: (-round(it[1].confidence, 3),
                                              -(it[0].number if it[0].number is not None else -1), it[0].key))
        best = order[0][0]
        chosen[seq] = best.key
        roles[best.key] = ("used", f"as {seq}")
        for s, ident in order[1:]:
            if s.kind == "dicom" and best.kind == "dicom" and round(ident.confidence, 3) == round(order[0][1].confidence, 3):
                why = f"{seq} is taken from the later series {best.describe()} (a repeat is usually the better run)"
            else:
                why = f"{seq} is taken from {best.describe()} (identified with more confidence or first by name)"
            roles[s.key] = ("not used", why)
            warnings.append(f"two series identified as {seq}: used {best.describe()}, not {s.describe()}")
    verdicts = tuple(SeriesVerdict(s, ident, *roles[s.key]) for s, ident in ids)
    ref = next((r for r in reference if r in chosen), None)
    problems: List[str] = []
    if ref is None:
        found = ", ".join(seq for seq in SEQUENCES if seq in chosen) or "none"
        want = " or ".join(reference)
        problem = (f"no {want} series (the reference) was found (sequences found: {found}); name it in a mapping "
                   f"file (--mapping) or choose another reference (--reference)")
        unused = [v for v in verdicts if v.role != "used"]
        if unused:  # say what the study holds instead (a CT study, localizers only, unknown names...)
            shown = "; ".join(f"{v.series.describe()}: {v.role}, {v.note}" for v in unused[:3])
            problem += f". Series not used: {shown}" + (f"; and {len(unused) - 3} more" if len(unused) > 3 else "")
        if any(series_modality(v.series.header) == "CT" for v in unused):
            problem += (". The batch segments MRI studies; for a CT use `deepedit segment --model liver-lesion "
                        "--input ct=SERIES_FOLDER`")
        problems.append(problem)
    mixed = _mixed_subjects(candidates)
    if mixed:  # one folder, several patients: choosing one series per sequence would drop a patient unsaid
        names = ", ".join(mixed)
        problems.append(f"the folder holds the images of {len(mixed)} subjects ({names}, by their file names): put "
                        "each study in its own sub-folder")
    ordered = tuple((seq, chosen[seq]) for seq in SEQUENCES if seq in chosen)
    return StudyPlan(study, verdicts, ordered, ref, tuple(problems), tuple(warnings))
