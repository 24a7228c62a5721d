"""Point files and extreme-point rules.

Points travel as (N, 3) float arrays of LPS millimetres. Files may be:
- Slicer markups JSON (``.mrk.json``): ``coordinateSystem`` "LPS" or "RAS" is honoured
  (RAS is converted to LPS);
- Slicer fiducial CSV (``.fcsv``): the ``# CoordinateSystem`` header line is honoured;
- plain JSON: ``[[x, y, z], ...]`` or ``{"points": [...], "coordinateSystem": "LPS"}``, LPS mm
  unless stated;
- plain CSV: rows ``x,y,z`` (an optional header row is skipped), LPS mm.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, grid_of, physical_to_index, index_to_physical, ras_to_lps

__all__ = ["read_points", "check_inside", "validate_extreme_points", "extreme_points_from_mask", "write_points_json"]

_NAMES = ("x-min (right)", "x-max (left)", "y-min (anterior)", "y-max (posterior)", "z-min (inferior)", "z-max (superior)")


def _system(value, path) -> str:
    s = str(value if value is not None else "LPS").strip().upper()
    if s in ("0", "RAS"):
        return "RAS"
    if s in ("1", "LPS"):
        return "LPS"
    raise InputError(f"unknown coordinateSystem {value!r} (expected 'RAS' or 'LPS')", path)


def _as_array(rows, path) -> np.ndarray:
    try:
        arr = np.asarray(rows, dtype=float)
    except (TypeError, ValueError) as e:
        raise InputError(f"points are not numbers: {e}", path) from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"each point needs 3 coordinates (x, y, z); got an array of shape {arr.shape}", path)
    if not np.all(np.isfinite(arr)):
        bad = int(np.argwhere(~np.isfinite(arr).all(axis=1))[0][0]) + 1
        raise InputError(f"point {bad} has a coordinate that is not a finite number", path)
    return arr


def read_points(path: Union[str, Path]) -> np.ndarray:
    """Read points from a markups, JSON or CSV file.

    Args:
        path: ``.mrk.json``, ``.json``, ``.fcsv`` or ``.csv`` file.

    Returns:
        (N, 3) LPS mm.

    Raises:
        InputError: unreadable file, unknown format or coordinate system, no points.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("point file not found", p)
    name = p.name.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read point file: {e}", p) from None
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e})", p) from None
        if isinstance(data, dict) and "markups" in data:
            pts, system = [], "LPS"
            for m in data.get("markups") or []:
                system = _system(m.get("coordinateSystem", "LPS"), p)
                for cp in m.get("controlPoints") or []:
                    if "position" not in cp:
                        raise InputError(f"control point {cp.get('label', '?')!r} has no position", p)
                    if cp.get("positionStatus", "defined") != "defined":
                        continue  # a point still being placed in Slicer has no position yet
                    pts.append(ras_to_lps(cp["position"])[0] if system == "RAS" else cp["position"])
            if not pts:
                raise InputError("the markups file has no control points", p)
            return _as_array(pts, p)
        if isinstance(data, dict):
            system = _system(data.get("coordinateSystem", "LPS"), p)
            rows = data.get("points")
        else:
            system, rows = "LPS", data
        if not rows:
            raise InputError("no points in the file", p)
        arr = _as_array(rows, p)
        return ras_to_lps(arr) if system == "RAS" else arr
    if name.endswith(".fcsv") or name.endswith(".csv"):
        system, rows = "LPS", []
        for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not "".join(row).strip():
                continue
            if row[0].startswith("#"):
                head = ",".join(row)
                if "CoordinateSystem" in head:
                    system = _system(head.split("=", 1)[1], p)
                continue
            if any(";" in c or "\t" in c for c in row):  # a spreadsheet's export in another locale
                sep = "semicolons" if any(";" in c for c in row) else "tabs"
                raise InputError(f"line {line_no}: the values are separated by {sep}, not commas: write each point "
                                 "as x,y,z (commas between the numbers, points as decimal marks)", p)
            cells = row[1:4] if name.endswith(".fcsv") else row[:3]
            try:
                rows.append([float(c) for c in cells])
            except ValueError:
                if not rows and line_no == 1:
                    continue  # a header row such as "x,y,z"
                raise InputError(f"line {line_no}: expected three numbers x,y,z, got {row[:4]}", p) from None
        if not rows:
            raise InputError("no points in the file", p)
        arr = _as_array(rows, p)
        return ras_to_lps(arr) if system == "RAS" else arr
    raise InputError("unknown point file type (use .mrk.json, .json, .fcsv or .csv)", p)


def write_points_json(points_lps: np.ndarray) -> str:
    """Plain JSON text for points in LPS mm (the format :func:`read_points` reads)."""
    return json.dumps({"coordinateSystem": "LPS", "points": np.round(np.asarray(points_lps), 4).tolist()}, indent=1)


def check_inside(points_lps, image, source=None, what: str = "point") -> None:
    """Refuse points outside the image (more than half a voxel beyond its outer voxel centres) or not finite.

    Raises:
        InputError: naming the point (``what`` and its 1-based number) and ``source``.
    """
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    g = image if isinstance(image, Grid) else grid_of(image)
    size = np.asarray(g.size)
    for n, (ix, pt) in enumerate(zip(physical_to_index(g, pts), pts), start=1):
        if not np.all(np.isfinite(pt)):
            raise InputError(f"{what} {n} has a coordinate that is not a number ({pt.tolist()})", source)
        if np.any(ix < -0.5) or np.any(ix > size - 0.5):
            raise InputError(
                f"{what} {n} at LPS ({pt[0]:.1f}, {pt[1]:.1f}, {pt[2]:.1f}) mm is outside the image "
                f"(voxel index {np.round(ix, 1).tolist()}, image size {size.tolist()})", source)


def validate_extreme_points(
    points_lps: np.ndarray, image: Union[sitk.Image, Grid], *, source: Optional[str] = None, count: int = 6
) -> np.ndarray:
    """Check points for extreme-point annotation.

    Rules: exactly ``count`` points; each inside the image (within half a voxel of its outer
    voxel centres); their bounding box has a non-zero size along every physical axis (i.e.
    they are not all in one plane perpendicular to x, y or z).

    Raises:
        InputError: naming the point (1-based) and why.
    """
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    if len(pts) != count:
        raise InputError(f"extreme-point annotation needs exactly {count} points, got {len(pts)}", source)
    g = image if isinstance(image, Grid) else grid_of(image)
    check_inside(pts, g, source)
    extent = pts.max(axis=0) - pts.min(axis=0)
    min_mm = 0.5 * min(g.spacing)
    for axis, name in enumerate("xyz"):
        if extent[axis] < min_mm:
            raise InputError(
                f"all {count} points lie in one plane (their {name} coordinates span {extent[axis]:.2f} mm): "
                "extreme points must enclose the object in 3D", source)
    return pts


def extreme_points_from_mask(
    mask: sitk.Image, *, rng: Optional[np.random.Generator] = None, jitter_mm: float = 0.0
) -> np.ndarray:
    """Six extreme points of a binary mask, as a person would click them.

    For each physical axis (x, y, z in LPS) the mask voxels with the smallest and the largest
    coordinate are found; among the ties one is picked (the median one, or a random one when
    ``rng`` is given). Each point is then moved by Gaussian noise of ``jitter_mm`` mm per axis
    (clicks are not exact), then clipped into the image.

    Returns:
        (6, 3) LPS mm in the order x-min, x-max, y-min, y-max, z-min, z-max.

    Raises:
        InputError: when the mask is empty.
    """
    arr = sitk.GetArrayViewFromImage(mask)
    kji = np.argwhere(arr > 0)
    if len(kji) == 0:
        raise InputError("the mask is empty: no extreme points can be taken from it")
    g = grid_of(mask)
    phys = index_to_physical(g, kji[:, ::-1].astype(float))
    out = []
    for axis in range(3):
        c = phys[:, axis]
        for pick in (c.min(), c.max()):
            cand = phys[np.abs(c - pick) < 1e-3]
            if rng is None:
                # the candidate closest to the candidates' centre
                centre = cand.mean(axis=0)
                out.append(cand[np.argmin(((cand - centre) ** 2).sum(axis=1))])
            else:
                out.append(cand[rng.integers(len(cand))])
    pts = np.asarray(out, dtype=float)
    if rng is not None and jitter_mm > 0:
        pts = pts + rng.normal(0.0, jitter_mm, size=pts.shape)
        idx = np.clip(physical_to_index(g, pts), 0, np.asarray(g.size) - 1)
        pts = index_to_physical(g, idx)
    return pts
