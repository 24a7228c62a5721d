"""Batch fixtures built from real pixels: multi-sequence studies with known head motion.

A co-registered real case (e.g. ``brain-tumor/tcga-du-7294``: t1, t1c, t2, flair, 1 mm, skull
stripped) stands in for one patient. Each sequence except the reference (T1c) is "acquired"
after a known random rigid head motion, at the voxel size of the 1.5 T Siemens protocol in
DESIGN.md (T2 0.8x0.6x5 mm, DWI 1.2x1.2x5, SWI 1.1x0.9x2, T1 1 mm, FLAIR 0.9x0.9x5): the source
is resampled through the motion onto the protocol grid after a Gaussian slice/pixel profile
(FWHM = voxel size), and Rician noise is added. The series are written as DICOM (Siemens-like
series descriptions, real geometry tags, a fake patient name) or as NIfTI with typical file
names. The motions are the truth for the registration error.

DWI-like and SWI-like volumes are synthesised from the real T2 (they are not real DWI/SWI):
DWI-like is a b=1000 s/mm^2 signal ``T2 * exp(-b * ADC)`` with an ADC that grows with the T2
signal (so CSF turns dark, as in a trace image); SWI-like is a T2*-like magnitude with a
compressed dynamic range and thin dark "veins". They test registration across a contrast
change at the protocol's voxel sizes, not the physics of those sequences.

Conventions: physical points are LPS mm. A "true" transform maps points of the reference
(fixed) space to the moving series' space, as the transform a SimpleITK registration of
fixed=reference, moving=series returns.

Used by Testing/test_batch_*.py (with ``base_mm=2`` and ``inplane_factor=2`` to stay small)
and benchmarks/batch.py (full protocol resolution).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

FAKE_PATIENT_NAME = "Fixture^Zyxwvut"
FAKE_PATIENT_ID = "PID-QX7-40417"

# name: source sequence of the real case, voxel size (i, j, k) mm, Siemens-like description,
# DICOM acquisition tags, NIfTI file name (``{case}`` is the study name)
PROTOCOL: Dict[str, dict] = {
    "t1c": dict(source="t1c", spacing=(1.0, 1.0, 1.0), description="t1_vibe_tra_iso_post", protocol="t1_vibe_tra_iso_post",
                tags=dict(ScanningSequence="GR", SequenceVariant="SP\\SS", MRAcquisitionType="3D", RepetitionTime=11.0,
                          EchoTime=4.76, ContrastBolusAgent="Gadovist", ImageType="ORIGINAL\\PRIMARY\\M\\ND\\NORM"),
                nifti="{case}-t1c.nii.gz"),
    "t1": dict(source="t1", spacing=(1.0, 1.0, 1.0), description="t1_vibe_sag_iso", protocol="t1_vibe_sag_iso",
               tags=dict(ScanningSequence="GR", SequenceVariant="SP\\SS", MRAcquisitionType="3D", RepetitionTime=11.0,
                         EchoTime=4.76, ImageType="ORIGINAL\\PRIMARY\\M\\ND\\NORM"),
               nifti="{case}-t1n.nii.gz", sagittal=True),
    "t2": dict(source="t2", spacing=(0.8, 0.6, 5.0), description="t2_tse_tra_p2", protocol="t2_tse_tra_p2",
               tags=dict(ScanningSequence="SE", SequenceVariant="SK\\SP\\OSP", MRAcquisitionType="2D", RepetitionTime=4000.0,
                         EchoTime=98.0, ImageType="ORIGINAL\\PRIMARY\\M\\ND\\NORM"),
               nifti="{case}-t2w.nii.gz"),
    "flair": dict(source="flair", spacing=(0.9, 0.9, 5.0), description="t2_tirm_tra_dark-fluid", protocol="t2_tirm_tra_dark-fluid",
                  tags=dict(ScanningSequence="SE\\IR", SequenceVariant="SK\\SP\\MP\\OSP", MRAcquisitionType="2D",
                            RepetitionTime=9000.0, EchoTime=89.0, InversionTime=2500.0, ImageType="ORIGINAL\\PRIMARY\\M\\ND\\NORM"),
                  nifti="{case}-t2f.nii.gz"),
    "dwi": dict(source="dwi", spacing=(1.2, 1.2, 5.0), description="ep2d_diff_3scan_trace_p2_TRACEW",
                protocol="ep2d_diff_3scan_trace_p2",
                tags=dict(ScanningSequence="EP", SequenceVariant="SK\\SP", MRAcquisitionType="2D", RepetitionTime=3600.0,
                          EchoTime=89.0, ImageType="DERIVED\\PRIMARY\\DIFFUSION\\TRACEW\\ND\\NORM"),
                nifti="{case}_dwi.nii.gz"),
    "swi": dict(source="swi", spacing=(1.1, 0.9, 2.0), description="t2_swi_tra_p2_SWI", protocol="t2_swi_tra_p2",
                tags=dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="3D", RepetitionTime=49.0,
                          EchoTime=40.0, ImageType="ORIGINAL\\PRIMARY\\M\\SWI\\ND\\NORM"),
                nifti="{case}_swi.nii.gz"),
}


@dataclass
class Case:
    """A real co-registered case resampled to ``base_mm`` and cropped to the head."""

    images: Dict[str, sitk.Image]  # float32, same grid
    brain: sitk.Image  # uint8 mask (non-zero T1c voxels)


@dataclass
class StudyTruth:
    """What a built study holds and the motion of each sequence."""

    name: str
    folder: Path
    fmt: str
    reference: str
    transforms: Dict[str, List[float]] = field(default_factory=dict)  # Euler3D parameters + centre, reference -> series
    spacing: Dict[str, List[float]] = field(default_factory=dict)
    files: Dict[str, List[str]] = field(default_factory=dict)

    def transform(self, sequence: str) -> sitk.Euler3DTransform:
        return euler_from_list(self.transforms[sequence])


def euler_from_list(values: Sequence[float]) -> sitk.Euler3DTransform:
    """Euler3DTransform from [rx, ry, rz (rad), tx, ty, tz (mm), cx, cy, cz (mm)]."""
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in values[6:9]])
    t.SetParameters([float(v) for v in values[:6]])
    return t


def euler_to_list(t: sitk.Euler3DTransform) -> List[float]:
    return [float(v) for v in t.GetParameters()] + [float(v) for v in t.GetCenter()]


# ---------------------------------------------------------------------------------- sources


def _smooth_axes(img: sitk.Image, sigmas_mm: Sequence[float]) -> sitk.Image:
    """Gaussian blur with a separate sigma (mm) along each index axis (0 = none)."""
    out = img
    for axis, s in enumerate(sigmas_mm):
        if s > 1e-3:
            f = sitk.RecursiveGaussianImageFilter()
            f.SetSigma(float(s))
            f.SetDirection(axis)
            f.SetOrder(0)
            out = f.Execute(out)
    return out


@lru_cache(maxsize=4)
def load_case_cached(case_dir: str, base_mm: float) -> Case:
    """:func:`load_case`, kept for the test session (cases are read-only once built)."""
    return load_case(Path(case_dir), base_mm)


def load_case(case_dir: Path, base_mm: float = 1.0, margin_mm: float = 12.0) -> Case:
    """Read t1, t1c, t2, flair of a co-registered case, crop to the head, resample to ``base_mm``.

    Also synthesises "dwi" and "swi" from T2 (see the module docstring). Deterministic.
    """
    from SegmentationDeepEditLib.geometry import Grid, resample_to_grid
    from SegmentationDeepEditLib.imageio import read_image

    names = {"t1": ["t1", "t1n"], "t1c": ["t1c"], "t2": ["t2", "t2w"], "flair": ["flair", "t2f"]}
    raw: Dict[str, sitk.Image] = {}
    for key, options in names.items():
        for o in options:
            p = Path(case_dir) / f"{o}.nii.gz"
            if p.is_file():
                raw[key] = sitk.Cast(read_image(p), sitk.sitkFloat32)
                break
        else:
            raise FileNotFoundError(f"{case_dir}: no {key} ({', '.join(options)})")
    ref = raw["t1c"]
    arr = sitk.GetArrayViewFromImage(ref)
    nz = np.argwhere(arr != 0)
    lo, hi = nz.min(axis=0)[::-1], nz.max(axis=0)[::-1]  # [i, j, k]
    sp = np.asarray(ref.GetSpacing())
    lo_mm = np.asarray(ref.TransformIndexToPhysicalPoint([int(v) for v in lo])) - margin_mm
    hi_mm = np.asarray(ref.TransformIndexToPhysicalPoint([int(v) for v in hi])) + margin_mm
    size = np.ceil((hi_mm - lo_mm) / base_mm).astype(int) + 1
    grid = Grid(tuple(int(s) for s in size), (base_mm,) * 3, tuple(float(v) for v in lo_mm))
    sigma = math.sqrt(max(base_mm**2 - float(sp.min()) ** 2, 0.0)) / 2.355
    images = {}
    for k, img in raw.items():
        src = _smooth_axes(img, [sigma] * 3) if sigma > 0 else img
        images[k] = resample_to_grid(src, grid, default=0.0)
    brain = sitk.Cast(images["t1c"] != 0, sitk.sitkUInt8)
    # DWI-like and SWI-like from T2 (not real physics; see module docstring)
    t2 = sitk.GetArrayFromImage(images["t2"]).astype(np.float64)
    inside = sitk.GetArrayViewFromImage(brain) > 0
    scale = np.percentile(t2[inside], 99) if inside.any() else 1.0
    t2n = np.clip(t2 / scale, 0, 1.5)
    adc = 0.7e-3 + 2.3e-3 * np.clip((t2n - 0.45) / 0.55, 0, 1)  # mm^2/s
    dwi = 1000.0 * t2n * np.exp(-1000.0 * adc) * 2.5
    rng = np.random.default_rng(1234)
    veins = sitk.GetImageFromArray(rng.standard_normal(t2.shape).astype(np.float32))
    veins.CopyInformation(images["t2"])
    veins = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(veins, 2.0 * base_mm))
    veins = np.abs(veins) < 0.02 * veins.std() * 3  # thin sheets/tubes where smoothed noise crosses 0
    swi = 1000.0 * np.sqrt(np.clip(t2n, 0, None)) * np.where(veins & inside, 0.45, 1.0)
    for key, arr_ in (("dwi", dwi), ("swi", swi)):
        im = sitk.GetImageFromArray((arr_ * inside).astype(np.float32))
        im.CopyInformation(images["t2"])
        images[key] = im
    return Case(images, brain)


def with_head(case: Case, seed: int = 5) -> Case:
    """The case as raw (not skull-stripped) MRI: tissue of the head up to 20 mm outside the brain
    (meninges, skull, scalp, as one grey layer) and Rician background noise everywhere else, as a
    scanner writes it (deterministic; load the case with a margin of 30 mm or more so that the head fits)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    inside = sitk.GetArrayViewFromImage(case.brain) > 0
    spacing = np.asarray(case.brain.GetSpacing())[::-1]
    dist = ndimage.distance_transform_edt(~inside, sampling=spacing)
    shell = (dist > 0.0) & (dist <= 20.0)
    images = {}
    for key, img in case.images.items():
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        top = float(np.percentile(arr[inside], 99)) if inside.any() else 1.0
        sigma = 0.03 * top
        noise = np.hypot(rng.normal(0, sigma, arr.shape), rng.normal(0, sigma, arr.shape)).astype(np.float32)
        arr = np.where(inside, arr, noise)
        arr[shell] += 0.6 * top
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        images[key] = out
    return Case(images, case.brain)


def random_motion(rng: np.random.Generator, centre: Sequence[float], max_deg: float = 8.0,
                  max_mm: float = 12.0) -> sitk.Euler3DTransform:
    """A random rigid head motion about ``centre`` (LPS mm): rotations and shifts uniform in ± limits."""
    t = sitk.Euler3DTransform()
    t.SetCenter([float(c) for c in centre])
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    shift = rng.uniform(-max_mm, max_mm, 3)
    t.SetParameters([float(v) for v in angles] + [float(v) for v in shift])
    return t


def acquire(source: sitk.Image, true: sitk.Transform, spacing: Sequence[float], *, centre_mm: Sequence[float],
            fov_mm: Sequence[float], direction: Sequence[float], rng: np.random.Generator,
            noise: float = 0.02, base_mm: float = 1.0) -> sitk.Image:
    """Simulate an acquisition of ``source`` (reference space) after head motion ``true``.

    ``true`` maps reference points to points of the new scan; the scan's grid (``spacing`` mm,
    ``direction``) is centred at ``centre_mm`` of the scan space and spans ``fov_mm``. Each
    voxel integrates the source with a Gaussian profile of FWHM equal to its size (thick
    slices blur across slices), then Rician noise of ``noise`` x the 99th percentile is added.
    Returns an int16 image (values clipped to 0..32767).
    """
    from SegmentationDeepEditLib.geometry import Grid

    spacing = np.asarray(spacing, float)
    fine = np.minimum(spacing, base_mm)
    d = np.asarray(direction, float).reshape(3, 3)
    size_fine = np.ceil(np.asarray(fov_mm) / fine).astype(int)
    origin = np.asarray(centre_mm) - d @ ((size_fine - 1) / 2 * fine)
    fine_grid = Grid(tuple(int(s) for s in size_fine), tuple(float(s) for s in fine), tuple(float(v) for v in origin),
                     tuple(float(v) for v in d.ravel()))
    # output point y of the scan shows source point true^-1(y)
    img = sitk.Resample(source, fine_grid.reference_image(), true.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sig = np.sqrt(np.maximum(spacing**2 - fine**2, 0.0)) / 2.355
    img = _smooth_axes(img, sig)
    size = np.maximum(np.floor(np.asarray(fov_mm) / spacing).astype(int), 2)
    origin2 = np.asarray(centre_mm) - d @ ((size - 1) / 2 * spacing)
    grid = Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(v) for v in origin2),
                tuple(float(v) for v in d.ravel()))
    img = sitk.Resample(img, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    top = float(np.percentile(arr[arr > 0], 99)) if (arr > 0).any() else 1.0
    s = noise * top
    arr = np.sqrt((arr + rng.normal(0, s, arr.shape)) ** 2 + rng.normal(0, s, arr.shape) ** 2)
    arr = np.clip(np.rint(arr * (1500.0 / top)), 0, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


# ------------------------------------------------------------------------------------ DICOM


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom_series(img: sitk.Image, folder: Path, *, study_uid: str, series_uid: str, description: str,
                       series_number: int, tags: Optional[dict] = None, protocol: str = "",
                       patient_name: str = FAKE_PATIENT_NAME, patient_id: str = FAKE_PATIENT_ID,
                       rng: Optional[np.random.Generator] = None, prefix: str = "IM") -> List[Path]:
    """Write a 3D int16 image as an MR DICOM series, one file per slice (files in random name order).

    Geometry: ImagePositionPatient is the LPS position of voxel (0, 0, k); ImageOrientationPatient
    holds the directions of the i (row) and j (column) axes; PixelSpacing is [j, i] spacing.
    The image's third direction must be the cross product of the first two (right-handed),
    which is what DICOM readers assume.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    if np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]) < 0.99:
        raise ValueError("the image's axes are not right-handed; DICOM slices would be read mirrored")
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(sitk.Cast(img, sitk.sitkInt16))
    sp = img.GetSpacing()
    n = arr.shape[0]
    order = np.arange(n) if rng is None else rng.permutation(n)
    files = []
    for k in range(n):
        sop = _uid(series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = _uid(study_uid, "for")
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = "20240105"
        ds.StudyTime = "101500"
        ds.SeriesTime = ds.AcquisitionTime = f"{101500 + series_number * 100:06d}"
        ds.AccessionNumber = "ACC" + patient_id[-5:]
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Avanto"
        ds.MagneticFieldStrength = 1.5
        ds.SeriesDescription = description
        ds.ProtocolName = protocol or description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        pos = img.TransformIndexToPhysicalPoint([0, 0, k])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in list(d[:, 0]) + list(d[:, 1])]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]
        ds.SliceThickness = f"{sp[2]:.6f}"
        ds.SpacingBetweenSlices = f"{sp[2]:.6f}"
        ds.SliceLocation = f"{float(np.dot(pos, d[:, 2])):.6f}"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(arr[k]).astype("<i2").tobytes()
        path = folder / f"{prefix}{int(order[k]):05d}"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files


def write_dicomdir_stub(path: Path) -> None:
    """A file named DICOMDIR with the DICOMDIR media storage class (content minimal)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = _uid(path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "FIXTURE"
    ds.save_as(str(path), enforce_file_format=True)


def localizer(reference: sitk.Image, centre: Sequence[float]) -> List[sitk.Image]:
    """Three single-slice-ish (3 slices) low-resolution planes, as a Siemens scout series holds."""
    from SegmentationDeepEditLib.geometry import Grid, resample_to_grid

    out = []
    dirs = [(1, 0, 0, 0, 1, 0, 0, 0, 1), (1, 0, 0, 0, 0, -1, 0, 1, 0), (0, 1, 0, 0, 0, -1, -1, 0, 0)]
    for d in dirs:
        dm = np.asarray(d, float).reshape(3, 3)
        size = np.array([64, 64, 3])
        sp = np.array([3.5, 3.5, 6.0])
        origin = np.asarray(centre) - dm @ ((size - 1) / 2 * sp)
        g = Grid(tuple(int(s) for s in size), tuple(float(s) for s in sp), tuple(float(v) for v in origin), d)
        out.append(sitk.Cast(resample_to_grid(reference, g), sitk.sitkInt16))
    return out


# ------------------------------------------------------------------------------------ studies


def _fov(case: Case, extra_mm: float = 10.0) -> np.ndarray:
    g = case.brain
    return np.asarray(g.GetSize()) * np.asarray(g.GetSpacing()) + extra_mm


def brain_centre(case: Case) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(case.brain) > 0).mean(axis=0)[::-1]
    return np.asarray(case.brain.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


# sagittal slices: i runs anterior->posterior (+y), j superior->inferior (-z), k = i x j = -x
_SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def build_study(case: Case, root: Path, name: str, *, sequences: Iterable[str] = ("t1c", "t2", "flair"),
                fmt: str = "dicom", seed: int = 0, inplane_factor: float = 1.0, max_deg: float = 8.0,
                max_mm: float = 12.0, base_mm: float = 1.0, extras: bool = True, noise: float = 0.02) -> StudyTruth:
    """Write one study folder ``root/name`` from a case; the T1c is the unmoved reference.

    Args:
        case: the real case (see :func:`load_case`).
        root: the batch input folder.
        name: study folder name.
        sequences: which protocol sequences to write (keys of ``PROTOCOL``).
        fmt: "dicom" (one sub-folder per series, slice files in random name order, plus a
            DICOMDIR, a localizer, an ADC map and a text file when ``extras``) or "nifti"
            (typical BraTS/BIDS-like file names, plus a label map and a text file when ``extras``).
        seed: motions and noise.
        inplane_factor: multiply the protocol's in-plane voxel size (not slice thickness) by this
            factor, to keep test fixtures small.
        base_mm: the voxel size of the case (the reference T1c is written at this size).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    centre = brain_centre(case)
    truth = StudyTruth(name=name, folder=folder, fmt=fmt, reference="t1c")
    study_uid = _uid("study", name, seed)
    fov = _fov(case)
    for n, seq in enumerate(sequences):
        p = PROTOCOL[seq]
        spacing = np.asarray(p["spacing"], float)
        if seq == "t1c":
            img = sitk.Cast(sitk.Round(case.images["t1c"] * (1500.0 / max(1.0, float(np.percentile(
                sitk.GetArrayViewFromImage(case.images["t1c"]), 99.5))))), sitk.sitkInt16)
            motion = sitk.Euler3DTransform()
            motion.SetCenter([float(c) for c in centre])
        else:
            spacing = np.array([spacing[0] * inplane_factor, spacing[1] * inplane_factor, spacing[2]])
            spacing = np.maximum(spacing, [base_mm if spacing[2] <= base_mm else 0.0] * 3)
            motion = random_motion(rng, centre, max_deg, max_mm)
            direction = _SAGITTAL if p.get("sagittal") else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            fov_seq = fov if not p.get("sagittal") else fov[[1, 2, 0]]
            if spacing[2] > 2.0:
                fov_seq = np.array([fov_seq[0], fov_seq[1], min(fov_seq[2], 140.0)])  # thick slices: fewer of them
            img = acquire(case.images[p["source"]], motion, spacing, centre_mm=motion.TransformPoint(centre),
                          fov_mm=fov_seq, direction=direction, rng=rng, noise=noise, base_mm=base_mm)
        truth.transforms[seq] = euler_to_list(motion)
        truth.spacing[seq] = [float(s) for s in img.GetSpacing()]
        if fmt == "dicom":
            series_dir = folder / f"S{10 + n:04d}"
            files = write_dicom_series(img, series_dir, study_uid=study_uid, series_uid=_uid("series", name, seq, seed),
                                       description=p["description"], protocol=p["protocol"], series_number=2 + n,
                                       tags=p["tags"], rng=rng)
            truth.files[seq] = [str(f.relative_to(folder)) for f in files]
        else:
            from SegmentationDeepEditLib.imageio import write_image

            out = folder / p["nifti"].format(case=name)
            write_image(img, out)
            truth.files[seq] = [out.name]
    if extras:
        (folder / "notes.txt").write_text("acquired on a fixture scanner\n", encoding="utf-8")
        if fmt == "dicom":
            write_dicomdir_stub(folder / "DICOMDIR")
            ref = sitk.Cast(case.images["t1c"], sitk.sitkFloat32)
            for m, plane in enumerate(localizer(ref, centre)):
                write_dicom_series(plane, folder / "S0001", study_uid=study_uid, series_uid=_uid("loc", name, seed),
                                   description="AAHead_Scout_64ch-head-coil", series_number=1,
                                   tags=dict(ImageType="ORIGINAL\\PRIMARY\\M\\ND\\NORM", ScanningSequence="GR"),
                                   prefix=f"LOC{m}_")
            motion = random_motion(rng, centre, max_deg, max_mm)
            adc_img = acquire(case.images["t2"], motion, [2.4, 2.4, 5.0], centre_mm=motion.TransformPoint(centre),
                              fov_mm=[fov[0], fov[1], 60.0], direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), rng=rng,
                              base_mm=base_mm)
            write_dicom_series(adc_img, folder / "S0099", study_uid=study_uid, series_uid=_uid("adc", name, seed),
                               description="ep2d_diff_3scan_trace_p2_ADC", series_number=99,
                               tags=dict(ImageType="DERIVED\\PRIMARY\\DIFFUSION\\ADC\\ND\\NORM", ScanningSequence="EP"))
        else:
            from SegmentationDeepEditLib.imageio import write_image

            write_image(case.brain, folder / f"{name}-seg.nii.gz")
    return truth


def save_truth(truths: Sequence[StudyTruth], path: Path) -> None:
    data = {t.name: {"fmt": t.fmt, "reference": t.reference, "transforms": t.transforms, "spacing": t.spacing}
            for t in truths}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def registration_error_mm(found: sitk.Transform, true: sitk.Transform, mask: sitk.Image,
                          max_points: int = 200_000) -> Tuple[float, float]:
    """Mean and maximum distance (mm) between two reference->moving transforms over mask voxels.

    Both transforms map reference (fixed) points to moving points, so the distance between
    their images of each brain voxel is the misplacement of that voxel in the moving scan.
    """
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)
    if len(idx) > max_points:
        idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    from SegmentationDeepEditLib.geometry import index_to_physical

    pts = index_to_physical(mask, idx)
    a = _apply(found, pts)
    b = _apply(true, pts)
    d = np.linalg.norm(a - b, axis=1)
    return float(d.mean()), float(d.max())


def _apply(t: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    """Apply a rigid/affine transform to (N, 3) points using its matrix (fast, exact for linear transforms)."""
    if hasattr(t, "GetMatrix"):
        m = np.asarray(t.GetMatrix(), float).reshape(3, 3)
        c = np.asarray(t.GetCenter(), float)
        tr = np.asarray(t.GetTranslation(), float)
        return (pts - c) @ m.T + c + tr
    return np.array([t.TransformPoint([float(v) for v in p]) for p in pts])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_read_only(root: Path) -> None:
    """Remove write permission from every file and folder under ``root`` (inputs stay read-only)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o444)
        os.chmod(dirpath, 0o555)


# ------------------------------------------------------------------------------ comparison

_TIMING_COLUMNS = ("seconds_total", "seconds_registration", "seconds_segmentation")


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in ("seconds",)}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def output_differences(a: Path, b: Path) -> List[str]:
    """Differences between two batch output folders, ignoring timings and the manifest.

    Every study file must be byte-identical, except report.json (compared without its
    ``seconds``) and summary.csv (compared without the seconds columns).
    """
    import csv

    diffs = []
    files_a = {p.relative_to(a).as_posix() for p in Path(a).rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in Path(b).rglob("*") if p.is_file()}
    for f in sorted(files_a ^ files_b):
        diffs.append(f"only in {'first' if f in files_a else 'second'}: {f}")
    for f in sorted(files_a & files_b):
        pa, pb = Path(a) / f, Path(b) / f
        if f == "manifest.json":
            continue
        if f.endswith("report.json"):
            ja, jb = (_strip_timings(json.loads(p.read_text())) for p in (pa, pb))
            if ja != jb:
                diffs.append(f"differs: {f}")
        elif f == "summary.csv":
            ra, rb = ([{k: v for k, v in r.items() if k not in _TIMING_COLUMNS} for r in csv.DictReader(p.open())]
                      for p in (pa, pb))
            if ra != rb:
                diffs.append(f"differs: {f}")
        elif pa.read_bytes() != pb.read_bytes():
            diffs.append(f"differs: {f}")
    return diffs


def files_containing(root: Path, needles: Sequence[str]) -> List[str]:
    """Files under ``root`` whose bytes (gzip content too) contain any of ``needles`` (case-insensitive)."""
    import gzip

    found = []
    low = [n.lower().encode() for n in needles]
    for p in Path(root).rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if data[:2] == b"\x1f\x8b":
            try:
                data = data + gzip.decompress(data)
            except OSError:
                pass
        d = data.lower()
        if any(n in d for n in low):
            found.append(str(p))
    return found


# -------------------------------------------------------------------- a stand-in segmenter

THRESHOLD_SEGMENTS = [
    {"value": 1, "name": "Bright on T2", "color": (0.9, 0.8, 0.1)},
    {"value": 2, "name": "Bright on T1c", "color": (0.9, 0.2, 0.2)},
]


def stripped_brain_segmenter(images: Dict[str, sitk.Image]):
    """:func:`threshold_segmenter` behind the installed glioma model's skull-stripping check (the
    real check on the study's registered T1c, as the bundle runner does before its network)."""
    from SegmentationDeepEditLib.bundle import load_bundle
    from SegmentationDeepEditLib.segment import check_foreground_volume

    check_foreground_volume(load_bundle("glioma-regions").meta, images["t1c"], "t1c")
    return threshold_segmenter(images)


def threshold_segmenter(images: Dict[str, sitk.Image]):
    """A stand-in automatic model for tests (module level, so worker processes can pickle it).

    Label 1: the brightest 3 % of T2 voxels; label 2 (over 1): the brightest 1 % of T1c voxels.
    """
    t2 = sitk.GetArrayViewFromImage(images["t2"]).astype(np.float32)
    t1c = sitk.GetArrayViewFromImage(images["t1c"]).astype(np.float32)
    lab = np.zeros(t2.shape, np.uint8)
    lab[t2 > np.percentile(t2[t2 > 0], 97)] = 1
    lab[t1c > np.percentile(t1c[t1c > 0], 99)] = 2
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(images["t1c"])
    return out, THRESHOLD_SEGMENTS
