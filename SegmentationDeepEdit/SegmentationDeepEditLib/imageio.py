"""Strict reading and atomic writing of medical images and label maps.

Readers in common use succeed on broken files: SimpleITK (2.5) returns a zero-filled
volume for a truncated NIfTI (``.nii`` and ``.nii.gz``), turns NaN and infinite NIfTI
voxels into 0, silently replaces a NIfTI ``pixdim`` of 0 by 1 mm, accepts skewed
(non-orthonormal) NRRD space directions, and reads a DICOM folder with a missing slice
by spreading the spacing over the gap. This module refuses all of these with an
:class:`~SegmentationDeepEditLib.errors.InputError` that names the file and the problem.

Conventions: images are ``SimpleITK.Image`` objects; physical coordinates are LPS
millimetres (ITK's convention); spacing is in millimetres per voxel.

Supported inputs: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``, including
Slicer ``.seg.nrrd`` label maps), MetaImage (``.mha``, ``.mhd``) and a folder of DICOM
files (one image series). Outputs are always written atomically (to a temporary file in
the target folder that is renamed into place), and never over an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import math
import os
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "READ_EXTENSIONS",
    "IMAGE_WRITE_EXTENSIONS",
    "SEGMENTATION_WRITE_EXTENSIONS",
    "DicomSeriesInfo",
    "read_image",
    "check_image_values",
    "check_is_image",
    "list_dicom_series",
    "read_dicom_series",
    "slice_normal",
    "check_output_path",
    "atomic_output",
    "write_image",
    "write_segmentation",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Default upper limit on the number of voxels of an input image (512**3, i.e. 128 Mi
#: voxels, 512 MiB as float32).
DEFAULT_MAX_VOXELS: int = 512**3

#: File extensions :func:`read_image` accepts (a folder is read as a DICOM series).
READ_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: File extensions :func:`write_image` writes.
IMAGE_WRITE_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")

#: File extensions :func:`write_segmentation` writes.
SEGMENTATION_WRITE_EXTENSIONS: Tuple[str, ...] = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")

# Compound extensions first, so that "a.nii.gz" is ".nii.gz" and not ".gz".
_COMPOUND_EXTENSIONS = (".seg.nrrd", ".nii.gz")

_IMAGE_IO = {
    ".nii.gz": "NiftiImageIO",
    ".nii": "NiftiImageIO",
    ".nrrd": "NrrdImageIO",
    ".nhdr": "NrrdImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
}

# Bytes per component of the scalar SimpleITK pixel types.
_COMPONENT_BYTES = {
    sitk.sitkUInt8: 1,
    sitk.sitkInt8: 1,
    sitk.sitkUInt16: 2,
    sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4,
    sitk.sitkUInt64: 8,
    sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4,
    sitk.sitkFloat64: 8,
}
_FLOAT_TYPES = (sitk.sitkFloat32, sitk.sitkFloat64)
_INTEGER_TYPES = tuple(k for k in _COMPONENT_BYTES if k not in _FLOAT_TYPES)

_CHUNK = 8 << 20  # bytes read at a time when checking pixel data
_ORTHONORMAL_TOL = 1e-4

# DICOM storage classes that are not image slices (SEG, RT structures, SR, presentation
# states, raw data, waveforms ...), and DICOMDIR's media storage class.
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "ECG"}
_NON_IMAGE_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, SEG, fiducials
    "1.2.840.10008.5.1.4.1.1.481",  # radiotherapy objects
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF/CDA
)
_DICOM_TAGS = [
    "SOPClassUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesTime",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "PixelSpacing",
    "NumberOfFrames",
    "SamplesPerPixel",
]


#: How a series whose files have no SeriesInstanceUID is named (its key starts with this).
NO_SERIES_UID = "(no SeriesInstanceUID)"

# ----------------------------------------------------------------------------- helpers


def _extension(path: PathLike, known: Sequence[str] = READ_EXTENSIONS + _COMPOUND_EXTENSIONS) -> str:
    """Return the lower-case extension of ``path`` among ``known`` (longest match), or ``""``."""
    name = Path(path).name.lower()
    for ext in sorted(set(known), key=len, reverse=True):
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return ""


def _file_extension(path: PathLike) -> str:
    """Return the full extension of a file name as written (``.nii.gz``, ``.seg.nrrd``, ``.png``)."""
    name = Path(path).name
    for ext in _COMPOUND_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[-len(ext):]
    return Path(name).suffix


def _sitk_message(error: BaseException) -> str:
    """Shorten a SimpleITK/ITK exception to the part a user can act on."""
    text = str(error)
    if "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
        if "): " in text.split("\n", 1)[0]:
            text = text.split("): ", 1)[1]
    text = " ".join(text.split())
    return text[:300] if text else type(error).__name__


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _check_geometry(spacing: Sequence[float], direction: np.ndarray, path: Path, what: str) -> None:
    """Refuse non-positive spacing and non-orthonormal or degenerate direction cosines.

    Args:
        spacing: voxel size along i, j, k in mm.
        direction: 3x3 direction cosine matrix (columns are the axis directions in LPS).
        path: file named in the error.
        what: what the file is, for the message.
    """
    spacing = [float(s) for s in spacing]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(
            f"the {what} has a voxel spacing of {_fmt(spacing)} mm; it must be > 0 on every axis", path
        )
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)):
        raise InputError(f"the {what} has degenerate (non-finite) direction cosines", path)
    err = float(np.max(np.abs(d.T @ d - np.eye(3))))
    if err >= _ORTHONORMAL_TOL or abs(np.linalg.det(d)) < 0.5:
        raise InputError(
            f"the {what} has non-orthonormal (skewed or degenerate) direction cosines "
            f"(|D^T D - I| = {err:.3g}); a sheared voxel grid is not supported",
            path,
        )


def _check_finite(img: sitk.Image, path: Path, what: str) -> None:
    """Refuse NaN or infinite voxels (counted slab by slab to limit memory)."""
    if img.GetPixelID() not in _FLOAT_TYPES:
        return
    arr = sitk.GetArrayViewFromImage(img)
    bad = 0
    step = max(1, (1 << 24) // max(1, arr[0].size))
    for k in range(0, arr.shape[0], step):
        bad += int(np.count_nonzero(~np.isfinite(arr[k : k + step])))
    if bad:
        raise InputError(f"the {what} has {bad:,} voxels that are NaN or infinite", path)


def _check_image(img: sitk.Image, path: Path, what: str) -> None:
    """Checks every image returned by a reader passes (3D, scalar, geometry, finite)."""
    if img.GetDimension() != 3:
        raise InputError(f"the {what} is {img.GetDimension()}D; a single 3D volume is needed", path)
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetPixelID() not in _COMPONENT_BYTES:
        raise InputError(
            f"the {what} has pixel type '{img.GetPixelIDTypeAsString()}'; "
            "a scalar (one value per voxel) image is needed",
            path,
        )
    _check_geometry(img.GetSpacing(), np.array(img.GetDirection()), path, what)
    _check_finite(img, path, what)


def _check_header_shape(
    size: Sequence[int], ncomp: int, pixel_id: int, pixel_name: str, max_voxels: int, path: Path, what: str
) -> None:
    """Check dimensionality, components, pixel type and voxel count from header information."""
    if ncomp != 1:
        raise InputError(
            f"the {what} has {ncomp} components per voxel (vector or colour image); "
            "a scalar (one value per voxel) image is needed",
            path,
        )
    if pixel_id not in _COMPONENT_BYTES:
        raise InputError(f"the {what} has an unsupported pixel type '{pixel_name}'", path)
    dim = len(size)
    if dim < 3:
        raise InputError(
            f"the {what} is a {dim}D image (size {'x'.join(map(str, size))}); a 3D volume is needed", path
        )
    if dim == 4 and size[3] > 1:
        raise InputError(f"the {what} has {size[3]} frames (4D); a single 3D volume is needed", path)
    if dim > 4 and any(s > 1 for s in size[3:]):
        raise InputError(
            f"the {what} has {dim} dimensions (size {'x'.join(map(str, size))}); a single 3D volume is needed",
            path,
        )
    if any(s < 2 for s in size[:3]):
        raise InputError(
            f"the {what} has a single slice (size {'x'.join(map(str, size[:3]))}); a 3D volume is needed", path
        )
    nvox = int(np.prod([int(s) for s in size], dtype=np.int64))
    if nvox > max_voxels:
        raise InputError(
            f"the {what} has {nvox:,} voxels (size {'x'.join(map(str, size))}), more than the limit of "
            f"{max_voxels:,}; crop or resample it first",
            path,
        )


# -------------------------------------------------------------- pixel data completeness


def _raw_chunks(f: BinaryIO, limit: Optional[int] = None) -> Iterator[bytes]:
    """Yield the bytes of ``f`` from its current position (at most ``limit`` bytes)."""
    left = limit
    while left is None or left > 0:
        chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _gzip_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Yield the decompressed bytes of the gzip stream(s) at the position of ``f``.

    Raises EOFError / gzip.BadGzipFile / zlib.error / OSError on truncated or corrupt data.
    """
    with gzip.GzipFile(fileobj=f, mode="rb") as gz:
        yield from _raw_chunks(gz)  # type: ignore[arg-type]


def _bz2_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Yield the decompressed bytes of the bzip2 stream at the position of ``f``."""
    with bz2.BZ2File(f, mode="rb") as bz:
        yield from _raw_chunks(bz)  # type: ignore[arg-type]


def _zlib_chunks(f: BinaryIO, limit: Optional[int] = None) -> Iterator[bytes]:
    """Yield the decompressed bytes of one zlib (or gzip) stream; EOFError if it ends early."""
    d = zlib.decompressobj(47)  # 32 + 15: accept a zlib or a gzip header
    for chunk in _raw_chunks(f, limit):
        out = d.decompress(chunk)
        if out:
            yield out
        if d.eof:
            return
    out = d.flush()
    if out:
        yield out
    if not d.eof:
        raise EOFError("the compressed stream ends before its end marker")


def _measure(
    chunks: Iterator[bytes], skip: int, needed: int, dtype: Optional[np.dtype] = None
) -> Tuple[int, int]:
    """Count the bytes of a data stream and, for a float dtype, its non-finite values.

    Args:
        chunks: the (decompressed) bytes of the stream, in order.
        skip: bytes at the start that are not voxel data (header, byte skip).
        needed: bytes of voxel data expected after ``skip``.
        dtype: on-disk element type; non-finite values are counted only for floats.

    Returns:
        (voxel data bytes found after ``skip``, at most ``needed``; non-finite values).
    """
    count_bad = dtype is not None and dtype.kind == "f"
    seen = 0  # bytes of the whole stream consumed
    data = 0  # voxel data bytes found
    bad = 0
    carry = b""
    for chunk in chunks:
        start = max(0, skip - seen)
        seen += len(chunk)
        if start >= len(chunk) or data >= needed:
            continue  # still in the header, or past the voxel data (drain for integrity)
        part = chunk[start : start + (needed - data)]
        data += len(part)
        if count_bad:
            buf = carry + part
            usable = len(buf) - len(buf) % dtype.itemsize
            if usable:
                values = np.frombuffer(buf[:usable], dtype=dtype)
                bad += int(np.count_nonzero(~np.isfinite(values)))
            carry = buf[usable:]
    return data, bad


def _truncation_error(path: Path, what: str, data: int, needed: int, detail: str = "") -> InputError:
    missing = 100.0 * (needed - data) / max(needed, 1)
    return InputError(
        f"the {what} is truncated: {needed:,} bytes of voxel data are expected but only {data:,} "
        f"are present ({missing:.1f}% missing){detail}",
        path,
    )


def _check_nifti(path: Path, ext: str, what: str) -> None:
    """Check a NIfTI file's header geometry, pixel data length and finite values.

    SimpleITK zero-fills a truncated NIfTI and reads NaN/inf voxels as 0, so the raw
    stream is read here (decompressed, in chunks) before SimpleITK reads the file.
    """
    import nibabel as nib

    with open(path, "rb") as f:
        magic = f.read(2)
    if ext == ".nii.gz" and magic != b"\x1f\x8b":
        raise InputError(f"the {what} is named .nii.gz but is not gzip-compressed; rename it to .nii", path)
    try:
        # Read the header unchecked: nibabel's checks would "fix" a pixdim of 0 to 1.
        with (gzip.open(path, "rb") if ext == ".nii.gz" else open(path, "rb")) as f:
            first = f.read(4)
            f.seek(0)
            nifti2 = 540 in (int.from_bytes(first, "little"), int.from_bytes(first, "big"))
            hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header).from_fileobj(f, check=False)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr.get_data_offset())
    except Exception as e:  # nibabel raises many types for broken headers
        raise InputError(f"cannot read the NIfTI header of the {what}: {e}", path) from e

    pixdim = [float(v) for v in np.asarray(hdr["pixdim"], dtype=float)[1:4]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        # SimpleITK/niftilib silently replace 0 by 1 mm and keep negative values.
        raise InputError(
            f"the {what} has a voxel spacing (NIfTI pixdim) of {_fmt(pixdim)} mm; it must be > 0 on every axis",
            path,
        )
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if scode > 0 and sform is not None:
        norms = np.linalg.norm(np.asarray(sform, dtype=float)[:3, :3], axis=0)
        if np.any(np.abs(norms - pixdim) > 1e-3 * np.asarray(pixdim)):
            raise InputError(
                f"the {what} has an sform with voxel sizes {_fmt(norms)} mm that disagree with its pixdim "
                f"{_fmt(pixdim)} mm; readers would disagree on its geometry",
                path,
            )
        if qcode > 0 and qform is not None:
            ni, nj, nk = (max(s - 1, 0) for s in (shape + (1, 1, 1))[:3])
            corners = np.array([[i, j, k, 1.0] for i in (0, ni) for j in (0, nj) for k in (0, nk)]).T
            dist = float(np.max(np.linalg.norm((np.asarray(qform) - np.asarray(sform)) @ corners, axis=0)[:]))
            # SimpleITK itself writes oblique, mirrored directions with qform and sform apart by
            # ~1e-3 per voxel (quaternion rounding); half a voxel is where placements really differ
            if dist > 0.5 * min(pixdim):
                raise InputError(
                    f"the {what} has a qform and an sform that disagree by up to {dist:.3g} mm; "
                    "SimpleITK and nibabel would place it differently (fix the header so both agree)",
                    path,
                )

    nvox = int(np.prod(shape, dtype=np.int64)) if shape else 0
    needed = nvox * dtype.itemsize
    check_values = dtype.kind == "f"
    if ext == ".nii":
        size = path.stat().st_size
        data = max(0, min(size - offset, needed))
        if data < needed:
            raise _truncation_error(path, what, data, needed)
        if not check_values:
            return
        with open(path, "rb") as f:
            f.seek(offset)
            data, bad = _measure(_raw_chunks(f, needed), 0, needed, dtype)
    else:
        try:
            with open(path, "rb") as f:
                data, bad = _measure(_gzip_chunks(f), offset, needed, dtype if check_values else None)
        except (EOFError, OSError, zlib.error) as e:
            raise InputError(
                f"the {what} is truncated or corrupt: its gzip stream cannot be read to the end ({e})", path
            ) from e
    if data < needed:
        raise _truncation_error(path, what, data, needed)
    if bad:
        raise InputError(f"the {what} has {bad:,} voxels that are NaN or infinite", path)


def _parse_nrrd_header(path: Path) -> Tuple[Dict[str, str], int]:
    """Return the NRRD header fields (lower-case keys) and the byte offset after the header."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline(64).startswith(b"NRRD"):
            raise InputError("is not a NRRD file (no NRRD magic)", path)
        while True:
            line = f.readline(1 << 20)
            if not line:
                break  # a detached header may end without a blank line
            text = line.rstrip(b"\r\n")
            if not text:
                break
            if text.startswith(b"#"):
                continue
            s = text.decode("latin-1")
            if ":=" in s:
                continue
            key, sep, value = s.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() in ("data file", "datafile") and value.strip().upper().startswith("LIST"):
                    break
        return fields, f.tell()


def _detached_data_file(path: Path, datafile: str, what: str) -> Optional[Path]:
    """The single data file a NRRD or MetaImage header names, relative to the header's folder.

    Returns None for multi-file data (a list or a pattern), which SimpleITK checks itself.

    Raises:
        InputError: when the named file does not exist.
    """
    if " " in datafile or datafile.upper().startswith("LIST"):
        return None
    data_path = Path(datafile)
    if not data_path.is_absolute():
        data_path = path.parent / data_path
    if not data_path.is_file():
        raise InputError(f"the data file '{datafile}' named in the {what} header does not exist", path)
    return data_path


def _check_nrrd(path: Path, what: str, needed: int) -> None:
    """Check that a NRRD file (attached or single detached data file) holds all voxel data.

    Args:
        path: the .nrrd or .nhdr file.
        what: what the file is, for messages.
        needed: bytes of voxel data the header describes.
    """
    fields, header_end = _parse_nrrd_header(path)
    encoding = fields.get("encoding", "raw").lower()
    datafile = fields.get("data file", fields.get("datafile"))
    try:
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except ValueError:
        return  # SimpleITK reports a malformed header itself
    if encoding not in ("raw", "gzip", "gz", "bzip2", "bz2") or line_skip != 0:
        return  # ascii/hex encodings and line skips: left to SimpleITK
    if datafile is not None:
        data_path = _detached_data_file(path, datafile, what)
        if data_path is None:
            return  # multi-file data: left to SimpleITK
        start = 0
    else:
        data_path, start = path, header_end
    try:
        with open(data_path, "rb") as f:
            f.seek(start)
            if encoding == "raw":
                if byte_skip < 0:
                    return  # data are the last bytes of the file: nothing to compare
                size = data_path.stat().st_size - start - byte_skip
                data = max(0, min(size, needed))
            else:
                chunks = _gzip_chunks(f) if encoding in ("gzip", "gz") else _bz2_chunks(f)
                data, _ = _measure(chunks, max(byte_skip, 0), needed)
    except (EOFError, OSError, zlib.error, ValueError) as e:
        raise InputError(
            f"the {what} is truncated or corrupt: its {encoding} data cannot be read to the end ({e})", path
        ) from e
    if data < needed:
        raise _truncation_error(path, what, data, needed)


def _check_meta(path: Path, what: str, needed: int) -> None:
    """Check that a MetaImage (.mha/.mhd) file holds all voxel data (raw or zlib-compressed)."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline(1 << 20)
            if not line:
                break
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                continue
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                break
        header_end = f.tell()
    datafile = fields.get("elementdatafile")
    if datafile is None:
        raise InputError(f"the {what} MetaImage header has no ElementDataFile line", path)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if datafile.upper() == "LOCAL":
        data_path, start = path, header_end
    else:
        data_path = _detached_data_file(path, datafile, what)
        if data_path is None:
            return  # multi-file data: left to SimpleITK
        try:
            header_size = int(fields.get("headersize", "0"))
        except ValueError:
            header_size = 0
        if header_size < 0 and not compressed:
            return  # data are the last bytes of the file
        start = max(header_size, 0)
    try:
        with open(data_path, "rb") as f:
            f.seek(start)
            if not compressed:
                size = data_path.stat().st_size - start
                data = max(0, min(size, needed))
            else:
                data, _ = _measure(_zlib_chunks(f), 0, needed)
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(
            f"the {what} is truncated or corrupt: its compressed data cannot be read to the end ({e})", path
        ) from e
    if data < needed:
        raise _truncation_error(path, what, data, needed)


# ----------------------------------------------------------------------------- reading


def check_is_image(image: Any, source=None, what: str = "image") -> None:
    """Refuse what is not a SimpleITK image (a path or an array given to the Python API)."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"the {what} must be a SimpleITK image, not {type(image).__name__} (read files with "
                         "SegmentationDeepEditLib.imageio.read_image)", source)


def check_image_values(image: Any, source=None, what: str = "image") -> None:
    """Refuse what a model must not be given from memory (the Python API): something that is not a
    SimpleITK image (a path or an array: read files with :func:`read_image`), NaN or infinite voxels
    (a file with them is refused by :func:`read_image`; in memory they would shift the result
    silently), and a blank image, whose voxels all hold one value (a blank export, a failed
    conversion): a model given it returns a confident answer that means nothing; and a label map (at most
    :data:`LABEL_LIKE_MAX_VALUES` whole-number values: a segmentation given where the scan belongs), on which a
    brain model reported a 385 mL tumour.

    Raises:
        InputError: naming ``source`` and the problem.
    """
    check_is_image(image, source, what)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"the {what} has {bad} NaN or infinite voxels", source)
    first = arr.flat[0]
    if arr.size and not np.any(arr != first):
        raise InputError(f"the {what} is blank: every voxel holds the value {float(first):g}", source)
    values = _label_like_values(arr)
    if values is not None:
        raise InputError(f"the {what} looks like a label map, not an image: its voxels hold only the values "
                         f"{', '.join(f'{v:g}' for v in values)} (give the scan itself; a segmentation is a result, "
                         "or the truth for `deepedit evaluate`)", source)


# an image given as a model's input whose voxels hold this many whole-number values or fewer is a label map
# (BraTS 0/1/2/4, liver 0/1/2, a binary mask); any scan holds hundreds of values, noise alone sees to that
LABEL_LIKE_MAX_VALUES = 6


def _label_like_values(arr: np.ndarray) -> Optional[List[float]]:
    """The sorted values of ``arr`` when they are at most :data:`LABEL_LIKE_MAX_VALUES` whole numbers, else None."""
    flat = arr.reshape(-1)
    probe = np.unique(flat[:: max(1, flat.size // 65536)])  # a cheap look first: a scan has many values
    if probe.size > LABEL_LIKE_MAX_VALUES:
        return None
    values = np.unique(flat)
    if values.size > LABEL_LIKE_MAX_VALUES or (values.dtype.kind == "f" and np.any(values != np.round(values))):
        return None
    return [float(v) for v in values]


def read_image(path: PathLike, *, max_voxels: int = DEFAULT_MAX_VOXELS, what: str = "image") -> sitk.Image:
    """Read one 3D scalar image, refusing anything broken or ambiguous.

    Reads NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
    ``.mhd``) files, and a folder as one DICOM series (see :func:`read_dicom_series`).

    Checks, in order: the path exists and its extension is supported; the header
    (read with ``sitk.ImageFileReader.ReadImageInformation``, before any pixel data is
    allocated) describes one scalar component per voxel, exactly three dimensions with
    at least two voxels along each, and at most ``max_voxels`` voxels; the spacing is
    > 0 mm on every axis and the direction cosines are orthonormal
    (``max |DᵀD − I| < 1e-4``); the pixel data are complete (explicitly checked for NIfTI,
    attached or single-file NRRD with raw/gzip/bzip2 data, and MetaImage with raw or
    zlib-compressed data, since SimpleITK zero-fills truncated NIfTI files); for NIfTI
    also that ``pixdim`` is > 0, that the sform agrees with ``pixdim`` and with the
    qform (when both are set), since SimpleITK and nibabel otherwise disagree; and that
    no voxel is NaN or infinite (for NIfTI checked on the raw stored values, because
    SimpleITK turns them into 0).

    A 4D (or higher) file whose extra dimensions all have size 1 is accepted and
    squeezed to 3D; with more than one frame it is refused.

    Args:
        path: image file, or folder holding exactly one DICOM image series.
        max_voxels: largest accepted number of voxels (product of the header sizes).
        what: what the image is (``"image"``, ``"label"``...), used in error messages.

    Returns:
        The image; spacing in mm, origin in LPS mm, direction as ITK cosines.

    Raises:
        InputError: the file is missing, unsupported, truncated, not 3D, too large, has
            invalid geometry, NaN/infinite or multi-component voxels; the message starts
            with the path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"the {what} does not exist", p)
    if p.is_dir():
        return read_dicom_series(p, max_voxels=max_voxels, what=what)
    if not p.is_file():
        raise InputError(f"the {what} is not a regular file", p)
    ext = _extension(p)
    if ext == ".seg.nrrd":
        ext = ".nrrd"
    if ext not in _IMAGE_IO:
        raise InputError(
            f"unsupported {what} file type '{_file_extension(p) or p.name}'; use one of "
            f"{', '.join(READ_EXTENSIONS)} or a DICOM folder",
            p,
        )

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.SetImageIO(_IMAGE_IO[ext])
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        if ext in (".nrrd", ".nhdr"):  # teem reads a detached data file with the header
            fields = _parse_nrrd_header(p)[0]
            datafile = fields.get("data file", fields.get("datafile"))
            if datafile is not None:
                _detached_data_file(p, datafile, what)  # raises when it is missing
        raise InputError(f"cannot read the {what} header: {_sitk_message(e)}", p) from e
    size = [int(s) for s in reader.GetSize()]
    _check_header_shape(
        size,
        int(reader.GetNumberOfComponents()),
        int(reader.GetPixelID()),
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        max_voxels,
        p,
        what,
    )
    dim = len(size)
    direction = np.array(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    _check_geometry(reader.GetSpacing()[:3], direction, p, what)

    needed = int(np.prod(size, dtype=np.int64)) * _COMPONENT_BYTES[reader.GetPixelID()]
    if ext in (".nii", ".nii.gz"):
        _check_nifti(p, ext, what)
    elif ext in (".nrrd", ".nhdr"):
        _check_nrrd(p, what, needed)
    else:
        _check_meta(p, what, needed)

    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read the {what}: {_sitk_message(e)}", p) from e
    if img.GetDimension() > 3:
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:3] + [0] * (img.GetDimension() - 3))
        extract.SetIndex([0] * img.GetDimension())
        extract.SetDirectionCollapseToStrategy(extract.DIRECTIONCOLLAPSETOSUBMATRIX)
        try:
            img = extract.Execute(img)
        except RuntimeError as e:
            raise InputError(f"cannot reduce the {what} to 3D: {_sitk_message(e)}", p) from e
    _check_image(img, p, what)
    return img


# ------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One DICOM image series found in a folder.

    Attributes:
        series_uid: SeriesInstanceUID.
        description: SeriesDescription ("" if absent). Never holds patient data.
        modality: Modality (e.g. "CT", "MR"; "" if absent).
        n_files: number of slice files of the series.
        files: the slice files, sorted by position along the slice normal (the
            ImagePositionPatient projected on the cross product of the two
            ImageOrientationPatient vectors), in ascending order.
    """

    series_uid: str
    description: str
    modality: str
    n_files: int
    files: Tuple[Path, ...]


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6 cosines)
    rows: int
    columns: int
    pixel_spacing: Tuple[float, ...]
    samples: int


def _scan_dicom_folder(folder: Path) -> Tuple[Dict[str, Tuple[Any, List[_Slice]]], Dict[str, int]]:
    """Read the headers of the files directly in ``folder`` (not in sub-folders); see :func:`_scan_dicom_files`."""
    entries = sorted((e for e in os.scandir(folder) if e.is_file()), key=lambda e: e.name)
    return _scan_dicom_files([Path(e.path) for e in entries])


def _scan_dicom_files(paths: Sequence[Path]) -> Tuple[Dict[str, Tuple[Any, List[_Slice]]], Dict[str, int]]:
    """Read the headers of ``paths`` (files, possibly from several folders).

    Returns:
        series UID -> (first dataset's description/modality, list of slices), and counts
        of skipped files by reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: Dict[str, Tuple[Any, List[_Slice]]] = {}
    skipped: Dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for entry in paths:
        entry = Path(entry)
        if entry.name.upper() == "DICOMDIR":
            skip("DICOMDIR")
            continue
        try:
            ds = pydicom.dcmread(str(entry), stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
            skip("not DICOM")
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        modality = str(ds.get("Modality", "") or "")
        if sop_class == _DICOMDIR_CLASS:
            skip("DICOMDIR")
            continue
        if modality.upper() in _NON_IMAGE_MODALITIES or sop_class.startswith(_NON_IMAGE_CLASS_PREFIXES):
            skip(f"non-image DICOM ({modality or sop_class})")
            continue
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        if frames > 1:
            skip("multi-frame DICOM (not supported)")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        try:
            position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
            rows, columns = int(ds.Rows), int(ds.Columns)
            pixel_spacing = tuple(float(v) for v in ds.get("PixelSpacing", []) or [])
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            skip("DICOM without image geometry")
            continue
        if position.shape != (3,) or orientation.shape != (6,):
            skip("DICOM without image geometry")
            continue
        if not uid:
            # Some anonymisers blank the (required) SeriesInstanceUID. Such files are one series per
            # number, description, series time, modality and geometry (an export's parts in two
            # folders stay one series); two volumes left alike are refused as sharing positions.
            number = str(ds.get("SeriesNumber", "") or "")
            description = str(ds.get("SeriesDescription", "") or "")
            series_time = str(ds.get("SeriesTime", "") or "")
            spacing = "x".join(f"{v:g}" for v in pixel_spacing)
            cosines = ",".join(f"{v:.3f}" for v in orientation)
            parts = (NO_SERIES_UID, number and f"number {number}", description and f'"{description}"',
                     series_time and f"time {series_time}", modality, f"{rows}x{columns}", spacing, f"[{cosines}]")
            uid = " ".join(x for x in parts if x)
        sl = _Slice(entry, position, orientation, rows, columns, pixel_spacing, samples)
        if uid not in series:
            description = str(ds.get("SeriesDescription", "") or "")
            series[uid] = ({"description": description, "modality": modality}, [])
        series[uid][1].append(sl)
    return series, skipped


def slice_normal(orientation) -> np.ndarray:
    """Unit normal of DICOM slices from their ImageOrientationPatient (6 direction cosines)."""
    orientation = np.asarray(orientation, dtype=float)
    n = np.cross(orientation[:3], orientation[3:])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else n


def _sorted_slices(slices: List[_Slice]) -> List[_Slice]:
    """Sort slices by position along the normal of the first slice's orientation."""
    n = slice_normal(slices[0].orientation)
    return sorted(slices, key=lambda s: (float(np.dot(s.position, n)), s.path.name))


def _series_infos(series: Dict[str, Tuple[Any, List[_Slice]]]) -> List[DicomSeriesInfo]:
    infos = []
    for uid, (info, slices) in series.items():
        ordered = _sorted_slices(slices)
        infos.append(
            DicomSeriesInfo(
                series_uid=uid,
                description=info["description"],
                modality=info["modality"],
                n_files=len(ordered),
                files=tuple(s.path for s in ordered),
            )
        )
    infos.sort(key=lambda i: (i.description, i.series_uid))
    return infos


def list_dicom_series(folder: PathLike) -> List[DicomSeriesInfo]:
    """List the DICOM image series of the files directly in ``folder``.

    Files that are not DICOM, DICOMDIR, non-image objects (SEG, RTSTRUCT, SR,
    presentation states...), multi-frame files and files without image geometry are
    ignored. Only SeriesDescription is reported, never patient data.

    Args:
        folder: folder holding DICOM files (sub-folders are not searched).

    Returns:
        One entry per series, sorted by description then UID; each entry's files are
        sorted by slice position along the slice normal. Empty if there is none.

    Raises:
        InputError: the folder does not exist or is not a folder.
    """
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise InputError("the DICOM folder does not exist" if not p.exists() else "is not a folder", p)
    series, _ = _scan_dicom_folder(p)
    return _series_infos(series)


def _describe_series(infos: List[DicomSeriesInfo]) -> str:
    return "; ".join(
        f"{i.series_uid} \"{i.description or '(no description)'}\" ({i.modality or '?'}, {i.n_files} files)"
        for i in infos
    )


def read_dicom_series(
    folder: PathLike,
    series_uid: Optional[str] = None,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    what: str = "image",
    files: Optional[Sequence[PathLike]] = None,
) -> sitk.Image:
    """Read one DICOM image series from a folder (or from ``files``) as a 3D image.

    The slices are sorted by position along the slice normal (not by file name or
    InstanceNumber) and refused when they differ in orientation, size or pixel spacing,
    share a position, are missing (a gap between sorted positions larger than 1.5 times
    the smallest gap, hence also than 1.5 times the median gap), are irregularly spaced
    (gaps differing by more than 1% of the median gap) or are sheared (gantry tilt of
    more than about 0.6 degrees). SimpleITK would otherwise spread the spacing over a
    missing slice.

    Args:
        folder: folder holding the DICOM files (sub-folders are not searched).
        series_uid: SeriesInstanceUID to read; needed when the folder holds several series.
        max_voxels: largest accepted number of voxels (rows x columns x slices).
        what: what the image is, used in error messages.
        files: read these files instead of the folder's (a series whose files an export split
            over several folders); ``folder`` then only names the series in messages.

    Returns:
        The image (spacing in mm, origin = ImagePositionPatient of the first slice, LPS).

    Raises:
        InputError: no image series, several series and no ``series_uid``, unknown
            ``series_uid``, inconsistent or missing slices, too many voxels, or an
            unreadable/invalid image; the message starts with the folder.
    """
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise InputError(f"the {what} DICOM folder does not exist" if not p.exists() else "is not a folder", p)
    series, skipped = _scan_dicom_folder(p) if files is None else _scan_dicom_files([Path(f) for f in files])
    infos = _series_infos(series)
    if not infos:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        if not detail:
            subfolders = sum(1 for e in os.scandir(p) if e.is_dir())
            detail = f"no files; it holds {subfolders} sub-folder(s), give one of them" if subfolders else "it is empty"
        raise InputError(f"no DICOM image series found in the {what} folder ({detail})", p)
    if series_uid is None:
        if len(infos) > 1:
            mri = all(i.modality.upper() == "MR" for i in infos)  # the batch sorts brain MRI series, not CT
            raise InputError(
                f"the {what} folder holds {len(infos)} DICOM series; give a folder that holds only the one you "
                "mean (move each series' files into a folder of its own)"
                + (", or run `deepedit batch` on it, which sorts MRI series by itself" if mri else "")
                + ". The series: " + _describe_series(infos),
                p,
            )
        info = infos[0]
    else:
        match = [i for i in infos if i.series_uid == series_uid]
        if not match:
            raise InputError(
                f"no DICOM series with UID {series_uid} in the {what} folder; it holds: " + _describe_series(infos), p
            )
        info = match[0]

    slices = _sorted_slices(series[info.series_uid][1])
    label = f"series {info.series_uid}"
    first = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first.orientation)) > 1e-4:
            raise InputError(f"the slices of {label} have different orientations ({s.path.name}, {first.path.name})", p)
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise InputError(f"the slices of {label} have different sizes ({s.path.name}, {first.path.name})", p)
        if len(s.pixel_spacing) != len(first.pixel_spacing) or np.max(
            np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing)), initial=0.0
        ) > 1e-4 * max(first.pixel_spacing, default=1.0):
            raise InputError(f"the slices of {label} have different pixel spacings ({s.path.name})", p)
    if first.samples != 1:
        raise InputError(f"{label} has {first.samples} samples per pixel (colour); a scalar image is needed", p)
    if len(slices) < 2:
        raise InputError(f"{label} has a single slice; a 3D volume is needed", p)
    nvox = first.rows * first.columns * len(slices)
    if nvox > max_voxels:
        raise InputError(
            f"{label} has {nvox:,} voxels ({first.columns}x{first.rows}x{len(slices)}), more than the limit of "
            f"{max_voxels:,}",
            p,
        )

    normal = slice_normal(first.orientation)
    positions = np.array([float(np.dot(s.position, normal)) for s in slices])
    gaps = np.diff(positions)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            f"{label}: {dup.size + 1} or more files share a slice position ({positions[i]:.3f} mm: "
            f"{slices[i].path.name}, {slices[i + 1].path.name}); the series holds several volumes "
            "(echoes, time points) or duplicates",
            p,
        )
    median = float(np.median(gaps))
    smallest = float(np.min(gaps))
    # A missing slice leaves a gap of about twice the others. The smallest gap is the
    # reference (the median alone misses a gap in a short series: gaps 1, 2 -> median 1.5).
    big = np.flatnonzero(gaps > 1.5 * smallest)
    if big.size:
        i = int(big[0])
        raise InputError(
            f"{label}: missing slice(s) between position {positions[i]:.3f} mm and {positions[i + 1]:.3f} mm "
            f"({slices[i].path.name}, {slices[i + 1].path.name}; gap {gaps[i]:.3f} mm, smallest gap "
            f"{smallest:.3f} mm)",
            p,
        )
    if float(np.max(gaps)) - smallest > 0.01 * median:
        i = int(np.argmax(np.abs(gaps - median)))
        raise InputError(
            f"{label}: irregular slice spacing ({gaps[i]:.4f} mm between positions {positions[i]:.3f} and "
            f"{positions[i + 1]:.3f} mm, {median:.4f} mm elsewhere); a regular grid is needed",
            p,
        )
    offsets = np.array([s.position - first.position for s in slices])
    lateral = offsets - np.outer(offsets @ normal, normal)
    shear = float(np.max(np.linalg.norm(lateral, axis=1)))
    extent = float(positions[-1] - positions[0])
    if shear > max(1e-2, 1e-2 * extent):
        angle = math.degrees(math.atan2(shear, extent))
        raise InputError(
            f"{label}: the slices are sheared (gantry tilt of about {angle:.1f} degrees); "
            "resample the series to an orthogonal grid first",
            p,
        )

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"cannot read {label}: {_sitk_message(e)}", p) from e
    _check_image(img, p, what)
    if np.max(np.abs(np.subtract(img.GetOrigin(), first.position))) > 1e-3 or abs(
        img.GetSpacing()[2] - median
    ) > 1e-3 * median:
        raise InputError(
            f"{label}: the geometry read by SimpleITK (origin {_fmt(img.GetOrigin())}, slice spacing "
            f"{img.GetSpacing()[2]:g} mm) does not match the slice positions (first {_fmt(first.position)}, "
            f"spacing {median:g} mm)",
            p,
        )
    return img


# ------------------------------------------------------------------------------ writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(
    path: PathLike,
    *,
    inputs: Sequence[PathLike] = (),
    overwrite: bool = False,
    allowed: Sequence[str] = SEGMENTATION_WRITE_EXTENSIONS,
) -> Path:
    """Check that ``path`` may be written, before any work is done.

    Args:
        path: the output file.
        inputs: input files/folders of the run; the output must not be one of them.
        overwrite: allow replacing an existing file.
        allowed: accepted extensions (case-insensitive, e.g. ``".nii.gz"``).

    Returns:
        The output path, absolute (its folder resolved).

    Raises:
        InputError: the folder does not exist or cannot be written, the extension is not
            allowed, the path is an input or a folder, or the file exists and ``overwrite`` is False.
    """
    p = Path(path).expanduser()
    parent = p.absolute().parent
    if not parent.is_dir():
        raise InputError(f"the output folder {parent} does not exist", p)
    if p.is_dir():
        raise InputError("the output path is a folder, not a file", p)
    name = p.name.lower()
    if not any(name.endswith(ext.lower()) and len(name) > len(ext) for ext in allowed):
        raise InputError(
            f"unsupported output file type '{_file_extension(p) or p.name}'; use one of {', '.join(allowed)}", p
        )
    for inp in inputs:
        if _same_file(p, Path(inp).expanduser()):
            raise InputError("the output path is one of the input files; writing it would destroy the input", p)
    if p.exists() and not overwrite:
        raise InputError("the output file already exists (use --overwrite to replace it)", p)
    if not os.access(parent, os.W_OK | os.X_OK):  # said now, not after minutes of work
        raise InputError(f"cannot write in the output folder {parent} (permission denied)", p)
    return parent.resolve() / p.name


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``path``; without ``overwrite`` never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if ``path`` exists
    except FileExistsError as e:
        raise InputError("the output file already exists (use --overwrite to replace it)", path) from e
    except OSError:
        # no hard links on this file system: check, then rename (a small race remains)
        if path.exists():
            raise InputError("the output file already exists (use --overwrite to replace it)", path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write, then move it onto ``path`` atomically.

    The temporary file is in the same folder and has the same extension as ``path``
    (so that writers choosing a format by extension behave the same). It is renamed onto
    ``path`` with ``os.replace`` when the ``with`` block ends without an exception, and
    deleted if anything fails, so a half-written output never appears.

    Args:
        path: the final output file.
        overwrite: allow replacing an existing file.

    Yields:
        The temporary path to write (not created yet).

    Raises:
        InputError: the folder does not exist, the file exists and ``overwrite`` is
            False (checked before and after writing), or the block wrote no file.
    """
    p = Path(path).expanduser()
    if not p.absolute().parent.is_dir():
        raise InputError(f"the output folder {p.absolute().parent} does not exist", p)
    if p.exists() and not overwrite:
        raise InputError("the output file already exists (use --overwrite to replace it)", p)
    ext = _file_extension(p)
    stem = p.name[: len(p.name) - len(ext)] if ext else p.name
    tmp = p.absolute().parent / f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext.lower()}"
    try:
        yield tmp
        if not tmp.is_file():
            raise InputError("the writer produced no file", p)
        _move_into_place(tmp, p, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_image(
    img: sitk.Image, path: PathLike, *, overwrite: bool = False, inputs: Sequence[PathLike] = ()
) -> Path:
    """Write an image atomically as ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` (compressed).

    NIfTI stores the geometry as float32; NRRD and MetaImage keep it in full precision.

    Args:
        img: the image to write (any dimension/pixel type the format supports).
        path: the output file.
        overwrite: allow replacing an existing file.
        inputs: input paths the output must not be.
        regions: optional overlapping regions ``[{"name", "color", "values": [label values]}]``
            (glioma ET/TC/WT): a ``.seg.nrrd`` then holds these regions as segments, one layer
            each (Slicer's layered binary labelmap), instead of one segment per label value;
            plain label-map formats keep the label values.

    Returns:
        The absolute output path.

    Raises:
        InputError: bad output path (see :func:`check_output_path`) or write failure.
    """
    if Path(path).name.lower().endswith(".seg.nrrd"):
        raise InputError("a .seg.nrrd file holds a segmentation; use write_segmentation", path)
    out = check_output_path(path, inputs=inputs, overwrite=overwrite, allowed=IMAGE_WRITE_EXTENSIONS)
    with atomic_output(out, overwrite) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), True)
        except RuntimeError as e:
            raise InputError(f"cannot write the image: {_sitk_message(e)}", out) from e
    return out


def _validate_segments(segments: Sequence[Dict[str, Any]], path: Path) -> List[Dict[str, Any]]:
    """Check and normalise segment descriptions; returns copies with typed values."""
    result = []
    seen: Dict[int, str] = {}
    if not segments:
        raise InputError("no segments given to describe the label map", path)
    for n, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise InputError(f"segment {n} must be a dict with value, name and color", path)
        value = seg.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 255:
            raise InputError(f"segment {n} has label value {value!r}; it must be an integer 1..255", path)
        value = int(value)
        if value in seen:
            raise InputError(
                f"label value {value} is used by two segments ('{seen[value]}', '{seg.get('name')}')", path
            )
        name = seg.get("name")
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\n\r|"):
            raise InputError(f"segment {n} (value {value}) has an invalid name {name!r}", path)
        color = seg.get("color")
        try:
            rgb = tuple(float(c) for c in color)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) != 3 or not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in rgb):
            raise InputError(f"segment '{name}' has colour {color!r}; it must be three numbers in 0..1", path)
        terminology = seg.get("terminology")
        if terminology is not None and not isinstance(terminology, str):
            raise InputError(f"segment '{name}' has a terminology that is not a string", path)
        seen[value] = name
        result.append({"value": value, "name": name, "color": rgb, "terminology": terminology})
    return result


def write_segmentation(
    label: sitk.Image,
    path: PathLike,
    segments: Sequence[Dict[str, Any]],
    *,
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
    regions: Sequence[Dict[str, Any]] = (),
) -> Path:
    """Write a label map atomically, as a Slicer segmentation or a plain uint8 label map.

    ``.seg.nrrd`` is written with slicerio as a Slicer segmentation (binary labelmap
    representation, one layer): each segment's name, colour, label value and optional
    terminology, plus the image geometry (LPS). ``.nii``, ``.nii.gz`` and ``.nrrd`` are
    written as a uint8 label map with the same geometry (segment names are not stored).

    Args:
        label: 3D scalar integer image; 0 is background, every other value must be
            described in ``segments``; values must be in 0..255.
        path: the output file (``.seg.nrrd``, ``.nii.gz``, ``.nii``, ``.nrrd``).
        segments: ``[{"value": int 1..255, "name": str, "color": (r, g, b) floats in
            0..1, "terminology": optional Slicer terminology entry string}]``.
        overwrite: allow replacing an existing file.
        inputs: input paths the output must not be.

    Returns:
        The absolute output path.

    Raises:
        InputError: bad output path, label image, segment description, or write failure.
    """
    p = Path(path)
    segs = _validate_segments(segments, p)
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the label map must be a 3D scalar image", p)
    if label.GetPixelID() not in _INTEGER_TYPES:
        raise InputError(f"the label map has pixel type '{label.GetPixelIDTypeAsString()}'; integers are needed", p)
    _check_geometry(label.GetSpacing(), np.array(label.GetDirection()), p, "label map")
    arr = sitk.GetArrayViewFromImage(label)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > 255:
        raise InputError(f"the label map has values {low}..{high}; they must be in 0..255", p)
    counts = np.zeros(256, dtype=np.int64)
    step = max(1, (1 << 22) // max(1, arr[0].size))
    for k in range(0, arr.shape[0], step):  # slab by slab: bincount copies to intp
        counts += np.bincount(arr[k : k + step].reshape(-1).astype(np.intp), minlength=256)
    present = np.flatnonzero(counts)
    unknown = sorted(set(int(v) for v in present) - {0} - {s["value"] for s in segs})
    if unknown:
        raise InputError(f"label value(s) {', '.join(map(str, unknown))} have no segment description", p)
    out = check_output_path(p, inputs=inputs, overwrite=overwrite, allowed=SEGMENTATION_WRITE_EXTENSIONS)
    label8 = label if label.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(label, sitk.sitkUInt8)

    if not out.name.lower().endswith(".seg.nrrd"):
        with atomic_output(out, overwrite) as tmp:
            try:
                sitk.WriteImage(label8, str(tmp), True)
            except RuntimeError as e:
                raise InputError(f"cannot write the label map: {_sitk_message(e)}", out) from e
        return out

    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(label8.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(label8.GetSpacing())
    ijk_to_lps[:3, 3] = label8.GetOrigin()
    slicer_segments = []
    for s in segs:
        entry: Dict[str, Any] = {
            "id": f"Segment_{s['value']}",
            "labelValue": s["value"],
            "layer": 0,
            "name": s["name"],
            "nameAutoGenerated": False,
            "color": [float(c) for c in s["color"]],
            "colorAutoGenerated": False,
        }
        if s["terminology"]:
            try:
                entry["terminology"] = terminology_entry_from_string(s["terminology"])
            except (IndexError, ValueError) as e:
                raise InputError(f"segment '{s['name']}' has a malformed terminology string", out) from e
        slicer_segments.append(entry)
    voxels = sitk.GetArrayFromImage(label8).transpose(2, 1, 0)
    if regions:
        layers = []
        slicer_segments = []
        for n, r in enumerate(regions):
            rgb = [float(c) for c in r["color"]]
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise InputError(f"region '{r.get('name')}' has colour {r.get('color')!r}; it must be three numbers in 0..1", out)
            layers.append(np.isin(voxels, [int(v) for v in r["values"]]).astype(np.uint8))
            slicer_segments.append({"id": f"Segment_{r['name']}", "labelValue": 1, "layer": n, "name": str(r["name"]),
                                    "nameAutoGenerated": False, "color": rgb, "colorAutoGenerated": False})
        voxels = np.stack(layers)
    segmentation = {
        # sitk arrays are [k, j, i]; slicerio wants [i, j, k] (written in Fortran order), layers first
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": slicer_segments,
    }
    with atomic_output(out, overwrite) as tmp:
        try:
            slicerio.write_segmentation(str(tmp), segmentation, compression_level=6)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise InputError(f"cannot write the segmentation: {e}", out) from e
    return out
