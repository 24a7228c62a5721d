"""``deepedit train`` for automatic models (configs with ``"task": "segmentation"``).

A run is described by its JSON config (kept in ``Resources/Training/``) and its seed:

- ``bundle``: the metadata of the bundle to write (network, inputs, spacing, ``segmentation``
  section, labels...); the same metadata drives :mod:`segment` at inference, and every
  training case is prepared with :func:`segment.prepare_volume` on :func:`segment.model_grid`,
  so training and inference see identical inputs;
- ``data`` / ``validation``: sources, either ``{"synthetic": "brain"|"ct", "cases": N, "seed": S,
  "options": {...}}`` or ``{"images": {input name: path}, "label": path, "convention": NAME}``
  (paths relative to the data root, ``--data-root``, default ``../shared/data``; with ``"root":
  "registry"``, relative to the real CTs ``deepedit data fetch`` prepares). Real cases
  may lack inputs (BraTS 2013 has no T2 or T1): those channels are zeros, as at inference
  with a missing optional input;
- ``targets``: ``{"kind": "regions", "regions": ["ET", "TC", "WT"]}`` (one sigmoid channel per
  region of :data:`labels.CONVENTIONS`), or ``{"kind": "classes", "n": N, "class_sets":
  {convention: {label value: [allowed classes]}}}``: softmax classes with *partial labels*;
  a voxel whose label allows several classes (e.g. TCGA's "necrotic/non-enhancing core" for
  a model that separates necrosis from non-enhancing tumour, or a real liver mask without
  lesion labels) is trained with the marginal likelihood of its allowed classes, and counts
  in the Dice term only for classes it is certain about;
- ``loss``: ``"dice_focal"`` (regions; focal gamma ``focal_gamma``) or ``"dice_ce"`` (classes);
- ``optimizer``: ``"ranger21"`` (its own warm-up and warm-down over ``steps``) or ``"adamw"``
  with a one-cycle schedule up to ``lr``;
- ``patch``: training patch in voxels ([k, j, i] for 3D; [j, i] for 2D bundles, which train on
  axial slices of the model grid), ``batch_size``, ``fg_fraction`` (patches centred on a labelled
  voxel), ``weight`` per source (relative probability of drawing its cases), ``init_from`` (a bundle
  id or folder whose weights start the run: fine-tuning; of an ensemble, ``init_member`` N names the member), ``train_spacings`` (extra model spacings to prepare each case at: scale augmentation),
  ``augment``: ``flip_axes`` (model-grid array axes 0=k, 1=j, 2=i), ``intensity_scale``,
  ``intensity_shift``, ``drop_inputs`` ({input: probability of zeroing it}), ``contrast_phase``
  (CT inputs with ``ct_window`` normalisation: ``{"probability": P, "keep": [k0, k1], "from_hu": A,
  "to_hu": B}``: with probability P a patch's soft-tissue enhancement above A HU is scaled by k drawn
  from [k0, k1] up to B HU, then ramps back to the window's top, so that contrast-enhanced CTs also
  train the low liver-to-background contrast of a non-contrast CT; see :func:`contrast_phase_map`);
  for 3D models also ``spatial`` (rotation and zoom), ``noise``, ``blur``, ``low_resolution`` and ``gamma``,
  nnU-Net's default set, applied to the batch on the device (see :mod:`augment`);
- ``snapshot_every``: K: the network's weights after every K-th step are also kept as
  ``snapshots/step-NNNNN.safetensors`` in the run folder (for a curve of a score against training
  length; a snapshot loads into the bundle's network like its own weights);
- ``average_weights``: ``{"from_step": N, "every": K}``: stochastic weight averaging (Izmailov
  et al. 2018): the equal-weight mean of the network's weights after steps N, N+K, N+2K, ... up
  to the last step is what the bundle ships (and what the final validation scores); the running
  mean is kept in the checkpoint, so a resumed run averages exactly as an uninterrupted one.

The random stream of step ``n`` is seeded by ``(seed, n)``: a resumed run draws what an
uninterrupted one would. Outputs: ``checkpoint.pt`` (``weights_only`` readable), ``log.csv``
(step, loss, per-target validation Dice, seconds), ``bundle/`` at the end.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from .bundle import build_network, draft_card, save_bundle
from .augment import batch_augment, check_batch_augment
from .train import check_resume, count_nonfinite_loss, load_checkpoint, run_identity, save_checkpoint
from .errors import InputError, ModelError
from .geometry import resample_to_grid
from .imageio import atomic_output, read_image
from .labels import CONVENTIONS, check_label_values
from .parallel import sources_in_order
from .registry_data import source_root
from .segment import model_grid, predict_volume, prepare_volume

__all__ = ["SegCase", "build_seg_cases", "targets_for", "train_segmentation", "sample_batch", "contrast_phase_map"]

log = logging.getLogger(__name__)


@dataclass
class SegCase:
    """One training case prepared on its model grid: inputs [C, k, j, i], targets, foreground."""

    name: str
    x: np.ndarray
    y: np.ndarray  # regions: uint8 [R, k, j, i]; classes: uint8 bitmask [k, j, i] of allowed classes
    fg: np.ndarray  # flat indices of labelled voxels
    weight: float = 1.0  # relative probability of drawing this case
    cached: bool = False  # read from a case cache (not made by this run)


def _region_targets(label_arr: np.ndarray, convention: str, regions: List[str]) -> np.ndarray:
    table = CONVENTIONS[convention]
    return np.stack([np.isin(label_arr, table[r]) for r in regions]).astype(np.uint8)


def _class_targets(label_arr: np.ndarray, convention: str, targets: dict) -> np.ndarray:
    sets = targets["class_sets"].get(convention)
    if sets is None:
        raise InputError(f"training config: targets.class_sets has no entry for label convention {convention!r}")
    out = np.ones(label_arr.shape, np.uint8)  # bit 0: background
    for value, allowed in sets.items():
        bits = 0
        for c in allowed:
            bits |= 1 << int(c)
        out[label_arr == int(value)] = bits
    return out


def targets_for(label_arr: np.ndarray, convention: str, targets: dict) -> np.ndarray:
    """Training targets from a label array (see module docstring)."""
    if targets["kind"] == "regions":
        return _region_targets(label_arr, convention, targets["regions"])
    return _class_targets(label_arr, convention, targets)


def _prepare_case(name: str, images: Dict[str, Optional[sitk.Image]], label: sitk.Image, convention: str,
                  meta: dict, targets: dict, spacing=None) -> SegCase:
    from .segment import align_inputs

    m = dict(meta)
    if spacing is not None:
        m["spacing_mm"] = list(spacing)
    ref_name = meta["segmentation"]["reference"]
    imgs = {s["name"]: images.get(s["name"]) for s in meta["inputs"]}
    imgs = align_inputs(imgs, ref_name)
    grid = model_grid(m, imgs[ref_name])
    x = prepare_volume(m, imgs, grid)
    lab = sitk.GetArrayFromImage(resample_to_grid(label, grid, interpolator=sitk.sitkNearestNeighbor, default=0))
    y = targets_for(lab, convention, targets)
    fgmask = y.any(axis=0) if targets["kind"] == "regions" else (y != 1)
    return SegCase(name, x, y, np.flatnonzero(fgmask.reshape(-1)))


_CACHE_FORMAT = "deepedit.case-cache/2"  # npz arrays, read with allow_pickle=False


@functools.lru_cache(maxsize=1)
def _cache_salt() -> bytes:
    """What, besides a case's own recipe, decides what a prepared case holds: this package's code
    (every module: generation, preparation, normalisation...) and the numerical libraries' versions."""
    from importlib import metadata

    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for dist in ("numpy", "scipy", "SimpleITK", "nilearn", "torch", "monai"):
        try:
            h.update(f"{dist}=={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent".encode())
    return h.digest()


def _cache_file(cache_dir: Path, kind: str, s: int, options: dict, meta: dict, targets: dict, spacings) -> Path:
    """The file that keeps generated case ``s`` of ``kind`` prepared for this bundle metadata, targets and
    spacings (a hash of all of them, of this package's code and of the numerical libraries' versions)."""
    h = hashlib.sha256(_cache_salt())
    h.update(json.dumps([kind, s, options, meta, targets, spacings], sort_keys=True, default=str).encode())
    return Path(cache_dir) / f"{_cache_version()}-{kind}-{s}-{h.hexdigest()[:20]}.npz"


def _cache_version() -> str:
    """The first part of every cache file's name: this code's and libraries' version, as a short hash."""
    return _cache_salt().hex()[:12]


def stale_cache_files(cache_dir: Path) -> List[Path]:
    """Files in ``cache_dir`` that no run of this code can read: cases made by another version of the
    package or of the numerical libraries (another first part of the name, or a name from before the
    version was part of it), and the hidden temporary files of writes that were killed."""
    now = _cache_version()
    out = []
    for f in sorted(Path(cache_dir).iterdir()):
        if not f.is_file():
            continue
        if _OWN_CASE_FILE.fullmatch(f.name) or _OLD_CASE_FILE.fullmatch(f.name):
            if not f.name.startswith(now + "-"):
                out.append(f)
        elif _OWN_TEMP_FILE.fullmatch(f.name) and time.time() - f.stat().st_mtime > 24 * 3600:
            out.append(f)  # a day old: no live run is still writing it
    return out


# the names this cache writes (anything else in the folder is someone else's and never touched):
# <version>-<kind>-<seed>-<key>.npz, before versions were named <kind>-<seed>-<key>.npz, and the
# hidden temporary file of a write, .<stem>.<12 hex>.tmp.npz
_OWN_CASE_FILE = re.compile(r"[0-9a-f]{12}-(brain|ct)-\d+-[0-9a-f]{20}\.npz")
_OLD_CASE_FILE = re.compile(r"(brain|ct)-\d+-[0-9a-f]{20}\.npz")
_OWN_TEMP_FILE = re.compile(r"\.([0-9a-f]{12}-)?(brain|ct)-\d+-[0-9a-f]{20}\.[0-9a-f]{12}\.tmp\.npz")


def report_stale_cache(cache_dir: Path, prune: bool = False) -> int:
    """Say (or, with ``prune``, delete) what :func:`stale_cache_files` finds; returns the bytes concerned."""
    files = stale_cache_files(cache_dir)
    size = sum(f.stat().st_size for f in files)
    if not files:
        return 0
    shown = ", ".join(f.name for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    if prune:
        for f in files:
            f.unlink(missing_ok=True)
        log.warning("training case cache: deleted %d files (%.1f GB) made by other versions of the code or by "
                    "killed runs from %s: %s", len(files), size / 1e9, cache_dir, shown)
    else:
        log.warning("training case cache: %d files (%.1f GB) in %s were made by other versions of the code (or are "
                    "left from killed runs) and cannot be reused: %s; --prune-cache deletes them", len(files),
                    size / 1e9, cache_dir, shown)
    return size


def _cache_folder(cache_dir) -> Path:
    """``cache_dir``, made if absent; InputError when it cannot be a folder (a file in the way...)."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--cache-dir: cannot use it as a folder ({e.strerror or type(e).__name__})", cache_dir) from None
    return cache_dir


def _read_cached(path: Path) -> Optional[List[SegCase]]:
    """The cases kept in ``path``, or None when it is absent or unreadable (then they are made again).
    Plain arrays only (``allow_pickle=False``): a cache file cannot run code."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return [SegCase(str(z[f"name{i}"]), z[f"x{i}"], z[f"y{i}"], z[f"fg{i}"]) for i in range(int(z["n"]))]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: made again, and said
        log.warning("training case cache: %s is unreadable (%s); making that case again", path, e)
        return None


def _write_cached(path: Path, cases: List[SegCase]) -> None:
    """Keep ``cases`` in ``path`` (renamed in when complete: runs sharing the folder never read a
    half-written file; two runs that made the same case write the same content). The cache is an
    optimisation: a write that fails (disk full, no permission) is said and training goes on."""
    arrays = {"n": np.array(len(cases))}
    for i, c in enumerate(cases):
        arrays.update({f"name{i}": np.array(c.name), f"x{i}": c.x, f"y{i}": c.y, f"fg{i}": c.fg})
    try:
        with atomic_output(path, overwrite=True) as tmp:
            np.savez(tmp, **arrays)
    except (OSError, InputError) as e:
        log.warning("training case cache: cannot keep %s (%s); training goes on without it", path.name, e)


def _synthetic_cases(kind: str, s: int, options: dict, weight: float, meta: dict, targets: dict,
                     spacings, cache_dir: Optional[str] = None) -> List[SegCase]:
    """Generated case ``s`` of ``kind`` prepared at each spacing (a top-level function: it also runs
    in worker processes). With ``cache_dir``, read from there when another run of the same recipe
    prepared it already (see :func:`_cache_file`), else made and kept there."""
    from . import synthetic

    path = _cache_file(Path(cache_dir), kind, s, options, meta, targets, spacings) if cache_dir else None
    out = _read_cached(path) if path is not None else None
    for case in out or []:
        case.cached = True
    if out is None:
        make = synthetic.make_brain_case if kind == "brain" else synthetic.make_ct_case
        conv = "brats2017" if kind == "brain" else "liver-lesion"
        c = make(s, **options)
        out = [_prepare_case(f"synthetic-{kind}-{s}", c.images, c.label, conv, meta, targets, sp) for sp in spacings]
        if path is not None:
            _write_cached(path, out)
    for case in out:
        case.weight = weight
    return out


def build_seg_cases(sources: List[dict], meta: dict, targets: dict, data_root: Path, spacings=None,
                    progress=None, workers: int = 1, cache_dir: Optional[Path] = None) -> List[SegCase]:
    """Load or generate and prepare the cases a config lists (at each spacing of ``spacings``).

    ``workers`` > 1 (0: one per CPU core) generates and prepares the synthetic cases in that many
    worker processes; each case depends only on its seed, so the cases and their order are the
    same as with one. ``cache_dir`` keeps the prepared generated cases for other runs (seeds) of
    the same recipe; the real cases are read each time.
    """
    spacings = spacings or [None]
    if cache_dir is not None:
        cache_dir = _cache_folder(cache_dir)

    def jobs_of(src):  # (kind, seed, options, weight, meta, targets, spacings) of each generated case of a source
        first = int(src.get("seed", 0))
        return [(src["synthetic"], s, src.get("options", {}), float(src.get("weight", 1.0)), meta, targets, spacings,
                 str(cache_dir) if cache_dir else None)
                for s in range(first, first + int(src["cases"]))]

    cases: List[SegCase] = []
    for src, job, generated in sources_in_order(sources, jobs_of, _synthetic_cases, workers):
        if job is not None:
            cases.extend(generated)
            if progress:
                progress(f"synthetic-{job[0]}-{job[1]}" + (" (from the cache)" if generated and all(c.cached for c in generated)
                                                           else ""))
            continue
        root = source_root(src, data_root)
        images = {}
        for name, rel in src["images"].items():
            images[name] = read_image(root / rel)
        label = read_image(root / src["label"], what="label")
        conv = src["convention"]
        check_label_values(label, conv, root / src["label"])
        for sp in spacings:
            cases.append(_prepare_case(src.get("name", src["label"]), images, label, conv, meta, targets, sp))
            cases[-1].weight = float(src.get("weight", 1.0))
        if progress:
            progress(src.get("name", src["label"]))
    return cases


def _pad_to(a: np.ndarray, size, value=0) -> np.ndarray:
    pads = [(0, 0)] * (a.ndim - len(size)) + [(0, max(0, s - d)) for s, d in zip(size, a.shape[-len(size):])]
    return np.pad(a, pads, constant_values=value) if any(p[1] for p in pads) else a


def contrast_phase_map(x: np.ndarray, window, keep: float, from_hu: float, to_hu: float) -> np.ndarray:
    """A CT input normalised by ``ct_window`` (HU clipped to ``window`` and scaled to [0, 1]) with its
    enhancement compressed, as if scanned with less contrast agent (a native or late phase).

    HU at or below ``from_hu`` (fat, water, unenhanced tissue) are unchanged; from ``from_hu`` to ``to_hu``
    (enhanced parenchyma and vessels) the HU above ``from_hu`` are scaled by ``keep``; from ``to_hu`` to the
    window's top the map ramps back to the top, so bone and anything clipped there stay brightest; values
    outside [0, 1] (moved there by the intensity augmentation, applied first) are unchanged. The map is
    continuous and non-decreasing (``0 <= keep <= 1``).
    """
    lo, hi = float(window[0]), float(window[1])
    if not (lo < from_hu < to_hu < hi) or not 0.0 <= keep <= 1.0:
        raise ValueError(f"contrast_phase needs {lo} < from_hu < to_hu < {hi} and keep in [0, 1], "
                         f"got from_hu={from_hu}, to_hu={to_hu}, keep={keep}")
    hu_pts = np.array([lo, from_hu, to_hu, hi])
    out_pts = np.array([lo, from_hu, from_hu + keep * (to_hu - from_hu), hi])
    v_in, v_out = (hu_pts - lo) / (hi - lo), (out_pts - lo) / (hi - lo)
    # values that an intensity augmentation moved outside [0, 1] are left as they are
    v_in, v_out = np.r_[-1e6, v_in, 1e6], np.r_[-1e6, v_out, 1e6]
    return np.interp(x, v_in, v_out).astype(x.dtype, copy=False)


def _phase_settings(phase: dict):
    """``augment.contrast_phase`` with its defaults: (probability, keep range, from_hu, to_hu)."""
    return (float(phase.get("probability", 0.5)), list(phase.get("keep", [0.1, 0.7])),
            float(phase.get("from_hu", 40.0)), float(phase.get("to_hu", 200.0)))


def _check_contrast_phase(config: dict) -> None:
    """Refuse a ``contrast_phase`` augmentation that could not run, before any case is prepared."""
    phase = config.get("augment", {}).get("contrast_phase")
    if not phase:
        return
    ct = [s for s in config["bundle"]["inputs"] if s.get("normalization") == "ct_window"]
    try:
        probability, keep, from_hu, to_hu = _phase_settings(phase)
        if not ct:
            raise ValueError("the bundle has no input with ct_window normalisation")
        if len(keep) != 2 or keep[0] > keep[1] or not 0 <= probability <= 1:
            raise ValueError(f"keep must be [low, high] with low <= high and probability in [0, 1], got {phase}")
        for spec in ct:
            for k in keep:
                contrast_phase_map(np.zeros(1, np.float32), spec["window"], float(k), from_hu, to_hu)
    except (ValueError, TypeError) as exc:
        raise InputError(f"training config: augment.contrast_phase: {exc}") from None


def sample_batch(cases: List[SegCase], cfg: dict, meta: dict, rng: np.random.Generator):
    """One training batch (x [B, C, *patch], y) drawn with ``rng`` (see module docstring)."""
    dims = int(meta["segmentation"].get("dims", 3))
    patch = [int(p) for p in cfg["patch"]]
    aug = cfg.get("augment", {})
    names = [s["name"] for s in meta["inputs"]]
    xs, ys = [], []
    w = np.asarray([c.weight for c in cases], float)
    w = w / w.sum()
    for _ in range(int(cfg["batch_size"])):
        c = cases[int(rng.choice(len(cases), p=w))]
        shape = c.x.shape[1:]
        if len(c.fg) and rng.random() < float(cfg.get("fg_fraction", 0.7)):
            centre = np.array(np.unravel_index(int(c.fg[int(rng.integers(len(c.fg)))]), shape))
        else:
            centre = np.array([int(rng.integers(s)) for s in shape])
        if dims == 2:
            k = int(centre[0])
            x = c.x[:, k]
            y = c.y[:, k] if c.y.ndim == 4 else c.y[k]
            centre = centre[1:]
        else:
            x, y = c.x, c.y
        sp = x.shape[1:]
        start = [int(np.clip(ce - p // 2, 0, max(0, s - p))) for ce, p, s in zip(centre, patch, sp)]
        sl = tuple(slice(st, st + p) for st, p in zip(start, patch))
        xp = _pad_to(x[(slice(None),) + sl], patch)
        yp = y[(slice(None),) + sl] if y.ndim == len(patch) + 1 else y[sl]
        yp = _pad_to(yp, patch, value=0 if y.ndim == len(patch) + 1 else 1)
        xp = xp.copy()
        for ax in aug.get("flip_axes", []):
            a = int(ax) - (1 if dims == 2 else 0)
            if a >= 0 and rng.random() < 0.5:
                xp = np.flip(xp, axis=a + 1)
                yp = np.flip(yp, axis=a + (1 if yp.ndim == len(patch) + 1 else 0))
        if dims == 2 and aug.get("rot90", False):
            kq = int(rng.integers(4))
            xp = np.rot90(xp, kq, axes=(-2, -1))
            yp = np.rot90(yp, kq, axes=(-2, -1))
        for ci in range(xp.shape[0]):
            s = 1.0 + rng.uniform(-1, 1) * float(aug.get("intensity_scale", 0.0))
            b = rng.uniform(-1, 1) * float(aug.get("intensity_shift", 0.0))
            nz = xp[ci] != 0
            xp[ci][nz] = xp[ci][nz] * s + b
            p = float(aug.get("drop_inputs", {}).get(names[ci], 0.0))
            if p and rng.random() < p:
                xp[ci] = 0
        phase = aug.get("contrast_phase")  # drawn last: the other draws are those of a config without it
        if phase:
            probability, keep, from_hu, to_hu = _phase_settings(phase)
            if rng.random() < probability:
                k = float(rng.uniform(*keep))
                for ci, spec in enumerate(meta["inputs"]):
                    if spec.get("normalization") == "ct_window":
                        xp[ci] = contrast_phase_map(xp[ci], spec["window"], k, from_hu, to_hu)
        xs.append(np.ascontiguousarray(xp))
        ys.append(np.ascontiguousarray(yp))
    return np.stack(xs).astype(np.float32), np.stack(ys)


def _class_loss(logits, ybits, n_classes: int):
    """Partial-label softmax loss: marginal NLL of the allowed classes + Dice on certain voxels."""
    import torch

    bits = torch.stack([(ybits >> c) & 1 for c in range(n_classes)], dim=1).bool()  # [B, C, ...]
    p = torch.softmax(logits.float(), dim=1)
    nll = -torch.log((p * bits).sum(1).clamp_min(1e-6)).mean()
    certain_pos = bits & (bits.sum(1, keepdim=True) == 1)
    known = certain_pos | ~bits  # voxel's membership in class c is known
    dice_terms = []
    for c in range(1, n_classes):
        kc, tc, pc = known[:, c].float(), certain_pos[:, c].float(), p[:, c]
        inter = (pc * tc * kc).sum()
        denom = (pc * kc).sum() + tc.sum()
        dice_terms.append(1 - (2 * inter + 1e-5) / (denom + 1e-5))
    return nll + torch.stack(dice_terms).mean()


def _region_loss_fn(cfg: dict):
    from monai.losses import DiceFocalLoss

    return DiceFocalLoss(sigmoid=True, gamma=float(cfg.get("focal_gamma", 2.0)), smooth_nr=1e-5, smooth_dr=1e-5)


def _validate(net, cases: List[SegCase], meta: dict, targets: dict, device) -> List[float]:
    """Dice per target (region, or class >= 1) on the model grid, averaged over cases."""
    import torch

    net.eval()
    scores = []
    for c in cases:
        probs = predict_volume(net, c.x, meta, device, tta=0)
        if targets["kind"] == "regions":
            pred = probs >= float(meta["output"]["threshold"])
            truth = c.y.astype(bool)
        else:
            arg = np.argmax(probs, axis=0)
            n = probs.shape[0]
            pred = np.stack([arg == k for k in range(1, n)])
            truth = np.stack([(c.y == (1 << k)) | ((c.y >> k) & 1).astype(bool) for k in range(1, n)])
        row = []
        for p, t in zip(pred, truth):
            denom = p.sum() + t.sum()
            row.append(1.0 if denom == 0 else 2.0 * (p & t).sum() / denom)
        scores.append(row)
    net.train()
    torch.set_grad_enabled(True)
    return list(np.mean(np.array(scores), axis=0)) if scores else []


def _weights_of(net) -> dict:
    """The network's weights as float32 CPU tensors of their own (a copy, contiguous)."""
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in net.state_dict().items()}


def _write_snapshot(path: Path, net) -> None:
    """The network's weights as safetensors, written atomically (a resumed run may write one again)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        save_file(_weights_of(net), str(tmp))


def _average_into(averaged: dict, net) -> None:
    """Fold the network's current weights into the running equal-weight mean ``averaged``."""
    n = int(averaged.get("n", 0))
    cur = _weights_of(net)
    if n == 0:
        averaged["state"] = cur
    else:
        for k, v in averaged["state"].items():
            v += (cur[k] - v) / (n + 1)
    averaged["n"] = n + 1


def train_segmentation(config: dict, run_dir: Path, *, data_root: Path, device: str = "auto", resume: bool = False,
                       steps: Optional[int] = None, bundle_dir: Optional[Path] = None,
                       show_progress: bool = True, workers: int = 1, cache_dir: Optional[Path] = None,
                       prune_cache: bool = False) -> dict:
    """Train an automatic model from a config (see module docstring). Returns a summary dict.

    ``workers``: processes that generate and prepare the synthetic cases (0: one per CPU core).
    ``cache_dir``: a folder where the prepared generated cases are kept and found again by other
    runs of the same recipe (other seeds); None: prepared in memory only. Files there that this
    code cannot read (made by another version) are reported, and deleted with ``prune_cache``.
    """
    import torch

    from .device import cpu_supports_bf16, pick_device
    from .progress import StepProgress

    meta = dict(config["bundle"])
    if meta.get("network", {}).get("ensemble") is not None:
        raise InputError("the config's bundle.network declares an ensemble: train its members one by one (one "
                         "network each, with --seed) and join them with Resources/Training/assemble_ensemble.py")
    targets = config["targets"]
    steps = int(config["steps"] if steps is None else steps)
    total_steps = steps
    seed = int(config.get("seed", 0))
    avg_cfg = config.get("average_weights")
    if avg_cfg is not None and (int(avg_cfg.get("every", 0)) < 1 or not 0 < int(avg_cfg.get("from_step", 0)) <= steps):
        raise InputError(f"average_weights needs every >= 1 and 0 < from_step <= steps ({steps}), got {avg_cfg}")
    _check_contrast_phase(config)
    check_batch_augment(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    log_path = run_dir / "log.csv"
    if ckpt_path.exists() and not resume:
        raise InputError(f"{run_dir} already holds a run; use --resume to continue it or choose another --run-dir", ckpt_path)
    identity = run_identity(config, seed, steps)  # one-cycle and Ranger21 schedules are made for the length
    if resume and ckpt_path.exists():
        check_resume(ckpt_path, identity)  # before minutes of case preparation

    init_state = None
    if config.get("init_from"):  # read (and refused) before minutes of case preparation
        from .bundle import read_weights_for_init

        init_state = read_weights_for_init(config["init_from"], config.get("init_member"))
    if cache_dir is not None:
        report_stale_cache(_cache_folder(cache_dir), prune=prune_cache)
    elif prune_cache:
        raise InputError("--prune-cache needs --cache-dir (the folder to prune)")
    dev = pick_device(device)
    torch.manual_seed(seed)
    t_load = time.perf_counter()
    say = (lambda name: print(f"prepared {name}", file=sys.stderr, flush=True)) if show_progress else None
    spacings = config.get("train_spacings")
    cases = build_seg_cases(config["data"], meta, targets, data_root, spacings=spacings, progress=say, workers=workers,
                            cache_dir=cache_dir)
    val_cases = build_seg_cases(config.get("validation", []), meta, targets, data_root, workers=workers,
                                cache_dir=cache_dir)
    load_s = time.perf_counter() - t_load
    if not cases:
        raise InputError("the training config lists no cases")

    net = build_network(meta).to(dev)
    if init_state is not None:
        try:
            net.load_state_dict(init_state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"init_from {config['init_from']!r}: its weights do not fit this config's network: "
                             f"{str(e).splitlines()[0]}") from None
    if meta["network"].get("channels_last") and dev.type == "cpu":
        net = net.to(memory_format=torch.channels_last_3d)
    opt_name = config.get("optimizer", "adamw")
    lr = float(config.get("lr", 1e-3))
    sched = None
    if opt_name == "ranger21":
        from ranger21 import Ranger21

        spe = int(config.get("steps_per_epoch", 50))
        with contextlib.redirect_stdout(io.StringIO()):
            opt = Ranger21(net.parameters(), lr=lr, num_epochs=max(1, math.ceil(total_steps / spe)),
                           num_batches_per_epoch=spe, weight_decay=float(config.get("weight_decay", 1e-4)))
    elif opt_name == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=float(config.get("weight_decay", 1e-4)))
        if total_steps >= 3:  # one-cycle needs a warm-up and a decay step; shorter (smoke) runs keep lr constant
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                        pct_start=min(0.5, max(0.1, 2.5 / total_steps)))
    else:
        raise InputError(f"unknown optimizer {opt_name!r} (ranger21 or adamw)")
    region_loss = _region_loss_fn(config) if targets["kind"] == "regions" else None
    n_classes = int(targets.get("n", 0))

    averaged: dict = {}  # {"n": snapshots so far, "state": running mean of the weights}
    start = 0
    if resume and ckpt_path.exists():
        start = load_checkpoint(ckpt_path, net, opt, sched, dev, extra=averaged)
    use_bf16 = dev.type == "cpu" and bool(config.get("cpu_bf16", True)) and cpu_supports_bf16()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if use_bf16 else \
        (lambda: torch.autocast("cuda", dtype=torch.float16)) if dev.type == "cuda" else \
        (lambda: contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" else None

    new_log = not log_path.exists() or start == 0
    target_names = targets["regions"] if targets["kind"] == "regions" else [f"class{k}" for k in range(1, n_classes)]
    if new_log:
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "loss"] + [f"val_dice_{t}" for t in target_names] + ["seconds"])
    val_every = int(config.get("val_every", 250))
    ckpt_every = int(config.get("checkpoint_every", 100))
    t0 = time.perf_counter()
    losses: List[float] = []
    last_val: List[float] = []
    nonfinite = 0
    bar = StepProgress(range(start, steps), initial=start, total=steps, enabled=show_progress, desc="train")

    net.train()
    for step in bar:
        rng = np.random.default_rng([seed, step])
        xb, yb = sample_batch(cases, config, meta, rng)
        x = torch.from_numpy(xb).to(dev)
        y = torch.from_numpy(yb).to(dev)
        # drawn after sample_batch's draws, from the same stream; the batch itself when the config has none
        x, y = batch_augment(x, y, config.get("augment") or {}, rng,
                             y_background=0 if targets["kind"] == "regions" else 1, spacing=list(meta["spacing_mm"])[::-1])
        with amp():
            logits = net(x)
        if region_loss is not None:
            loss = region_loss(logits.float(), y.float())
        else:
            loss = _class_loss(logits, y.long(), n_classes)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            with contextlib.redirect_stdout(io.StringIO()):
                opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
        done = step + 1
        nonfinite = count_nonfinite_loss(losses[-1], nonfinite, done, run_dir)
        if avg_cfg is not None and done >= int(avg_cfg["from_step"]) and \
                (done - int(avg_cfg["from_step"])) % int(avg_cfg["every"]) == 0:
            _average_into(averaged, net)
        if done % val_every == 0 or done == steps:
            last_val = _validate(net, val_cases, meta, targets, dev) if val_cases else []
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([done, round(float(np.mean(losses[-val_every:])), 5)]
                                       + [round(float(v), 4) for v in last_val] + [round(time.perf_counter() - t0, 1)])
        if config.get("snapshot_every") and done % int(config["snapshot_every"]) == 0:
            _write_snapshot(run_dir / "snapshots" / f"step-{done:05d}.safetensors", net)
        if done % ckpt_every == 0 or done == steps:
            save_checkpoint(ckpt_path, net, opt, sched, done, extra=averaged, run=identity)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                        val=",".join(f"{v:.3f}" for v in last_val) if last_val else "-")
    bar.close()
    if averaged:
        net.load_state_dict({k: v.to(dev) for k, v in averaged["state"].items()})
        last_val = _validate(net, val_cases, meta, targets, dev) if val_cases else []
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([f"mean of {int(averaged['n'])} snapshots", ""]
                                   + [round(float(v), 4) for v in last_val] + [round(time.perf_counter() - t0, 1)])
    summary = {"run_dir": str(run_dir), "steps": steps, "cases": len(cases), "validation_cases": len(val_cases),
               "load_seconds": round(load_s, 1), "train_seconds": round(time.perf_counter() - t0, 1),
               "final_loss": round(float(np.mean(losses[-50:])), 4) if losses else None,
               "validation_dice": dict(zip(target_names, [round(float(v), 4) for v in last_val]))}
    if True:
        meta.setdefault("training", {})
        meta["training"] = {**meta["training"], "steps": total_steps, "seed": seed,
                            "validation_dice_model_grid": summary["validation_dice"]}
        if config.get("held_out"):  # deepedit train --hold-out: the sources this fold left out
            meta["training"]["held_out"] = list(config["held_out"])
        if averaged:
            meta["training"]["averaged_weights"] = {"snapshots": int(averaged["n"]), **avg_cfg}
            summary["averaged_snapshots"] = int(averaged["n"])
        b = save_bundle(Path(bundle_dir) if bundle_dir else run_dir / "bundle", meta, _weights_of(net),
                        config.get("card") or draft_card(meta, config))
        summary["bundle"] = str(b.path)
    return summary
