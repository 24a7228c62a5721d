"""Overlap metrics."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["dice"]


def dice(pred, truth) -> float:
    """Dice of two binary masks (arrays or images of the same shape).

    When the truth is empty the score is 1 if the prediction is empty too, else 0
    (the rule in DESIGN.md for a region absent from the ground truth).
    """
    a = sitk.GetArrayViewFromImage(pred) if isinstance(pred, sitk.Image) else np.asarray(pred)
    b = sitk.GetArrayViewFromImage(truth) if isinstance(truth, sitk.Image) else np.asarray(truth)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a, b = a > 0, b > 0
    sa, sb = int(a.sum()), int(b.sum())
    if sb == 0:
        return 1.0 if sa == 0 else 0.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)
