"""What the Slicer module decides, as pure functions (numpy and SimpleITK only, no Slicer).

The Slicer layer hands over plain values (arrays, 4x4 matrices, strings) and gets plain
values back, so that every rule here is tested with pytest:

- geometry: a Slicer IJK-to-RAS matrix <-> ITK geometry in LPS (spacing, origin, direction);
  a volume's voxels [k, j, i] plus that matrix -> a SimpleITK image; the check that a result
  mask lies on the volume's grid before it is written into a segment;
- points kept with a segment: the JSON stored in the segment tag :data:`POINTS_TAG`
  (extreme points and corrective clicks in LPS mm, the model used), written and read back;
- the hint naming the next extreme point to click, and the labels of placed points;
- input volumes for a model guessed from volume names (``"T1 post Gd"`` -> the ``t1c`` input);
- the Slicer terminology string of a bundle label, when it has a well-formed one;
- a background worker's messages sorted against the requests awaiting an answer
  (:func:`route_worker_messages`: the inference and the batch worker share it);
- which segment an annotation result replaces, and whether it becomes the one the next clicks
  refine (:func:`segment_to_replace`, :class:`AnnotationTarget`).

Coordinates: Slicer's RAS and ITK's LPS differ by the sign of x and y. Index order: IJK-to-RAS
maps [i, j, k, 1]; numpy arrays of volumes (``slicer.util.arrayFromVolume``,
``sitk.GetArrayFromImage``) are [k, j, i].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, grid_of, ras_to_lps, same_geometry

__all__ = [
    "POINTS_TAG", "POINTS_FORMAT", "EXTREME_POINTS", "SegmentPoints",
    "lps_geometry_from_ijk_to_ras", "ijk_to_ras_from_lps_geometry", "grid_from_ijk_to_ras",
    "image_from_volume_array", "check_mask_fits_volume",
    "points_tag_value", "parse_points_tag",
    "extreme_point_label", "next_extreme_hint",
    "sequence_of_name", "guess_input_volumes", "terminology_of_label", "segments_from_result",
    "WorkerEvent", "route_worker_messages",
    "batch_request",
    "segment_to_replace", "AnnotationTarget",
]

#: Segment tag that keeps the points a segment was made from (value: :func:`points_tag_value`).
POINTS_TAG = "SegmentationDeepEdit.ExtremePoints"
POINTS_FORMAT = "SegmentationDeepEdit.points/1"

#: The six extremes in the order the module asks for them: (control point label, words for the hint).
#: The model does not care about the order; asking in a fixed order just makes the hint useful.
EXTREME_POINTS: Tuple[Tuple[str, str], ...] = (
    ("R", "right-most (patient's right)"),
    ("L", "left-most (patient's left)"),
    ("A", "most anterior (front)"),
    ("P", "most posterior (back)"),
    ("S", "most superior (top)"),
    ("I", "most inferior (bottom)"),
)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """Split a Slicer IJK-to-RAS matrix into ITK geometry.

    Args:
        ijk_to_ras: 4x4 matrix mapping voxel index [i, j, k, 1] to RAS mm.

    Returns:
        (spacing (i, j, k) mm, origin LPS mm, direction as a row-major 9-tuple whose column c
        is the LPS direction of index axis c), as SimpleITK's SetSpacing/SetOrigin/SetDirection take them.

    Raises:
        InputError: a zero spacing or a matrix that is not a rotation times a scaling.
    """
    m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    linear = _RAS_TO_LPS @ m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise InputError(f"the volume's IJK to RAS matrix has a zero or invalid spacing: {m[:3, :3].tolist()}")
    direction = linear / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-4:
        raise InputError("the volume's IJK to RAS matrix is sheared (its axes are not perpendicular); "
                         "resample the volume first")
    origin = _RAS_TO_LPS @ m[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.reshape(-1).tolist())


def ijk_to_ras_from_lps_geometry(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The inverse of :func:`lps_geometry_from_ijk_to_ras`: ITK geometry (LPS) to a 4x4 IJK-to-RAS matrix."""
    m = np.eye(4)
    m[:3, :3] = _RAS_TO_LPS @ np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = _RAS_TO_LPS @ np.asarray(origin, dtype=float)
    return m


def grid_from_ijk_to_ras(ijk_to_ras: np.ndarray, shape_kji: Sequence[int]) -> Grid:
    """The :class:`Grid` of a volume given its IJK-to-RAS matrix and array shape [k, j, i]."""
    spacing, origin, direction = lps_geometry_from_ijk_to_ras(ijk_to_ras)
    return Grid(tuple(int(s) for s in tuple(shape_kji)[::-1]), spacing, origin, direction)


def image_from_volume_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A volume's voxels and IJK-to-RAS matrix as a SimpleITK image in LPS (pixels copied).

    Args:
        array_kji: scalar voxels [k, j, i] (as ``slicer.util.arrayFromVolume`` gives them).
        ijk_to_ras: 4x4 IJK-to-RAS matrix of the volume.

    Raises:
        InputError: not a 3D scalar array, or a bad matrix.
    """
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise InputError(f"the volume must be a 3D scalar volume; its voxel array has shape {arr.shape}")
    spacing, origin, direction = lps_geometry_from_ijk_to_ras(ijk_to_ras)
    image = sitk.GetImageFromArray(np.array(arr, copy=True))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def check_mask_fits_volume(mask: sitk.Image, ijk_to_ras: np.ndarray, shape_kji: Sequence[int], tol: float = 1e-4) -> np.ndarray:
    """The mask's voxels [k, j, i] as uint8, after checking that it lies on the volume's grid.

    A mask on another grid would be written voxel by voxel into the wrong place, so this is an
    error rather than a resampling.

    Raises:
        InputError: the grids differ (names what differs).
    """
    volume_grid = grid_from_ijk_to_ras(ijk_to_ras, shape_kji)
    if not same_geometry(grid_of(mask), volume_grid, tol=tol):
        g = grid_of(mask)
        raise InputError(
            "the result does not lie on the volume's voxel grid "
            f"(result size {list(g.size)}, spacing {np.round(g.spacing, 4).tolist()}, origin {np.round(g.origin, 3).tolist()}; "
            f"volume size {list(volume_grid.size)}, spacing {np.round(volume_grid.spacing, 4).tolist()}, "
            f"origin {np.round(volume_grid.origin, 3).tolist()})")
    return sitk.GetArrayFromImage(mask).astype(np.uint8, copy=False)


# --------------------------------------------------------------------------------------
# Points kept with a segment
# --------------------------------------------------------------------------------------


@dataclass
class SegmentPoints:
    """The clicks a segment was made from, LPS mm.

    Attributes:
        extreme: (N, 3) extreme points (six for a complete annotation).
        positive: (N, 3) corrective clicks inside what was missing.
        negative: (N, 3) corrective clicks outside what was wrongly included.
        model_id: the bundle that produced the segment ("" when unknown).
    """

    extreme: np.ndarray
    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    model_id: str = ""


def _points(value: Any, what: str) -> np.ndarray:
    if value is None:
        return np.zeros((0, 3))
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"segment tag {POINTS_TAG}: {what} points are not numbers") from None
    if arr.size == 0:
        return np.zeros((0, 3))
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.all(np.isfinite(arr)):
        raise InputError(f"segment tag {POINTS_TAG}: {what} points must be a list of finite [x, y, z]")
    return arr


def points_tag_value(extreme_lps: np.ndarray, positive_lps: Optional[np.ndarray] = None,
                     negative_lps: Optional[np.ndarray] = None, model_id: str = "") -> str:
    """Compact one-line JSON for :data:`POINTS_TAG`: the points in LPS mm (0.1 µm rounding) and the model id.

    The text never contains "|" or a line break, so that it survives a .seg.nrrd round trip.
    """
    def rows(a):
        return np.round(_points(a, "these"), 4).tolist()

    text = json.dumps({
        "format": POINTS_FORMAT, "coordinateSystem": "LPS", "units": "mm",
        "extreme": rows(extreme_lps), "positive": rows(positive_lps), "negative": rows(negative_lps),
        "model": model_id or "",
    }, separators=(",", ":"), ensure_ascii=True)
    # Slicer's .seg.nrrd writer stores all tags of a segment on one header line as
    # "key:value|key:value|" (vtkMRMLSegmentationStorageNode::GetSegmentTagsAsString): a "|" in
    # the value would cut it there. JSON may spell it as an escape instead; newlines are escaped.
    return text.replace("|", "\\u007c")


def parse_points_tag(text: str) -> SegmentPoints:
    """Read a :data:`POINTS_TAG` value back (RAS is accepted too and converted).

    Raises:
        InputError: not JSON, another format, or malformed points.
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        raise InputError(f"segment tag {POINTS_TAG} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != POINTS_FORMAT:
        raise InputError(f"segment tag {POINTS_TAG} is not in the {POINTS_FORMAT} format")
    system = str(data.get("coordinateSystem", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise InputError(f"segment tag {POINTS_TAG}: unknown coordinateSystem {system!r}")
    out = {}
    for key in ("extreme", "positive", "negative"):
        pts = _points(data.get(key), key)
        out[key] = ras_to_lps(pts) if system == "RAS" and len(pts) else pts
    return SegmentPoints(out["extreme"], out["positive"], out["negative"], str(data.get("model") or ""))


# --------------------------------------------------------------------------------------
# Hints and labels for the six extreme points
# --------------------------------------------------------------------------------------


def extreme_point_label(index: int) -> str:
    """Control point label for the ``index``-th (0-based) extreme point: R, L, A, P, S, I, then numbers."""
    return EXTREME_POINTS[index][0] if 0 <= index < len(EXTREME_POINTS) else str(index + 1)


def next_extreme_hint(defined: int, total: int = -1) -> str:
    """The sentence that tells the user what to click next.

    Args:
        defined: number of extreme points already placed.
        total: number of control points in the list (placed or not); -1 when equal to ``defined``.
    """
    n = len(EXTREME_POINTS)
    if defined < n:
        name = EXTREME_POINTS[defined][1]
        return f"Point {defined + 1} of {n}: click the {name} edge of the object (any order works)."
    if defined == n and (total in (-1, n)):
        return ("All six points are placed. Drag a point to refine; add + clicks inside what is missing "
                "and - clicks on what is wrongly included.")
    return f"{defined} points are placed; exactly {n} are needed: delete {defined - n}."


# --------------------------------------------------------------------------------------
# Guessing a model's input volumes from volume names
# --------------------------------------------------------------------------------------

_CONTRAST_TOKENS = {"c", "ce", "gd", "gad", "post", "contrast", "postcontrast", "kontrast", "km", "plus"}
_CONTRAST_WORDS = ("t1c", "t1ce", "t1gd", "t1post", "t1plus", "t1+c", "t1+", "gado", "contrast", "postgd", "+c", "c+")


def sequence_of_name(name: str) -> Optional[str]:
    """The MR sequence or modality a volume name suggests: "t1c", "t1", "t2", "flair", "ct", or None.

    Rules (case-insensitive): FLAIR before T2 (FLAIR is T2-weighted); T1 with a contrast marker
    (c, ce, gd, gad, post, contrast, +c) is "t1c"; MPRAGE/VIBE count as T1; "CT" as a separate word.
    """
    s = name.lower()
    tokens = [t for t in re.split(r"[^a-z0-9+]+", s) if t]
    compact = re.sub(r"[^a-z0-9+]", "", s)
    if "flair" in compact or "t2f" in tokens or "darkfluid" in compact:
        return "flair"
    t1 = "t1" in compact or "mprage" in compact or "vibe" in tokens or "spgr" in tokens
    if t1 and (any(w in compact for w in _CONTRAST_WORDS) or any(t in _CONTRAST_TOKENS for t in tokens)):
        return "t1c"
    if t1:
        return "t1"
    if "t2" in compact:
        return "t2"
    if "ct" in tokens or compact.startswith("ct") or "hounsfield" in compact:
        return "ct"
    return None


def _input_kind(spec: Mapping[str, Any]) -> Optional[str]:
    name = str(spec.get("name", "")).lower()
    if name in ("t1c", "t1ce", "t1gd", "t1", "t2", "flair", "ct"):
        return {"t1ce": "t1c", "t1gd": "t1c"}.get(name, name)
    if str(spec.get("modality", "")).upper() == "CT":
        return "ct"
    return sequence_of_name(name)


def guess_input_volumes(inputs: Sequence[Mapping[str, Any]], volume_names: Sequence[str]) -> List[Optional[int]]:
    """For each input a bundle declares, the index of the volume that most likely is it.

    Each volume is used at most once. A volume whose name names the input's sequence (see
    :func:`sequence_of_name`) scores highest, then one whose name contains the input's name; an
    input of modality "any" (or a single-input model with a single volume) takes what is left.

    Args:
        inputs: the bundle's ``inputs`` ({"name", "modality"}), in order.
        volume_names: names of the candidate volumes.

    Returns:
        One entry per input: a volume index, or None when nothing fits (the user must pick).
    """
    kinds = [sequence_of_name(v) for v in volume_names]
    scores = np.zeros((len(inputs), len(volume_names)))
    conflict = np.zeros_like(scores, dtype=bool)
    for a, spec in enumerate(inputs):
        want = _input_kind(spec)
        name = re.sub(r"[^a-z0-9]", "", str(spec.get("name", "")).lower())
        for b, vname in enumerate(volume_names):
            if want is not None and kinds[b] is not None and kinds[b] != want:
                conflict[a, b] = True  # e.g. a contrast-enhanced T1 is never the native T1 input
            elif want is not None and kinds[b] == want:
                scores[a, b] = 3.0
            elif name and len(name) > 1 and name in re.sub(r"[^a-z0-9]", "", vname.lower()):
                scores[a, b] = 2.0
            elif want is None and str(spec.get("modality", "any")).lower() == "any":
                scores[a, b] = 1.0
    out: List[Optional[int]] = [None] * len(inputs)
    used = set()
    # Best pairs first; ties keep the inputs' and the volumes' order
    order = sorted(((-scores[a, b], a, b) for a in range(len(inputs)) for b in range(len(volume_names))))
    for neg, a, b in order:
        if -neg <= 0:
            break
        if out[a] is None and b not in used:
            out[a] = b
            used.add(b)
    if len(inputs) == 1 and out[0] is None and len(volume_names) == 1 and not conflict[0, 0]:
        out[0] = 0  # one input, one volume, nothing against it
    return out


# --------------------------------------------------------------------------------------
# Terminology
# --------------------------------------------------------------------------------------

_CODE = r"[^~^]*\^[^~^]*\^[^~^]*"  # scheme^value^meaning
_TERMINOLOGY_RE = re.compile(rf"^[^~]+(~{_CODE}){{3}}~[^~]*(~{_CODE}){{2}}$")


def terminology_of_label(label: Mapping[str, Any]) -> Optional[str]:
    """The Slicer terminology entry string of a bundle label, or None when it has none.

    Slicer stores terminology in the segment tag ``TerminologyEntry`` as
    ``context~category~type~modifier~anatomicContext~anatomicRegion~anatomicModifier``, each
    coded item as ``scheme^value^meaning``; a malformed string is dropped (the segment keeps
    its name and colour) rather than written where Slicer would fail to parse it.
    """
    value = label.get("terminology")
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    return value if _TERMINOLOGY_RE.match(value) else None


def segments_from_result(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The segments to create from a worker "segment" reply: ``[{name, values, color, terminology}]``.

    Overlapping regions (glioma ET/TC/WT, each a union of label values) when the model has them,
    else one segment per label value.
    """
    regions = result.get("regions") or []
    if regions:
        return [{"name": str(r["name"]), "values": [int(v) for v in r["values"]],
                 "color": [float(c) for c in r["color"]], "terminology": r.get("terminology")} for r in regions]
    return [{"name": str(s["name"]), "values": [int(s["value"])], "color": [float(c) for c in s["color"]],
             "terminology": s.get("terminology")} for s in result.get("segments", [])]


# --------------------------------------------------------------------------------------
# Batch tab
# --------------------------------------------------------------------------------------


def _chosen_path(value: Any) -> str:
    """A folder or file chosen in a path widget, or "" when none is (a pathlib.Path parameter left unset reads ".")."""
    text = "" if value is None else str(value).strip()
    return "" if text in ("", ".") else text


def batch_request(input_dir: Any, output_dir: Any, *, model: str = "", workers: int = 1, resume: bool = False,
                  device: str = "auto", mapping: Any = None, plan_only: bool = False) -> Dict[str, Any]:
    """The worker's ``batch`` (or ``batch_plan``) request for the Batch tab's settings.

    Args:
        input_dir, output_dir: folders from the tab's path widgets (``Path(".")`` or "" = not chosen).
        model: "" (the default brain model), "none" (register and report only) or a bundle id.
        workers: studies processed at once.
        mapping: optional mapping file overriding identification (unset: "" or ".").
        plan_only: the request of "Find studies" (a dry run: no output folder needed).

    Raises:
        InputError: a folder is not chosen or does not exist, a mapping file is given but missing,
            or ``workers`` is below 1.
    """
    inp, out = _chosen_path(input_dir), _chosen_path(output_dir)
    if not inp:
        raise InputError("choose the folder of studies first")
    if not Path(inp).is_dir():
        raise InputError("the folder of studies does not exist", inp)
    fields: Dict[str, Any] = {"input_dir": inp}
    mapping_file = _chosen_path(mapping)
    if mapping_file:
        if not Path(mapping_file).is_file():
            raise InputError("the mapping file does not exist", mapping_file)
        fields["mapping"] = mapping_file
    if plan_only:
        return fields
    if not out:
        raise InputError("choose an output folder (a new or empty folder outside the studies folder)")
    if int(workers) < 1:
        raise InputError(f"parallel studies must be 1 or more, not {workers}")
    fields.update(output_dir=out, model=model or None, workers=int(workers), resume=bool(resume), device=device or "auto")
    return fields


@dataclass
class WorkerEvent:
    """One thing the module must act on, from :func:`route_worker_messages`.

    kind: ``"log"`` (a line for the application log), ``"lost"`` (the worker exited while
    ``contexts`` still awaited an answer), ``"progress"``, ``"error"`` or ``"result"`` (of the
    request whose context is ``contexts[0]``).
    """

    kind: str
    message: Dict[str, Any]
    contexts: List[Any] = field(default_factory=list)

    @property
    def context(self) -> Any:
        return self.contexts[0] if self.contexts else None


def route_worker_messages(messages: Sequence[Mapping[str, Any]], pending: Dict[Any, Any]) -> List[WorkerEvent]:
    """Sort a worker's messages against ``pending`` (request id -> the module's context).

    A request's error or result removes it from ``pending``; the worker's exit empties it and
    reports every request left without an answer (``"lost"``), once. Messages for no pending
    request (the worker's "ready", an answer to a cancelled request) are dropped.
    """
    events: List[WorkerEvent] = []
    for message in messages:
        if "log" in message:
            events.append(WorkerEvent("log", dict(message)))
            continue
        if "exited" in message:
            if pending:
                lost = list(pending.values())
                pending.clear()
                events.append(WorkerEvent("lost", dict(message), lost))
            continue
        ctx = pending.get(message.get("id"))
        if ctx is None:
            continue
        if "progress" in message:
            events.append(WorkerEvent("progress", dict(message), [ctx]))
            continue
        del pending[message["id"]]
        if "error" in message:
            events.append(WorkerEvent("error", dict(message), [ctx]))
        elif "result" in message:
            events.append(WorkerEvent("result", dict(message), [ctx]))
    return events


# --------------------------------------------------------------------------------------
# Which segment an annotation result replaces
# --------------------------------------------------------------------------------------


def segment_to_replace(segment_id: str, exists: bool, has_points: bool) -> str:
    """The segment an annotation result may overwrite: only one this module made.

    A segment made here carries its clicks (:data:`POINTS_TAG`). Any other segment (painted by
    hand, imported, or the one Slicer selects after the current segment is deleted) is never
    overwritten: the result then becomes a new segment ("").
    """
    return segment_id if segment_id and exists and has_points else ""


class AnnotationTarget:
    """Whether a finished annotation may become the segment that the next clicks refine.

    Each request takes a :meth:`ticket` (the output segmentation and segment it was sent for,
    and the current generation). Starting a new object, choosing another output segmentation
    or another segment calls :meth:`detach`: a request still running then writes its own
    result but no longer decides which segment the following clicks refine.
    """

    def __init__(self) -> None:
        self.generation = 0

    def detach(self) -> None:
        self.generation += 1

    def ticket(self, segmentation_id: Optional[str], segment_id: str) -> Dict[str, Any]:
        return {"generation": self.generation, "segmentation": segmentation_id or None, "segment": segment_id or ""}

    def adopts(self, ticket: Mapping[str, Any], segmentation_id: Optional[str], segment_id: str) -> bool:
        """True when the result of ``ticket`` becomes the current segment (nothing changed since it was sent)."""
        return (ticket.get("generation") == self.generation and ticket.get("segmentation") == (segmentation_id or None)
                and ticket.get("segment", "") == (segment_id or ""))
