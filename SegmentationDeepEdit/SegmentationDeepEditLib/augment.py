"""Batch augmentations for training automatic 3D models, applied on the device to a whole batch.

The set follows nnU-Net's default pipeline (Isensee et al. 2021, Nat. Methods 18:203): each is drawn per
patch with its own probability, in this order:

- ``spatial``: ``{"probability": P, "rotate_deg": R, "scale": [s0, s1]}``: a rotation about each axis by an
  angle drawn from [-R, R] degrees and an isotropic zoom by s drawn from [s0, s1] (s > 1 shows the anatomy
  larger), about the patch centre, in millimetre-true voxel units; trilinear for the image, nearest for
  the labels; beyond the patch the image is 0 and the label background;
- ``noise``: ``{"probability": P, "sigma": S}``: Gaussian noise of standard deviation drawn from [0, S]
  (in the network's input units: for a CT window of 500 HU, 0.1 is 50 HU);
- ``blur``: ``{"probability": P, "sigma_vox": [b0, b1]}``: a Gaussian blur of sigma drawn from [b0, b1] voxels;
- ``low_resolution``: ``{"probability": P, "zoom": [z0, z1]}``: the patch sampled down by z drawn from
  [z0, z1] (nearest) and back up (trilinear): a coarser scan seen on the model grid;
- ``gamma``: ``{"probability": P, "range": [g0, g1]}``: the patch's intensities, scaled to [0, 1] by its own
  minimum and maximum, raised to the power g drawn from [g0, g1], and scaled back.

Every draw comes from the training step's own random stream (``numpy.random.Generator``), after the
draws of :func:`train_segment.sample_batch`, so that a config without these keys trains exactly as
before and a resumed run draws what an uninterrupted one would. Only 3D models take them.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import InputError

KINDS = ("spatial", "noise", "blur", "low_resolution", "gamma")
_RANGES = {"scale": (0.5, 2.0), "sigma_vox": (0.0, 3.0), "zoom": (0.2, 1.0), "range": (0.3, 3.0)}


def check_batch_augment(config: dict) -> None:
    """Refuse batch augmentations that could not run (a 2D model, a wrong key or range), before any case is prepared."""
    aug = config.get("augment") or {}
    given = [k for k in KINDS if aug.get(k)]
    if not given:
        return
    if int(config.get("bundle", {}).get("segmentation", {}).get("dims", 3)) != 3:
        raise InputError(f"training config: augment.{given[0]} is for 3D models")
    keys = {"spatial": {"probability", "rotate_deg", "scale"}, "noise": {"probability", "sigma"},
            "blur": {"probability", "sigma_vox"}, "low_resolution": {"probability", "zoom"},
            "gamma": {"probability", "range"}}
    for kind in given:
        spec = aug[kind]
        where = f"training config: augment.{kind}"
        if not isinstance(spec, dict) or set(spec) - keys[kind] or "probability" not in spec:
            raise InputError(f"{where}: an object with 'probability' and {sorted(keys[kind] - {'probability'})}")
        p = spec["probability"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise InputError(f"{where}.probability must be between 0 and 1, not {p!r}")
        for key, (lo, hi) in _RANGES.items():
            if key in spec:
                v = spec[key]
                if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(a, (int, float)) for a in v)
                        or not lo <= v[0] <= v[1] <= hi):
                    raise InputError(f"{where}.{key} must be [low, high] with {lo} <= low <= high <= {hi}, not {v!r}")
        for key, hi in (("rotate_deg", 180.0), ("sigma", 1.0)):
            v = spec.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                raise InputError(f"{where}.{key} must be between 0 and {hi}, not {v!r}")


def _rotation(angles) -> np.ndarray:
    """Rotation matrix about array axes 0, 1, 2 (in that order) by ``angles`` radians."""
    out = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _gaussian_blur(x, sigma: float):
    """Separable Gaussian blur of one patch [C, D, H, W] (``sigma`` in voxels; edges replicated)."""
    import torch
    import torch.nn.functional as F

    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    out = x.unsqueeze(0)  # [1, C, D, H, W]
    c = x.shape[0]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return out[0]


def turn(x, y, angles, zoom: float, y_background: int = 0, spacing=None):
    """One patch ``x`` [C, D, H, W] and its label ``y`` ([D, H, W] codes or [R, D, H, W] regions) rotated by
    ``angles`` (radians, about array axes 0, 1, 2) and zoomed by ``zoom`` about the patch centre, in millimetres
    (``spacing`` [k, j, i]); trilinear for the image (0 beyond the patch), nearest for the label
    (``y_background`` beyond it)."""
    import torch
    import torch.nn.functional as F

    shape = x.shape[1:]
    regions = y.dim() == x.dim()
    sp = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), float)
    half = np.maximum((np.asarray(shape, float) - 1) / 2, 0.5) * sp  # [k, j, i] half extents in mm
    # output position -> input position (normalised [k, j, i] coordinates): rotate, then shrink by the zoom
    m = np.diag(1 / half) @ (_rotation(angles) / zoom) @ np.diag(half)
    theta = np.zeros((3, 4))
    theta[:, :3] = m[::-1, ::-1]  # affine_grid's coordinates run (x=i, y=j, z=k)
    th = torch.as_tensor(theta, dtype=torch.float32, device=x.device)[None]
    grid = F.affine_grid(th, [1, 1, *shape], align_corners=True)
    xt = F.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    pad = float(0 if regions else y_background)
    yb = (y[None] if regions else y[None, None]).float() - pad  # background shifted to 0, the padding value
    yb = F.grid_sample(yb, grid, mode="nearest", padding_mode="zeros", align_corners=True) + pad
    return xt.to(x.dtype), (yb[0] if regions else yb[0, 0]).round().to(y.dtype)


def batch_augment(x, y, aug: dict, rng: np.random.Generator, y_background: int = 0, spacing=None):
    """Apply the augmentations of ``aug`` (see the module docstring) to a batch on its device.

    Args:
        x: images [B, C, D, H, W] (float).
        y: labels [B, D, H, W] (class codes) or [B, R, D, H, W] (region channels), any integer or float dtype.
        rng: the step's random stream.
        y_background: the label code beyond the patch after a rotation (what ``sample_batch`` pads with).
        spacing: the model grid's spacing [k, j, i] in mm, so that rotations are true in millimetres.

    Returns:
        ``(x, y)``: new tensors, or the inputs themselves when nothing was drawn.
    """
    import torch
    import torch.nn.functional as F

    given = {k: aug[k] for k in KINDS if aug.get(k)}
    if not given:
        return x, y
    x = x.clone()
    y = y.clone()
    shape = x.shape[2:]
    gen: Optional[torch.Generator] = None

    def generator():
        nonlocal gen
        if gen is None:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(int(rng.integers(2 ** 62)))
        return gen

    for b in range(x.shape[0]):
        spec = given.get("spatial")
        if spec and rng.random() < float(spec["probability"]):
            angles = np.radians(rng.uniform(-1, 1, 3) * float(spec.get("rotate_deg", 0.0)))
            zoom = float(rng.uniform(*spec.get("scale", [1.0, 1.0])))
            x[b], y[b] = turn(x[b], y[b], angles, zoom, y_background, spacing)
        spec = given.get("noise")
        if spec and rng.random() < float(spec["probability"]):
            sigma = float(rng.uniform(0, float(spec.get("sigma", 0.1))))
            x[b] = x[b] + sigma * torch.randn(x[b].shape, generator=generator(), device=x.device, dtype=x.dtype)
        spec = given.get("blur")
        if spec and rng.random() < float(spec["probability"]):
            s = float(rng.uniform(*spec.get("sigma_vox", [0.5, 1.0])))
            if s > 0:
                x[b] = _gaussian_blur(x[b], s)
        spec = given.get("low_resolution")
        if spec and rng.random() < float(spec["probability"]):
            z = float(rng.uniform(*spec.get("zoom", [0.5, 1.0])))
            small = [max(1, int(round(n * z))) for n in shape]
            low = F.interpolate(x[b:b + 1].float(), size=small, mode="nearest")
            x[b] = F.interpolate(low, size=list(shape), mode="trilinear", align_corners=False)[0].to(x.dtype)
        spec = given.get("gamma")
        if spec and rng.random() < float(spec["probability"]):
            g = float(rng.uniform(*spec.get("range", [0.7, 1.5])))
            for c in range(x.shape[1]):
                lo_v, hi_v = x[b, c].min(), x[b, c].max()
                if float(hi_v - lo_v) > 1e-6:
                    x[b, c] = ((x[b, c] - lo_v) / (hi_v - lo_v)).clamp(0, 1) ** g * (hi_v - lo_v) + lo_v
    return x, y
