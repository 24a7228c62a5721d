"""Image geometry: LPS/RAS points, physical point <-> voxel index, grids, resampling, crop and un-crop.

Conventions:
- Physical points are LPS millimetres (ITK). Slicer's RAS differs by the sign of x and y.
- Indices returned by this module are [i, j, k] (ITK order, continuous where stated);
  numpy arrays of SimpleITK images are [k, j, i].
- A :class:`Grid` is the geometry of an image without its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

__all__ = [
    "same_lattice",
    "geometry_differences",
    "frequent_values",
    "Grid",
    "ras_to_lps",
    "lps_to_ras",
    "physical_to_index",
    "index_to_physical",
    "grid_of",
    "corners_lps",
    "image_on_grid",
    "resample_to_grid",
    "crop",
    "uncrop",
    "same_geometry",
    "bounding_box_grid",
    "index_box_covering",
    "reorient_axes",
]


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Convert points (N, 3) from RAS to LPS millimetres (negate x and y)."""
    p = np.array(points, dtype=float, copy=True).reshape(-1, 3)
    p[:, :2] *= -1
    return p


lps_to_ras = ras_to_lps  # the conversion is its own inverse


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image.

    Attributes:
        size: number of voxels (i, j, k).
        spacing: voxel size in mm (i, j, k).
        origin: LPS mm position of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines as a row-major 9-tuple; column c is the LPS
            direction of index axis c (ITK's convention).
    """

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def matrix(self) -> np.ndarray:
        """3x3 direction matrix D (columns are axis directions)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this geometry."""
        img = sitk.Image([int(s) for s in self.size], pixel_type)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(d) for d in self.direction])
        return img


def grid_of(image: sitk.Image) -> Grid:
    """The :class:`Grid` of a SimpleITK image."""
    return Grid(
        tuple(int(s) for s in image.GetSize()),
        tuple(float(s) for s in image.GetSpacing()),
        tuple(float(o) for o in image.GetOrigin()),
        tuple(float(d) for d in image.GetDirection()),
    )


def physical_to_index(grid: Grid | sitk.Image, points: np.ndarray) -> np.ndarray:
    """LPS mm points (N, 3) to continuous [i, j, k] indices (N, 3); voxel centres are integers."""
    g = grid if isinstance(grid, Grid) else grid_of(grid)
    p = np.asarray(points, dtype=float).reshape(-1, 3)
    rel = p - np.asarray(g.origin)
    return (rel @ g.matrix) / np.asarray(g.spacing)  # D^T (p - o) / s, as row vectors


def index_to_physical(grid: Grid | sitk.Image, index: np.ndarray) -> np.ndarray:
    """Continuous [i, j, k] indices (N, 3) to LPS mm points (N, 3)."""
    g = grid if isinstance(grid, Grid) else grid_of(grid)
    idx = np.asarray(index, dtype=float).reshape(-1, 3)
    return (idx * np.asarray(g.spacing)) @ g.matrix.T + np.asarray(g.origin)


def corners_lps(grid: Grid | sitk.Image) -> np.ndarray:
    """LPS mm positions (8, 3) of the centres of a grid's eight corner voxels."""
    g = grid if isinstance(grid, Grid) else grid_of(grid)
    n = np.asarray(g.size) - 1
    idx = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], float)
    return index_to_physical(g, idx)


def image_on_grid(array_kji: np.ndarray, grid: Grid) -> sitk.Image:
    """Wrap a numpy array indexed [k, j, i] as an image with the given geometry."""
    if tuple(array_kji.shape[::-1]) != tuple(grid.size):
        raise ValueError(f"array shape {array_kji.shape} does not match grid size {grid.size} (i, j, k)")
    img = sitk.GetImageFromArray(array_kji)
    img.SetSpacing([float(s) for s in grid.spacing])
    img.SetOrigin([float(o) for o in grid.origin])
    img.SetDirection([float(d) for d in grid.direction])
    return img


def resample_to_grid(
    image: sitk.Image, grid: Grid, *, interpolator: int = sitk.sitkLinear, default: float = 0.0,
    pixel_type: int | None = None, extrapolate: bool = False,
) -> sitk.Image:
    """Resample ``image`` onto ``grid`` (identity transform, physical space preserved).

    Outside the image, voxels get ``default``, or with ``extrapolate`` the nearest edge voxel's value.
    """
    out_type = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, grid.reference_image(), sitk.Transform(), interpolator, float(default), out_type,
                         bool(extrapolate))


def crop(image: sitk.Image, lower: Sequence[int], upper: Sequence[int]) -> sitk.Image:
    """Crop to the index box [lower, upper) ([i, j, k], clipped to the image).

    The result keeps spacing and direction; its origin is the physical position of ``lower``.
    """
    size = np.asarray(image.GetSize())
    lo = np.clip(np.asarray(lower, dtype=int), 0, size)
    hi = np.clip(np.asarray(upper, dtype=int), 0, size)
    if np.any(hi <= lo):
        raise ValueError(f"empty crop box {lo.tolist()}..{hi.tolist()} for image size {size.tolist()}")
    return sitk.RegionOfInterest(image, [int(v) for v in hi - lo], [int(v) for v in lo])


def uncrop(cropped: sitk.Image, reference: sitk.Image | Grid, default: float = 0) -> sitk.Image:
    """Paste a crop of ``reference`` back into an image with exactly the reference geometry.

    The crop must lie on the reference's voxel lattice (as :func:`crop` produces); its voxels
    are copied, everything else is ``default``.
    """
    g = reference if isinstance(reference, Grid) else grid_of(reference)
    start = physical_to_index(g, np.asarray(cropped.GetOrigin()))[0]
    start_i = np.rint(start).astype(int)
    if np.max(np.abs(start - start_i)) > 1e-3 or not np.allclose(cropped.GetSpacing(), g.spacing) \
            or not np.allclose(cropped.GetDirection(), g.direction, atol=1e-6):
        raise ValueError("the crop is not on the reference image's voxel lattice")
    arr = sitk.GetArrayViewFromImage(cropped)
    out = np.full(tuple(g.size[::-1]), default, dtype=arr.dtype)
    lo = start_i
    hi = lo + np.asarray(cropped.GetSize())
    slo = np.clip(lo, 0, g.size)
    shi = np.clip(hi, 0, g.size)
    if np.all(shi > slo):
        src = tuple(slice(a - l, b - l) for a, b, l in zip(slo[::-1], shi[::-1], lo[::-1]))
        dst = tuple(slice(a, b) for a, b in zip(slo[::-1], shi[::-1]))
        out[dst] = arr[src]
    return image_on_grid(out, g)


def same_geometry(a: sitk.Image | Grid, b: sitk.Image | Grid, tol: float = 1e-6) -> bool:
    """True when size is equal and spacing, origin, direction agree within ``tol``."""
    ga = a if isinstance(a, Grid) else grid_of(a)
    gb = b if isinstance(b, Grid) else grid_of(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, atol=tol)
        and np.allclose(ga.origin, gb.origin, atol=tol)
        and np.allclose(ga.direction, gb.direction, atol=tol)
    )


def same_lattice(a: sitk.Image | Grid, b: sitk.Image | Grid, tol: float = 1e-3) -> bool:
    """True when ``a``'s voxel centres are exactly ``b``'s, perhaps stored in another axis order or
    direction (RAS vs LPS, axes permuted or flipped): then a nearest-neighbour resampling of one onto
    the other moves no value."""
    ga = a if isinstance(a, Grid) else grid_of(a)
    gb = b if isinstance(b, Grid) else grid_of(b)
    # index of a -> index of b: idx_b = M @ idx_a + t
    to_b = np.linalg.inv(gb.matrix * np.asarray(gb.spacing))
    m = to_b @ (ga.matrix * np.asarray(ga.spacing))
    t = to_b @ (np.asarray(ga.origin) - np.asarray(gb.origin))
    rounded = np.round(m)
    if not (np.allclose(m, rounded, atol=tol) and np.allclose(np.abs(rounded).sum(axis=0), 1)
            and np.allclose(np.abs(rounded).sum(axis=1), 1) and np.allclose(t, np.round(t), atol=tol)):
        return False
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in ga.size], indexing="ij")).reshape(3, -1).T
    mapped = corners @ rounded.T + np.round(t)
    return sorted(ga.size) == sorted(gb.size) and bool((mapped >= 0).all() and (mapped <= np.asarray(gb.size) - 1).all())


def geometry_differences(a: sitk.Image | Grid, b: sitk.Image | Grid, tol: float = 1e-3) -> str:
    """What differs between two grids, in words (``size 240x240x155 vs 240x240x150; spacing ...``)."""
    ga = a if isinstance(a, Grid) else grid_of(a)
    gb = b if isinstance(b, Grid) else grid_of(b)

    def fmt(v):
        return "x".join(f"{x:g}" for x in (round(float(y), 3) for y in v))

    out = []
    if tuple(ga.size) != tuple(gb.size):
        out.append(f"size {fmt(ga.size)} vs {fmt(gb.size)}")
    for what, x, y in (("spacing", ga.spacing, gb.spacing), ("origin", ga.origin, gb.origin),
                       ("direction", ga.direction, gb.direction)):
        if not np.allclose(x, y, atol=tol):
            out.append(f"{what} ({fmt(x)}) vs ({fmt(y)})" if what != "direction" else
                       f"direction ({', '.join(f'{v:g}' for v in np.round(x, 3))}) vs "
                       f"({', '.join(f'{v:g}' for v in np.round(y, 3))})")
    return "; ".join(out)


def bounding_box_grid(
    points_lps: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    margin_vox: int = 20,
    max_size: Sequence[int] | None = None,
    multiple: int = 32,
) -> Grid:
    """An axis-aligned (identity direction, LPS) grid around points, for a model's input crop.

    The box spans the points plus ``margin_vox`` voxels of ``spacing_mm`` on each side. When it
    needs more voxels than ``max_size`` on some axis, the spacing is scaled up isotropically
    (by one factor on all axes) until it fits, so the object keeps its proportions and the
    model's input size stays bounded. The size is then rounded up to a multiple of
    ``multiple`` and the box grown symmetrically about its centre (this is the "pad to a
    multiple of 32"; the padding holds image content where the image has some). With
    ``max_size`` given, every axis is padded to ``max_size`` (rounded down to a multiple),
    so the model always sees the same input size.

    Using the identity direction makes the model's input independent of how the image's
    axes are stored (permuted or flipped), so results agree in physical space.

    Args:
        points_lps: (N, 3) LPS mm.
        spacing_mm: the model's target spacing (x, y, z) in mm.
        margin_vox: margin on each side in voxels of ``spacing_mm``.
        max_size: largest allowed size per axis (voxels) before padding; None for no limit.
        multiple: the size of every axis is a multiple of this.

    Returns:
        The grid (size [i, j, k], spacing mm, origin LPS mm, identity direction).
    """
    p = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    lo, hi = p.min(axis=0), p.max(axis=0)
    centre = (lo + hi) / 2
    spacing = np.asarray(spacing_mm, dtype=float)
    extent = (hi - lo) + 2 * margin_vox * spacing  # mm
    need = extent / spacing
    if max_size is not None:
        # the multiple-of-`multiple` rounding must not push past max_size either
        cap = np.maximum(np.floor(np.asarray(max_size, dtype=float) / multiple) * multiple, multiple)
        factor = float(np.max(need / cap))
        if factor > 1:
            spacing = spacing * factor
            need = extent / spacing
    size = np.maximum(np.ceil(need / multiple - 1e-6), 1).astype(int) * multiple
    if max_size is not None:
        # a constant input size: constant latency, and training batches of one shape
        size = cap.astype(int)
    origin = centre - (size - 1) / 2 * spacing
    return Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin))


def index_box_covering(image_grid: "Grid", grid: "Grid") -> tuple:
    """Index box [lo, hi) of ``image_grid`` that covers ``grid``'s corners, one voxel wider on each
    side and clipped to the image (where a model grid's output is pasted back)."""
    idx = physical_to_index(image_grid, corners_lps(grid))
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, np.asarray(image_grid.size))
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 2, 0, np.asarray(image_grid.size))
    return lo, hi


def reorient_axes(image: sitk.Image, perm: Sequence[int], flips: Sequence[bool]) -> sitk.Image:
    """Store the same physical image with its index axes permuted and/or reversed.

    New index axis ``a`` runs along old axis ``perm[a]`` (reversed when ``flips[a]``). Every
    voxel keeps its physical (LPS) position and value; only the storage order, origin and
    direction change. Used to test orientation handling and to randomise synthetic data.
    """
    perm = [int(p) for p in perm]
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(f"perm must be a permutation of 0, 1, 2, got {perm}")
    arr = sitk.GetArrayFromImage(image)  # [k, j, i]: numpy axis 2 - a is ITK axis a
    new = np.transpose(arr, [2 - perm[2 - n] for n in range(3)])
    for a in range(3):
        if flips[a]:
            new = np.flip(new, axis=2 - a)
    g = grid_of(image)
    size = np.asarray(g.size)
    start = np.array([size[p] - 1 if f else 0 for p, f in zip(perm, flips)], float)
    old_start = np.zeros(3)
    for a in range(3):
        old_start[perm[a]] = start[a]
    D = g.matrix
    new_dir = np.stack([D[:, perm[a]] * (-1.0 if flips[a] else 1.0) for a in range(3)], axis=1)
    out = sitk.GetImageFromArray(np.ascontiguousarray(new))
    out.SetSpacing([g.spacing[p] for p in perm])
    out.SetOrigin(index_to_physical(g, old_start)[0].tolist())
    out.SetDirection(new_dir.ravel().tolist())
    return out


def frequent_values(arr: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """The values that each fill more than ``fraction`` of a volume (on every 4th voxel per axis).

    A skull-stripped volume's background is one such value: 0, or a negative constant in a volume
    z-scored as a whole (inside a frame of 0 when it was resampled).
    """
    values, counts = np.unique(arr[::4, ::4, ::4], return_counts=True)
    return values[counts > fraction * counts.sum()]
