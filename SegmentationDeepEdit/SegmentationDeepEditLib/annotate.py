"""Extreme-point annotation: six points and an image in, a binary segment on the image's grid out.

Pipeline (the same :func:`prepare_input` feeds training, so train and inference agree):
1. a box around the points plus ``margin_vox`` voxels of the model's spacing on each side,
   on an axis-aligned LPS grid at the model's spacing (coarsened isotropically if the box
   exceeds ``roi_max``), sized to a multiple of ``divisible_by`` (see
   :func:`geometry.bounding_box_grid`);
2. each input image resampled onto it (linear); voxels outside the image are set to 0 after
   normalisation (z-score over the voxels inside the image, or a CT window to [0, 1]);
3. guidance channels (Gaussian heatmaps, :mod:`heatmap`) appended after the images;
4. the network (optionally averaged over flips: test-time augmentation), sigmoid;
5. the probability resampled back (linear) onto the part of the image's own grid that the
   box covers, thresholded (near corrective clicks by the bundle's click prior, see
   :func:`click_threshold`), reduced to the connected component the points enclose, and
   pasted into an image of exactly the input geometry.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .bundle import Bundle, get_network, load_bundle
from .device import pick_device, run_with_fallback
from .errors import InputError
from .geometry import (Grid, bounding_box_grid, grid_of, image_on_grid, index_box_covering, physical_to_index,
                       resample_to_grid)
from .heatmap import gaussian_heatmap
from .imageio import check_image_values
from .points import check_inside, validate_extreme_points

__all__ = ["ModelInput", "AnnotationResult", "prepare_input", "guidance_sigma_mm", "predict", "annotate",
           "keep_enclosed_component", "click_threshold", "looks_like_ct", "fraction_at_or_below", "default_model_for",
           "normalise_input"]

Progress = Optional[Callable[[str, float], None]]


@dataclass
class ModelInput:
    """What the network sees: channels on a model grid.

    Attributes:
        grid: the model grid (identity direction, LPS).
        array: float32 [C, k, j, i]: image channels, then guidance channels.
        inside: bool [k, j, i], True where the grid lies inside the (first) input image.
    """

    grid: Grid
    array: np.ndarray
    inside: np.ndarray


@dataclass
class AnnotationResult:
    """Output of :func:`annotate`.

    Attributes:
        mask: uint8 0/1 image with exactly the input image's geometry.
        model_id, model_version: the bundle used.
        segment_name, color: label name and RGB colour (0..1) from the bundle.
        terminology: the label's Slicer terminology entry string from the bundle, or None.
        device: the torch device actually used ("cpu" or "cuda").
        seconds: wall time per stage (prepare, inference, postprocess, total).
        grid: the model grid that was used.
        warnings: messages worth showing a user (e.g. empty result).
    """

    mask: sitk.Image
    model_id: str
    model_version: str
    segment_name: str
    color: Sequence[float]
    device: str
    seconds: Dict[str, float]
    grid: Grid
    warnings: List[str] = field(default_factory=list)
    terminology: Optional[str] = None

    def segment_description(self, name: Optional[str] = None) -> Dict[str, Any]:
        """The mask's segment (value 1) as :func:`imageio.write_segmentation` takes it.

        ``name``: the segment's name instead of the model's label (the models are class-agnostic: a
        liver outlined with six points is no "Tumor core"); the label's terminology then goes too.
        """
        if name and name != self.segment_name:
            return {"value": 1, "name": name, "color": tuple(self.color)}
        return {"value": 1, "name": self.segment_name, "color": tuple(self.color), "terminology": self.terminology}

    @property
    def volume_ml(self) -> float:
        """Volume of the segment in millilitres."""
        n = int(sitk.GetArrayViewFromImage(self.mask).sum())
        return n * float(np.prod(self.mask.GetSpacing())) / 1000.0


def normalise_input(arr: np.ndarray, inside: np.ndarray, spec: dict, min_voxels: int = 1) -> np.ndarray:
    """One input channel normalised as its bundle input ``spec`` says; 0 outside ``inside``.

    ``ct_window``: HU clipped to ``window`` and scaled to [0, 1]. ``zscore``: mean 0, std 1 over the
    voxels inside (only the non-zero ones with ``foreground: "nonzero"``: a skull-stripped brain);
    fewer than ``min_voxels`` of them give an all-zero channel. Used by annotation and by
    automatic segmentation, so both normalise the same way.
    """
    out = np.zeros(arr.shape, dtype=np.float32)
    if spec["normalization"] == "ct_window":
        lo, hi = spec.get("window", (-200.0, 300.0))
        out[inside] = (np.clip(arr[inside], lo, hi) - lo) / (hi - lo)
        return out
    fg = inside & (arr != 0) if spec.get("foreground") == "nonzero" else inside
    if fg.sum() < max(min_voxels, 1):
        return out
    vals = arr[fg]
    mean, std = float(vals.mean()), float(vals.std())
    out[fg] = (vals - mean) / (std if std > 1e-6 else 1.0)
    return out


def prepare_input(
    images: Union[sitk.Image, Sequence[sitk.Image]],
    points_lps: np.ndarray,
    meta: dict,
    *,
    positive: Optional[np.ndarray] = None,
    negative: Optional[np.ndarray] = None,
    grid: Optional[Grid] = None,
) -> ModelInput:
    """Build the network input for a bundle (see the module docstring).

    Args:
        images: one image per entry of ``meta["inputs"]``, in that order.
        points_lps: (6, 3) extreme points, LPS mm.
        meta: the bundle's metadata.
        positive, negative: corrective clicks (N, 3) LPS mm, used when the bundle has such channels.
        grid: use this model grid instead of deriving it from the points (training uses this
            to crop from the true extreme points while feeding perturbed clicks).
    """
    imgs = [images] if isinstance(images, sitk.Image) else list(images)
    specs = meta["inputs"]
    if len(imgs) != len(specs):
        raise InputError(f"model {meta['id']} needs {len(specs)} input image(s) ({', '.join(s['name'] for s in specs)}), got {len(imgs)}")
    if grid is None:
        grid = bounding_box_grid(
            points_lps, meta["spacing_mm"], margin_vox=meta.get("margin_vox", 20),
            max_size=meta.get("roi_max"), multiple=meta.get("divisible_by", 32))
    channels = []
    inside = None
    for img, spec in zip(imgs, specs):
        f = sitk.Cast(img, sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(resample_to_grid(f, grid, default=np.nan))
        ins = np.isfinite(arr)
        inside = ins if inside is None else inside
        channels.append(normalise_input(np.nan_to_num(arr), ins, spec))
    clicks = {"extreme": points_lps, "positive": positive, "negative": negative}
    guidance = meta.get("guidance", {"channels": [], "sigma_mm": 1.0})
    for name in guidance["channels"]:
        pts = clicks[name]
        pts = np.zeros((0, 3)) if pts is None else np.asarray(pts, dtype=float).reshape(-1, 3)
        channels.append(gaussian_heatmap(pts, grid, guidance_sigma_mm(meta, grid)))
    return ModelInput(grid, np.stack(channels).astype(np.float32), inside)


def guidance_sigma_mm(meta: dict, grid: Grid) -> float:
    """Gaussian sigma (mm) of the guidance heatmaps on a model grid.

    ``guidance.sigma_mm`` holds at the model's own spacing. With ``guidance.sigma_scaling`` set
    to ``"grid"``, it grows with the grid when a large object made the crop coarser, so a click
    keeps the same size in voxels (a 3 mm Gaussian on a 3.7 mm liver grid would be a single
    voxel the network barely sees). Without it (bundles up to 0.1.x) sigma is fixed in mm.
    """
    g = meta["guidance"]
    sigma = float(g["sigma_mm"])
    if g.get("sigma_scaling") == "grid":
        sigma *= float(np.max(np.asarray(grid.spacing) / np.asarray(meta["spacing_mm"], dtype=float)))
    return sigma


_FLIPS = ((), (2,), (3,), (4,))  # identity and one flip per spatial axis of an NCDHW tensor


def predict(net, array: np.ndarray, device, *, tta: bool = False, channels_last: bool = False) -> np.ndarray:
    """Sigmoid probability [k, j, i] of a single-output network for one input [C, k, j, i]."""
    import torch

    x = torch.from_numpy(array[None]).to(device)
    if channels_last and device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    acc = None
    with torch.inference_mode():
        for dims in (_FLIPS if tta else _FLIPS[:1]):
            xi = torch.flip(x, dims) if dims else x
            y = torch.sigmoid(net(xi).float())
            y = torch.flip(y, dims) if dims else y
            acc = y if acc is None else acc + y
    prob = (acc / (len(_FLIPS) if tta else 1))[0, 0]
    return prob.cpu().numpy()


def keep_enclosed_component(mask: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Keep the 26-connected component of ``mask`` [k, j, i] with most voxels in the box.

    Args:
        lower, upper: inclusive box corners as [k, j, i] indices (the points' bounding box).
    """
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.astype(np.uint8)
    lo = np.clip(np.floor(lower).astype(int), 0, np.asarray(mask.shape) - 1)
    hi = np.clip(np.ceil(upper).astype(int), 0, np.asarray(mask.shape) - 1) + 1
    box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    counts = np.bincount(box.ravel(), minlength=n + 1)
    counts[0] = 0
    keep = int(np.argmax(counts)) if counts.max() > 0 else int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return (labels == keep).astype(np.uint8)


def _distance2_mm(grid: Grid, point_lps: np.ndarray) -> np.ndarray:
    """Squared distance (mm², float32 [k, j, i]) from every voxel centre of the grid to one point.

    The direction cosines are orthonormal, so in the grid's own axes the distance separates into
    three 1-D terms: one array of the grid's size, whatever the orientation.
    """
    d = np.asarray(grid.direction, float).reshape(3, 3)
    q = d.T @ (np.asarray(point_lps, float) - np.asarray(grid.origin, float))  # mm along index axes i, j, k
    terms = [((np.arange(n) * sp - qq) ** 2).astype(np.float32) for n, sp, qq in zip(grid.size, grid.spacing, q)]
    return terms[2][:, None, None] + terms[1][None, :, None] + terms[0][None, None, :]


def click_threshold(meta: dict, grid: Grid, positive: Optional[np.ndarray], negative: Optional[np.ndarray]):
    """The probability threshold, lowered near positive clicks and raised near negative ones.

    Bundle option ``output.click_prior = {"radius_mm": r, "strength": a}``: a click says what the
    voxels around it are, so the threshold there moves by ``a * exp(-d^2 / 2r^2)`` towards the
    click's side (d: distance to the click; the nearest, strongest click wins). Without the
    option, or without clicks, it is the plain ``output.threshold``.
    """
    thr = float(meta["output"]["threshold"])
    prior = meta["output"].get("click_prior")
    clicks = [(np.asarray(c, float).reshape(-1, 3), sign) for c, sign in ((positive, -1.0), (negative, 1.0))
              if c is not None and len(np.asarray(c).reshape(-1, 3))]
    if not prior or not clicks:
        return thr
    r, a = float(prior["radius_mm"]), float(prior["strength"])
    shift = np.zeros(grid.size[::-1], np.float32)
    for pts, sign in clicks:
        for p in pts:
            w = np.float32(a) * np.exp(_distance2_mm(grid, p) / np.float32(-2 * r * r))
            shift = np.where(w > np.abs(shift), np.float32(sign) * w, shift)
    return thr + shift


def looks_like_ct(image: sitk.Image) -> bool:
    """True for an image in Hounsfield units: at least 1 % of voxels at -500 or below (air, lung).

    MR intensities are never that negative (raw values are >= 0, z-scored ones stay within a few
    units); a CT crop without any air is not recognised and keeps the default model.
    """
    return fraction_at_or_below(image, -500.0) >= 0.01


def fraction_at_or_below(image: sitk.Image, value: float) -> float:
    """The fraction of an image's voxels at or below ``value``, from a regular sample of about
    200,000 voxels (plenty for fractions of 0.1 % and more); 0 for an empty image."""
    a = sitk.GetArrayViewFromImage(image)
    step = max(1, int(round((a.size / 2e5) ** (1 / 3))))
    sample = np.asarray(a[::step, ::step, ::step], dtype=np.float32)
    return float(np.count_nonzero(sample <= value)) / sample.size if sample.size else 0.0


def default_model_for(image: sitk.Image) -> Bundle:
    """The annotation model used when none is named: the CT-tuned bundle for a CT image (when
    installed), else the default annotation model. Naming a model always overrides this."""
    from .bundle import CT_ANNOTATION_MODEL
    from .errors import ModelError

    if looks_like_ct(image):
        try:
            b = load_bundle(CT_ANNOTATION_MODEL)
        except ModelError:  # not installed
            b = None
        if b is not None and b.task == "annotation":
            return b
    return load_bundle(None)


def annotate(
    images: Union[sitk.Image, Sequence[sitk.Image]],
    points_lps: np.ndarray,
    model: Union[str, Bundle, None] = None,
    *,
    device: str = "auto",
    tta: bool = False,
    positive: Optional[np.ndarray] = None,
    negative: Optional[np.ndarray] = None,
    points_source: Optional[str] = None,
    progress: Progress = None,
    sources: Optional[Dict[str, str]] = None,
) -> AnnotationResult:
    """Segment the object enclosed by six extreme points.

    Args:
        images: the input image(s) the bundle declares (the first one defines the output grid).
        points_lps: (6, 3) LPS mm.
        model: bundle id, folder or :class:`Bundle`; None: :func:`default_model_for` the image
            (the CT-tuned model for CT, else the default annotation model).
        device: "auto", "cpu" or "cuda".
        tta: average the prediction over flips along each axis.
        positive, negative: corrective clicks (N, 3) LPS mm for bundles that take them.
        points_source: file the points came from, for error messages.
        progress: optional callback(stage, fraction).
        sources: files the first image and the clicks came from (keys "image", "positive",
            "negative"), for error messages.

    Returns:
        :class:`AnnotationResult`, whose ``mask`` has exactly the geometry of ``images[0]``.
    """
    t0 = time.perf_counter()
    report = progress or (lambda stage, frac: None)
    imgs = [images] if isinstance(images, sitk.Image) else list(images) if isinstance(images, (list, tuple)) else [images]
    sources = sources or {}
    for n, img in enumerate(imgs):
        check_image_values(img, sources.get("image") if n == 0 else None, "image" if n == 0 else f"image {n + 1}")
    if isinstance(points_lps, (str, os.PathLike)):
        raise InputError("points must be an array of six [x, y, z] in LPS mm, not a file name (read a file with "
                         "SegmentationDeepEditLib.points.read_points)", str(points_lps))
    ref = imgs[0]
    bundle = load_bundle(model) if model is not None else default_model_for(ref)
    meta = bundle.meta
    if meta["task"] != "annotation":
        raise InputError(f"model {bundle.id!r} is an automatic model, not an annotation model (use `deepedit segment`)")
    n_extreme = 6
    pts = validate_extreme_points(points_lps, ref, source=points_source, count=n_extreme)
    for extra, what in ((positive, "positive"), (negative, "negative")):
        if extra is not None and len(np.asarray(extra).reshape(-1, 3)) and what not in meta.get("guidance", {}).get("channels", []):
            raise InputError(f"model {bundle.id!r} takes no {what} clicks")
        if extra is not None:
            check_inside(extra, ref, sources.get(what), what=f"{what} click")
    report("prepare", 0.1)
    mi = prepare_input(imgs, pts, meta, positive=positive, negative=negative)
    t1 = time.perf_counter()
    report("inference", 0.3)
    dev = pick_device(device)
    channels_last = bool(meta["network"].get("channels_last"))

    def run(d):
        net = get_network(bundle, d)
        return predict(net, mi.array, d, tta=tta, channels_last=channels_last)

    prob, used = run_with_fallback(run, dev, device)
    t2 = time.perf_counter()
    report("postprocess", 0.8)
    ref_grid = grid_of(ref)
    lo, hi = index_box_covering(ref_grid, mi.grid)
    warnings: List[str] = []
    full = np.zeros(ref_grid.size[::-1], np.uint8)
    if np.all(hi > lo):
        sub = sitk.RegionOfInterest(ref_grid.reference_image(), [int(v) for v in hi - lo], [int(v) for v in lo])
        prob_img = image_on_grid(prob.astype(np.float32), mi.grid)
        back = sitk.GetArrayFromImage(resample_to_grid(prob_img, grid_of(sub), default=0.0))
        seg = back >= click_threshold(meta, grid_of(sub), positive, negative)
        pidx = physical_to_index(grid_of(sub), pts)[:, ::-1]  # [k, j, i]
        seg = keep_enclosed_component(seg, pidx.min(axis=0), pidx.max(axis=0))
        full[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = seg
    mask = image_on_grid(full, ref_grid)
    if not full.any():
        warnings.append("the model found nothing inside the points; check that they enclose the object")
    t3 = time.perf_counter()
    label = meta["labels"][0]
    report("done", 1.0)
    return AnnotationResult(
        mask=mask, model_id=bundle.id, model_version=bundle.version, segment_name=label["name"],
        color=tuple(label["color"]), device=used.type,
        seconds={"prepare": t1 - t0, "inference": t2 - t1, "postprocess": t3 - t2, "total": t3 - t0},
        grid=mi.grid, warnings=warnings, terminology=label.get("terminology"))
