"""Guidance channels: Gaussian heatmaps of clicked points on a model grid.

Convention (used identically in training and inference):
- one channel per point set, value at voxel x = max over points p of exp(-|x - p|^2 / (2 sigma^2)),
  with |x - p| the physical distance in mm and sigma in mm (so thick slices get fewer voxels
  of spread along their axis, not a wider Gaussian in mm);
- range [0, 1]: 1 at a point, 0 far from every point (an empty point set gives all zeros);
- the channel is appended after the image channels.
MONAI's ``extreme_points_to_image`` differs (sigma in voxels, range [-1, 1]); we keep mm so that
the same bundle behaves alike at any image spacing.
"""

from __future__ import annotations

import numpy as np

from .geometry import Grid

__all__ = ["gaussian_heatmap"]


def gaussian_heatmap(points_lps: np.ndarray, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Heatmap of points on a grid.

    Args:
        points_lps: (N, 3) LPS mm; N may be 0.
        grid: the grid to draw on (any orthonormal direction).
        sigma_mm: Gaussian standard deviation in mm.

    Returns:
        float32 array indexed [k, j, i], values in [0, 1].
    """
    size = grid.size
    out = np.zeros(size[::-1], dtype=np.float32)
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    if len(pts) == 0:
        return out
    # For an orthonormal direction D the squared distance separates per index axis:
    # |o + D (s*idx) - p|^2 = sum_a (s_a idx_a - q_a)^2 with q = D^T (p - o).
    q = (pts - np.asarray(grid.origin)) @ grid.matrix
    axes = [np.arange(n) * s for n, s in zip(size, grid.spacing)]
    inv = -0.5 / float(sigma_mm) ** 2
    for qq in q:
        gi = np.exp(inv * (axes[0] - qq[0]) ** 2).astype(np.float32)
        gj = np.exp(inv * (axes[1] - qq[1]) ** 2).astype(np.float32)
        gk = np.exp(inv * (axes[2] - qq[2]) ** 2).astype(np.float32)
        np.maximum(out, gk[:, None, None] * gj[None, :, None] * gi[None, None, :], out=out)
    return out
