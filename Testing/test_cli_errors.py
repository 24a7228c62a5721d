"""Every bad input: a one-line error naming the file and the problem, exit code 1, no output."""

import gzip
import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.bundle import load_bundle
from SegmentationDeepEditLib.cli import main

PTS = [[10, 20, 30], [40, 20, 30], [25, 8, 30], [25, 35, 30], [25, 20, 15], [25, 20, 45]]


@pytest.fixture
def case(tmp_path):
    arr = np.random.default_rng(0).normal(size=(48, 48, 48)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    (tmp_path / "pts.json").write_text(json.dumps(PTS))
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, out: Path, argv, *needles):
    code, err = run(capsys, *argv)
    assert code == 1, f"exit code {code}, stderr: {err}"
    lines = [l for l in err.splitlines() if "error" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert not out.exists(), "an output file was written despite the error"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name.lower()], "temporary files left"


def _annotate(case, image, points=None, out=None):
    return ["annotate", "--image", image, "--points", points or case / "pts.json", "-o", out or case / "out.seg.nrrd"]


def test_truncated_nifti(case, capsys):
    raw = (case / "img.nii.gz").read_bytes()
    (case / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "trunc.nii.gz"), "trunc.nii.gz")


def test_truncated_uncompressed_nifti(case, capsys):
    sitk.WriteImage(sitk.ReadImage(str(case / "img.nii.gz")), str(case / "plain.nii"))
    raw = (case / "plain.nii").read_bytes()
    (case / "plain.nii").write_bytes(raw[:-1000])
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "plain.nii"), "plain.nii")


def test_nan_voxels(case, capsys):
    arr = np.zeros((48, 48, 48), np.float32)
    arr[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(case / "nan.nii.gz"))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "nan.nii.gz"), "nan.nii.gz")


def test_4d_file_names_its_frames(case, capsys):
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 3), np.float32), np.eye(4)), str(case / "four.nii.gz"))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "four.nii.gz"), "four.nii.gz", "3 frames")


def test_2d_image(case, capsys):
    sitk.WriteImage(sitk.Image(30, 30, sitk.sitkFloat32), str(case / "flat.nrrd"))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "flat.nrrd"), "flat.nrrd", "2D")


def test_zero_spacing(case, capsys):
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), str(case / "zero.nii"))
    raw = bytearray((case / "zero.nii").read_bytes())
    struct.pack_into("<f", raw, 76 + 3 * 4, 0.0)  # pixdim[3] = 0: the third axis has no spacing
    (case / "zero.nii").write_bytes(bytes(raw))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "zero.nii"), "zero.nii", "spacing")


@pytest.mark.parametrize("n", [5, 7])
def test_wrong_point_count(case, capsys, n):
    pts = (PTS + [[20, 20, 20]])[:n]
    (case / f"p{n}.json").write_text(json.dumps(pts))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz", case / f"p{n}.json"),
                   f"p{n}.json", f"got {n}")


def test_point_outside(case, capsys):
    pts = [list(p) for p in PTS]
    pts[2] = [25, -30, 30]
    (case / "out.json").write_text(json.dumps(pts))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz", case / "out.json"),
                   "out.json", "point 3", "outside")


def test_points_on_one_plane(case, capsys):
    (case / "plane.json").write_text(json.dumps([[p[0], 20, p[2]] for p in PTS]))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz", case / "plane.json"),
                   "plane.json", "one plane")


def test_markups_without_points(case, capsys):
    (case / "none.mrk.json").write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": []}]}))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz", case / "none.mrk.json"),
                   "none.mrk.json", "no control points")


def test_corrupt_weights(case, capsys):
    src = load_bundle(None).path
    dst = case / "bundle"
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x55
    w.write_bytes(bytes(data))
    argv = _annotate(case, case / "img.nii.gz") + ["--model", dst]
    assert_refused(capsys, case / "out.seg.nrrd", argv, "model.safetensors", "SHA-256")


def test_output_in_missing_folder(case, capsys):
    out = case / "missing" / "out.seg.nrrd"
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=out))
    assert code == 1 and "missing" in err and not out.exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(case, capsys, monkeypatch):
    """Said at once, naming the folder (not after inference, naming a temporary file). Tests run as root, which
    may write anywhere: the permission check is simulated."""
    import os

    from SegmentationDeepEditLib import annotate

    ro = case / "read-only"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    monkeypatch.setattr(annotate, "predict", lambda *a, **k: pytest.fail("the model ran before the output was checked"))
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=ro / "out.seg.nrrd"))
    assert code == 1 and f"cannot write in the output folder {ro} (permission denied)" in err, err
    assert list(ro.iterdir()) == []


def test_output_equal_to_input(case, capsys):
    before = (case / "img.nii.gz").read_bytes()
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=case / "img.nii.gz"))
    assert code == 1 and "img.nii.gz" in err
    assert (case / "img.nii.gz").read_bytes() == before, "the input was touched"


def test_existing_output_needs_overwrite(case, capsys):
    (case / "out.seg.nrrd").write_text("keep me")
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz"))
    assert code == 1 and "overwrite" in err
    assert (case / "out.seg.nrrd").read_text() == "keep me"


def test_unknown_model(case, capsys):
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz") + ["--model", "no-such-model"], "no-such-model")


def test_blank_image(case, capsys):
    sitk.WriteImage(sitk.Image([48, 48, 48], sitk.sitkFloat32), str(case / "blank.nii.gz"))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "blank.nii.gz"),
                   "blank.nii.gz", "is blank: every voxel holds the value 0")


def test_corrective_click_outside(case, capsys):
    (case / "pos.json").write_text(json.dumps([[25, 20, 30], [500, 500, 500]]))
    assert_refused(capsys, case / "out.seg.nrrd", _annotate(case, case / "img.nii.gz") + ["--positive", case / "pos.json"],
                   "pos.json", "positive click 2", "outside the image")


def test_upper_case_nifti_output_is_written(case, capsys):
    """`.NII.GZ` passed the extension check, then failed after inference (the temporary file kept the case)."""
    out = case / "OUT.NII.GZ"
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=out))
    assert code == 0, err
    assert sitk.ReadImage(str(out)).GetSize() == (48, 48, 48)
    assert sorted(p.name for p in case.iterdir()) == ["OUT.NII.GZ", "img.nii.gz", "pts.json"]


def test_output_folder_blocked_by_a_file_is_exit_1_not_an_internal_error(case, capsys):
    (case / "f.txt").write_text("x")
    sitk.WriteImage(sitk.ReadImage(str(case / "img.nii.gz")) > 1.0, str(case / "mask.nii.gz"))
    cases = {"cases": [{"image": "img.nii.gz", "label": "mask.nii.gz", "convention": "binary", "regions": ["object"]}]}
    (case / "c.json").write_text(json.dumps(cases))
    for argv in (["evaluate", "--cases", case / "c.json", "--data-root", case, "-o", case / "f.txt" / "sub"],
                 ["demo", "-o", case / "f.txt" / "sub"]):
        code, err = run(capsys, *argv)
        assert code == 1 and "f.txt" in err and "internal error" not in err and "Traceback" not in err, err


def _train_config(tmp_path, **changes):
    from test_train import _config

    cfg = dict(_config(), **changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "cfg.json"


@pytest.mark.parametrize("changes,extra,needle", [
    ({"steps": None}, [], "'steps' must be a positive whole number"),
    ({"data": []}, [], "'data' must be a non-empty list"),
    ({"data": [{"synthetic": "brain"}]}, [], "data source 1: 'cases'"),
    ({"bundle": None}, [], "'bundle'"),
    ({}, ["--steps", "0"], "--steps must be 1 or more"),
    ({}, ["--workers", "-2"], "--workers must be 0"),
    ({}, ["--resume"], "nothing to resume"),
])
def test_train_bad_config_or_options_exit_1_and_leave_no_run_folder(tmp_path, capsys, changes, extra, needle):
    cfg = _train_config(tmp_path, **changes)
    code, err = run(capsys, "train", cfg, "--run-dir", tmp_path / "run", *extra)
    assert code == 1 and needle in err and "internal error" not in err, err
    assert not (tmp_path / "run").exists()


def test_train_config_not_an_object_or_run_folder_a_file(tmp_path, capsys):
    (tmp_path / "list.json").write_text("[]")
    code, err = run(capsys, "train", tmp_path / "list.json", "--run-dir", tmp_path / "run")
    assert code == 1 and "list.json" in err and "JSON object" in err, err
    cfg = _train_config(tmp_path)
    code, err = run(capsys, "train", cfg, "--run-dir", cfg)
    assert code == 1 and "is a file" in err and not (tmp_path / "run").exists(), err


def test_annotate_names_the_segment_as_asked(case, capsys):
    """The models are class-agnostic: a liver outlined with six points was always written as 'Tumor core'."""
    import slicerio

    out = case / "liver.seg.nrrd"
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=out), "--name", "Liver")
    assert code == 0, err
    seg = slicerio.read_segmentation(str(out))["segments"][0]
    assert seg["name"] == "Liver" and "terminology" not in seg  # the model's 'Mass' terminology is not kept
    code, err = run(capsys, *_annotate(case, case / "img.nii.gz", out=case / "default.seg.nrrd"))
    assert code == 0 and slicerio.read_segmentation(str(case / "default.seg.nrrd"))["segments"][0]["name"] == "Tumor core"


def test_json_mode_reports_a_failure_on_stdout_too(case, capsys):
    """With --json a failed command printed nothing on stdout: a script parsing it got no JSON at all."""
    out = case / "out.nii.gz"
    code = main(["annotate", "--image", str(case / "missing.nii.gz"), "--points", str(case / "pts.json"),
                 "-o", str(out), "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 1 and report["command"] == "annotate" and report["exit_code"] == 1
    assert report["error"].endswith("missing.nii.gz: the image does not exist"), report
    assert not report["error"].startswith("error")  # the field says it is one
    assert "missing.nii.gz" in captured.err and not out.exists()
    # without --json, stdout stays empty on an error
    assert main(["annotate", "--image", str(case / "missing.nii.gz"), "--points", str(case / "pts.json"), "-o", str(out)]) == 1
    assert capsys.readouterr().out == ""
