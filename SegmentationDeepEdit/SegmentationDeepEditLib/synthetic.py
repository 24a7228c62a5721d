"""Deterministic synthetic cases: glioma brain MRI and abdominal CT with liver lesions.

Every case is drawn from one integer seed: the same seed (and the same keyword arguments)
always gives the same pixels, labels and geometry; different seeds give different cases.
The cases are meant for tests, for smoke-training models and for domain-randomised
pre-training, never as a substitute for real data.

Geometry follows the core's contract: images are SimpleITK images whose physical points are
LPS millimetres (+x = patient's left, +y = posterior, +z = superior); numpy arrays taken from
them are indexed [k, j, i].  Each case is sampled onto a random acquisition grid (spacing,
slice thickness, storage orientation, axis flips, small oblique rotation, origin), and the
label is derived from the same continuous anatomy so that it stays consistent with the
images whatever the grid.

Brain cases (:func:`make_brain_case`) start from the MNI152 2009 template that ships inside
the ``nilearn`` wheel (grey- and white-matter probability maps and brain mask, 1 mm; no
network access is needed).  A glioma (irregular core, necrosis, enhancing rim that may be
partial or absent, surrounding edema that prefers white matter) is grown in it, the tissues
around it are pushed aside (mass effect), and four contrasts are synthesised from tissue
intensities drawn per case (T1, T1c, T2, FLAIR), with a smooth multiplicative bias field per
sequence, optional blur, thick-slice partial volume and Rician noise.  Labels follow the
BraTS 2017-2021 convention: 1 necrotic / non-enhancing tumour core, 2 edema, 4 enhancing.

CT cases (:func:`make_ct_case`) are a procedural portal-venous abdominal phantom (body wall
fat and muscle, ribs, spine, lung bases, heart, aorta, IVC, kidneys, spleen, stomach, bowel
and fat, gallbladder, liver with vessels, and hypo- or hyperdense lesions), stored as int16
Hounsfield units.  Labels follow the Medical Segmentation Decathlon Task03 convention:
1 liver, 2 lesion.

Sizes are kept small (a brain case is a few million voxels) so that one case takes about
a second or two on a two-core CPU; see ``info["seconds"]`` of any case.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.special import ndtri

from .errors import InputError

__all__ = [
    "SyntheticCase",
    "make_brain_case",
    "make_ct_case",
    "tumour_core_mask",
    "BRAIN_LABELS",
    "CT_LABELS",
    "GENERATOR_VERSION",
]

#: Bumped whenever the same seed would give different pixels than before.
GENERATOR_VERSION = 1

#: Label values of brain cases (BraTS 2017-2021 convention).
BRAIN_LABELS = {"necrotic_non_enhancing_core": 1, "edema": 2, "enhancing": 4}

#: Label values of CT cases (Medical Segmentation Decathlon Task03 convention).
CT_LABELS = {"liver": 1, "lesion": 2}

_BRAIN_SEQUENCES = ("t1", "t1c", "t2", "flair")

# Internal (anatomy-frame) grid spacing, mm. The anatomy is built on this axis-aligned LPS
# grid and then resampled onto the random acquisition grid.
_BRAIN_INTERNAL_MM = 1.5
_CT_INTERNAL_MM = 2.0

# Storage orientations as DICOM would write them: columns are the LPS directions of the
# index axes i (rows of a slice), j (columns of a slice) and k (slice normal).
_ORIENTATIONS = {
    "axial": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float).T,
    "coronal": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float).T,
    "sagittal": np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float).T,
}

SpacingArg = Optional[Union[float, Sequence[float]]]


@dataclass
class SyntheticCase:
    """One synthetic case.

    Attributes:
        images: sequence name -> image. Brain: ``"t1"``, ``"t1c"``, ``"t2"``, ``"flair"``
            (float32, arbitrary MR units, non-negative). CT: ``"ct"`` (int16 Hounsfield units).
        label: uint8 label map on exactly the geometry of the images. Brain: BraTS values
            1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour. CT: 1 liver,
            2 lesion (lesions lie inside the liver).
        kind: ``"brain"`` or ``"ct"``.
        seed: the seed the case was drawn from.
        info: the parameters drawn, JSON-serialisable: geometry (``spacing`` mm in index
            order i, j, k; ``size``; ``origin`` and centres in LPS mm; ``direction`` as 9
            numbers, row-major, columns = index axes; ``orientation``; ``rotation_deg``),
            tissue intensities, noise, tumour or lesion parameters, and ``seconds`` (time
            taken to generate).
        masks: extra binary uint8 masks on the same geometry: ``"brain"`` for brain cases,
            ``"body"`` for CT cases.
    """

    images: Dict[str, sitk.Image]
    label: sitk.Image
    kind: str
    seed: int
    info: dict
    masks: Dict[str, sitk.Image] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Small numerical helpers
# --------------------------------------------------------------------------------------


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


def _rng(seed: int, salt: int) -> np.random.Generator:
    """Generator for one case; ``salt`` keeps brain and CT streams apart."""
    return np.random.default_rng([salt, seed])


def _spacing3(value, name: str) -> np.ndarray:
    """Turns a scalar or a 3-sequence into three positive spacings (mm)."""
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InputError(f"{name} must be one positive number or three (mm, index order i, j, k), got {value!r}")
    return arr


def _bspline3(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel (support |t| < 2)."""
    t = np.abs(t)
    return np.where(t < 1, 2.0 / 3.0 - t**2 + 0.5 * t**3, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


def _interp_matrix(n: int, step: float, phase: float) -> np.ndarray:
    """(n, m) cubic B-spline weights of m coarse nodes for n fine samples."""
    u = np.arange(n) * step + 1.0 + phase
    m = int(np.floor(u[-1])) + 3
    return _bspline3(u[:, None] - np.arange(m)[None, :])


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int, int], spacing_mm: float,
                  scale_mm: float) -> np.ndarray:
    """Smooth Gaussian random field with unit variance everywhere.

    Args:
        rng: random generator.
        shape: array shape (nz, ny, nx).
        spacing_mm: voxel size of the array, mm (isotropic).
        scale_mm: spacing of the random B-spline control lattice, mm (the correlation length).

    Returns:
        float32 array of ``shape``, mean 0, standard deviation 1 at every voxel.
    """
    step = spacing_mm / scale_mm
    mats = [_interp_matrix(n, step, rng.uniform()) for n in shape]
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats))
    out = np.tensordot(coarse, mats[2], axes=([2], [1]))  # (cz, cy, nx)
    out = np.tensordot(out, mats[1], axes=([1], [1]))  # (cz, nx, ny)
    out = np.tensordot(out, mats[0], axes=([0], [1]))  # (nx, ny, nz)
    out = out.transpose(2, 1, 0)
    norms = [np.sqrt((m**2).sum(axis=1)) for m in mats]
    out = out / (norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :])
    return np.ascontiguousarray(out, dtype=np.float32)


def _soft(f: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume membership of the region f < 0 (f in mm): a logistic step."""
    return (0.5 - 0.5 * np.tanh(f * (0.5 / width_mm))).astype(np.float32)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed fields (mm); k is the blending distance, mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix about a unit axis (Rodrigues)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def _uniform_rotation(rng: np.random.Generator) -> np.ndarray:
    """Rotation drawn uniformly from SO(3)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _small_rotation(rng: np.random.Generator, max_deg: float) -> Tuple[np.ndarray, float, List[float]]:
    """Rotation by an angle uniform in [-max_deg, max_deg] about a random axis."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(-1.0, 1.0)) * max_deg
    return _rotation(axis, math.radians(angle)), angle, [float(v) for v in axis]


def _ellipsoid(x, y, z, centre, radii, rot) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an ellipsoid.

    Args:
        x, y, z: broadcastable LPS coordinate arrays, mm.
        centre: ellipsoid centre (x, y, z), mm.
        radii: semi-axes along the columns of ``rot``, mm.
        rot: 3x3 matrix whose columns are the ellipsoid's axes in LPS.
    """
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    q = 0.0
    for a in range(3):
        u = rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz
        q = q + (u / radii[a]) ** 2
    return ((np.sqrt(q) - 1.0) * float(np.exp(np.mean(np.log(radii))))).astype(np.float32)


def _ellipse2d(x, y, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse in the x-y plane (a z-cylinder)."""
    q = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return ((np.sqrt(q) - 1.0) * math.sqrt(rx * ry)).astype(np.float32)


def _rot_z(deg: float) -> np.ndarray:
    return _rotation(np.array([0.0, 0.0, 1.0]), math.radians(deg))


@dataclass
class _Grid:
    """Axis-aligned LPS grid with identity direction; arrays are [z, y, x]."""

    origin: np.ndarray  # LPS mm of voxel [0, 0, 0], ordered (x, y, z)
    spacing: float
    shape: Tuple[int, int, int]  # (nz, ny, nx)

    def axes(self, box: Optional[Tuple[slice, slice, slice]] = None):
        """Open coordinate arrays x (1,1,nx), y (1,ny,1), z (nz,1,1) in mm for a sub-box."""
        box = box or (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))
        z = (self.origin[2] + self.spacing * np.arange(box[0].start, box[0].stop, dtype=np.float32))
        y = (self.origin[1] + self.spacing * np.arange(box[1].start, box[1].stop, dtype=np.float32))
        x = (self.origin[0] + self.spacing * np.arange(box[2].start, box[2].stop, dtype=np.float32))
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def box(self, centre, half_mm) -> Tuple[slice, slice, slice]:
        """Index box (z, y, x slices) covering centre +- half_mm, clipped to the grid."""
        half = np.broadcast_to(np.asarray(half_mm, dtype=float), (3,))
        out = []
        for ax_xyz, ax_zyx in ((2, 0), (1, 1), (0, 2)):
            lo = int(math.floor((centre[ax_xyz] - half[ax_xyz] - self.origin[ax_xyz]) / self.spacing))
            hi = int(math.ceil((centre[ax_xyz] + half[ax_xyz] - self.origin[ax_xyz]) / self.spacing)) + 1
            out.append(slice(max(lo, 0), max(min(hi, self.shape[ax_zyx]), max(lo, 0))))
        return tuple(out)

    def index_to_lps(self, idx_zyx) -> np.ndarray:
        idx = np.asarray(idx_zyx, dtype=float)
        return self.origin + self.spacing * idx[..., ::-1]


def _target_geometry(direction: np.ndarray, spacing: np.ndarray, centre: np.ndarray,
                     extent_mm: np.ndarray) -> Tuple[List[int], np.ndarray]:
    """Size and origin of a grid of ``extent_mm`` centred on ``centre`` (LPS mm)."""
    size = [max(int(math.ceil(e / s - 1e-6)), 1) for e, s in zip(extent_mm, spacing)]
    origin = centre - direction @ (spacing * (np.asarray(size) - 1) / 2.0)
    return size, origin


def _resample(arrays: List[np.ndarray], src_origin: np.ndarray, src_spacing: float, size, spacing, origin,
              direction) -> List[np.ndarray]:
    """Linear resampling of axis-aligned arrays onto an acquisition grid.

    Args:
        arrays: float arrays [z, y, x] of one shape, on an identity-direction grid.
        src_origin: LPS position (mm) of their voxel [0, 0, 0] in the scanner.
        src_spacing: their isotropic voxel size, mm.
        size, spacing, origin, direction: the acquisition grid (index order i, j, k).

    Returns:
        One float32 array [k, j, i] per input; points outside the source read 0.
    """
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in size])
    f.SetOutputSpacing([float(v) for v in spacing])
    f.SetOutputOrigin([float(v) for v in origin])
    f.SetOutputDirection([float(v) for v in np.asarray(direction).flatten()])
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0)
    out = []
    for a in arrays:  # one scalar image at a time: faster than a vector image in SimpleITK
        img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
        img.SetSpacing([float(src_spacing)] * 3)
        img.SetOrigin([float(v) for v in src_origin])
        out.append(sitk.GetArrayFromImage(f.Execute(img)))
    return out


def _resample_region(arrays: List[np.ndarray], src_origin: np.ndarray, src_spacing: float, size, spacing, origin,
                     direction) -> Tuple[Tuple[slice, slice, slice], List[np.ndarray]]:
    """Like :func:`_resample`, but only over the part of the acquisition grid that the
    source box covers.

    Returns:
        (region, arrays): ``region`` are [k, j, i] slices of the full acquisition grid and
        ``arrays`` the resampled values there (possibly empty slices).
    """
    shape_zyx = np.array(arrays[0].shape)
    lo = np.asarray(src_origin, dtype=float)
    hi = lo + src_spacing * (shape_zyx[::-1] - 1)
    direction = np.asarray(direction)
    spacing = np.asarray(spacing, dtype=float)
    idx = (_box_corners(lo, hi) - np.asarray(origin)) @ direction / spacing  # continuous (i, j, k)
    i0 = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.asarray(size))
    i1 = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, np.asarray(size))
    sub_size = np.maximum(i1 - i0, 0)
    region = (slice(int(i0[2]), int(i0[2] + sub_size[2])), slice(int(i0[1]), int(i0[1] + sub_size[1])),
              slice(int(i0[0]), int(i0[0] + sub_size[0])))
    if np.any(sub_size == 0):
        return region, [np.zeros(tuple(sub_size[::-1]), np.float32) for _ in arrays]
    sub_origin = np.asarray(origin) + direction @ (spacing * i0)
    return region, _resample(arrays, src_origin, src_spacing, sub_size, spacing, sub_origin, direction)


class _NoisePool:
    """Standard normal numbers for several same-sized noise fields, drawn once.

    Each field is a contiguous window of the pool at a random offset: windows at different
    offsets are spatially white and, to the eye and to a network, independent, at a
    quarter of the cost of drawing every field afresh.
    """

    def __init__(self, rng: np.random.Generator, n: int):
        self.rng, self.n = rng, n
        self.pool = rng.standard_normal(2 * n + 1, dtype=np.float32)

    def take(self) -> np.ndarray:
        o = int(self.rng.integers(0, self.n + 1))
        return self.pool[o:o + self.n]


def _rician(pool: _NoisePool, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise of ``sigma`` per channel (float32)."""
    shape = signal.shape
    re = pool.take() * np.float32(sigma)
    re += signal.reshape(-1)
    re *= re
    im = pool.take() * np.float32(sigma)
    im *= im
    re += im
    np.sqrt(re, out=re)
    return re.reshape(shape)


def _to_image(arr: np.ndarray, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in np.asarray(direction).flatten()])
    return img


def _draw_direction(rng: np.random.Generator, orientation: Optional[str], oblique: bool,
                    max_deg: float, orientation_p=(0.5, 0.2, 0.3), flip_p: float = 0.25):
    """Random storage direction: orientation, axis flips and a small rotation."""
    names = list(_ORIENTATIONS)
    drawn = names[int(rng.choice(len(names), p=orientation_p))]
    orientation = orientation or drawn
    base = _ORIENTATIONS[orientation].copy()
    flips = rng.random(3) < flip_p
    base = base * np.where(flips, -1.0, 1.0)[None, :]
    rot, angle, axis = _small_rotation(rng, max_deg if oblique else 0.0)
    direction = rot @ base
    info = {
        "orientation": orientation,
        "flips": [bool(v) for v in flips],
        "rotation_deg": angle,
        "rotation_axis": axis,
    }
    return direction, info


def _extent_along(direction: np.ndarray, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Min and max of points (n, 3) projected on the grid axes."""
    proj = points @ direction
    return proj.min(axis=0), proj.max(axis=0)


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return round(float(x), 6)
    return x


# --------------------------------------------------------------------------------------
# Brain
# --------------------------------------------------------------------------------------


@dataclass
class _BrainAnatomy:
    grid: _Grid
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray  # soft brain mask in [0, 1]
    depth: np.ndarray  # distance inside the brain mask, mm
    brain_lo: np.ndarray  # LPS bounding box of the brain, mm
    brain_hi: np.ndarray


def _nifti_to_sitk(nii) -> sitk.Image:
    """nibabel image (RAS affine) -> SimpleITK image (LPS geometry)."""
    data = np.asarray(nii.get_fdata(dtype=np.float32))
    aff = np.diag([-1.0, -1.0, 1.0]) @ nii.affine[:3, :4]
    spacing = np.linalg.norm(aff[:, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (aff[:, :3] / spacing[None, :]).flatten()])
    img.SetOrigin([float(v) for v in aff[:, 3]])
    return img


@functools.lru_cache(maxsize=2)
def _brain_anatomy(spacing_mm: float = _BRAIN_INTERNAL_MM) -> _BrainAnatomy:
    """MNI152 2009 tissue maps resampled onto an axis-aligned LPS grid (cached)."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise InputError("synthetic brain cases need the 'nilearn' package (it ships the MNI152 template)") from exc
    gm = _nifti_to_sitk(datasets.load_mni152_gm_template(resolution=1))
    wm = _nifti_to_sitk(datasets.load_mni152_wm_template(resolution=1))
    mask = _nifti_to_sitk(datasets.load_mni152_brain_mask(resolution=1))
    mask = sitk.SmoothingRecursiveGaussian(sitk.Cast(mask, sitk.sitkFloat32), 0.7)

    m = sitk.GetArrayFromImage(mask) > 0.5
    idx = np.argwhere(m)[:, ::-1]  # (i, j, k)
    corners = np.array([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                        for c in _box_corners(idx.min(0), idx.max(0))])
    lo, hi = corners.min(0), corners.max(0)
    margin = 10.0
    origin = lo - margin
    shape_xyz = np.ceil((hi - lo + 2 * margin) / spacing_mm).astype(int) + 1
    grid = _Grid(origin=origin, spacing=spacing_mm, shape=(int(shape_xyz[2]), int(shape_xyz[1]), int(shape_xyz[0])))

    ref = sitk.Image([int(v) for v in shape_xyz], sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin([float(v) for v in origin])

    def res(img):
        return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))

    brain = np.clip(res(mask), 0, 1)
    g, w = np.clip(res(gm), 0, 1) * brain, np.clip(res(wm), 0, 1) * brain
    total = g + w
    scale = np.where(total > brain, brain / np.maximum(total, 1e-6), 1.0)
    g, w = g * scale, w * scale
    depth = ndimage.distance_transform_edt(brain > 0.5, sampling=spacing_mm).astype(np.float32)
    arrs = [a.astype(np.float32) for a in (g, w, brain)]
    for a in arrs + [depth]:
        a.setflags(write=False)
    return _BrainAnatomy(grid=grid, gm=arrs[0], wm=arrs[1], brain=arrs[2], depth=depth, brain_lo=lo, brain_hi=hi)


# Relative tissue intensities (white matter of T1 = 1) and their per-case variation.
_BRAIN_TISSUE = {
    #            t1    t1c   t2    flair
    "wm":       (1.00, 1.00, 0.50, 0.65),
    "gm":       (0.72, 0.74, 0.72, 0.85),
    "csf":      (0.25, 0.25, 1.60, 0.15),
    "edema":    (0.70, 0.72, 1.25, 1.45),
    "necrosis": (0.35, 0.38, 1.40, 0.80),
    "nonenh":   (0.60, 0.64, 1.10, 1.15),
    "enh":      (0.72, 1.55, 0.95, 1.10),
}


def _draw_brain_spacing(rng, spacing: SpacingArg, thick_slices) -> Tuple[np.ndarray, bool]:
    """Voxel size (i, j, k) in mm, and whether the slices are thick.

    The same random numbers are drawn whatever the options, so that options change only
    what they name (the anatomy of a seed stays the same).
    """
    inplane = float(rng.uniform(0.8, 1.5))
    thick_drawn = float(rng.uniform()) < 0.35
    thickness = float(np.round(rng.uniform(3.0, 5.0) * 2) / 2)
    iso = float(rng.uniform()) < 0.6
    thin = float(rng.uniform(0.8, 1.5))
    if spacing is not None:
        if thick_slices not in (None, False):
            raise InputError("give either spacing or thick_slices, not both")
        sp = _spacing3(spacing, "spacing")
        return sp, bool(sp[2] >= 2.5 * min(sp[0], sp[1]))
    if thick_slices is None:
        thick = thick_drawn
    elif isinstance(thick_slices, (bool, np.bool_)):
        thick = bool(thick_slices)
    else:
        try:
            thickness = float(thick_slices)
        except (TypeError, ValueError):
            thickness = float("nan")
        if not math.isfinite(thickness) or thickness <= 0:
            raise InputError(f"thick_slices must be None, True, False or a slice thickness in mm, got {thick_slices!r}")
        thick = True
    if thick:
        return np.array([inplane, inplane, thickness]), True
    return np.array([inplane, inplane, inplane if iso else thin]), False


def _grow_glioma(rng, anat: _BrainAnatomy, rim: Optional[str]):
    """Draws a glioma; returns fields on a sub-box of the internal grid and its parameters."""
    grid, s = anat.grid, anat.grid.spacing
    diameter = float(rng.uniform(15.0, 60.0))
    radius = diameter / 2
    radii = radius * np.exp(rng.uniform(-0.25, 0.25, 3))
    radii = radii * radius / np.exp(np.mean(np.log(radii)))
    rot = _uniform_rotation(rng)

    # centre: in white matter, deep enough, supratentorial
    need = min(0.55 * radius, 22.0) + 4.0
    cand = np.argwhere((anat.wm > 0.6) & (anat.depth >= need))
    zc = grid.index_to_lps(cand)[:, 2]
    cand = cand[zc > -20.0] if np.any(zc > -20.0) else cand
    pick = cand[int(rng.integers(len(cand)))]
    centre = grid.index_to_lps(pick) + rng.uniform(-0.5, 0.5, 3) * s

    drawn = ("full", "partial", "absent")[int(rng.choice(3, p=[0.55, 0.27, 0.18]))]
    rim = rim or drawn
    rim_mm = float(rng.uniform(2.0, 6.0))
    noise_amp = float(rng.uniform(0.08, 0.22)) * radius
    noise_scale = max(6.0, radius * float(rng.uniform(0.5, 1.0)))
    small_edema = float(rng.uniform()) < 0.15
    edema_small, edema_large = float(rng.uniform(2.0, 6.0)), float(rng.uniform(5.0, 35.0))
    edema_margin = edema_small if small_edema else edema_large
    edema_radii = radii * np.exp(rng.uniform(-0.15, 0.15, 3)) + edema_margin
    edema_rot = _rotation(rng.standard_normal(3), float(rng.uniform(-0.4, 0.4))) @ rot
    edema_centre = centre + rng.uniform(-0.3, 0.3, 3) * edema_margin
    edema_amp = 0.3 * edema_margin + 2.0
    edema_scale = float(rng.uniform(8.0, 20.0))
    has_push, push = float(rng.uniform()) < 0.8, float(rng.uniform(0.1, 0.45)) * radius
    push = push if has_push else 0.0
    pres_frac = float(rng.uniform(0.4, 0.85))

    stretch = float(edema_radii.max() / np.exp(np.mean(np.log(edema_radii))))
    half = float(max(np.abs(edema_centre - centre).max() + edema_radii.max() + 3.5 * edema_amp * stretch,
                     2.5 * radius)) + 6.0
    box = grid.box(centre, half)
    x, y, z = grid.axes(box)
    shape = tuple(sl.stop - sl.start for sl in box)

    # mass effect: tissue at radius r is sampled from radius r - h(r)
    gm = anat.gm[box]
    wm = anat.wm[box]
    if push > 0:
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
        L = radius
        h = push * (r / L) * np.exp(0.5 * (1 - (r / L) ** 2))
        taper = np.clip((half - r) / (0.3 * half), 0, 1)  # vanish at the box's edge
        h = (h * taper).astype(np.float32)
        scale = (1 - h / r)
        coords = [
            ((z - centre[2]) * scale + centre[2] - grid.origin[2]) / s - box[0].start,
            ((y - centre[1]) * scale + centre[1] - grid.origin[1]) / s - box[1].start,
            ((x - centre[0]) * scale + centre[0] - grid.origin[0]) / s - box[2].start,
        ]
        coords = np.stack([np.broadcast_to(c, shape) for c in coords]).astype(np.float32)
        gm = ndimage.map_coordinates(gm, coords, order=1, mode="nearest")
        wm = ndimage.map_coordinates(wm, coords, order=1, mode="nearest")
    brain = anat.brain[box]
    gm, wm = np.minimum(gm, brain), np.minimum(wm, brain)
    csf = np.clip(brain - gm - wm, 0, 1)
    # ~signed distance to the brain's surface, mm (negative inside)
    outside = (0.5 - brain) * 8.0 - anat.depth[box]

    f_core = _ellipsoid(x, y, z, centre, radii, rot) - noise_amp * _smooth_noise(rng, shape, s, noise_scale)
    f_core = np.maximum(f_core, outside)
    thick = rim_mm * np.clip(1 + 0.35 * _smooth_noise(rng, shape, s, 10.0), 0.4, 1.8)
    f_nec = f_core + thick
    if rim == "full":
        f_pres = np.full(shape, -10.0, np.float32)
    elif rim == "partial":
        thr = -float(ndtri(pres_frac))
        f_pres = (thr - _smooth_noise(rng, shape, s, max(8.0, radius * 0.8))) * 5.0
    else:
        f_pres = np.full(shape, 10.0, np.float32)
    f_enh = np.maximum(np.maximum(f_core, -f_nec), f_pres)
    f_ed = _ellipsoid(x, y, z, edema_centre, edema_radii, edema_rot)
    f_ed = f_ed - edema_amp * _smooth_noise(rng, shape, s, edema_scale)
    lam = max(4.0, 0.4 * edema_margin)
    f_ed = np.maximum(f_ed + lam * (0.8 * gm + 2.0 * csf - 0.2), outside)
    # never touch the box's faces (a round cap at worst, not a flat cut)
    dist = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    f_ed = np.maximum(f_ed, dist - (half - 3.0 * s))
    tex = 1 + 0.08 * _smooth_noise(rng, shape, s, 4.0)

    params = {
        "tumour_centre_lps_anatomy": centre,
        "core_diameter_mm": diameter,
        "core_radii_mm": radii,
        "rim": rim,
        "rim_thickness_mm": rim_mm,
        "rim_present_fraction": pres_frac if rim == "partial" else (1.0 if rim == "full" else 0.0),
        "edema_margin_mm": edema_margin,
        "mass_effect_mm": push,
        "shape_noise_mm": noise_amp,
    }
    fields = dict(gm=gm, wm=wm, csf=csf, f_core=f_core, f_nec=f_nec, f_enh=f_enh, f_ed=f_ed, tex=tex)
    return box, fields, params


def make_brain_case(seed: int, *, spacing: SpacingArg = None, size_mm: SpacingArg = None, oblique: bool = True,
                    thick_slices: Optional[Union[bool, float]] = None, rim: Optional[str] = None,
                    orientation: Optional[str] = None, core_contrast: str = "standard") -> SyntheticCase:
    """Synthetic glioma MRI (T1, T1c, T2, FLAIR) with a BraTS-convention label.

    Args:
        seed: non-negative integer; the same seed and arguments give identical cases.
        spacing: voxel size in mm in index order (i, j, k), one number for isotropic; default
            drawn: in-plane 0.8-1.5 mm, slices either as thin (3D acquisition) or 3-5 mm thick.
        size_mm: field of view in mm along (i, j, k), one number for a cube; default: the
            brain's extent plus a random margin of 2-15 mm. A smaller field of view is centred
            on the brain and shifted, where needed, to keep the tumour core inside.
        oblique: if True, the grid is rotated by up to 15 degrees about a random axis.
        thick_slices: None (thick 3-5 mm slices in about a third of cases), True (always
            thick, 3-5 mm), False (never), or a slice thickness in mm along k. Not
            together with ``spacing``.
        rim: enhancing rim ``"full"``, ``"partial"`` or ``"absent"`` (non-enhancing,
            low-grade-like); default drawn (55 / 27 / 18 %).
        orientation: storage orientation ``"axial"``, ``"coronal"`` or ``"sagittal"``
            (the slice axis is k); default drawn (50 / 20 / 30 %).
        core_contrast: ``"standard"`` (the default) or ``"varied"``: the non-enhancing
            tumour core's T1c and FLAIR intensities are drawn per case over a range measured
            on real BraTS 2013 training cases (pat0001-0003: non-enhancing tumour 0.1-1.4 SD
            brighter than edema in T1c and 0.3-1.4 SD darker in FLAIR), so that it can look
            much like edema, instead of the standard fixed contrast (darker than edema in
            both). Drawn from a separate random stream: the rest equals the standard case.

    Returns:
        A :class:`SyntheticCase` with ``kind="brain"``, float32 images ``t1``, ``t1c``,
        ``t2``, ``flair``, a uint8 label (1 necrotic/non-enhancing core, 2 edema,
        4 enhancing) and ``masks["brain"]``.

    Raises:
        InputError: on a bad seed, spacing, size or option.
    """
    t0 = time.perf_counter()
    seed = _check_seed(seed)
    if orientation is not None and orientation not in _ORIENTATIONS:
        raise InputError(f"orientation must be one of {sorted(_ORIENTATIONS)}, got {orientation!r}")
    if rim not in (None, "full", "partial", "absent"):
        raise InputError(f"rim must be None, 'full', 'partial' or 'absent', got {rim!r}")
    if core_contrast not in ("standard", "varied"):
        raise InputError(f"core_contrast must be 'standard' or 'varied', got {core_contrast!r}")
    anat = _brain_anatomy()
    grid, s = anat.grid, anat.grid.spacing
    rng = _rng(seed, 1)

    # --- geometry of the acquisition
    sp, thick = _draw_brain_spacing(rng, spacing, thick_slices)
    direction, dir_info = _draw_direction(rng, orientation, oblique, 15.0)
    translation = np.array([rng.uniform(-30, 30), rng.uniform(-30, 30), rng.uniform(-60, 60)])

    # --- tumour and tissues (tumour fields live on a sub-box of the internal grid)
    box, fl, tparams = _grow_glioma(rng, anat, rim)
    gm, wm, brain = anat.gm.copy(), anat.wm.copy(), anat.brain
    gm[box], wm[box] = fl["gm"], fl["wm"]
    csf = np.clip(brain - gm - wm, 0, 1)
    shape = grid.shape
    w = 0.4 * s
    m_core = _soft(fl["f_core"], w)
    m_ed = _soft(fl["f_ed"], w) * (1 - m_core)
    m_enh = _soft(fl["f_enh"], w)
    m_int = _soft(fl["f_nec"], w) * m_core
    m_non = np.clip(m_core - m_int - m_enh, 0, 1)
    m_tis = np.clip(1 - m_core - m_ed, 0, 1)
    tex = fl["tex"]
    interior = "nonenh" if tparams["rim"] == "absent" else "necrosis"
    rc = _rng(seed, 9)

    # --- contrasts
    intensities = {}
    images_internal = []
    blur = float(rng.uniform(0.3, 0.8)) if rng.uniform() < 0.3 else 0.0
    bias_strength = {}
    for c, name in enumerate(_BRAIN_SEQUENCES):
        mu = {t: v[c] * float(rng.uniform(0.88, 1.12)) for t, v in _BRAIN_TISSUE.items()}
        if core_contrast == "varied" and name in ("t1c", "flair"):
            # relative to this case's edema: T1c 0.92-1.30 x (brighter), FLAIR 0.72-0.98 x (darker)
            lo, hi = (0.92, 1.30) if name == "t1c" else (0.72, 0.98)
            mu["nonenh"] = mu["edema"] * float(rc.uniform(lo, hi))
        if name == "t1c":  # keep the contrast agent's effect relative to pre-contrast tissue
            mu["enh"] = max(mu["enh"], 1.3 * mu["wm"])
        scale = float(rng.uniform(200.0, 1500.0))
        mu = {t: v * scale for t, v in mu.items()}
        intensities[name] = {t: float(v) for t, v in mu.items()}
        img = gm * mu["gm"] + wm * mu["wm"] + csf * mu["csf"]
        img[box] = img[box] * m_tis + tex * (m_ed * mu["edema"] + m_int * mu[interior] + m_enh * mu["enh"]
                                             + m_non * mu["nonenh"])
        bs = float(rng.uniform(0.0, 0.25))
        bias_strength[name] = bs
        img *= np.exp(bs * _smooth_noise(rng, shape, s, float(rng.uniform(60.0, 120.0))))
        if blur > 0:
            img = ndimage.gaussian_filter(img, blur / s, truncate=3.0)
        images_internal.append(img.astype(np.float32))

    # thick slices: partial volume across the slice along the internal axis nearest to k
    if sp[2] > s * 1.2:
        ax_xyz = int(np.argmax(np.abs(direction[:, 2])))
        sigma = math.sqrt(max(sp[2] ** 2 - s**2, 0.0) / 12.0) / s
        images_internal = [ndimage.gaussian_filter1d(a, sigma, axis=2 - ax_xyz, truncate=3.0) for a in images_internal]

    # --- field of view
    brain_corners = _box_corners(anat.brain_lo, anat.brain_hi) + translation
    lo, hi = _extent_along(direction, brain_corners)
    centre_t = (lo + hi) / 2 + rng.uniform(-5, 5, 3)
    if size_mm is None:
        extent = hi - lo + rng.uniform(4, 30, 3)
    else:
        extent = _spacing3(size_mm, "size_mm")
        # keep the tumour core inside where the field of view allows it
        tc = direction.T @ (tparams["tumour_centre_lps_anatomy"] + translation)
        reach = float(np.max(tparams["core_radii_mm"])) * 1.25 + 5
        for a in range(3):
            half = extent[a] / 2
            if 2 * reach > extent[a]:
                centre_t[a] = tc[a]
            elif tc[a] + reach > centre_t[a] + half:
                centre_t[a] = tc[a] + reach - half
            elif tc[a] - reach < centre_t[a] - half:
                centre_t[a] = tc[a] - reach + half
    centre_phys = direction @ centre_t
    size, origin = _target_geometry(direction, sp, centre_phys, extent)

    out = _resample(images_internal + [brain - 0.5], grid.origin + translation, s, size, sp, origin, direction)
    brain_t = out[4] > 0
    box_origin = grid.origin + translation + s * np.array([box[2].start, box[1].start, box[0].start])
    region, fields_t = _resample_region([-fl["f_core"], -fl["f_enh"], -fl["f_ed"]], box_origin, s, size, sp,
                                        origin, direction)
    core_t, enh_t, ed_t = fields_t[0] > 0, fields_t[1] > 0, fields_t[2] > 0
    label = np.zeros(out[0].shape, np.uint8)
    sub = np.zeros(core_t.shape, np.uint8)
    sub[ed_t] = 2
    sub[core_t] = 1
    sub[enh_t & core_t] = 4
    label[region] = sub

    # --- noise (Rician magnitude) and background
    skull_stripped = bool(rng.uniform() < 0.6)
    noise = {}
    images = {}
    pool = _NoisePool(rng, int(brain_t.sum()) if skull_stripped else brain_t.size)
    for c, name in enumerate(_BRAIN_SEQUENCES):
        sigma = float(rng.uniform(0.01, 0.05)) * intensities[name]["wm"]
        noise[name] = sigma
        if skull_stripped:
            a = np.zeros_like(out[c])
            a[brain_t] = _rician(pool, out[c][brain_t], sigma)
        else:
            a = _rician(pool, out[c], sigma)
        images[name] = _to_image(a, sp, origin, direction)

    label_img = _to_image(label, sp, origin, direction)
    mask_img = _to_image(brain_t.astype(np.uint8), sp, origin, direction)
    vox = float(np.prod(sp)) / 1000.0
    info = {
        "generator_version": GENERATOR_VERSION,
        "kind": "brain",
        "core_contrast": core_contrast,
        "template": "MNI152 2009 (nilearn), tissue maps resampled to %.1f mm" % s,
        "spacing": sp,
        "size": size,
        "origin": origin,
        "direction": direction.flatten(),
        "thick_slices": thick,
        **dir_info,
        "translation_mm": translation,
        "tumour_centre_lps": tparams["tumour_centre_lps_anatomy"] + translation,
        "brain_centre_lps": (anat.brain_lo + anat.brain_hi) / 2 + translation,
        **{k: v for k, v in tparams.items() if k != "tumour_centre_lps_anatomy"},
        "volumes_ml": {
            "necrotic_non_enhancing_core": float((label == 1).sum()) * vox,
            "edema": float((label == 2).sum()) * vox,
            "enhancing": float((label == 4).sum()) * vox,
        },
        "intensities": intensities,
        "noise_sigma": noise,
        "bias_strength": bias_strength,
        "blur_mm": blur,
        "skull_stripped": skull_stripped,
        "seconds": time.perf_counter() - t0,
    }
    return SyntheticCase(images=images, label=label_img, kind="brain", seed=seed, info=_jsonable(info),
                         masks={"brain": mask_img})


# --------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------

_CT_SLICES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_CT_SLICE_P = (0.05, 0.05, 0.1, 0.15, 0.2, 0.2, 0.25)


def make_ct_case(seed: int, *, spacing: SpacingArg = None, oblique: bool = True, n_lesions: Optional[int] = None,
                 size_mm: SpacingArg = None, phase: str = "portal", liver_shape: str = "standard",
                 chest: bool = False) -> SyntheticCase:
    """Synthetic portal-venous abdominal CT with liver and liver-lesion labels.

    The phantom, in LPS mm (the patient's right is -x, anterior is -y), has a body of
    subcutaneous fat (-120..-80 HU) and muscle (40-60 HU) in air (-1000 HU), ribs and a
    spine (cortical bone 600-1000 HU, cancellous 180-350 HU, discs, canal), lung bases and
    heart above the diaphragm,
    aorta and IVC (contrast 130-200 HU), kidneys, spleen, stomach (fluid and gas), bowel
    and fat, an optional gallbladder, and the liver (90-130 HU, with bright vessels) in
    the right upper abdomen carrying 0..n lesions (diameter 5-40 mm; mostly hypodense
    20-60 HU, some rim-enhancing, rarely hyperdense).

    Args:
        seed: non-negative integer; the same seed and arguments give identical cases.
        spacing: voxel size in mm in index order (i, j, k), one number for isotropic;
            default: in-plane 0.7-1.0 mm and slices of 1-5 mm.
        oblique: if True, the grid is rotated by up to 6 degrees about a random axis
            (gantry tilt, patient not straight).
        n_lesions: number of lesions (0 allowed); default drawn 0-4.
        size_mm: field of view in mm along (i, j, k), centred on the body; default: the
            whole body cross-section plus 5-20 mm of air on each side, and from 15-40 mm
            above the liver's dome (lung bases) to 10-45 mm below the liver.
        phase: ``"portal"`` (portal-venous contrast, the default) or ``"native"`` (no contrast:
            liver 35-65 HU, spleen 40-55, blood and heart 35-50, kidneys 25-40, liver vessels
            30-45, hypodense lesions at least 30 HU below the liver); the native values come
            from a separate random stream, so everything else equals the portal case of the
            same seed.
        liver_shape: ``"standard"`` (the default) or ``"varied"``: a wider range of liver
            shapes, as real livers vary: the left lobe may reach further across the midline
            (up to 160 mm left of the body axis), be thinner front to back (down to 15 mm) and
            hang lower; the right lobe's inferior surface may be flatter (a longer lateral
            tip). The shape is drawn from a separate random stream: body, bones and organs
            equal the standard case of the same seed; the draws after the liver's shape
            (its texture, lesions, image noise) differ.
        chest: if True, the anatomy and the default field of view reach 75-180 mm above the
            liver's dome instead of 15-40 mm (a chest-abdomen CT: the whole heart between the
            lungs, which in the native phase has the liver's density); the extra height is drawn
            from a separate random stream, so the body's and organs' proportions equal those of
            the case of the same seed, while textures, noise and the noise-driven detail of
            surfaces (drawn on a taller volume) differ (the liver's volume by a few per cent).

    Returns:
        A :class:`SyntheticCase` with ``kind="ct"``, the int16 image ``ct`` (HU), a uint8
        label (1 liver, 2 lesion) and ``masks["body"]``.

    Raises:
        InputError: on a bad seed, spacing, size or lesion count.
    """
    t0 = time.perf_counter()
    seed = _check_seed(seed)
    if n_lesions is not None and (isinstance(n_lesions, bool) or not isinstance(n_lesions, (int, np.integer))
                                  or n_lesions < 0 or n_lesions > 20):
        raise InputError(f"n_lesions must be an integer in 0..20, got {n_lesions!r}")
    rng = _rng(seed, 2)
    s = _CT_INTERNAL_MM

    # --- acquisition geometry
    inplane = float(rng.uniform(0.7, 1.0))
    sp = np.array([inplane, inplane, float(rng.choice(_CT_SLICES, p=_CT_SLICE_P))])
    if spacing is not None:
        sp = _spacing3(spacing, "spacing")
    direction, dir_info = _draw_direction(rng, "axial", oblique, 6.0, flip_p=0.2)
    translation = np.array([rng.uniform(-25, 25), rng.uniform(-40, 10), rng.uniform(-400, 200)])
    fov_margin = rng.uniform(10.0, 40.0, 2)
    noise_sd = float(rng.uniform(10.0, 25.0))

    # --- body proportions (anatomy frame: body axis at x = y = 0, liver dome near z = 0)
    a_body = float(rng.uniform(135.0, 180.0))
    b_body = float(rng.uniform(95.0, 130.0))
    p_body = float(rng.uniform(2.0, 2.6))
    t_fat = float(rng.uniform(8.0, min(35.0, 0.22 * b_body)))
    t_musc = float(rng.uniform(7.0, 14.0))
    a_in, b_in = a_body - t_fat - t_musc, b_body - t_fat - t_musc
    liver_height = float(rng.uniform(140.0, 190.0))
    z_top = float(rng.uniform(15.0, 40.0))
    if chest:
        z_top += float(_rng(seed, 10).uniform(60.0, 140.0))
    z_bot = -liver_height - float(rng.uniform(10.0, 45.0))
    margin_air = 12.0
    origin = np.array([-a_body - margin_air, -b_body - margin_air, z_bot - 8.0])
    shape = (int(math.ceil((z_top - z_bot + 16.0) / s)) + 1,
             int(math.ceil((2 * b_body + 2 * margin_air) / s)) + 1,
             int(math.ceil((2 * a_body + 2 * margin_air) / s)) + 1)
    grid = _Grid(origin=origin, spacing=s, shape=shape)
    X, Y, Z = grid.axes()
    x2, y2 = X[0], Y[0]  # (1, nx), (ny, 1)
    zz = Z[:, 0, 0]

    def superellipse(x, y, ax, by):
        """Approximate signed distance (mm) to a body-like superellipse of half-axes ax, by."""
        q = (np.abs(x) / ax) ** p_body + (np.abs(y) / by) ** p_body
        return ((q ** (1.0 / p_body) - 1.0) * min(ax, by)).astype(np.float32)

    hu = {
        "air": -1000.0,
        "fat": float(rng.uniform(-120.0, -80.0)),
        "muscle": float(rng.uniform(40.0, 60.0)),
        "bone_cortical": float(rng.uniform(600.0, 1000.0)),
        "bone_cancellous": float(rng.uniform(180.0, 350.0)),
        "lung": float(rng.uniform(-880.0, -820.0)),
        "bowel": float(rng.uniform(15.0, 45.0)),
        "blood_aorta": float(rng.uniform(140.0, 200.0)),
        "blood_ivc": float(rng.uniform(120.0, 170.0)),
        "heart": float(rng.uniform(90.0, 140.0)),
        "kidney": float(rng.uniform(150.0, 210.0)),
        "spleen": float(rng.uniform(100.0, 130.0)),
        "liver": float(rng.uniform(90.0, 130.0)),
        "liver_vessels": float(rng.uniform(150.0, 190.0)),
        "stomach_content": float(rng.uniform(5.0, 40.0)),
        "gallbladder": float(rng.uniform(0.0, 25.0)),
        "csf": float(rng.uniform(0.0, 15.0)),
        "disc": float(rng.uniform(70.0, 100.0)),
    }
    if phase == "native":
        rn = _rng(seed, 7)
        hu.update({k: float(rn.uniform(lo, hi)) for k, (lo, hi) in (
            ("liver", (35.0, 65.0)), ("spleen", (40.0, 55.0)), ("blood_aorta", (35.0, 50.0)),
            ("blood_ivc", (35.0, 50.0)), ("heart", (35.0, 50.0)), ("kidney", (25.0, 40.0)),
            ("liver_vessels", (30.0, 45.0)))})
    elif phase != "portal":
        raise InputError(f"phase must be 'portal' or 'native', got {phase!r}")
    if liver_shape not in ("standard", "varied"):
        raise InputError(f"liver_shape must be 'standard' or 'varied', got {liver_shape!r}")
    w = 0.6  # partial-volume width, mm

    # z-invariant layers, built in 2D: air, subcutaneous fat, muscle wall, abdominal cavity
    f_body2 = superellipse(x2, y2, a_body, b_body)
    f_cav2 = superellipse(x2, y2, a_in, b_in)
    v2 = np.full(f_body2.shape, hu["air"], np.float32)
    for f, value in ((f_body2, hu["fat"]), (superellipse(x2, y2, a_body - t_fat, b_body - t_fat), hu["muscle"]),
                     (f_cav2, hu["bowel"])):
        v2 += _soft(f, w) * (value - v2)
    vol = np.broadcast_to(v2, shape).copy()
    cav2 = f_cav2 < 0

    def paint(box, f, value):
        """Blends ``value`` (HU) into vol[box] where the field f (mm, on the box) is < 0."""
        sub = vol[box]
        sub += _soft(f, w) * (value - sub)

    def zbox(lo_xyz, hi_xyz):
        """Grid box between two LPS corners of the anatomy frame."""
        lo_xyz, hi_xyz = np.asarray(lo_xyz, float), np.asarray(hi_xyz, float)
        return grid.box((lo_xyz + hi_xyz) / 2, (hi_xyz - lo_xyz) / 2)

    # bowel loops, mesenteric fat and gas in the cavity
    fat_frac = float(rng.uniform(0.25, 0.6))
    n_fat = _smooth_noise(rng, shape, s, float(rng.uniform(10.0, 18.0)))
    n_gas = _smooth_noise(rng, shape, s, 7.0)
    is_fat = cav2 & (n_fat < ndtri(fat_frac))
    vol[is_fat] = hu["fat"]
    vol[cav2 & ~is_fat & (n_gas > float(rng.uniform(2.0, 2.6)))] = hu["air"]
    del n_fat, n_gas, is_fat

    # ribs: a ring just outside the cavity, striped obliquely along z
    ring2 = (f_cav2 > 1.0) & (f_cav2 < 10.0) & ~((np.abs(x2) < 35) & (y2 < 0))
    theta = np.arctan2(np.broadcast_to(y2, ring2.shape)[ring2], np.broadcast_to(x2, ring2.shape)[ring2])
    rib_period = float(rng.uniform(30.0, 40.0))
    rib_phase = float(rng.uniform(0, rib_period))
    from_back = np.arccos(np.clip(np.sin(theta), -1, 1))  # angle from the posterior midline, rad
    stripes = np.cos(2 * np.pi * (zz[:, None] + 45.0 * from_back + rib_phase) / rib_period) > 0.55
    rib_low = liver_height * (-0.95 + 0.45 * from_back / np.pi)
    sub = vol[:, ring2]
    sub[stripes & (zz[:, None] > rib_low[None, :])] = hu["bone_cortical"] * 0.75
    vol[:, ring2] = sub

    # diaphragm domes (the right one higher); lung bases and heart above them
    xR, yR = -0.45 * a_in, -0.05 * b_in
    xL, yL = 0.45 * a_in, 0.0
    zL = float(rng.uniform(-25.0, -8.0))
    rc = float(rng.uniform(55.0, 85.0))

    def z_dia(x, y):
        return np.maximum(3.0 - ((x - xR) ** 2 + (y - yR) ** 2) / (2 * rc),
                          zL - ((x - xL) ** 2 + (y - yL) ** 2) / (2 * rc)).astype(np.float32)

    zdia2 = z_dia(x2, y2)
    bx = zbox([-a_in, -b_in, float(zdia2[cav2].min()) + 2.0], [a_in, b_in, z_top + 8.0])
    x, y, z = grid.axes(bx)
    paint(bx, np.maximum(f_cav2[bx[1:]] + 2.0, zdia2[bx[1:]] + 4.0 - z), hu["lung"])
    heart_c, heart_r = np.array([15.0, -0.45 * b_in, zL + 50.0]), np.array([65.0, 50.0, 55.0])
    bx = grid.box(heart_c, heart_r.max() + 2)
    x, y, z = grid.axes(bx)
    paint(bx, np.maximum(_ellipsoid(x, y, z, heart_c, heart_r, _rot_z(-30.0)), zdia2[bx[1:]] + 6.0 - z), hu["heart"])

    # spine (body, discs, canal, arch, processes), paraspinal and psoas muscles
    r_vb = float(rng.uniform(15.0, 21.0))
    y_vb = b_body - float(rng.uniform(65.0, 85.0))
    y_can = y_vb + r_vb + 9.0
    disc_p = float(rng.uniform(28.0, 34.0))
    disc_ph = float(rng.uniform(0, disc_p))
    bx = zbox([-70.0, y_vb - r_vb - 30.0, z_bot - 10], [70.0, b_body, z_top + 10])
    x, y, z = grid.axes(bx)
    disc = ((z - disc_ph) % disc_p) < 7.0
    for sx in (-1.0, 1.0):
        paint(bx, np.maximum(_ellipse2d(x, y, sx * 32.0, y_can + 18.0, 26.0, 22.0), f_body2[bx[1:]] + 3.0),
              hu["muscle"])
        psoas_r = np.clip((-z - liver_height * 0.6) * 0.25, 0.0, 22.0)
        psoas = np.sqrt((x - sx * (r_vb + 18.0)) ** 2 + (y - (y_vb - 3.0)) ** 2) - psoas_r
        paint(bx, np.where(psoas_r > 1.0, psoas, 50.0).astype(np.float32), hu["muscle"])
    d_vb = np.sqrt(x**2 + (y - y_vb) ** 2)
    paint(bx, d_vb - r_vb, hu["bone_cortical"])
    paint(bx, d_vb - (r_vb - 2.0), np.where(disc, hu["disc"], hu["bone_cancellous"]).astype(np.float32))
    arch = np.sqrt(x**2 + (y - y_can) ** 2)
    paint(bx, arch - 13.0, hu["bone_cortical"] * 0.8)
    paint(bx, arch - 8.0, hu["csf"])
    spinous = np.maximum(np.abs(x) - 4.0, np.maximum(y_can + 10.0 - y, y - (b_body - t_fat - 12.0)))
    paint(bx, spinous.astype(np.float32), hu["bone_cortical"] * 0.8)
    transverse = np.maximum(np.abs(np.abs(x) - 26.0) - 12.0, np.abs(y - y_can) - 4.0)
    paint(bx, np.maximum(transverse, np.where(disc, 10.0, -10.0)).astype(np.float32), hu["bone_cortical"] * 0.8)

    # great vessels
    r_ao = float(rng.uniform(9.0, 13.0))
    ao_c = np.array([float(rng.uniform(10.0, 22.0)), y_vb - r_vb - r_ao - 2.0])
    ivc_c = np.array([-float(rng.uniform(20.0, 30.0)), y_vb - r_vb - 8.0])
    organs = {  # name -> (field function of x, y, z in mm, box): used to carve the liver
        "aorta": (lambda x, y, z: _ellipse2d(x, y, ao_c[0], ao_c[1], r_ao, r_ao),
                  zbox([ao_c[0] - r_ao - 6, ao_c[1] - r_ao - 6, z_bot - 10],
                       [ao_c[0] + r_ao + 6, ao_c[1] + r_ao + 6, z_top + 10])),
        "ivc": (lambda x, y, z: _ellipse2d(x, y, ivc_c[0], ivc_c[1], 14.0, 10.0),
                zbox([ivc_c[0] - 20, ivc_c[1] - 16, z_bot - 10], [ivc_c[0] + 20, ivc_c[1] + 16, z_top + 10])),
        "spine": (lambda x, y, z: np.sqrt(x**2 + (y - y_vb) ** 2) - r_vb - 12.0,
                  zbox([-r_vb - 20, y_vb - r_vb - 20, z_bot - 10], [r_vb + 20, y_vb + r_vb + 20, z_top + 10])),
    }
    for name, value in (("aorta", hu["blood_aorta"]), ("ivc", hu["blood_ivc"])):
        fn, bx = organs[name]
        paint(bx, fn(*grid.axes(bx)), value)

    # kidneys (the right one lower), with perirenal fat, medulla and sinus fat
    for side, name in ((-1.0, "kidney_right"), (1.0, "kidney_left")):
        kc = np.array([side * float(rng.uniform(55.0, 70.0)), y_vb + float(rng.uniform(-5.0, 10.0)),
                       -float(rng.uniform(100.0, 130.0)) - (15.0 if side < 0 else 0.0)])
        kr = np.array([float(rng.uniform(23.0, 30.0)), float(rng.uniform(25.0, 32.0)), float(rng.uniform(48.0, 60.0))])
        krot = _rot_z(side * float(rng.uniform(20.0, 40.0))) @ _rotation(np.array([0.0, 1.0, 0.0]), side * 0.2)
        bx = grid.box(kc, kr.max() + 12.0)
        x, y, z = grid.axes(bx)
        fk = _ellipsoid(x, y, z, kc, kr, krot)
        paint(bx, np.maximum(_ellipsoid(x, y, z, kc, kr + 9.0, krot), f_cav2[bx[1:]]), hu["fat"])
        paint(bx, fk, hu["kidney"])
        paint(bx, fk + 8.0, hu["kidney"] - 35.0)
        hilum_c = kc - side * np.array([kr[0] * 0.55, 0, 0])
        paint(bx, np.maximum(_ellipsoid(x, y, z, hilum_c, kr * np.array([0.35, 0.35, 0.5]), krot), fk), hu["fat"])
        organs[name] = (functools.partial(_ellipsoid, centre=kc, radii=kr, rot=krot), bx)

    def below_diaphragm(x, y, z, margin):
        return (z - z_dia(x, y) + margin).astype(np.float32)

    # spleen (left, posterior)
    sc = np.array([a_in - float(rng.uniform(35.0, 50.0)), 0.3 * b_in, -float(rng.uniform(30.0, 55.0))])
    sr = np.array([float(rng.uniform(22.0, 32.0)), float(rng.uniform(45.0, 65.0)), float(rng.uniform(40.0, 60.0))])
    srot = _rot_z(float(rng.uniform(-50.0, -25.0)))
    kfn, _ = organs["kidney_left"]

    def spleen(x, y, z):
        f = np.maximum(_ellipsoid(x, y, z, sc, sr, srot), superellipse(x, y, a_in, b_in) + 2.0)
        return np.maximum(np.maximum(f, below_diaphragm(x, y, z, 3.0)), 3.0 - kfn(x, y, z))

    bx = grid.box(sc, sr.max() + 2)
    paint(bx, spleen(*grid.axes(bx)), hu["spleen"])
    organs["spleen"] = (spleen, bx)

    # stomach (left anterior): wall, fluid, gas anteriorly (patient supine)
    has_stomach = bool(rng.uniform() < 0.85)
    stc = np.array([0.35 * a_in, -0.3 * b_in, -float(rng.uniform(35.0, 60.0))])
    str_ = np.array([float(rng.uniform(35.0, 50.0)), float(rng.uniform(28.0, 38.0)), float(rng.uniform(40.0, 60.0))])
    gas_level = stc[1] - str_[1] * float(rng.uniform(0.1, 0.6))
    if has_stomach:
        def stomach(x, y, z):
            f = np.maximum(_ellipsoid(x, y, z, stc, str_, _rot_z(30.0)), superellipse(x, y, a_in, b_in) + 2.0)
            return np.maximum(f, below_diaphragm(x, y, z, 3.0))

        bx = grid.box(stc, str_.max() + 2)
        x, y, z = grid.axes(bx)
        f_sto = stomach(x, y, z)
        paint(bx, f_sto, hu["muscle"])
        paint(bx, f_sto + 4.0, hu["stomach_content"])
        paint(bx, np.maximum(f_sto + 4.0, y - gas_level), hu["air"])
        organs["stomach"] = (stomach, bx)

    # liver: smooth union of right and left lobes, deformed, clipped by its neighbours
    rl_r = np.array([float(rng.uniform(0.5, 0.65)) * a_in, float(rng.uniform(0.8, 0.95)) * b_in, liver_height / 2])
    rl_c = np.array([-(a_in - rl_r[0] * 0.92), float(rng.uniform(-0.15, 0.05)) * b_in, 15.0 - rl_r[2]])
    # the inferior surface rises from the right lateral tip towards the left (a wedge)
    inf_lat = np.array([-a_in + 5.0, -liver_height + 15.0])  # (x, z)
    inf_slope = float(rng.uniform(0.35, 0.6)) * liver_height / a_in
    inf_tilt_y = float(rng.uniform(-0.35, 0.05))  # mm of z per mm of y: the posterior part hangs lower
    inf_curve_y = float(rng.uniform(0.1, 0.4)) / b_in  # the anterior and posterior edges curve up
    ll_r = np.array([float(rng.uniform(50.0, 80.0)), float(rng.uniform(28.0, 42.0)),
                     liver_height * float(rng.uniform(0.22, 0.32))])
    ll_c = np.array([float(rng.uniform(0.0, 30.0)), -0.55 * b_in + ll_r[1] * 0.6,
                     -ll_r[2] - float(rng.uniform(0.0, 10.0))])
    if liver_shape == "varied":
        rv = _rng(seed, 8)
        inf_slope = float(rv.uniform(0.15, 0.6)) * liver_height / a_in
        ll_r = np.array([float(rv.uniform(50.0, 110.0)), float(rv.uniform(15.0, 42.0)),
                         liver_height * float(rv.uniform(0.18, 0.38))])
        ll_c = np.array([float(rv.uniform(0.0, 50.0)), -0.55 * b_in + ll_r[1] * 0.6,
                         -ll_r[2] - float(rv.uniform(0.0, 35.0))])
    liver_box = zbox([-a_in - 2, -b_in - 2, -liver_height - 15], [ll_c[0] + ll_r[0] + 15, b_in + 2, z_top + 8])
    lx, ly, lz = grid.axes(liver_box)
    lshape = tuple(sl.stop - sl.start for sl in liver_box)
    f_rl = _ellipsoid(lx, ly, lz, rl_c, rl_r, _rot_z(float(rng.uniform(-15.0, 15.0))))
    f_ll = _ellipsoid(lx, ly, lz, ll_c, ll_r, _rot_z(float(rng.uniform(-25.0, 5.0))))
    f_liv = _smooth_min(f_rl, f_ll, 15.0)
    cos_a = 1.0 / math.sqrt(1.0 + inf_slope**2)
    z_inf = inf_lat[1] + inf_slope * (lx - inf_lat[0]) + inf_tilt_y * ly + inf_curve_y * ly**2
    f_inf = (z_inf - lz) * cos_a  # > 0 below the inferior surface
    f_liv = -_smooth_min(-f_liv, -f_inf, 10.0)
    del f_rl, f_ll, f_inf
    f_liv = f_liv - float(rng.uniform(3.0, 8.0)) * _smooth_noise(rng, lshape, s, float(rng.uniform(25.0, 40.0)))
    f_liv = np.maximum(f_liv, f_cav2[liver_box[1:]] + 3.0)
    f_liv = np.maximum(f_liv, lz - zdia2[liver_box[1:]] + 1.0)
    for name, (fn, obox) in organs.items():
        inter = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(liver_box, obox))
        if any(sl.stop <= sl.start for sl in inter):
            continue
        rel = tuple(slice(i.start - l.start, i.stop - l.start) for i, l in zip(inter, liver_box))
        f_liv[rel] = np.maximum(f_liv[rel], 3.0 - fn(*grid.axes(inter)))
    gb = {}
    f_gb = None
    if rng.uniform() < 0.6:
        gbc = np.array([-0.3 * a_in, -0.3 * b_in, -liver_height * float(rng.uniform(0.55, 0.75))])
        gbr = np.array([float(rng.uniform(12.0, 18.0)), float(rng.uniform(12.0, 18.0)), float(rng.uniform(25.0, 40.0))])
        f_gb = _ellipsoid(lx, ly, lz, gbc, gbr, _rotation(np.array([1.0, 0, 0]), 0.5))
        f_gb = np.maximum(f_gb, f_liv - 15.0)  # only where it touches the liver
        gb = {"centre_lps_anatomy": gbc, "radii_mm": gbr}

    # parenchyma with portal/hepatic vessels (tubes = crossings of two smooth noise surfaces)
    liver_val = hu["liver"] + 4.0 * _smooth_noise(rng, lshape, s, 6.0)
    vscale = float(rng.uniform(14.0, 22.0))
    v1 = _smooth_noise(rng, lshape, s, vscale)
    v2n = _smooth_noise(rng, lshape, s, vscale)
    tube = np.maximum(np.abs(v1), np.abs(v2n)) - float(rng.uniform(0.12, 0.2))
    vessels = _soft(tube * vscale * 0.5, 1.0) * np.clip(-f_liv / 6.0, 0, 1)
    liver_val += vessels * (hu["liver_vessels"] - liver_val)
    del v1, v2n, tube, vessels

    # lesions
    drawn = int(rng.choice(5, p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    n_lesions = drawn if n_lesions is None else n_lesions
    lesions = []
    f_les = np.full(lshape, 50.0, np.float32)
    les_val = np.zeros(lshape, np.float32)
    for _ in range(int(n_lesions)):
        d = float(np.exp(rng.uniform(math.log(5.0), math.log(40.0))))
        r = d / 2
        cand = np.argwhere(f_liv < -min(0.6 * r + 2.0, 15.0))
        if len(cand) == 0:
            cand = np.argwhere(f_liv < 0)
        if len(cand) == 0:
            break
        pick = cand[int(rng.integers(len(cand)))]
        lc = grid.index_to_lps(pick + np.array([sl.start for sl in liver_box])) + rng.uniform(-0.5, 0.5, 3) * s
        lr = r * np.exp(rng.uniform(-0.2, 0.2, 3))
        u = float(rng.uniform())
        kind = "hyperdense" if u < 0.1 else ("rim_enhancing" if u < 0.3 else "hypodense")
        if kind == "hyperdense":
            value = hu["liver"] + float(rng.uniform(35.0, 70.0))
        else:
            value = min(float(rng.uniform(20.0, 60.0)), hu["liver"] - 30.0)
        bx = grid.box(lc, lr.max() * 1.4 + 4)
        rel = tuple(slice(max(b.start - l.start, 0), min(b.stop - l.start, n))
                    for b, l, n in zip(bx, liver_box, lshape))
        bx = tuple(slice(r_.start + l.start, r_.stop + l.start) for r_, l in zip(rel, liver_box))
        x, y, z = grid.axes(bx)
        bshape = tuple(sl.stop - sl.start for sl in bx)
        fl = _ellipsoid(x, y, z, lc, lr, _uniform_rotation(rng)) - 0.1 * r * _smooth_noise(rng, bshape, s, max(r, 4.0))
        val = np.full(bshape, value, np.float32)
        if kind == "rim_enhancing":
            rim_hu = hu["liver"] + float(rng.uniform(-5.0, 25.0))
            val += _soft(-(fl + float(rng.uniform(1.5, 3.5))), 0.7) * (rim_hu - value)
        m = _soft(fl, max(w, 0.08 * r))
        les_val[rel] += m * (val - les_val[rel])
        f_les[rel] = np.minimum(f_les[rel], fl)
        lesions.append({"centre_lps_anatomy": lc, "diameter_mm": d, "radii_mm": lr, "kind": kind, "hu": value})
    f_les = np.maximum(f_les, f_liv)
    liver_val += _soft(f_les, w) * (les_val - liver_val)

    sub = vol[liver_box]
    sub += _soft(f_liv, w) * (liver_val - sub)
    if f_gb is not None:
        sub += _soft(f_gb, w) * (hu["gallbladder"] - sub)
        f_liv = np.maximum(f_liv, 1.0 - f_gb)
        f_les = np.maximum(f_les, f_liv)
    del liver_val, les_val

    # --- thick-slice partial volume along z, then resampling onto the acquisition grid
    if sp[2] > s * 1.2:
        sigma = math.sqrt(max(sp[2] ** 2 - s**2, 0.0) / 12.0) / s
        vol = ndimage.gaussian_filter1d(vol, sigma, axis=0, truncate=3.0)
    body_lo = np.array([-a_body, -b_body, z_bot])
    body_hi = np.array([a_body, b_body, z_top])
    lo, hi = _extent_along(direction, _box_corners(body_lo, body_hi) + translation)
    centre_t = (lo + hi) / 2
    if size_mm is None:
        extent = hi - lo + np.concatenate([fov_margin, [0.0]])
        extent[2] = z_top - z_bot
    else:
        extent = _spacing3(size_mm, "size_mm")
    size, origin_t = _target_geometry(direction, sp, direction @ centre_t, extent)
    # HU shifted by +1000 so that points outside the internal grid read as air
    vol += 1000.0
    ct, body_t = _resample([vol, np.broadcast_to(-f_body2, shape)], grid.origin + translation, s, size, sp,
                           origin_t, direction)
    del vol
    body_t = (body_t > 0).astype(np.uint8)
    box_origin = grid.origin + translation + s * np.array([liver_box[2].start, liver_box[1].start, liver_box[0].start])
    region, (liv_t, les_t) = _resample_region([-f_liv, -f_les], box_origin, s, size, sp, origin_t, direction)
    label = np.zeros(ct.shape, np.uint8)
    sub = np.zeros(liv_t.shape, np.uint8)
    sub[liv_t > 0] = 1
    sub[(les_t > 0) & (liv_t > 0)] = 2
    label[region] = sub

    noise = rng.standard_normal(ct.shape, dtype=np.float32)
    noise *= noise_sd
    ct += noise
    del noise
    ct -= 1000.0
    np.rint(ct, out=ct)
    np.clip(ct, -1024, 3071, out=ct)
    ct = ct.astype(np.int16)

    vox = float(np.prod(sp)) / 1000.0
    info = {
        "generator_version": GENERATOR_VERSION,
        "kind": "ct",
        "spacing": sp,
        "size": size,
        "origin": origin_t,
        "direction": direction.flatten(),
        **dir_info,
        "translation_mm": translation,
        "body_centre_lps": np.array([0.0, 0.0, (z_top + z_bot) / 2]) + translation,
        "body_half_axes_mm": [a_body, b_body],
        "subcutaneous_fat_mm": t_fat,
        "liver_height_mm": liver_height,
        "liver_shape": liver_shape,
        "liver_centre_lps": rl_c + translation,
        "hu": hu,
        "noise_sd_hu": noise_sd,
        "n_lesions": len(lesions),
        "lesions": [{**{k: v for k, v in les.items() if k != "centre_lps_anatomy"},
                     "centre_lps": les["centre_lps_anatomy"] + translation} for les in lesions],
        "gallbladder": bool(gb),
        "stomach": has_stomach,
        "volumes_ml": {"liver_incl_lesions": float((label >= 1).sum()) * vox,
                       "lesions": float((label == 2).sum()) * vox},
        "seconds": time.perf_counter() - t0,
    }
    return SyntheticCase(images={"ct": _to_image(ct, sp, origin_t, direction)},
                         label=_to_image(label, sp, origin_t, direction), kind="ct", seed=seed,
                         info=_jsonable(info), masks={"body": _to_image(body_t, sp, origin_t, direction)})


# --------------------------------------------------------------------------------------


def tumour_core_mask(label: sitk.Image, kind: str) -> sitk.Image:
    """Binary mask of the object that extreme points are clicked around.

    Args:
        label: a label map of a synthetic (or real, same convention) case.
        kind: ``"brain"``: tumour core = BraTS labels 1 and 4 (necrotic/non-enhancing core
            plus enhancing tumour; edema excluded). ``"ct"``: liver = label >= 1 (the liver
            including its lesions).

    Returns:
        uint8 image (0/1) with the label's geometry.

    Raises:
        InputError: for an unknown ``kind``.
    """
    arr = sitk.GetArrayViewFromImage(label)
    if kind == "brain":
        mask = (arr == 1) | (arr == 4)
    elif kind == "ct":
        mask = arr >= 1
    else:
        raise InputError(f"kind must be 'brain' or 'ct', got {kind!r}")
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(label)
    return out
