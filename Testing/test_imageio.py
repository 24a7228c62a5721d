"""Tests of SegmentationDeepEditLib.imageio: strict reading, DICOM series, atomic writing.

Broken files are made in tmp_path; real DICOM series come from the shared data folder
(fixture ``shared_data`` in conftest.py, which skips when it is absent).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio

from SegmentationDeepEditLib import imageio
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.imageio import (
    NO_SERIES_UID,
    atomic_output,
    check_image_values,
    check_output_path,
    list_dicom_series,
    read_dicom_series,
    read_image,
    write_image,
    write_segmentation,
)

# A signed axis permutation: exactly representable in every format (NIfTI qform included).
PERMUTED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
SPACING = (0.5, 1.25, 2.0)
ORIGIN = (-10.5, 20.25, 3.0)


def make_image(dtype=np.float32, size=(12, 10, 8), spacing=SPACING, origin=ORIGIN, direction=PERMUTED) -> sitk.Image:
    """A 3D image with distinct voxel values and the given geometry (size is i, j, k)."""
    rng = np.random.default_rng(0)
    arr = rng.uniform(-100, 100, size[::-1]).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def rotation(angle: float = 0.3) -> tuple:
    c, s = np.cos(angle), np.sin(angle)
    r = np.array([[c, -s, 0.0], [s * 0.8, c * 0.8, 0.6], [-s * 0.6, -c * 0.6, 0.8]])
    return tuple(r.ravel())


def expect_error(path: Path, *words: str, **kwargs) -> str:
    """read_image(path) must raise InputError naming the file and containing ``words``."""
    with pytest.raises(InputError) as info:
        read_image(path, **kwargs)
    assert info.value.path == str(path)
    assert str(info.value).startswith(str(path) + ": ")
    message = info.value.message  # without the path, which holds the test's name
    for word in words:
        assert word in message, message
    return message


@contextlib.contextmanager
def input_error(*words: str):
    """Like pytest.raises(InputError), checking ``words`` in the message without the path."""
    with pytest.raises(InputError) as info:
        yield info
    for word in words:
        assert word in info.value.message, info.value.message


def truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_round_trip_keeps_geometry_and_values(tmp_path, ext, dtype):
    img = make_image(dtype)
    out = write_image(img, tmp_path / f"img{ext}")
    assert out == (tmp_path / f"img{ext}").resolve()
    back = read_image(out)
    assert back.GetSize() == img.GetSize()
    assert back.GetSpacing() == img.GetSpacing()
    assert back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()
    assert back.GetPixelID() == img.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img{ext}"]


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_oblique_direction(tmp_path, ext):
    img = make_image(spacing=(0.8123, 0.9375, 3.3), origin=(-101.37, 55.5, -12.25), direction=rotation())
    back = read_image(write_image(img, tmp_path / f"obl{ext}"))
    # NIfTI stores the geometry as float32 (and a quaternion); NRRD and MHA keep doubles.
    tol = 1e-5 if ext == ".nii.gz" else 1e-12
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), rtol=tol)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4 if ext == ".nii.gz" else 1e-12)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=tol)


def test_real_nifti_reads(shared_data):
    img = read_image(shared_data / "brain-tumor" / "captk-flair" / "flair.nii.gz")
    assert img.GetDimension() == 3 and img.GetSize() == (96, 128, 96)


# ------------------------------------------------------------------------- broken inputs


def test_missing_file_and_what(tmp_path):
    message = expect_error(tmp_path / "nope.nii.gz", "does not exist", what="label")
    assert "label" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "photo.png"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(path))
    expect_error(path, "unsupported", ".png")


def test_garbage_with_image_extension(tmp_path):
    path = tmp_path / "garbage.nrrd"
    path.write_bytes(b"this is not an image\n" * 20)
    expect_error(path, "is not a NRRD file")
    path.write_bytes(b"NRRD0004\n" + b"zzz: not a field\n" * 20)  # the magic, then garbage
    expect_error(path, "cannot read the image header")


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, ext):
    path = tmp_path / f"cut{ext}"
    sitk.WriteImage(make_image(), str(path))
    truncate(path)
    expect_error(path, "is truncated")


def test_nifti_gzip_complete_but_data_short(tmp_path):
    # A valid gzip stream whose content is a truncated NIfTI (e.g. gzip of a cut .nii).
    raw = tmp_path / "full.nii"
    sitk.WriteImage(make_image(), str(raw))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw.read_bytes()[:-500]))
    message = expect_error(path, "truncated")
    assert "500 are" not in message  # reports the bytes found, not a fixed number
    assert "missing" in message


def test_nifti_named_gz_but_not_gzip(tmp_path):
    raw = tmp_path / "plain.nii"
    sitk.WriteImage(make_image(), str(raw))
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(raw.read_bytes())
    expect_error(path, "not gzip")


@pytest.mark.parametrize("ext,compress", [(".nrrd", False), (".nrrd", True), (".mha", False), (".mha", True)])
def test_truncated_nrrd_and_metaimage(tmp_path, ext, compress):
    path = tmp_path / f"cut{'_z' if compress else ''}{ext}"
    sitk.WriteImage(make_image(), str(path), compress)
    truncate(path, 0.7)
    expect_error(path, "is truncated")


def test_truncated_detached_nrrd(tmp_path):
    path = tmp_path / "det.nhdr"
    sitk.WriteImage(make_image(), str(path))
    data_files = [p for p in tmp_path.iterdir() if p.name != "det.nhdr"]
    assert len(data_files) == 1
    truncate(data_files[0], 0.5)
    expect_error(path, "is truncated")


@pytest.mark.parametrize("ext", [".nhdr", ".mhd"])
def test_detached_header_whose_data_file_is_gone(tmp_path, ext):
    # A header copied without its data file (.nhdr + .raw.gz, .mhd + .raw): name the missing file.
    path = tmp_path / f"det{ext}"
    sitk.WriteImage(make_image(), str(path))
    data_files = [p for p in tmp_path.iterdir() if p != path]
    assert len(data_files) == 1
    data_files[0].unlink()
    message = expect_error(path, "does not exist")
    assert data_files[0].name in message


def test_nan_voxels_in_nifti_are_refused(tmp_path):
    # SimpleITK turns NaN and inf NIfTI voxels into 0: the raw values must be checked.
    arr = np.ones((12, 10, 8), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.nan
    arr[7, 8, 1] = np.inf
    for name in ("nan.nii.gz", "nan.nii"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
        expect_error(path, "3 voxels", "NaN or infinite")


def test_nan_voxels_in_nrrd_are_refused(tmp_path):
    img = make_image()
    img[1, 2, 3] = float("nan")
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(img, str(path))
    expect_error(path, "1 voxels", "NaN or infinite")


def test_4d_file_is_refused_with_frame_count(tmp_path):
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 5), np.float32), np.eye(4)), str(path))
    expect_error(path, "has 5 frames (4D)", "single 3D volume")


def test_4d_with_one_frame_is_squeezed(tmp_path):
    img3 = make_image(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    img4 = sitk.JoinSeries([img3])  # size (12, 10, 8, 1)
    assert img4.GetDimension() == 4
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(img4, str(path))
    back = read_image(path)
    assert back.GetDimension() == 3 and back.GetSize() == img3.GetSize()
    assert back.GetSpacing() == img3.GetSpacing() and back.GetOrigin() == img3.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img3))


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(20, 30, sitk.sitkFloat32), str(path))
    expect_error(path, "2D", "3D volume")


def test_single_slice_volume_is_refused(tmp_path):
    path = tmp_path / "thin.nrrd"
    sitk.WriteImage(sitk.Image(20, 30, 1, sitk.sitkInt16), str(path))
    expect_error(path, "single slice")


def test_vector_image_is_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), str(path))
    expect_error(path, "3 components")


def test_zero_pixdim_nifti_is_refused(tmp_path):
    # niftilib (inside SimpleITK) would silently replace a pixdim of 0 by 1 mm.
    path = tmp_path / "ok.nii"
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    header = bytearray(path.read_bytes())
    struct.pack_into("<f", header, 76 + 4 * 2, 0.0)  # pixdim[2]
    bad = tmp_path / "zero.nii"
    bad.write_bytes(bytes(header))
    expect_error(bad, "pixdim) of (2, 0, 2) mm", "> 0 on every axis")


def write_nrrd(path: Path, directions: np.ndarray) -> None:
    """A 6x7x8 NRRD with the given space directions (rows: i, j, k axis vectors in LPS mm)."""
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": np.zeros(3),
        "kinds": ["domain"] * 3,
    }
    nrrd.write(str(path), np.ones((6, 7, 8), np.float32), header)


def test_zero_spacing_nrrd_is_refused(tmp_path):
    path = tmp_path / "zero.nrrd"
    directions = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 2.0]])
    write_nrrd(path, directions)
    expect_error(path, "spacing of (1, 0, 2) mm", "> 0 on every axis")


def test_skewed_nrrd_direction_is_refused(tmp_path):
    # SimpleITK reads this without complaint, with a non-orthonormal direction matrix.
    path = tmp_path / "skew.nrrd"
    directions = np.array([[1.0, 0, 0], [0.5, 1.0, 0], [0, 0, 2.0]])
    write_nrrd(path, directions)
    assert sitk.ReadImage(str(path)).GetSize() == (6, 7, 8)
    expect_error(path, "non-orthonormal")


def test_nifti_qform_sform_disagreement_is_refused(tmp_path):
    # SimpleITK follows the qform here and nibabel the sform: the origin is ambiguous.
    img = nib.Nifti1Image(np.ones((6, 7, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[:3, 3] = [5.0, 6.0, 7.0]
    img.set_qform(shifted, code=1)
    img.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=2)
    path = tmp_path / "forms.nii.gz"
    nib.save(img, str(path))
    expect_error(path, "qform", "sform")


def test_voxel_limit_is_checked_before_pixel_data(tmp_path, monkeypatch):
    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(make_image(), str(path))

    def no_pixels(self):
        raise AssertionError("pixel data must not be read when the header is over the limit")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_pixels)
    expect_error(path, "960 voxels", "limit of 500", max_voxels=500)


# ----------------------------------------------------------------------------------- DICOM


def _positions(files):
    """Positions along the slice normal, computed independently with pydicom."""
    out = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        position = np.array(ds.ImagePositionPatient, float)
        out[Path(f).name] = (float(np.dot(position, normal)), position)
    return out


def _link_series(src: Path, dst: Path, skip=()) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            os.symlink(f, dst / f"{src.name}-{f.name}")


def test_dicom_series_sorted_by_position(shared_data):
    folder = shared_data / "dicom" / "ge-t1-mprage"
    positions = _positions(sorted(folder.iterdir()))
    by_position = sorted(positions, key=lambda n: positions[n][0])
    assert by_position != sorted(positions)  # the file names are not in slice order

    (info,) = list_dicom_series(folder)
    assert info.n_files == 130 and info.modality == "MR"
    assert info.description == "3D Ax T1 MP-RAGE_R22"
    assert [f.name for f in info.files] == by_position

    img = read_image(folder)
    assert img.GetSize() == (256, 256, 130)
    assert img.GetSpacing()[2] == pytest.approx(1.2, abs=1e-4)
    assert img.GetSpacing()[:2] == pytest.approx((0.9375, 0.9375))
    np.testing.assert_allclose(img.GetOrigin(), positions[by_position[0]][1], atol=1e-4)
    last = img.TransformIndexToPhysicalPoint((0, 0, 129))
    np.testing.assert_allclose(last, positions[by_position[-1]][1], atol=1e-3)


def test_dicom_seg_and_non_dicom_files_are_ignored(shared_data):
    folder = shared_data / "dicom" / "ct-3slice-liver"
    (info,) = list_dicom_series(folder)  # liver-seg.dcm (SEG) and liver_seg.nrrd are not series
    assert info.n_files == 3 and info.modality == "CT"
    assert all(f.name != "liver-seg.dcm" for f in info.files)
    assert read_dicom_series(folder).GetSize() == (512, 512, 3)


def test_dicom_folder_with_two_series_says_what_to_do(shared_data, tmp_path):
    vendors = shared_data / "dicom" / "vendors"
    _link_series(vendors / "ge", tmp_path / "mixed")
    _link_series(vendors / "siemens", tmp_path / "mixed")
    infos = list_dicom_series(tmp_path / "mixed")
    assert len(infos) == 2 and all(i.n_files == 4 for i in infos)

    with pytest.raises(InputError) as err:
        read_image(tmp_path / "mixed")
    assert err.value.path == str(tmp_path / "mixed")
    message = err.value.message
    assert "2 DICOM series" in message and "give a folder that holds only the one you mean" in message
    assert "deepedit batch" in message  # MRI series: the batch sorts them
    for info in infos:
        assert info.series_uid in message
    assert message.count("4 files") == 2
    # two CT series (a scan and its copy as a second series): the brain-MRI batch is not offered
    import pydicom

    ct = tmp_path / "ct"
    ct.mkdir()
    for f in sorted((shared_data / "dicom" / "ct-3slice-liver").glob("0*.dcm")):
        for k in (1, 2):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + f".{k}"
            ds.save_as(ct / f"{k}-{f.name}")
    with pytest.raises(InputError) as err:
        read_image(ct)
    assert "2 DICOM series" in err.value.message and "deepedit batch" not in err.value.message
    ds = pydicom.dcmread(infos[0].files[0], stop_before_pixels=True)
    if str(ds.get("PatientName", "")):
        assert str(ds.PatientName) not in message

    chosen = read_dicom_series(tmp_path / "mixed", infos[1].series_uid)
    assert chosen.GetSize()[2] == 4
    with input_error("no DICOM series with UID 1.2.3"):
        read_dicom_series(tmp_path / "mixed", "1.2.3")


def test_dicom_series_whose_anonymiser_blanked_the_uids(shared_data, tmp_path):
    # Real exports (TotalSegmentator's Siemens test CT) arrive with SeriesInstanceUID and SOPClassUID
    # emptied: still one series, read like the original; two such volumes in one folder are refused.
    import pydicom

    source = shared_data / "dicom" / "ct-3slice-liver"
    original = read_image(source)
    anon = tmp_path / "anon"
    anon.mkdir()
    for f in sorted(source.glob("0*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.SOPClassUID = ""
        ds.save_as(anon / f.name)
    (info,) = list_dicom_series(anon)
    assert info.series_uid.startswith(NO_SERIES_UID) and info.n_files == 3
    image = read_image(anon)
    assert image.GetSize() == original.GetSize() and image.GetOrigin() == original.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    for f in sorted(anon.iterdir()):  # a second volume without UIDs at the same positions
        (anon / f"copy-{f.name}").write_bytes(f.read_bytes())
    with input_error("share a slice position"):
        read_image(anon)
    # two phases without UIDs whose slices follow on (no gap, no shared position) are never stacked
    # into one volume: their descriptions (or series times) tell them apart
    phases = tmp_path / "phases"
    phases.mkdir()
    files = sorted(source.glob("0*.dcm"))
    step = float(np.linalg.norm(np.subtract(pydicom.dcmread(files[1]).ImagePositionPatient,
                                            pydicom.dcmread(files[0]).ImagePositionPatient)))
    for phase, shift in (("ART", 0.0), ("VEN", 3 * step)):
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = ""
            ds.SeriesDescription = phase
            ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + shift]
            ds.save_as(phases / f"{phase}-{f.name}")
    assert sorted(i.n_files for i in list_dicom_series(phases)) == [3, 3]
    with input_error("holds 2 DICOM series"):
        read_image(phases)
    # the same description, told apart by their series times (a repeated acquisition)
    for f in phases.glob("VEN-*"):
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = "ART"
        ds.SeriesTime = "235959"
        ds.save_as(f)
    assert sorted(i.n_files for i in list_dicom_series(phases)) == [3, 3]


def test_dicom_missing_middle_slice(shared_data, tmp_path):
    folder = shared_data / "dicom" / "ge-t1-mprage"
    (info,) = list_dicom_series(folder)
    removed = info.files[60].name
    _link_series(folder, tmp_path / "gap", skip={removed})
    with pytest.raises(InputError) as err:
        read_image(tmp_path / "gap")
    assert err.value.path == str(tmp_path / "gap")
    message = err.value.message
    assert "missing slice(s) between position" in message
    assert f"ge-t1-mprage-{info.files[59].name}" in message
    assert f"ge-t1-mprage-{info.files[61].name}" in message


def test_dicom_missing_slice_in_short_series(shared_data, tmp_path):
    # 3 slices left: gaps 1x and 2x; the median (1.5x) alone would not flag it.
    (info,) = list_dicom_series(shared_data / "dicom" / "vendors" / "philips")
    _link_series(shared_data / "dicom" / "vendors" / "philips", tmp_path / "p", skip={info.files[1].name})
    with input_error("missing slice"):
        read_dicom_series(tmp_path / "p")


def test_dicom_voxel_limit_and_empty_folder(shared_data, tmp_path):
    folder = shared_data / "dicom" / "vendors" / "hitachi"
    with input_error("more than the limit"):
        read_image(folder, max_voxels=1000)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    with input_error("no DICOM image series"):
        read_image(tmp_path / "empty")


# ---------------------------------------------------------------------------------- output


def test_check_output_path(tmp_path):
    existing = tmp_path / "seg.nii.gz"
    existing.write_bytes(b"old")
    with input_error("already exists") as err:
        check_output_path(existing)
    assert str(existing) in str(err.value)
    assert check_output_path(existing, overwrite=True) == existing.resolve()

    with input_error("does not exist") as err:
        check_output_path(tmp_path / "no" / "such" / "out.nii.gz")
    assert "out.nii.gz" in str(err.value)

    with input_error("unsupported output"):
        check_output_path(tmp_path / "out.png")

    image = tmp_path / "image.nrrd"
    image.write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "image.nrrd"
    with input_error("input"):
        check_output_path(same, inputs=[image], overwrite=True)

    assert check_output_path(tmp_path / "a.seg.nrrd") == tmp_path.resolve() / "a.seg.nrrd"
    assert image.read_bytes() == b"input"


def test_write_image_refuses_existing_and_overwrites_on_request(tmp_path):
    path = tmp_path / "out.nrrd"
    path.write_bytes(b"keep me")
    with input_error("already exists"):
        write_image(make_image(), path)
    assert path.read_bytes() == b"keep me"
    write_image(make_image(), path, overwrite=True)
    assert read_image(path).GetSize() == (12, 10, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    old = tmp_path / "out.nii.gz"
    old.write_bytes(b"previous result")

    def broken_write(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(imageio.sitk, "WriteImage", broken_write)
    with input_error("disk full"):
        write_image(make_image(), old, overwrite=True)
    with input_error("disk full"):
        write_image(make_image(), tmp_path / "new.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert old.read_bytes() == b"previous result"


def test_atomic_output(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(ValueError):
        with atomic_output(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".json")
            tmp.write_text("{")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with input_error("no file"):
        with atomic_output(target):
            pass
    with atomic_output(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}" and list(tmp_path.iterdir()) == [target]
    with input_error("already exists"):
        with atomic_output(target):
            pass
    other = tmp_path / "other.json"
    with input_error("already exists"):
        with atomic_output(other) as tmp:
            tmp.write_text("mine")
            other.write_text("written meanwhile by someone else")
    assert other.read_text() == "written meanwhile by someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "report.json"]
    with atomic_output(tmp_path / "x.seg.nrrd", overwrite=True) as tmp:
        assert tmp.name.endswith(".seg.nrrd")
        tmp.write_bytes(b"1")


SEGMENTS = [
    {"value": 1, "name": "tumor core", "color": (1.0, 0.0, 0.0)},
    {
        "value": 2,
        "name": "edema",
        "color": (0.2, 0.6, 0.9),
        "terminology": "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^49755003^Morphologically Altered Structure~SCT^79654002^Edema~^^~~^^~^^",
    },
]


def make_label() -> sitk.Image:
    arr = np.zeros((8, 10, 12), np.uint8)
    arr[2:5, 3:6, 4:8] = 1
    arr[5:7, 1:4, 2:3] = 2
    label = sitk.GetImageFromArray(arr)
    label.SetSpacing(SPACING)
    label.SetOrigin(ORIGIN)
    label.SetDirection(rotation())
    return label


def test_seg_nrrd_round_trip_through_slicerio(tmp_path):
    label = make_label()
    path = write_segmentation(label, tmp_path / "result.seg.nrrd", SEGMENTS)
    seg = slicerio.read_segmentation(str(path))
    by_value = {s["labelValue"]: s for s in seg["segments"]}
    assert sorted(by_value) == [1, 2]
    assert by_value[1]["name"] == "tumor core" and by_value[2]["name"] == "edema"
    np.testing.assert_allclose(by_value[1]["color"], (1.0, 0.0, 0.0))
    np.testing.assert_allclose(by_value[2]["color"], (0.2, 0.6, 0.9))
    assert by_value[2]["terminology"]["type"][1] == "79654002"
    np.testing.assert_array_equal(seg["voxels"], sitk.GetArrayFromImage(label).transpose(2, 1, 0))
    expected = np.eye(4)
    expected[:3, :3] = np.array(label.GetDirection()).reshape(3, 3) @ np.diag(label.GetSpacing())
    expected[:3, 3] = label.GetOrigin()
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-12)

    back = read_image(path, what="label")  # also a plain NRRD for SimpleITK
    np.testing.assert_allclose(back.GetDirection(), label.GetDirection(), atol=1e-12)
    assert back.GetOrigin() == pytest.approx(label.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_label_map_written_as_uint8(tmp_path, ext):
    label = sitk.Cast(make_label(), sitk.sitkInt32)
    path = write_segmentation(label, tmp_path / f"lab{ext}", SEGMENTS)
    back = read_image(path)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))


def test_write_segmentation_refuses_bad_input(tmp_path):
    label = make_label()
    with input_error("label value(s) 2 have no segment"):
        write_segmentation(label, tmp_path / "a.seg.nrrd", SEGMENTS[:1])
    with input_error("colour"):
        write_segmentation(label, tmp_path / "a.seg.nrrd", [dict(SEGMENTS[0], color=(255, 0, 0)), SEGMENTS[1]])
    with input_error("used by two segments"):
        write_segmentation(label, tmp_path / "a.seg.nrrd", [SEGMENTS[0], dict(SEGMENTS[1], value=1)])
    with input_error("unsupported output"):
        write_segmentation(label, tmp_path / "a.mha", SEGMENTS)
    with input_error("write_segmentation"):
        write_image(label, tmp_path / "a.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_a_label_map_given_as_an_image_is_refused_and_a_quantised_scan_is_not(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 24, 28), np.uint8)
    labels[5:15, 6:18, 7:20] = 2
    labels[8:12, 9:14, 10:16] = 4
    labels[9:11, 10:12, 11:13] = 1
    for dtype in (np.uint8, np.int16, np.float32):  # a label map saved as floats is still one
        with pytest.raises(InputError, match="looks like a label map, not an image: its voxels hold only the values "
                                             "0, 1, 2, 4") as e:
            check_image_values(sitk.GetImageFromArray(labels.astype(dtype)), tmp_path / "seg.nii.gz", "input 't1c'")
        assert "seg.nii.gz" in str(e.value)
    mask = (labels > 0).astype(np.uint8)
    with pytest.raises(InputError, match="only the values 0, 1 "):
        check_image_values(sitk.GetImageFromArray(mask), None, "image")
    # a scan stored as small integers (an 8-bit export) has many values; fractional values are no label
    check_image_values(sitk.GetImageFromArray(rng.integers(0, 255, labels.shape).astype(np.uint8)), None, "image")
    check_image_values(sitk.GetImageFromArray((labels * 0.37).astype(np.float32)), None, "image")


def test_a_real_expert_label_given_as_the_t1c_is_refused_by_segment(shared_data, tmp_path, capsys):
    from SegmentationDeepEditLib.cli import main

    case = shared_data / "brain-tumor" / "brats2013-pat0004"
    out = tmp_path / "out.nii.gz"
    code = main(["segment", "--model", "glioma-regions", "--input", f"t1c={case / 'seg.nii.gz'}",
                 "--input", f"flair={case / 'flair.nii.gz'}", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "seg.nii.gz: the input 't1c' looks like a label map" in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
