"""Corrective clicks: where a person would click to fix a result.

A click goes to the centre of the largest error region: the voxel farthest (in mm) from the
region's border (ties broken towards the region's centroid) inside the largest connected component of missed voxels (a positive click)
or of wrongly included voxels (a negative click). The same rule simulates clicks in training
and in evaluation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["next_click"]


def next_click(pred: np.ndarray, truth: np.ndarray, spacing_kji: Sequence[float] = (1.0, 1.0, 1.0),
               min_voxels: int = 1) -> Optional[Tuple[np.ndarray, bool]]:
    """The next corrective click for a binary prediction.

    Args:
        pred, truth: boolean arrays [k, j, i] of the same shape.
        spacing_kji: voxel size in mm in array order, for the distance transform.
        min_voxels: error regions smaller than this are ignored.

    Returns:
        ([k, j, i] integer index of the click, True for positive / False for negative), or
        None when no error region is large enough.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    best = None
    for err, positive in ((truth & ~pred, True), (pred & ~truth, False)):
        if not err.any():
            continue
        labels, n = ndimage.label(err)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        k = int(np.argmax(sizes))
        if sizes[k] >= min_voxels and (best is None or sizes[k] > best[0]):
            best = (int(sizes[k]), labels == k, positive)
    if best is None:
        return None
    _, region, positive = best
    # pad so that the image border counts as the region's border too
    dist = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    # among the deepest voxels (ties are common in flat regions) take the one nearest the centroid
    deepest = np.argwhere(dist >= dist.max() - 1e-6)
    sp = np.asarray(spacing_kji, float)
    centroid = np.argwhere(region).mean(axis=0)
    best_idx = deepest[np.argmin((((deepest - centroid) * sp) ** 2).sum(axis=1))]
    return np.asarray(best_idx), positive
