"""Pictures for people: three orthogonal slices with segment outlines, written as PNG.

Views are drawn in radiological convention on an LPS-aligned grid, whatever the storage
order of the image: axial (patient right on the image's left, anterior up), coronal and
sagittal (superior up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, corners_lps, grid_of, resample_to_grid

__all__ = ["render_overlay", "CT_SOFT_TISSUE_WINDOW", "display_windows"]

CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU: width 400, level 40


def display_windows(meta: dict) -> dict:
    """{input name: grey-scale window} of a bundle's inputs that have a fixed one (CT: soft tissue);
    the others are windowed from their own intensities."""
    return {i["name"]: CT_SOFT_TISSUE_WINDOW for i in meta["inputs"] if i.get("modality") == "CT"}


def _lps_grid(image: sitk.Image, max_size: int = 256) -> Grid:
    g = grid_of(image)
    phys = corners_lps(g)
    lo, hi = phys.min(axis=0), phys.max(axis=0)
    sp = max(min(g.spacing), float(np.max(hi - lo)) / max_size)
    n = np.maximum(np.ceil((hi - lo) / sp).astype(int) + 1, 1)
    return Grid(tuple(int(v) for v in n), (sp, sp, sp), tuple(float(v) for v in lo))


def render_overlay(
    image: sitk.Image,
    masks: Sequence[sitk.Image],
    path: Path,
    *,
    colors: Sequence[Sequence[float]] = ((1.0, 0.8, 0.1), (0.2, 0.9, 0.3)),
    labels: Sequence[str] = ("result", "truth"),
    title: str = "",
    window: Optional[Tuple[float, float]] = None,
) -> Path:
    """Write a PNG of axial, coronal and sagittal slices through the first mask's centre.

    Args:
        image: the grey-scale image.
        masks: binary masks on any grid (resampled here); outlines are drawn in ``colors``.
        path: PNG file to write (the caller handles atomic replacement).
        title: a line of text above the views.
        window: (low, high) grey-scale window (e.g. a CT soft-tissue window in HU); default from
            the image's 1st and 99th percentiles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _lps_grid(image)
    img = sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(image, sitk.sitkFloat32), grid, default=np.nan))
    segs = [sitk.GetArrayFromImage(resample_to_grid(sitk.Cast(m, sitk.sitkUInt8), grid, interpolator=sitk.sitkNearestNeighbor)) for m in masks]
    ref = next((s for s in segs if s.any()), None)
    centre = np.argwhere(ref > 0).mean(axis=0).round().astype(int) if ref is not None else np.asarray(img.shape) // 2
    finite = img[np.isfinite(img)]
    vmin, vmax = window or (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
    k, j, i = centre
    # arrays are [z, y, x] on an LPS grid; choose slices and orientations per view
    views = [
        ("axial", lambda a: a[k], False),              # rows y (anterior at top), cols x (patient right at left)
        ("coronal", lambda a: a[:, j, :], True),       # rows z flipped so superior is up
        ("sagittal", lambda a: a[:, :, i], True),      # rows z flipped, cols y (anterior at left)
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for ax, (name, take, flip) in zip(axes, views):
        sl = np.nan_to_num(take(img), nan=vmin)
        sl = sl[::-1] if flip else sl
        ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        for s, c in zip(segs, colors):
            m = take(s)
            m = m[::-1] if flip else m
            if m.any() and m.min() != m.max():
                ax.contour(m, levels=[0.5], colors=[tuple(c)], linewidths=1.2)
        ax.set_title(name)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=tuple(c), label=l) for c, l in zip(colors, labels[: len(segs)])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
