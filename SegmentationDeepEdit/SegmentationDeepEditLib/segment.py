"""Automatic segmentation: named input images in, a label map on the reference input's grid out.

Pipeline (the same :func:`prepare_volume` feeds training, so train and inference agree):
1. the inputs are checked against the bundle (names, missing and extra inputs; optional
   inputs may be left out and become a zero channel, with a warning) and each is resampled
   (linear) onto the reference input's grid when its size, spacing or direction differs;
   inputs whose physical extents do not overlap the reference are refused, since they need
   registration first;
2. a model grid: axis-aligned (identity direction, LPS) at the bundle's spacing (``fast``:
   its coarser ``fast_spacing_mm``), around the reference's foreground (non-zero voxels of a
   skull-stripped MRI, or voxels above a threshold such as the body in CT), sized to a
   multiple of ``divisible_by``;
3. each input resampled onto the model grid and normalised (z-score over its foreground, or a
   CT window to [0, 1]); outside the image: zeros, or (``"outside": "replicate"``) the image's
   edge voxels continued, so that a field of view cutting through an organ does not look like air;
4. the network: 3D sliding windows of ``roi`` voxels (bounded memory) or 2D slices of the
   model grid's axial axis, averaged over test-time augmentations (3D: flips along each axis;
   2D: the dihedral group D4 in three levels), sigmoid (overlapping regions) or softmax
   (exclusive classes);
5. the probabilities resampled back (linear) onto the reference grid, turned into label values
   (regions: painted in the bundle's order, e.g. WT -> 2, TC -> 1, ET -> 4; classes: argmax)
   and returned with segment descriptions. Glioma regions (ET, TC, WT) overlap; they are also
   described as ``regions`` (lists of label values) for writers that support overlapping
   segments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .annotate import fraction_at_or_below, normalise_input
from .bundle import Bundle, ensemble_members, get_network, load_bundle
from .device import cpu_supports_bf16, pick_device, run_with_fallback
from .errors import InputError, ModelError, NotSkullStripped
from .imageio import check_image_values, check_is_image
from .geometry import (Grid, bounding_box_grid, corners_lps, frequent_values, grid_of, image_on_grid,
                       index_box_covering, index_to_physical, resample_to_grid, same_lattice)

__all__ = ["SegmentResult", "Cancelled", "resolve_input_names", "check_input_names", "check_inputs", "align_inputs", "model_grid", "check_foreground_volume", "prepare_volume", "tta_flips_3d",
           "d4_transforms", "TTA_LEVELS_2D", "predict_volume", "segment_images",
           "label_segments", "clean_label", "intensity_warnings", "volume_warnings"]

Progress = Optional[Callable[[str, float], None]]
#: 3D models warn when the reference image is thinner than this along any axis (a few slices).
THIN_VOLUME_MM = 30.0


class Cancelled(InputError):
    """Raised when a cancel callback asks to stop; nothing has been written."""


@dataclass
class SegmentResult:
    """Output of :func:`segment_images`.

    Attributes:
        label: uint8 label map with exactly the reference input's geometry.
        segments: ``[{"value", "name", "color", "terminology"?}]`` for the label values.
        regions: overlapping named regions ``[{"name", "color", "values"}]`` (glioma ET/TC/WT),
            or [] when the segments are exclusive.
        model_id, model_version: the bundle used.
        device: the torch device actually used.
        tta: the test-time augmentation level used (0 = none).
        fast: whether the coarser fast grid was used.
        seconds: wall time per stage.
        grid: the model grid.
        warnings: messages for the user (missing optional input, empty result...).
        inputs: the given inputs on the reference grid (the reference itself, the others
            resampled where their geometry differed), e.g. for a picture of the result.
        notes: what was done to the inputs that a user may want to know (which were resampled
            onto the reference grid, from what voxel size).
    """

    label: sitk.Image
    segments: List[Dict[str, Any]]
    regions: List[Dict[str, Any]]
    model_id: str
    model_version: str
    device: str
    tta: int
    fast: bool
    seconds: Dict[str, float]
    grid: Grid
    warnings: List[str] = field(default_factory=list)
    inputs: Dict[str, sitk.Image] = field(default_factory=dict, repr=False)
    notes: List[str] = field(default_factory=list)

    def __iter__(self):  # ``label, segments = segment_images(...)``
        return iter((self.label, self.segments))

    def volumes_ml(self) -> Dict[str, float]:
        """Volume (mL) of every segment and region."""
        arr = sitk.GetArrayViewFromImage(self.label)
        counts = np.bincount(arr.reshape(-1).astype(np.intp), minlength=256)
        voxel_ml = float(np.prod(self.label.GetSpacing())) / 1000.0
        out = {s["name"]: round(float(counts[s["value"]]) * voxel_ml, 3) for s in self.segments}
        for r in self.regions:
            out[r["name"]] = round(float(counts[list(r["values"])].sum()) * voxel_ml, 3)
        return out


def _seg(meta: dict) -> dict:
    if meta.get("task") != "segmentation" or "segmentation" not in meta:
        raise InputError(f"model {meta.get('id')!r} is not an automatic segmentation model")
    return meta["segmentation"]


def resolve_input_names(meta: dict, given: Sequence[Tuple[Optional[str], Any]], *,
                        ignore_unknown: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Match (name, value) pairs to the bundle's input names, accepting the usual other names.

    A name is matched to a declared input in this order: the same name (any case); else the
    sequence :func:`~SegmentationDeepEditLib.batch.identify.identify` reads in it, when that is
    a declared input (BraTS 2023 ``t1n``/``t2w``/``t2f``, BraTS 2021 ``t1ce``, ``t1gd``,
    ``FLAIR``...). A pair without a name (``None``) is the bundle's only input when it has one,
    else the sequence identified from the value's file name (``BraTS-GLI-00001-000-t2f.nii.gz``).

    Args:
        meta: the bundle's metadata.
        given: (name or None, value) pairs; values are passed through (paths or images).
        ignore_unknown: leave out names that match no input (with a note) instead of refusing them.

    Returns:
        ({declared input name: value}, notes saying what was matched how).

    Raises:
        InputError: a name or file that matches no input, two values for one input.
    """
    from .batch.identify import identify

    declared = [sp["name"] for sp in meta["inputs"]]
    by_lower = {d.lower(): d for d in declared}
    out: Dict[str, Any] = {}
    came_from: Dict[str, str] = {}
    notes: List[str] = []
    for name, value in given:
        if name is None:
            fname = Path(str(value)).name
            if len(declared) == 1:
                target, how = declared[0], f"file {fname!r} taken as input {declared[0]!r} (the model's only input)"
            else:
                ident = identify(file_name=fname)
                said = (f"file {fname!r}", "from its name")
                by, tell = "by its name", "from the file name"
                if ident.sequence not in declared and Path(str(value)).is_dir():
                    # a DICOM series folder: what its SeriesDescription, protocol and header say, as the batch reads them
                    from .batch.discover import identify_dicom_folder

                    found = identify_dicom_folder(Path(str(value)))
                    if found is not None and (found[0].sequence or not ident.sequence):
                        ident, described = found[0], found[1] or "no description"
                        said = (f"DICOM series {fname!r} ({described!r})", "from its description, protocol and header")
                        by = f"by its description ({described!r}), protocol and header"
                        tell = f"from the folder name or the series' description ({described!r}), protocol and header"
                target = ident.sequence if ident.sequence in declared else None
                if target is None and ident.sequence and ident.sequence != "ignore":
                    if ignore_unknown:
                        notes.append(f"file {fname!r} ({ident.sequence} {by}) is not used by model {meta['id']!r}")
                        continue
                    raise InputError(f"{by} this is a {ident.sequence} image, which model {meta['id']!r} does not "
                                     f"take (its inputs: {', '.join(_describe_input(sp) for sp in meta['inputs'])}); "
                                     "leave it out, or give it as NAME=PATH", str(value))
                if target is None and ident.sequence == "ignore":
                    raise InputError(f"{by} this is not an image model {meta['id']!r} takes ("
                                     f"{'; '.join(ident.reasons)}): leave it out, or give it as NAME=PATH", str(value))
                if target is None:
                    raise InputError(f"cannot tell {tell} which input of model {meta['id']!r} "
                                     f"({', '.join(declared)}) this is; give it as NAME=PATH", str(value))
                how = f"{said[0]} taken as input {target!r} ({said[1]})"
            label = f"file {fname!r}"
        else:
            target, how, label = by_lower.get(name.lower()), None, f"input {name!r}"
            if target is None:
                ident = identify(file_name=name)
                if ident.sequence in declared:
                    target, how = ident.sequence, f"input name {name!r} taken as {ident.sequence!r}"
            if target is None:
                if ignore_unknown:
                    notes.append(f"input {name!r} is not used by model {meta['id']!r}")
                    continue
                raise InputError(f"model {meta['id']!r} has no input named {name!r}; its inputs are "
                                 f"{', '.join(_describe_input(sp) for sp in meta['inputs'])}")
            if isinstance(value, (str, Path)):
                # NAME=PATH whose file name says another sequence: swapped inputs run without an error and give
                # a wrong answer (glioma-regions with T1c and FLAIR swapped: a whole tumour twice the size)
                fname = Path(str(value)).name
                said = identify(file_name=fname)
                if said.sequence not in (None, "ignore", target) and not said.ambiguous and said.confidence >= 0.8:
                    notes.append(f"warning: file {fname!r} is given as input {target!r} but its name says "
                                 f"{said.sequence}: check that the inputs are not swapped")
        if target in out and came_from[target] == label:
            both = [out[target], value]
            what = (f" ({both[0]} and {both[1]})" if all(isinstance(v, (str, Path)) for v in both) else "")
            raise InputError(f"{label} given twice{what}: give one", str(value) if name is None else None)
        if target in out:
            raise InputError(f"{came_from[target]} and {label} would both be input {target!r} of model "
                             f"{meta['id']!r}: give one", str(value) if name is None else None)
        out[target], came_from[target] = value, label
        if how:
            notes.append(how)
    return out, notes


def check_input_names(meta: dict, names, how: str = "give each as --input NAME=PATH") -> None:
    """Refuse input names the bundle does not declare, and missing required inputs (before any image is read).

    ``how`` tells the user how to give a missing input (the command line's way by default).

    Raises:
        InputError: naming the bundle's inputs.
    """
    specs = meta["inputs"]
    declared = [s["name"] for s in specs]
    extra = sorted(set(names) - set(declared))
    if extra:
        raise InputError(f"model {meta['id']!r} has no input named {', '.join(map(repr, extra))}; its inputs are "
                         f"{', '.join(_describe_input(s) for s in specs)}")
    missing = [s["name"] for s in specs if s["name"] not in names and not s.get("optional")]
    if missing:
        raise InputError(f"model {meta['id']!r} needs input(s) {', '.join(missing)} ({how}; "
                         f"its inputs are {', '.join(_describe_input(s) for s in specs)})")


def check_inputs(meta: dict, images: Mapping[str, Optional[sitk.Image]],
                 sources: Optional[Mapping[str, str]] = None) -> Tuple[Dict[str, Optional[sitk.Image]], List[str]]:
    """Match the given images to the bundle's inputs by name.

    Returns:
        ({input name: image or None for a missing optional input}, warnings).

    Raises:
        InputError: unknown names, missing required inputs, or images that are not 3D scalar.
    """
    specs = meta["inputs"]
    sources = sources or {}
    given = {k: v for k, v in images.items() if v is not None}
    for name, img in given.items():
        check_is_image(img, sources.get(name), f"input {name!r}")
    check_input_names(meta, given)
    warnings = []
    out: Dict[str, Optional[sitk.Image]] = {}
    for s in specs:
        img = given.get(s["name"])
        if img is None:
            warnings.append(f"input {s['name']!r} is missing: {s.get('if_missing', 'it is replaced by zeros, as in training with a dropped sequence; accuracy is lower')}")
        elif img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            where = sources.get(s["name"])
            raise InputError(f"input {s['name']!r} must be a 3D scalar image (it has {img.GetDimension()} dimensions and "
                             f"{img.GetNumberOfComponentsPerPixel()} channel(s) per voxel)", where)
        else:
            check_image_values(img, sources.get(s["name"]), f"input {s['name']!r}")
        if s.get("normalization") == "ct_window":
            check_hounsfield(img, s["name"], sources.get(s["name"]))
        out[s["name"]] = img
    _refuse_identical_inputs(out, sources)
    return out, warnings


def check_hounsfield(image: sitk.Image, name: str, source: Optional[str] = None) -> None:
    """Refuse a CT input whose values are not Hounsfield units.

    Every CT of a body holds fat (-120..-80 HU) and air (-1000 HU) around or inside it; in HU at
    least 0.1 % of the voxels lie at or below -200. Stored values without the DICOM rescale
    (0..4095, air at 0), an MRI or a z-scored volume have none there, and a CT model would label
    1-3 L of "liver" in them with only a misleading warning.

    Raises:
        InputError: naming the file, the range of values found and the likely causes.
    """
    if fraction_at_or_below(image, -200.0) >= 0.001:
        return
    a = sitk.GetArrayViewFromImage(image)
    raise InputError(
        f"the {name} image does not look like a CT in Hounsfield units: its values run from {float(a.min()):g} to "
        f"{float(a.max()):g}, and almost none lie at or below -200 (fat and air in any body CT). Stored values "
        "without the DICOM rescale slope and intercept (air would read 0 instead of -1000), or not a CT at all? "
        "Give the CT in HU (e.g. the DICOM series folder itself, which is read with the rescale applied)", source)


def _refuse_identical_inputs(images: Mapping[str, Optional[sitk.Image]], sources: Mapping[str, str]) -> None:
    """Refuse one image given as two inputs (a T1c passed as FLAIR too gives a confident, wrong result)."""
    given = [(n, im) for n, im in images.items() if im is not None]
    for a in range(len(given)):
        for b in range(a + 1, len(given)):
            (na, ia), (nb, ib) = given[a], given[b]
            if ia.GetSize() == ib.GetSize() and ia.GetPixelID() == ib.GetPixelID() and \
                    np.array_equal(sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib)):
                raise InputError(f"inputs {na!r} and {nb!r} are the same image: each input must be its own sequence "
                                 f"(leave an optional input out instead of repeating another)", sources.get(nb))


def _describe_input(spec: dict) -> str:
    return spec["name"] + (" (optional)" if spec.get("optional") else "")


def _voxels(img: sitk.Image) -> str:
    """``0.9x0.9x5 mm, 256x256x30``: an image's voxel size and size, for messages."""
    return ("x".join(f"{s:.3g}" for s in img.GetSpacing()) + " mm, " + "x".join(str(n) for n in img.GetSize())
            + ("" if np.allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-3) else ", oblique or reoriented"))


def _extent(img: Union[sitk.Image, Grid]) -> Tuple[np.ndarray, np.ndarray]:
    c = corners_lps(img)
    return c.min(axis=0), c.max(axis=0)


def align_inputs(images: Mapping[str, Optional[sitk.Image]], reference: str,
                 sources: Optional[Mapping[str, str]] = None) -> Dict[str, Optional[sitk.Image]]:
    """Resample every input onto the reference input's grid (linear) where the geometry differs; an
    input holding the reference's voxels stored another way (RAS vs LPS, axes permuted or flipped) is
    moved voxel for voxel, so that it gives the result its LPS copy gives.

    Raises:
        InputError: an input does not overlap the reference in physical space (not registered).
    """
    sources = sources or {}
    ref = images[reference]
    if ref is None:
        raise InputError(f"the reference input {reference!r} is missing")
    ref_grid = grid_of(ref)
    rlo, rhi = _extent(ref)
    out: Dict[str, Optional[sitk.Image]] = {}
    for name, img in images.items():
        if img is None or name == reference:
            out[name] = img
            continue
        lo, hi = _extent(img)
        overlap = np.clip(np.minimum(hi, rhi) - np.maximum(lo, rlo), 0, None)
        smaller = np.minimum(hi - lo, rhi - rlo)
        frac = float(np.prod(overlap) / max(np.prod(np.maximum(smaller, 1e-3)), 1e-9))
        if frac < 0.1:
            raise InputError(
                f"input {name!r} does not overlap the reference input {reference!r} in physical space "
                f"({frac:.0%} of the smaller extent): the images are not aligned; register them first "
                "(e.g. `deepedit batch`, which registers every sequence to the reference)", sources.get(name))
        if grid_of(img) == ref_grid:
            out[name] = img
        elif same_lattice(img, ref_grid):  # the same voxels stored another way (RAS, permuted): moved, not interpolated
            out[name] = resample_to_grid(sitk.Cast(img, sitk.sitkFloat32), ref_grid, interpolator=sitk.sitkNearestNeighbor)
        else:
            out[name] = resample_to_grid(sitk.Cast(img, sitk.sitkFloat32), ref_grid, default=0.0)
    return out


def _constant_corner_background(arr: np.ndarray) -> float:
    """The value every corner of a volume shares (the background of a skull-stripped volume, also
    one z-scored as a whole), else 0."""
    corners = {float(arr[k, j, i]) for k in (0, -1) for j in (0, -1) for i in (0, -1)}
    return corners.pop() if len(corners) == 1 else 0.0


def check_foreground_volume(meta: dict, image: sitk.Image, name: str, source: Optional[str] = None) -> None:
    """Refuse an input whose non-background region is larger than the model can be right about.

    ``segmentation.crop.max_ml`` (bundles trained on skull-stripped MRI): the voxels that differ
    from the background (0, and any single value filling a fifth of the volume) must fill no more
    than that many mL.
    A skull-stripped brain fills 1.1-1.9 L; a head with skull, scalp and neck, or raw MRI with
    background noise, 3-9 L, on which a glioma model calls hundreds of mL of scalp and neck tumour.

    Raises:
        NotSkullStripped: an InputError naming the file, the volume found and what to do.
    """
    crop = _seg(meta).get("crop", {})
    limit = crop.get("max_ml")
    if limit is None:
        return
    arr = sitk.GetArrayViewFromImage(image)
    # background: 0 and any single value that fills a fifth of the volume (a volume z-scored as a
    # whole has a constant negative background, inside a frame of 0 when it was resampled)
    inside = arr != 0
    for b in frequent_values(arr):
        inside &= arr != b
    ml = float(np.count_nonzero(inside)) * float(np.prod(image.GetSpacing())) / 1000.0
    if ml > float(limit):
        raise NotSkullStripped(
            f"the {name} image has {ml:,.0f} mL of non-background voxels, more than a skull-stripped brain "
            f"(at most {float(limit):,.0f} mL): it looks like a whole head (skull, scalp, neck or background noise "
            f"kept). Model {meta['id']!r} was trained on skull-stripped MRI and finds false tumour outside the brain; "
            "strip the skull first (e.g. HD-BET or FreeSurfer's SynthStrip) so that everything outside the brain is 0",
            source)


def model_grid(meta: dict, reference: sitk.Image, *, fast: bool = False) -> Grid:
    """The axis-aligned model grid around the reference input's foreground (see module docstring)."""
    seg = _seg(meta)
    spacing = seg.get("fast_spacing_mm") if fast else meta["spacing_mm"]
    if spacing is None:
        raise InputError(f"model {meta['id']!r} has no fast mode")
    arr = sitk.GetArrayViewFromImage(reference)
    crop = seg.get("crop", {"kind": "none"})
    if crop["kind"] == "nonzero":
        # the background of a skull-stripped image: 0, or the constant every corner shares
        # (a volume z-scored as a whole has a non-zero constant background), with
        # ``"background": "corners"``; else 0 (what the 3D bundles were trained with)
        background = _constant_corner_background(arr) if crop.get("background") == "corners" else 0.0
        fg = arr != background
    elif crop["kind"] == "threshold":
        fg = arr > float(crop["value"])
    else:
        fg = None
    if fg is not None and fg.any():
        idx = [np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        lo = np.array([idx[2][0], idx[1][0], idx[0][0]], float)  # i, j, k
        hi = np.array([idx[2][-1], idx[1][-1], idx[0][-1]], float)
    else:
        lo = np.zeros(3)
        hi = np.array(reference.GetSize(), float) - 1
    box = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    pts = index_to_physical(reference, box)
    grid = bounding_box_grid(pts, spacing, margin_vox=int(seg.get("margin_vox", 4)), max_size=None,
                             multiple=int(meta.get("divisible_by", 16)))
    if int(seg.get("dims", 3)) == 2:
        # slice-wise models need the multiple in-plane only: no padded slices along k
        margin = int(seg.get("margin_vox", 4))
        sz = float(grid.spacing[2])
        lo_z, hi_z = float(pts[:, 2].min()), float(pts[:, 2].max())
        nk = int(np.ceil((hi_z - lo_z) / sz - 1e-6)) + 1 + 2 * margin
        oz = (lo_z + hi_z) / 2 - (nk - 1) / 2 * sz
        grid = Grid((grid.size[0], grid.size[1], nk), grid.spacing, (grid.origin[0], grid.origin[1], oz), grid.direction)
    return grid


def prepare_volume(meta: dict, images: Mapping[str, Optional[sitk.Image]], grid: Grid) -> np.ndarray:
    """Network input [C, k, j, i] float32 on the model grid, one channel per bundle input (zeros when missing)."""
    chans = []
    for spec in meta["inputs"]:
        img = images.get(spec["name"])
        if img is None:
            chans.append(np.zeros(grid.size[::-1], np.float32))
            continue
        if spec.get("outside") == "replicate":
            # beyond the image's edges, continue its edge voxels: a field of view that cuts
            # through the anatomy (a CT ending inside the liver) must not look like air
            a = sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(img, sitk.sitkFloat32), grid, extrapolate=True))
            chans.append(normalise_input(a, np.ones(a.shape, bool), spec, min_voxels=10))
            continue
        a = sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(img, sitk.sitkFloat32), grid, default=np.nan))
        inside = np.isfinite(a)
        chans.append(normalise_input(np.nan_to_num(a), inside, spec, min_voxels=10))
    return np.stack(chans).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Test-time augmentation
# ----------------------------------------------------------------------------------------------

def d4_transforms(level: int) -> List[Tuple[int, bool]]:
    """The D4 elements of a 2D TTA level as (quarter turns k, flip first along the last axis).

    Level 0: identity; 1: identity and horizontal flip; 2: adds the vertical flip and both
    flips (= a half turn); 3: all eight rotations and reflections.
    """
    if level == 0:
        return [(0, False)]
    if level == 1:
        return [(0, False), (0, True)]
    if level == 2:
        # vertical flip = half turn of a horizontal flip; both flips = half turn
        return [(0, False), (0, True), (2, True), (2, False)]
    if level == 3:
        return [(k, f) for k in range(4) for f in (False, True)]
    raise InputError(f"2D test-time augmentation level must be 0, 1, 2 or 3, got {level}")


TTA_LEVELS_2D = (0, 1, 2, 3)
# model-grid axis (LPS, identity direction) -> dimension of an [N, C, k, j, i] tensor
_FLIP_DIMS = {"i": 4, "j": 3, "k": 2}


def tta_flips_3d(meta: dict, tta: int) -> Tuple[Tuple[int, ...], ...]:
    """The flips a 3D bundle averages at TTA level ``tta``: the identity, then one flip per axis
    in ``segmentation.tta_flip_axes`` (model-grid axes "i" left-right, "j" anterior-posterior,
    "k" inferior-superior; default all three)."""
    if int(tta) <= 0:
        return ((),)
    axes = _seg(meta).get("tta_flip_axes", ["k", "j", "i"])
    return ((),) + tuple((_FLIP_DIMS[a],) for a in axes)


def _apply_d4(x, k: int, flip: bool):
    import torch

    if flip:
        x = torch.flip(x, (-1,))
    return torch.rot90(x, k, (-2, -1)) if k else x


def _invert_d4(y, k: int, flip: bool):
    import torch

    if k:
        y = torch.rot90(y, -k, (-2, -1))
    return torch.flip(y, (-1,)) if flip else y


def _activation(meta: dict):
    import torch

    if meta["output"]["activation"] == "softmax":
        return lambda y: torch.softmax(y.float(), dim=1)
    return lambda y: torch.sigmoid(y.float())


def predict_volume(net, array: np.ndarray, meta: dict, device, *, tta: int = 0, bf16: Optional[bool] = None,
                   progress: Progress = None, cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Probabilities [C_out, k, j, i] for one input [C, k, j, i] on the model grid.

    3D bundles run sliding windows of ``segmentation.roi`` (overlap ``segmentation.overlap``,
    Gaussian weighting), so memory stays bounded whatever the volume; ``tta`` > 0 averages
    over the identity and a flip along each axis of ``segmentation.tta_flip_axes`` (default all
    three). 2D bundles run batches of axial slices,
    ``tta`` is the D4 level (0-3).
    """
    import torch

    seg = _seg(meta)
    act = _activation(meta)
    report = progress or (lambda stage, frac: None)
    use_bf16 = (device.type == "cpu" and cpu_supports_bf16()) if bf16 is None else bool(bf16)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if (use_bf16 and device.type == "cpu") else \
        torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    x = torch.from_numpy(array[None]).to(device)

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user; nothing was written")

    if int(seg.get("dims", 3)) == 2:
        elems = d4_transforms(int(tta))
        depth = x.shape[2]
        batch = int(seg.get("slice_batch", 16))
        out = None
        with torch.inference_mode(), amp:
            for z0 in range(0, depth, batch):
                check_cancel()
                xs = x[0, :, z0:z0 + batch].permute(1, 0, 2, 3)  # slices as a batch [B, C, j, i]
                acc = None
                for k, f in elems:
                    y = act(net(_apply_d4(xs, k, f)))
                    y = _invert_d4(y, k, f)
                    acc = y if acc is None else acc + y
                acc = (acc / len(elems)).permute(1, 0, 2, 3)
                if out is None:
                    out = torch.zeros((acc.shape[0], depth) + tuple(acc.shape[2:]), dtype=torch.float32)
                out[:, z0:z0 + batch] = acc.float().cpu()
                report("inference", min(1.0, (z0 + batch) / depth))
        return out.numpy()

    from monai.inferers import sliding_window_inference

    roi = tuple(int(r) for r in seg.get("roi", (96, 96, 96)))
    overlap = float(seg.get("overlap", 0.25))
    flips = tta_flips_3d(meta, tta)
    channels_last = bool(meta["network"].get("channels_last")) and device.type == "cpu"
    windows = len(flips) * _window_count(x.shape[2:], roi, overlap)
    done = [0]

    def predictor(w):
        check_cancel()
        if channels_last:
            w = w.contiguous(memory_format=torch.channels_last_3d)
        y = act(net(w))
        done[0] += 1
        report("inference", min(1.0, done[0] / windows))  # a step per window: long CPU runs show progress
        return y

    acc = None
    with torch.inference_mode(), amp:
        for n, dims in enumerate(flips):
            xi = torch.flip(x, dims) if dims else x
            y = sliding_window_inference(xi, roi, 1, predictor, overlap=overlap,
                                         mode="gaussian", padding_mode="constant", cval=0.0)
            y = torch.flip(y, dims) if dims else y
            acc = y.float() if acc is None else acc + y.float()
    report("inference", 1.0)
    return (acc / len(flips))[0].cpu().numpy()


def _window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Windows ``sliding_window_inference`` runs over a volume of ``shape`` (padded up to ``roi``,
    steps of ``roi * (1 - overlap)``; one step where the volume is the window's size), for progress."""
    from monai.data.utils import dense_patch_slices

    size = [max(int(s), int(r)) for s, r in zip(shape, roi)]
    step = [int(r) if s == r else max(1, int(r * (1 - overlap))) for s, r in zip(size, roi)]
    return max(1, len(dense_patch_slices(size, roi, step)))


def label_segments(meta: dict) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(segment descriptions of the label values, overlapping regions) of a bundle."""
    segments = [{k: v for k, v in lab.items() if k in ("value", "name", "color", "terminology")} for lab in meta["labels"]]
    regions = [dict(r) for r in _seg(meta).get("regions", [])]
    return segments, regions


def axial_array_axis(image: sitk.Image) -> int:
    """The axis of ``image``'s array [k, j, i] that runs closest to the patient's inferior-superior
    direction (0 for an axial acquisition; another for a sagittal or coronal one)."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)  # columns: the i, j, k directions in LPS
    return 2 - int(np.argmax(np.abs(d[2])))


def clean_label(meta: dict, label: np.ndarray, voxel_ml: Optional[float] = None, axial_axis: int = 0) -> np.ndarray:
    """The bundle's declared clean-up (``segmentation.postprocess``) of a label array [k, j, i].

    - ``components: {"min_fraction": f}``: connected components of the foreground (any label
      value, face-connected) smaller than ``f`` times the largest are set to 0 (stray islands:
      vessels, bowel, the far side of a flip). Several large foci of a multifocal tumour stay.
      ``f = 1`` keeps only the largest: for one connected organ such as the liver.
      With ``"keep_if": {"region": name, "min_ml": v}`` a small component that holds at least
      ``v`` mL of that region (e.g. 1 mL of tumour core: a satellite focus, not a vessel) stays
      too; this needs ``voxel_ml``, the volume of one voxel in mL.
    - ``fill_holes: [{"region": name, "value": v}]``: voxels enclosed by the region (a 3D hole,
      or a hole within an axial slice) that are not in it get the value ``v``; e.g. necrosis
      inside an enhancing rim is tumour core. ``axial_axis`` is the array axis across axial
      slices (:func:`axial_array_axis` of the reference image), so that a sagittal or coronal
      acquisition is cleaned up as an axial one is.

    Returns:
        A new array (the input is not changed); the input itself when nothing is declared.
    """
    from scipy import ndimage as ndi

    seg = _seg(meta)
    pp = seg.get("postprocess") or {}
    out = label
    regions = {r["name"]: r["values"] for r in seg.get("regions", [])}
    comp = pp.get("components")
    if comp and out.any():
        fg = out > 0
        lab, n = ndi.label(fg)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            small = np.concatenate([[False], sizes < float(comp["min_fraction"]) * sizes.max()])
            keep = comp.get("keep_if")
            if keep:
                if keep["region"] not in regions:
                    raise ModelError(f"postprocess.components.keep_if names region {keep['region']!r}, which the "
                                     "bundle does not declare")
                if voxel_ml is None:
                    raise ValueError("clean_label needs voxel_ml for postprocess.components.keep_if")
                held = np.bincount(lab[np.isin(out, regions[keep["region"]])], minlength=n + 1) * float(voxel_ml)
                small &= held < float(keep["min_ml"])
            out = out.copy()
            out[small[lab]] = 0
    for rule in pp.get("fill_holes", []):
        if rule["region"] not in regions:
            raise ModelError(f"postprocess.fill_holes names region {rule['region']!r}, which the bundle does not declare")
        inside = np.isin(out, regions[rule["region"]])
        if not inside.any():
            continue
        filled = np.moveaxis(ndi.binary_fill_holes(inside), axial_axis, 0)  # a view: slices along axis 0
        axial = np.moveaxis(inside, axial_axis, 0)
        for k in np.flatnonzero(axial.any(axis=(1, 2))):
            filled[k] |= ndi.binary_fill_holes(axial[k])
        filled = np.moveaxis(filled, 0, axial_axis)
        new = filled & ~inside
        if new.any():
            out = out.copy() if out is label else out
            out[new] = int(rule["value"])
    return out


def grow_threshold(meta: dict, fast: bool = False) -> Optional[float]:
    """The foreground probability threshold of the bundle's ``postprocess.grow`` in this mode (None: no growth)."""
    grow = (_seg(meta).get("postprocess") or {}).get("grow")
    if not grow:
        return None
    t = grow.get("fast_threshold" if fast else "threshold")
    return None if t is None else float(t)


def grow_label(meta: dict, label: np.ndarray, background: np.ndarray, fast: bool = False) -> np.ndarray:
    """The bundle's ``postprocess.grow`` of a cleaned label array [k, j, i] (after :func:`clean_label`).

    Background voxels whose foreground probability ``1 - background`` is at least the mode's threshold
    and that connect (face-connected, through such voxels) to the label's foreground get the declared
    value: the outline of the organ grows where the argmax was conservative, while every labelled voxel,
    lesions included, stays as it was, and islands apart from the organ stay background.

    Args:
        background: p(background) on the same grid as ``label`` (1 beyond what the model saw).

    Returns:
        A new array; ``label`` itself when the bundle declares no growth for this mode or nothing is labelled.
    """
    from scipy import ndimage as ndi

    t = grow_threshold(meta, fast)
    if t is None or not label.any():
        return label
    if background.shape != label.shape:
        raise ValueError(f"grow_label: background {background.shape} and label {label.shape} differ in shape")
    labelled = label > 0
    parts, _ = ndi.label(labelled | ((1.0 - background) >= t))
    joined = np.isin(parts, np.unique(parts[labelled])) & ~labelled
    if not joined.any():
        return label
    out = label.copy()
    out[joined] = int(_seg(meta)["postprocess"]["grow"]["value"])
    return out


def intensity_warnings(meta: dict, label: np.ndarray, images: Mapping[str, Optional[sitk.Image]]) -> List[str]:
    """Warnings from the bundle's ``segmentation.intensity_checks`` (an input outside what the model saw).

    Each check takes the median of one input over the voxels the model labelled with ``values``;
    outside ``range`` its ``message`` is returned, formatted with ``median``, ``low`` and ``high``.
    ``label`` and the images are on the reference grid; fewer than 100 labelled voxels: no check.
    """
    out = []
    for chk in _seg(meta).get("intensity_checks", []):
        img = images.get(chk["input"])
        if img is None:
            continue
        mask = np.isin(label, chk["values"])
        if int(mask.sum()) < 100:
            continue
        median = float(np.median(sitk.GetArrayViewFromImage(img)[mask]))
        low, high = chk["range"]
        if not low <= median <= high:
            out.append(chk["message"].format(median=median, low=low, high=high))
    return out


def offset_background(spec: dict, image: Optional[sitk.Image]) -> Optional[float]:
    """The constant that a skull-stripped input (``foreground: "nonzero"``) has for background when it
    is not 0 and the brain around it holds raw, not z-scored, intensities (an offset such as +200, a
    0-255 rescale); None otherwise.

    The models normalise the non-zero voxels; such a background is then taken for brain (on a copy of
    tcga-du-7294 with 200 added the glioma model's whole-tumour Dice fell from 0.89 to 0.43). Volumes
    z-scored over the brain around a constant negative background (the BraTS 2013 cases, part of the
    training data) are what the models saw: None (brain mean within one standard deviation of 0).
    """
    if image is None or spec.get("foreground") != "nonzero":
        return None
    arr = sitk.GetArrayViewFromImage(image)
    offsets = [float(v) for v in frequent_values(arr) if v != 0]
    if not offsets:
        return None
    brain = arr[~np.isin(arr, [0.0] + offsets)]
    if brain.size < 1000:
        return None
    mean, std = float(brain.mean()), float(brain.std())
    return offsets[0] if abs(mean) > max(std, 1e-6) else None


def zero_offset_backgrounds(meta: dict, images: Mapping[str, Optional[sitk.Image]]
                            ) -> Tuple[Dict[str, Optional[sitk.Image]], List[str]]:
    """Inputs with an :func:`offset_background` get that background set to 0 (the voxels equal to the
    constant), so that the brain alone is normalised; returns the images and a warning per input
    changed. Every other input is returned as it is (the same object). Images are on the reference grid.
    """
    out: Dict[str, Optional[sitk.Image]] = dict(images)
    warnings = []
    for spec in meta["inputs"]:
        img = images.get(spec["name"])
        value = offset_background(spec, img)
        if value is None:
            continue
        arr = sitk.GetArrayFromImage(img)
        arr[arr == value] = 0
        fixed = sitk.GetImageFromArray(arr)
        fixed.CopyInformation(img)
        out[spec["name"]] = fixed
        warnings.append(f"the {spec['name']} image's background is the constant {value:g}, not 0, around raw "
                        f"intensities: model {meta['id']!r} takes skull-stripped MRI whose background is 0, so the "
                        f"voxels of {value:g} were set to 0 before segmenting (on such copies of a real case, + 200 and "
                        "rescaled to 0-255, whole-tumour Dice 0.87-0.88 with this, 0.43-0.46 without, 0.89 for the "
                        "original); check the result, and store the background as 0")
    return out, warnings


def volume_warnings(meta: dict, label: np.ndarray, voxel_ml: float) -> List[str]:
    """Warnings from the bundle's ``segmentation.volume_checks``: a structure found, but smaller than
    one the model can be trusted to have found (``min_ml``); ``message`` is formatted with ``ml``
    and ``min``. Nothing found at all is reported elsewhere."""
    out = []
    for chk in _seg(meta).get("volume_checks", []):
        ml = float(np.count_nonzero(np.isin(label, chk["values"]))) * float(voxel_ml)
        if 0.0 < ml < float(chk["min_ml"]):
            out.append(chk["message"].format(ml=ml, min=float(chk["min_ml"])))
    return out


def edge_warnings(meta: dict, label: np.ndarray, axial_axis: int = 0) -> List[str]:
    """Warnings from the bundle's ``segmentation.edge_checks``: a structure that reaches the edge of the
    scan (more than ``max_fraction`` of its voxels on the outer faces of the reference grid) is cut
    by the field of view: its volume is a lower bound and its boundary there is not its own.
    ``message`` is formatted with ``fraction`` and ``where`` (the first or last slice, the side)."""
    out = []
    for chk in _seg(meta).get("edge_checks", []):
        inside = np.isin(label, chk["values"])
        total = int(np.count_nonzero(inside))
        if total == 0:
            continue
        on_face = np.zeros_like(inside)
        where = []
        for axis in range(3):
            faces = [0, inside.shape[axis] - 1]
            hit = np.take(inside, faces, axis=axis)
            if hit.any():
                where.append("the first or last slice" if axis == axial_axis else "the side of the field of view")
                idx = [slice(None)] * 3
                for f in faces:
                    idx[axis] = f
                    on_face[tuple(idx)] |= inside[tuple(idx)]
        fraction = np.count_nonzero(on_face) / total
        if fraction > float(chk["max_fraction"]):
            out.append(chk["message"].format(fraction=fraction, where=" and ".join(dict.fromkeys(where))))
    return out


def background_on_reference(probs: np.ndarray, mgrid: Grid, ref: sitk.Image) -> np.ndarray:
    """p(background) (channel 0 of ``probs`` on the model grid) on the reference grid; 1 beyond the model grid."""
    return sitk.GetArrayFromImage(resample_to_grid(image_on_grid(probs[0].astype(np.float32), mgrid), grid_of(ref),
                                                   default=1.0))


def _postprocess(meta: dict, probs: np.ndarray, mgrid: Grid, ref: sitk.Image) -> np.ndarray:
    """Probabilities on the model grid -> label array on the reference grid (channel by channel)."""
    seg = _seg(meta)
    ref_grid = grid_of(ref)
    shape = ref_grid.size[::-1]
    lo_idx, hi_idx = index_box_covering(ref_grid, mgrid)
    out = np.zeros(shape, np.uint8)
    if not np.all(hi_idx > lo_idx):
        return out
    sub = sitk.RegionOfInterest(ref_grid.reference_image(), [int(v) for v in hi_idx - lo_idx], [int(v) for v in lo_idx])
    sub_grid = grid_of(sub)

    def back(c, default=0.0):
        return sitk.GetArrayFromImage(resample_to_grid(image_on_grid(probs[c].astype(np.float32), mgrid), sub_grid,
                                                       default=default))

    if seg["output_kind"] == "regions":
        part = np.zeros(sub_grid.size[::-1], np.uint8)
        for r in seg["paint"]:  # a region's own threshold, else the bundle's
            part[back(int(r["channel"])) >= float(r.get("threshold", meta["output"]["threshold"]))] = int(r["value"])
    else:
        values = np.asarray(seg["class_values"], np.uint8)
        ft = seg.get("foreground_threshold")
        first = 0 if ft is None else 1  # with a foreground threshold, background is decided apart
        background = None if ft is None else back(0, default=1.0)  # beyond the model grid: background
        best = back(first)
        arg = np.full(best.shape, first, np.uint8)
        for c in range(first + 1, probs.shape[0]):
            p = back(c)
            better = p > best
            best[better] = p[better]
            arg[better] = c
        if background is not None:
            fill = seg.get("foreground_threshold_class")
            if fill is not None:  # the voxels the threshold adds (their argmax is background) take this class
                arg[(background >= best) & ((1.0 - background) >= float(ft))] = int(fill)
            arg[(1.0 - background) < float(ft)] = 0
        part = values[arg]
    out[lo_idx[2]:hi_idx[2], lo_idx[1]:hi_idx[1], lo_idx[0]:hi_idx[0]] = part
    return out


def segment_images(
    model: Union[str, Bundle],
    images: Mapping[str, Optional[sitk.Image]],
    *,
    device: str = "auto",
    tta: Optional[int] = None,
    fast: bool = False,
    sources: Optional[Mapping[str, str]] = None,
    progress: Progress = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> SegmentResult:
    """Run an automatic segmentation bundle.

    Args:
        model: bundle id, folder or :class:`Bundle` (``task == "segmentation"``).
        images: ``{input name: image}``; the bundle's reference input defines the output grid.
        device: "auto", "cpu" or "cuda".
        tta: test-time augmentation level (3D: 0 off, >0 flips; 2D: D4 level 0-3); None for
            the bundle's default.
        fast: use the bundle's coarser fast grid (``fast_spacing_mm``).
        sources: ``{input name: file}`` for error messages.
        progress: callback(stage, fraction).
        cancel: callable returning True to stop (checked between windows / slice batches).

    Returns:
        :class:`SegmentResult` whose label has exactly the reference input's geometry.
    """
    t0 = time.perf_counter()
    report = progress or (lambda stage, frac: None)
    if not isinstance(images, Mapping):
        raise InputError(f"images must be a mapping {{input name: SimpleITK image}} (e.g. {{'ct': image}}), "
                         f"not {type(images).__name__}")
    bundle = load_bundle(model)
    meta = bundle.meta
    if meta["task"] != "segmentation":
        raise InputError(f"model {bundle.id!r} is an annotation model (it needs points; use `deepedit annotate`)")
    seg = _seg(meta)
    level = int(seg.get("tta_default", 0) if tta is None else tta)
    if int(seg.get("dims", 3)) == 2:
        d4_transforms(level)  # validates the level
    elif level not in (0, 1):
        raise InputError(f"model {bundle.id!r} is 3D: its test-time augmentation level is 0 (off) or 1 (flips), "
                         f"not {level}")
    if fast and not seg.get("fast_spacing_mm"):
        raise InputError(f"model {bundle.id!r} has no fast mode")
    report("prepare", 0.0)
    imgs, warnings = check_inputs(meta, images, sources)
    ref_name = seg["reference"]
    aligned = align_inputs(imgs, ref_name, sources)
    ref = aligned[ref_name]
    notes = [f"{name} ({_voxels(img)}) " + (f"reordered onto the {ref_name} grid, voxel for voxel (the same voxels "
                                            "stored in another orientation)" if same_lattice(img, ref) else
                                            f"resampled onto the {ref_name} grid ({_voxels(ref)})")
             for name, img in imgs.items() if img is not None and name != ref_name and aligned[name] is not img]
    aligned, converted = zero_offset_backgrounds(meta, aligned)
    warnings.extend(converted)  # a warning per input whose background was set to 0
    for name, img in aligned.items():  # on the reference grid: the same volume everywhere
        if img is not None:
            check_foreground_volume(meta, img, name, (sources or {}).get(name))
    if int(seg.get("dims", 3)) == 3:
        extent = np.asarray(ref.GetSize(), float) * np.asarray(ref.GetSpacing(), float)
        if extent.min() < THIN_VOLUME_MM:
            axis = int(extent.argmin())
            warnings.append(f"the {ref_name} image covers only {extent[axis]:.0f} mm along its axis {'ijk'[axis]} "
                            f"({ref.GetSize()[axis]} voxels): this 3D model needs the anatomy around the target "
                            "(beyond the image it sees padding); the result is unreliable")
    grid = model_grid(meta, ref, fast=fast)
    arr = prepare_volume(meta, aligned, grid)
    t1 = time.perf_counter()
    dev = pick_device(device)

    def run(d):
        net = ensemble_members(get_network(bundle, d), seg.get("fast_members") if fast else None)
        return predict_volume(net, arr, meta, d, tta=level, progress=lambda s, f: report(s, 0.1 + 0.8 * f),
                              cancel=cancel)

    probs, used = run_with_fallback(run, dev, device)
    t2 = time.perf_counter()
    report("postprocess", 0.9)
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    axial = axial_array_axis(ref)
    out = clean_label(meta, _postprocess(meta, probs, grid, ref), voxel_ml=voxel_ml, axial_axis=axial)
    if grow_threshold(meta, fast) is not None:
        out = grow_label(meta, out, background_on_reference(probs, grid, ref), fast)
    label = image_on_grid(out, grid_of(ref))
    segments, regions = label_segments(meta)
    if not out.any():
        warnings.append("the model found nothing: check that the inputs are the sequences the model expects")
    warnings.extend(volume_warnings(meta, out, voxel_ml))
    warnings.extend(edge_warnings(meta, out, axial))
    warnings.extend(intensity_warnings(meta, out, aligned))
    t3 = time.perf_counter()
    report("done", 1.0)
    return SegmentResult(label=label, segments=segments, regions=regions, model_id=bundle.id,
                         model_version=bundle.version, device=used.type, tta=level, fast=bool(fast),
                         seconds={"prepare": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2, "total": t3 - t0},
                         grid=grid, warnings=warnings,
                         inputs={n: im for n, im in aligned.items() if im is not None}, notes=notes)
