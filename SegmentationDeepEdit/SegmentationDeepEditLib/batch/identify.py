"""Which MRI sequence is a series: T1, T1c, T2, FLAIR, DWI or SWI, with a confidence.

Evidence comes from three places, each scored on its own and then combined:

- **Names**: the DICOM SeriesDescription and ProtocolName, or the file name of a NIfTI/NRRD
  file (``t1c``, ``t1ce``, ``t1gd``, ``post``, ``+c``, ``gd``; ``t2f``, ``flair``, ``dark-fluid``;
  ``t2w``; ``t1n``, ``t1w``, ``mprage``, ``vibe``; ``dwi``, ``diff``, ``trace``; ``swi``,
  ``swan``...); Siemens, GE, Philips and BraTS/BIDS habits.
- **Acquisition header** (DICOM only): ImageType (DIFFUSION, TRACEW, SWI; ADC, phase, MIP,
  MPR and LOCALIZER mark series to ignore), ScanningSequence (EP, IR), RepetitionTime,
  EchoTime, InversionTime and ContrastBolusAgent.
- **A mapping file** given by the user overrides both (see :class:`Mapping`).

Each piece of evidence is a weight in 0..1 for one sequence; weights for the same sequence
combine as independent votes (``1 - prod(1 - w)``). The confidence of the winner is its score
reduced by the runner-up's (``best * (1 - second / 2)``); a series is *ambiguous* when the
runner-up is within 0.2 of the winner, and *unknown* when nothing reaches 0.5. Neither is
used; both are reported. Patient data are never read or returned.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping as MappingT, Optional, Tuple

from ..errors import InputError

__all__ = [
    "SEQUENCES",
    "IGNORE",
    "Identification",
    "identify",
    "Mapping",
    "load_mapping",
    "series_modality",
]

#: The sequences the batch pipeline knows, in display order.
SEQUENCES: Tuple[str, ...] = ("t1", "t1c", "t2", "flair", "dwi", "swi")
#: The pseudo-sequence of series to leave out (derived maps, phase images, localizers, label maps).
IGNORE = "ignore"

_MIN_CONFIDENCE = 0.5
_AMBIGUITY_MARGIN = 0.2


@dataclass(frozen=True)
class Identification:
    """The verdict on one series.

    Attributes:
        sequence: one of :data:`SEQUENCES`, :data:`IGNORE`, or None when unknown or ambiguous.
        confidence: 0..1 (1 for a mapping-file entry).
        source: where the verdict came from: "name", "header", "name+header", "mapping" or "none".
        reasons: the evidence, in words (e.g. ``"name: 'flair'"``).
        scores: every candidate's combined score, best first.
        ambiguous: two candidates scored within 0.2 of each other.
    """

    sequence: Optional[str]
    confidence: float
    source: str
    reasons: Tuple[str, ...] = ()
    scores: Tuple[Tuple[str, float], ...] = ()
    ambiguous: bool = False

    @property
    def candidates(self) -> List[str]:
        return [s for s, v in self.scores if v >= 0.3]

    def to_dict(self) -> dict:
        return {"sequence": self.sequence, "confidence": round(self.confidence, 3), "source": self.source,
                "ambiguous": self.ambiguous, "reasons": list(self.reasons),
                "scores": {k: round(v, 3) for k, v in self.scores}}


# ------------------------------------------------------------------------------ name rules
# Patterns are searched in "_" + normalised name + "_", where the name is lower-case and
# every run of characters other than letters, digits, "+" and "*" is one "_".
# (pattern, candidate, weight, label)
_NAME_RULES: List[Tuple[str, str, float, str]] = [
    # series to ignore
    (r"_(adc|eadc|fa|colfa|tensor_?fa|trace_?adc|dadc|md)_", IGNORE, 0.95, "derived diffusion map"),
    (r"_(pha|phase|pha_images|phase_images)_|_pha_", IGNORE, 0.9, "phase image"),
    (r"_(mip|mnip|minip|min_?ip|mpr|mprs|subtraction|reformat|3d_?render)_|_mip_", IGNORE, 0.9, "derived reformat/projection"),
    (r"(scout|localizer|localiser|survey|aahead|_loc_|3_?plane|tripilot)", IGNORE, 0.95, "localizer"),
    (r"_(seg|segmentation|label|labels|labelmap|mask|brainmask|brain_?mask|roi|gt|truth|annotation)_", IGNORE, 0.95,
     "label map or mask"),
    (r"_(perf|perfusion|dsc|dce|asl|pcasl|bold|fmri|rest|mra|tof|angio|spectro|svs|csi)_", IGNORE, 0.8,
     "another kind of series (perfusion, functional, angiography, spectroscopy)"),
    # FLAIR
    (r"flair", "flair", 0.95, "'flair'"),
    (r"_t2_?f_|_t2f_", "flair", 0.95, "'t2f'"),
    (r"dark_?fluid|_da_?fl_", "flair", 0.95, "'dark-fluid'"),
    (r"_tirm", "flair", 0.6, "'tirm' (inversion recovery)"),
    # DWI
    (r"_dwi|diff|_trace|tracew|_b_?1000_|_resolve_|_dti_|_dw_", "dwi", 0.95, "diffusion"),
    (r"_ep2d_|_epi_", "dwi", 0.4, "EPI readout"),
    # SWI
    (r"_swi|_swan_|_swip_|venobold|suscept|_sw_images_|_swi_images_", "swi", 0.95, "susceptibility-weighted"),
    (r"_mag_images_|_mag_", "swi", 0.5, "magnitude images (SWI component)"),
    # T2* gradient echo (not one of ours)
    (r"t2\*|t2_?star|_hemo|_t2_?fl2d|_fl2d_?t2|_t2_?gre_|_gre_t2|_me_?gre_", "other", 0.9, "T2* gradient echo"),
    # T1 post-contrast written as one token
    (r"_t1_?c_|_t1_?ce_|_t1_?gd_|_t1_?gad_|_t1_?post|_t1c|_t1ce|_t1gd|_t1_?km_|_t1_?contrast|_ce_?t1", "t1c", 0.95,
     "'t1c'"),
    # T1 (contrast markers are applied separately)
    (r"_t1_|_t1w|_t1n_|_t1_?pre|_t1_?se_|_t1_?tse_|_t1_?mprage|_t1_?vibe|_t1_?fl|_t1_?space|_t1_", "t1", 0.85, "'t1'"),
    (r"mp_?rage|_bravo|_spgr|_fspgr|_tfe_|_t1_?ffe|_vibe|_flash|_fl3d|_mpr_?age|_space_?t1", "t1", 0.6,
     "T1-weighted gradient-echo sequence name"),
    # T2
    (r"_t2_|_t2w|_t2_?tse|_t2_?frfse|_t2_?fse|_t2_?space|_t2_?blade|_t2_?haste|_t2_?propeller|_t2_", "t2", 0.85, "'t2'"),
    (r"_tse_|_fse_|_frfse_|_blade_|_propeller_", "t2", 0.35, "turbo spin echo"),
]
_CONTRAST = re.compile(r"_post|_\+_?c_|_c\+|\+c_|_gd_|_gad|_\+_?gd_|_\+_?gad|_ce_|_ce_gd|_contrast|_km_|_kontrast|_enh|_postcontrast|_dotarem|"
                       r"_gadovist|_magnevist|_omniscan|_prohance|_multihance|_clariscan")
_PRECONTRAST = re.compile(r"_pre_|_native|_nativ|_plain|_wo_|_noncontrast|_t1n_")


# T1-weighted FLAIR (GE "AX T1 FLAIR", a T1 inversion recovery): a T1, whatever "flair" says
_T1_FLAIR = re.compile(r"_t1_?flair|_t1w_?flair|_flair_?t1_|_t1_?ir_|_t1_?tirm")


def _normalise(text: str) -> str:
    s = re.sub(r"[^a-z0-9+*]+", "_", text.lower().replace("+", "_+"))  # "t1+gad": "t1", then "+gad"
    return "_" + re.sub(r"_+", "_", s).strip("_") + "_"


def _name_evidence(text: str, where: str) -> List[Tuple[str, float, str]]:
    s = _normalise(text)
    found: List[Tuple[str, float, str]] = []
    t1_flair = bool(_T1_FLAIR.search(s))
    if t1_flair:
        found.append(("t1", 0.95, f"{where}: 'T1 FLAIR' (T1-weighted inversion recovery)"))
    for pattern, seq, weight, label in _NAME_RULES:
        if t1_flair and seq in ("flair", "t1"):
            continue
        if re.search(pattern, s):
            found.append((seq, weight, f"{where}: {label}"))
    if _CONTRAST.search(s) and not _PRECONTRAST.search(s):
        found.append(("contrast", 0.9, f"{where}: contrast marker"))
    elif re.search(r"_post_|^_post_$", s):
        found.append(("contrast", 0.9, f"{where}: 'post'"))
    return found


# ---------------------------------------------------------------------------- header rules


def _num(header: MappingT[str, Any], key: str) -> Optional[float]:
    v = header.get(key)
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (list, tuple)):
            v = v[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _multi(header: MappingT[str, Any], key: str) -> List[str]:
    v = header.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        parts = v.replace("/", "\\").split("\\")
    else:
        try:
            parts = [str(x) for x in v]
        except TypeError:
            parts = [str(v)]
    return [p.strip().upper() for p in parts if p.strip()]


def series_modality(header: MappingT[str, Any]) -> str:
    """A series' DICOM Modality (``MR``, ``CT``...), upper case; '' where the header has none (NIfTI)."""
    return str(header.get("Modality") or "").strip().upper()


def _header_evidence(header: MappingT[str, Any]) -> List[Tuple[str, float, str]]:
    found: List[Tuple[str, float, str]] = []
    image_type = _multi(header, "ImageType")
    scanning = _multi(header, "ScanningSequence")
    tr, te, ti = _num(header, "RepetitionTime"), _num(header, "EchoTime"), _num(header, "InversionTime")
    agent = str(header.get("ContrastBolusAgent") or "").strip()
    it = set(image_type)
    modality = series_modality(header)
    if modality and modality != "MR":  # CT, PET, SEG, SR...: the batch's sequences are MRI
        found.append((IGNORE, 0.95, f"header: Modality {modality}, not MRI"))
    if "LOCALIZER" in it:
        found.append((IGNORE, 0.95, "header: ImageType LOCALIZER"))
    if it & {"ADC", "FA", "EADC", "TENSOR", "CALC_BVALUE", "EXP"}:
        found.append((IGNORE, 0.95, "header: ImageType derived diffusion map"))
    if it & {"MIP", "MNIP", "MINIP", "MPR", "PROJECTION IMAGE", "SUBTRACTION", "SUB", "CPR", "MIN IP"}:
        found.append((IGNORE, 0.9, "header: ImageType reformat/projection"))
    if len(image_type) > 2 and image_type[2] in ("P", "PHASE"):
        found.append((IGNORE, 0.9, "header: ImageType phase"))
    if image_type and image_type[0] == "DERIVED" and not it & {"DIFFUSION", "TRACEW", "TRACE", "SWI", "M", "NORM"}:
        found.append((IGNORE, 0.6, "header: derived series"))
    if it & {"DIFFUSION", "TRACEW", "TRACE"}:
        found.append(("dwi", 0.9, "header: ImageType DIFFUSION/TRACEW"))
    if "SWI" in it:
        found.append(("swi", 0.9, "header: ImageType SWI"))
    b = _num(header, "DiffusionBValue")
    if b is not None and b > 100:
        found.append(("dwi", 0.9, f"header: b-value {b:g}"))
    if "EP" in scanning and "IR" not in scanning:
        found.append(("dwi", 0.4, "header: echo-planar (EP)"))
    if ti is not None and ti > 1400 and (tr is None or tr > 4000):
        found.append(("flair", 0.85, f"header: inversion time {ti:g} ms (fluid suppression)"))
    elif ti is not None and 80 < ti < 300 and tr is not None and tr > 2000:
        found.append(("other", 0.6, f"header: inversion time {ti:g} ms (STIR)"))
    elif ti is not None and 600 <= ti <= 1300 and "GR" in scanning:
        found.append(("t1", 0.5, f"header: inversion-prepared gradient echo (TI {ti:g} ms)"))
    if tr is not None and te is not None and "EP" not in scanning and not (ti is not None and ti > 1400):
        if tr < 1000 and te < 20:
            found.append(("t1", 0.5, f"header: short TR/TE ({tr:g}/{te:g} ms), T1-weighted"))
        elif tr > 2000 and te > 70:
            found.append(("t2", 0.6, f"header: long TR/TE ({tr:g}/{te:g} ms), T2-weighted"))
        elif "GR" in scanning and te >= 15 and tr < 200:
            found.append(("swi", 0.35, f"header: gradient echo with long TE ({te:g} ms)"))
    if agent:
        found.append(("contrast", 0.8, "header: ContrastBolusAgent set"))
    return found


# -------------------------------------------------------------------------------- verdict


def _combine(evidence: Iterable[Tuple[str, float, str]]) -> Tuple[Dict[str, float], bool, List[str]]:
    score: Dict[str, float] = {}
    contrast = False
    reasons: List[str] = []
    for seq, w, why in evidence:
        reasons.append(why)
        if seq == "contrast":
            contrast = True
            continue
        score[seq] = 1.0 - (1.0 - score.get(seq, 0.0)) * (1.0 - w)
    return score, contrast, reasons


def identify(description: str = "", *, protocol: str = "", file_name: str = "",
             header: Optional[MappingT[str, Any]] = None) -> Identification:
    """Identify the sequence of one series.

    Args:
        description: DICOM SeriesDescription ("" for files).
        protocol: DICOM ProtocolName.
        file_name: the image file's name (NIfTI/NRRD series), without folders.
        header: DICOM attributes by keyword (ImageType, ScanningSequence, SequenceVariant,
            RepetitionTime, EchoTime, InversionTime, ContrastBolusAgent, DiffusionBValue);
            values as pydicom gives them or as strings.

    Returns:
        The identification (sequence None when unknown or ambiguous).
    """
    evidence: List[Tuple[str, float, str]] = []
    name_seqs = set()
    for text, where in ((description, "description"), (protocol, "protocol"), (_strip_ext(file_name), "file name")):
        if text and (where != "protocol" or _normalise(text) != _normalise(description)):
            ev = _name_evidence(text, where)
            evidence += ev
            name_seqs |= {e[0] for e in ev}
    hdr = _header_evidence(header or {})
    evidence += hdr
    header_seqs = {e[0] for e in hdr}
    score, contrast, reasons = _combine(evidence)

    # Specific patterns explain the generic ones they contain ("t2_tirm_dark-fluid", "t2_swi").
    # Only a name explains a name: a header saying FLAIR does not silence a name saying T1.
    for specific in ("flair", "swi", "dwi", "other"):
        if score.get(specific, 0) >= 0.8 and specific in name_seqs:
            for generic in ("t2", "t1"):
                if generic in score:
                    score[generic] *= 0.3
    if score.get(IGNORE, 0) >= 0.8:
        for k in list(score):
            if k != IGNORE:
                score[k] *= 0.3
    # Contrast turns T1 evidence into T1c evidence (and only T1's: a post-contrast FLAIR stays FLAIR).
    if contrast:
        t1 = score.get("t1", 0.0)
        if t1 > 0 or not any(score.get(s, 0) >= 0.5 for s in ("t2", "flair", "dwi", "swi", IGNORE, "other")):
            base = t1 if t1 > 0 else 0.6  # "post" alone, as a file name
            score["t1c"] = 1.0 - (1.0 - score.get("t1c", 0.0)) * (1.0 - base)
            score.pop("t1", None)  # the T1 evidence is explained by the post-contrast T1
    elif score.get("t1c", 0) >= 0.8:
        score.pop("t1", None)  # "t1c" contains "t1"

    ranked = sorted(((k, v) for k, v in score.items() if v > 0.01), key=lambda kv: (-kv[1], kv[0]))
    if not ranked:
        return Identification(None, 0.0, "none", tuple(reasons) or ("no evidence in the names or header",), (), False)
    best, top = ranked[0]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    confidence = top * (1.0 - second / 2.0)
    ambiguous = len(ranked) > 1 and top - second < _AMBIGUITY_MARGIN and second >= 0.3
    src_name, src_header = best in name_seqs or (best == "t1c" and "contrast" in name_seqs), best in header_seqs or (
        best == "t1c" and ("contrast" in header_seqs or "t1" in header_seqs))
    source = "name+header" if src_name and src_header else "name" if src_name else "header"
    sequence: Optional[str] = best
    if ambiguous or confidence < _MIN_CONFIDENCE or best == "other":
        sequence = None
    if best == IGNORE and not ambiguous and confidence >= _MIN_CONFIDENCE:
        sequence = IGNORE
        # the reason shown for an ignored series is the first: the one that made it ignored ('Modality CT,
        # not MRI'), not a name's evidence that it outweighed (a CT protocol 'FDG_TK_KM' read as a contrast marker)
        why_ignored = [why for seq, _w, why in evidence if seq == IGNORE]
        reasons = why_ignored + [r for r in reasons if r not in why_ignored]
    return Identification(sequence, float(confidence), source, tuple(reasons), tuple((k, float(v)) for k, v in ranked),
                          bool(ambiguous))


def _strip_ext(name: str) -> str:
    n = name
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return n


# -------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class MappingRule:
    """One rule of a mapping file; every given field must match."""

    sequence: str
    match: Optional[str] = None  # glob on the series description (DICOM) or file name (files), case-insensitive
    study: Optional[str] = None  # glob on the study name
    number: Optional[int] = None  # DICOM SeriesNumber


@dataclass(frozen=True)
class Mapping:
    """User overrides of identification, read from a JSON mapping file.

    Format: either an object mapping a glob to a sequence, e.g.
    ``{"t2_tirm*": "flair", "*_pd_*": "ignore"}``, or
    ``{"series": [{"match": "t1_vibe*", "number": 12, "study": "case-0*", "sequence": "t1c"}, ...]}``.
    A glob matches the DICOM SeriesDescription or, for image files, the file name (with
    its folder inside the study); matching is case-insensitive; the first rule that matches
    wins. ``sequence`` is one of t1, t1c, t2, flair, dwi, swi or ignore.
    """

    rules: Tuple[MappingRule, ...] = ()
    source: str = ""

    def lookup(self, study: str, name: str, number: Optional[int] = None) -> Optional[MappingRule]:
        for r in self.rules:
            if r.study is not None and not fnmatch.fnmatchcase(study.lower(), r.study.lower()):
                continue
            if r.match is not None and not fnmatch.fnmatchcase(name.lower(), r.match.lower()):
                continue
            if r.number is not None and r.number != number:
                continue
            return r
        return None

    def identification(self, rule: MappingRule) -> Identification:
        what = ", ".join(f"{k} {v!r}" for k, v in (("study", rule.study), ("match", rule.match), ("number", rule.number))
                         if v is not None)
        return Identification(rule.sequence, 1.0, "mapping", (f"mapping file: {what}",), ((rule.sequence, 1.0),), False)


def load_mapping(path: Optional[Path]) -> Mapping:
    """Read and check a mapping file (see :class:`Mapping`); None gives an empty mapping.

    Raises:
        InputError: unreadable JSON, unknown keys, or a sequence name that is not known.
    """
    if path is None:
        return Mapping()
    p = Path(path)
    if not p.is_file():
        raise InputError("the mapping file does not exist", p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"the mapping file is not valid JSON ({e})", p) from None
    if isinstance(data, dict) and "series" in data:
        items = data["series"]
        extra = set(data) - {"series", "description", "comment"}
        if extra:
            raise InputError(f"the mapping file has unknown keys {sorted(extra)}", p)
    elif isinstance(data, dict):
        items = [{"match": k, "sequence": v} for k, v in data.items()]
    else:
        raise InputError("the mapping file must hold a JSON object", p)
    if not isinstance(items, list):
        raise InputError("'series' in the mapping file must be a list", p)
    rules = []
    allowed = set(SEQUENCES) | {IGNORE}
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"mapping rule {n + 1} must be an object", p)
        extra = set(item) - {"match", "study", "number", "sequence"}
        if extra:
            raise InputError(f"mapping rule {n + 1} has unknown keys {sorted(extra)}", p)
        seq = str(item.get("sequence", "")).lower()
        if seq not in allowed:
            raise InputError(f"mapping rule {n + 1} names sequence {item.get('sequence')!r}; use one of "
                             f"{', '.join(SEQUENCES)} or {IGNORE}", p)
        if not any(item.get(k) is not None for k in ("match", "study", "number")):
            raise InputError(f"mapping rule {n + 1} matches every series; give match, study or number", p)
        number = item.get("number")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
            raise InputError(f"mapping rule {n + 1}: number must be an integer (the DICOM SeriesNumber)", p)
        for k in ("match", "study"):
            if item.get(k) is not None and not isinstance(item[k], str):
                raise InputError(f"mapping rule {n + 1}: {k} must be a string", p)
        rules.append(MappingRule(seq, item.get("match"), item.get("study"), number))
    return Mapping(tuple(rules), str(p))
