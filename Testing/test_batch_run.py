"""Tests of the batch run: outputs, no patient data, kill + resume, bad studies, workers, Dask, CLI.

Input studies are built from real pixels (``brain-tumor/tcga-du-7294`` at 2 mm, protocol slice
thicknesses, in-plane voxels doubled to stay small) with known head motions: a DICOM study with a
localizer, an ADC map, a DICOMDIR and a text file, and a NIfTI study with a sagittal T1 and a label
map. Every run here uses ``--spacing 2`` and ``--model none`` (or a stand-in threshold model).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fixtures_batch as fb
from SegmentationDeepEditLib import cli
from SegmentationDeepEditLib.batch import segment as segment_mod
from SegmentationDeepEditLib.batch.register import read_transform
from SegmentationDeepEditLib.batch.run import (EXIT_NOTHING_DONE, EXIT_OK, EXIT_SOME_FAILED, BatchOptions, run_batch)
from SegmentationDeepEditLib.batch.segment import NO_MODEL, Segmenter, resolve_segment_step
from SegmentationDeepEditLib.errors import InputError, ModelError
from SegmentationDeepEditLib.imageio import read_image

pytestmark = pytest.mark.realdata

CASE = "brain-tumor/tcga-du-7294"
OPTIONS = BatchOptions(spacing_mm=2.0, model="none")
CLI_OPTIONS = ["--spacing", "2", "--model", "none"]  # the same options on the command line
REPO = Path(__file__).resolve().parents[1]


def _build(case, root: Path, name: str, **kw) -> fb.StudyTruth:
    return fb.build_study(case, root, name, base_mm=2.0, inplane_factor=2.0, **kw)


def _snapshot(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{oct(st.st_mode)}\n".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory):
    """The main input folder (two studies) and an edge-case folder (corrupt series, no T1c, repeated series)."""
    case = fb.load_case_cached(str(shared_data / CASE), 2.0)
    root = tmp_path_factory.mktemp("batch")
    main = root / "in"
    truths = {
        "case-a": _build(case, main, "case-a", sequences=("t1c", "t2", "flair"), fmt="dicom", seed=11),
        "case-b": _build(case, main, "case-b", sequences=("t1c", "t1", "t2"), fmt="nifti", seed=12),
    }
    edge = root / "edge"
    corrupt = _build(case, edge, "corrupt", sequences=("t1c", "t2", "flair"), fmt="dicom", seed=21, extras=False)
    slices = sorted((corrupt.folder / Path(corrupt.files["flair"][0]).parent).iterdir())
    data = slices[len(slices) // 2].read_bytes()
    slices[len(slices) // 2].write_bytes(data[: len(data) // 2])  # a truncated slice file
    _build(case, edge, "no-t1c", sequences=("t2", "flair"), fmt="nifti", seed=22, extras=False)
    # the same T2 description twice: the later series (number 9) is the one to use
    dup = _build(case, edge, "repeat", sequences=("t1c", "t2"), fmt="dicom", seed=23, extras=False)
    rng = np.random.default_rng(24)
    centre = fb.brain_centre(case)
    motion = fb.random_motion(rng, centre)
    again = fb.acquire(case.images["t2"], motion, [1.6, 1.2, 5.0], centre_mm=motion.TransformPoint(centre),
                       fov_mm=[170, 200, 140], direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), rng=rng, base_mm=2.0)
    p = fb.PROTOCOL["t2"]
    fb.write_dicom_series(again, dup.folder / "S0090", study_uid=fb._uid("study", "repeat", 23),
                          series_uid=fb._uid("again", "repeat"), description=p["description"], series_number=9,
                          tags=p["tags"], rng=rng)
    dup.transforms["t2-again"] = fb.euler_to_list(motion)
    return {"root": root, "main": main, "edge": edge, "truths": truths, "repeat": dup, "case": case,
            "snapshot": _snapshot(main)}


@pytest.fixture(scope="module")
def baseline(inputs):
    """One uninterrupted single-process run of the main input."""
    out = inputs["root"] / "baseline"
    t0 = time.perf_counter()
    result = run_batch(inputs["main"], out, options=OPTIONS)
    print(f"\nbaseline batch: {len(result.studies)} studies in {time.perf_counter() - t0:.1f} s")
    return out, result


def _rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_outputs_of_a_run(inputs, baseline):
    out, result = baseline
    assert result.exit_code == EXIT_OK and [s["state"] for s in result.studies] == ["done", "done"]
    assert _snapshot(inputs["main"]) == inputs["snapshot"], "the input folder was modified"
    assert sorted(p.name for p in out.iterdir()) == ["case-a", "case-b", "errors.csv", "manifest.json", "summary.csv"]
    expected = {"case-a": ["t1c", "t2", "flair"], "case-b": ["t1c", "t1", "t2"]}
    print("\nregistration error of the 2 mm batch fixtures (from the written .tfm files):")
    for name, seqs in expected.items():
        folder = out / name
        report = json.loads((folder / "report.json").read_text())
        assert report["study"] == name and report["reference"]["sequence"] == "t1c"
        assert sorted(report["files"]) == sorted(
            ["qc.png", "report.json"] + [f"registered/{s}.nii.gz" for s in seqs]
            + [f"transforms/{s}.tfm" for s in seqs if s != "t1c"])
        assert report["segmentation"]["status"] == "not segmented"
        ref = read_image(folder / "registered" / "t1c.nii.gz")
        assert ref.GetSpacing() == (2.0, 2.0, 2.0)
        for seq in seqs:
            img = read_image(folder / "registered" / f"{seq}.nii.gz")
            assert img.GetSize() == ref.GetSize() and np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
            if seq == "t1c":
                continue
            entry = report["sequences"][seq]
            assert entry["status"] == "ok" and entry["quality"]["edge_correlation"] > 0.35
            tf = read_transform(folder / "transforms" / f"{seq}.tfm")
            mean, worst = fb.registration_error_mm(tf, inputs["truths"][name].transform(seq), inputs["case"].brain)
            print(f"  {name} {seq:6s} {'x'.join(f'{v:g}' for v in inputs['truths'][name].spacing[seq]):12s} "
                  f"mean {mean:.2f} mm, max {worst:.2f} mm, {report['seconds']['register'][seq]:.1f} s")
            assert mean < 1.5
        roles = {s["name"]: s["role"] for s in report["series"]}
        for s in report["series"]:
            assert len(s["sha256"]) == 64
        if name == "case-a":
            assert roles["AAHead_Scout_64ch-head-coil"] == "ignored"
            assert roles["ep2d_diff_3scan_trace_p2_ADC"] == "ignored"
            assert report["ignored_files"] == 2  # DICOMDIR, notes.txt
        else:
            assert roles["case-b-seg.nii.gz"] == "ignored" and roles["case-b-t1n.nii.gz"] == "used"
    summary = _rows(out / "summary.csv")
    assert [r["study"] for r in summary] == ["case-a", "case-b"]
    assert all(r["status"] == "done" and r["needs_review"] == "no" and r["registered"] == "2" for r in summary)
    assert _rows(out / "errors.csv") == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: v["state"] for k, v in manifest["studies"].items()} == {"case-a": "done", "case-b": "done"}


def test_no_patient_data_or_uids_in_outputs(inputs, baseline):
    out, _ = baseline
    secrets = [fb.FAKE_PATIENT_NAME, fb.FAKE_PATIENT_ID, "Zyxwvut", fb._uid("study", "case-a", 11),
               fb._uid("series", "case-a", "t2", 11)]
    assert fb.files_containing(out, secrets) == []


def _kill_when_busy(cmd, out: Path, timeout: float = 300.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as a study has written a registered volume into its temporary folder."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if out.is_dir() and any(out.glob(".deepedit-tmp-*/registered/*.nii.gz")):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return
            if proc.poll() is not None:
                pytest.fail(f"the batch ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.02)
        pytest.fail("no study output appeared in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigkill_mid_study_then_resume_gives_the_uninterrupted_outputs(inputs, baseline, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "SegmentationDeepEditLib.cli", "batch", str(inputs["main"]), "-o", str(out), *CLI_OPTIONS]
    _kill_when_busy(cmd, out)
    leftovers = list(out.glob(".deepedit-tmp-*"))
    assert leftovers, "the kill left no temporary study folder (it should have been mid-study)"
    manifest = json.loads((out / "manifest.json").read_text())
    assert "running" in {v["state"] for v in manifest["studies"].values()}
    with pytest.raises(InputError, match="use --resume"):
        run_batch(inputs["main"], out, options=OPTIONS)
    result = run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    assert result.exit_code == EXIT_OK
    assert not list(out.glob(".deepedit-tmp-*")) and not list(out.rglob(".*.tmp*"))
    assert fb.output_differences(baseline[0], out) == []


def test_sigterm_stops_the_worker_processes_and_leaves_nothing_half_done(inputs, baseline, tmp_path):
    """SIGTERM to a `--workers 2` run (a scheduler or service stop) killed the main process only: its workers went
    on, wrote studies that no manifest recorded, then idled forever with parent PID 1."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "SegmentationDeepEditLib.cli", "batch", str(inputs["main"]), "-o", str(out),
           "--workers", "2", *CLI_OPTIONS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.is_dir() and any(out.glob(".deepedit-tmp-*/registered/*.nii.gz"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-500:]
            assert time.monotonic() < deadline, "no study output appeared in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)  # the main process only, not its group
        assert proc.wait(60) == 143
        assert "terminated" in proc.stderr.read().decode()
        for _ in range(100):  # the workers are gone with it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("worker processes outlived the terminated batch")
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list(out.glob(".deepedit-tmp-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    done = {k for k, v in manifest["studies"].items() if v["state"] == "done"}
    assert "running" not in {v["state"] for v in manifest["studies"].values()}
    assert {p.name for p in out.iterdir() if p.is_dir()} == done  # no unrecorded study folder
    assert not (out / ".deepedit-batch.lock").exists()
    result = run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    assert result.exit_code == EXIT_OK and fb.output_differences(baseline[0], out) == []


def test_resume_skips_intact_studies_and_redoes_damaged_ones(inputs, baseline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    target = out / "case-b" / "registered" / "t2.nii.gz"
    target.write_bytes(target.read_bytes()[:1000])  # a half-written file
    before_a = (out / "case-a" / "report.json").stat().st_mtime_ns
    with pytest.raises(InputError, match="other options.*spacing_mm"):
        run_batch(inputs["main"], out, options=BatchOptions(spacing_mm=1.0, model="none"), resume=True)
    with pytest.raises(InputError, match="model: 'none' then, the default model now"):  # not Python's None
        run_batch(inputs["main"], out, options=BatchOptions(spacing_mm=2.0), resume=True)
    with pytest.raises(InputError, match="other options.*spacing_mm"):  # the dry run of a resume says it too
        run_batch(inputs["main"], out, options=BatchOptions(spacing_mm=1.0, model="none"), resume=True, dry_run=True)
    assert run_batch(inputs["main"], out, options=OPTIONS, resume=True, dry_run=True).exit_code == EXIT_OK
    lock = out / ".deepedit-batch.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live run holds the folder
    with pytest.raises(InputError, match="another batch run"):
        run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    lock.write_text("999999999 " + socket.gethostname() + "\n")  # a dead run's lock is taken over
    result = run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    assert not lock.exists()
    states = {s["study"]: (s["state"], s["skipped"]) for s in result.studies}
    assert states == {"case-a": ("done", True), "case-b": ("done", False)}
    assert (out / "case-a" / "report.json").stat().st_mtime_ns == before_a
    assert fb.output_differences(baseline[0], out) == []
    # a finished run resumed again does nothing and is still "all ok"
    again = run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    assert again.exit_code == EXIT_OK and all(s["skipped"] for s in again.studies)


def test_bad_studies_are_recorded_and_do_not_stop_the_run(inputs, tmp_path):
    out = tmp_path / "out"
    seg = Segmenter(fb.threshold_segmenter, ("t1c", "t2"), "threshold-test", "1.0.0")
    result = run_batch(inputs["edge"], out, options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert result.exit_code == EXIT_SOME_FAILED
    states = {s["study"]: s["state"] for s in result.studies}
    assert states == {"corrupt": "done", "no-t1c": "failed", "repeat": "done"}
    summary = {r["study"]: r for r in _rows(out / "summary.csv")}
    errors = _rows(out / "errors.csv")
    # a corrupt series: the study goes on without it, and says so
    assert summary["corrupt"]["unreadable"] == "1" and summary["corrupt"]["needs_review"] == "yes"
    corrupt_err = [e for e in errors if e["study"] == "corrupt"]
    assert len(corrupt_err) == 1 and corrupt_err[0]["stage"] == "read"
    assert "t2_tirm_tra_dark-fluid" in corrupt_err[0]["series"] and "cannot read" in corrupt_err[0]["error"]
    assert "1.2.826" not in corrupt_err[0]["error"] and str(inputs["edge"]) not in corrupt_err[0]["error"]
    assert (out / "corrupt" / "segmentation.seg.nrrd").is_file()  # T1c and T2 were fine
    assert not (out / "corrupt" / "registered" / "flair.nii.gz").exists()
    # a study without T1c: failed, with the reason, and no output folder
    no_ref = [e for e in errors if e["study"] == "no-t1c"]
    assert len(no_ref) == 1 and "no t1c series (the reference) was found" in no_ref[0]["error"]
    assert summary["no-t1c"]["status"] == "failed" and not (out / "no-t1c").exists()
    # two series with the same description: the later one is used, the earlier reported
    report = json.loads((out / "repeat" / "report.json").read_text())
    roles = {s["number"]: (s["role"], s["note"]) for s in report["series"]}
    assert roles[9][0] == "used" and roles[3][0] == "not used" and "later series #9" in roles[3][1]
    assert any("two series identified as t2" in w for w in report["warnings"])
    tf = read_transform(out / "repeat" / "transforms" / "t2.tfm")
    truth = fb.euler_from_list(inputs["repeat"].transforms["t2-again"])
    assert fb.registration_error_mm(tf, truth, inputs["case"].brain)[0] < 1.5
    # the stand-in model's outputs: label maps, volumes in mL, model id
    seg_report = report["segmentation"]
    assert seg_report["status"] == "segmented" and seg_report["model"] == "threshold-test"
    assert set(seg_report["volumes_ml"]) == {"Bright on T2", "Bright on T1c"} and seg_report["volumes_ml"]["Bright on T2"] > 1
    lab = read_image(out / "repeat" / "segmentation.nii.gz")
    assert lab.GetSize() == read_image(out / "repeat" / "registered" / "t1c.nii.gz").GetSize()
    assert "Bright on T2=" in summary["repeat"]["volumes_ml"]
    # DICOM in, DICOM SEG out, on the reference series, one segment per label value
    import pydicom

    assert "segmentation.dcm" in seg_report["files"]
    dseg = pydicom.dcmread(out / "repeat" / "segmentation.dcm")
    assert dseg.Modality == "SEG" and [s.SegmentLabel for s in dseg.SegmentSequence] == ["Bright on T2", "Bright on T1c"]
    assert "PatientName" in dseg and str(dseg.PatientName) not in json.dumps(report)
    # "nothing done": only failing studies
    only_bad = tmp_path / "only-bad"
    shutil.copytree(inputs["edge"] / "no-t1c", only_bad / "no-t1c")
    assert run_batch(only_bad, tmp_path / "out2", options=OPTIONS).exit_code == EXIT_NOTHING_DONE
    empty = tmp_path / "empty"
    empty.mkdir()  # no study at all: an input error, nothing written (test_an_empty_input_folder_...)
    with pytest.raises(InputError, match="no studies found"):
        run_batch(empty, tmp_path / "out3", options=OPTIONS)
    assert not (tmp_path / "out3").exists()


def test_a_whole_head_is_registered_and_reported_but_not_segmented(inputs, shared_data, tmp_path):
    heads = tmp_path / "in"
    head = fb.with_head(fb.load_case(shared_data / CASE, 2.0, margin_mm=30.0))
    _build(head, heads, "raw-head", sequences=("t1c", "t2"), fmt="nifti", seed=31, extras=False)
    out = tmp_path / "out"
    seg = Segmenter(fb.stripped_brain_segmenter, ("t1c", "t2"), "needs-stripped-brain", "1.0.0")
    result = run_batch(heads, out, options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert result.exit_code == EXIT_OK and {s["state"] for s in result.studies} == {"done"}
    # the same check passes the skull-stripped studies: they are segmented
    stripped = run_batch(inputs["main"], tmp_path / "out2", options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert {r["segmentation"].split(" by ")[0] for r in _rows(tmp_path / "out2" / "summary.csv")} == {"segmented"}
    assert stripped.exit_code == EXIT_OK
    for row in _rows(out / "summary.csv"):
        study = out / row["study"]
        report = json.loads((study / "report.json").read_text())
        assert report["segmentation"]["status"] == "not segmented"
        assert "non-background voxels, more than a skull-stripped brain" in report["segmentation"]["reason"]
        assert any("strip the skull first" in w for w in report["warnings"])
        assert row["needs_review"] == "yes" and row["segmentation"].startswith("not segmented: the t1c image has")
        assert (study / "registered" / "t1c.nii.gz").is_file() and (study / "qc.png").is_file()
        assert not list(study.glob("segmentation.*"))


def test_the_models_warnings_reach_the_study_report_and_ask_for_review(inputs, tmp_path, monkeypatch):
    """The automatic model's own warnings (nothing found, an input stored unlike its training data...) were
    dropped by the batch: now in report.json, under the study on the console, and the study needs review."""
    from SegmentationDeepEditLib.batch.report import format_result
    from SegmentationDeepEditLib.segment import SegmentResult

    def runner(model_id, images, device="auto"):  # stands in for segment_images (whose warnings are tested there)
        label, segments = fb.threshold_segmenter({"t1c": images["t1c"], "t2": images["t2"]})
        return SegmentResult(label=label, segments=segments, regions=[], model_id=model_id, model_version="9.9.9",
                             device="cpu", tta=0, fast=False, seconds={}, grid=None,
                             warnings=["the t1c image's background is the constant 200, not 0"])

    monkeypatch.setattr(segment_mod, "_core_runner", lambda: runner)
    only_a = tmp_path / "in"
    shutil.copytree(inputs["main"] / "case-a", only_a / "case-a")  # T1c, T2, FLAIR
    result = run_batch(only_a, tmp_path / "out", options=BatchOptions(spacing_mm=2.0, model="glioma-regions"))
    assert result.exit_code == EXIT_OK
    report = json.loads((tmp_path / "out" / "case-a" / "report.json").read_text())
    assert report["segmentation"]["status"] == "segmented" and report["needs_review"] is True
    assert "segmentation: the t1c image's background is the constant 200, not 0" in report["warnings"]
    assert _rows(tmp_path / "out" / "summary.csv")[0]["needs_review"] == "yes"
    assert "      warning: segmentation: the t1c image's background" in format_result(result)


def test_a_sub_folder_without_images_is_said_not_passed_over(inputs, tmp_path, capsys):
    """An empty or unfinished copy of a study: the dry run and the run name it (QA: silently skipped)."""
    folder = tmp_path / "in"
    shutil.copytree(inputs["main"] / "case-b", folder / "case-b")
    (folder / "copying-still").mkdir()
    (folder / "copying-still" / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    assert cli.main(["batch", str(folder), "-o", str(tmp_path / "out"), "--dry-run"] + CLI_OPTIONS) == 0
    printed = capsys.readouterr().out
    assert "copying-still" in printed and "not a study: no image file and no DICOM series found" in printed
    assert ".hidden" not in printed and "1 studies: 1 ready" in printed
    result = run_batch(folder, tmp_path / "out", options=OPTIONS, dry_run=True)
    assert result.without_images == ["copying-still"] and result.to_dict()["without_images"] == ["copying-still"]


def test_output_folder_inside_or_equal_to_the_input_is_refused(inputs, tmp_path, capsys):
    main = inputs["main"]
    for bad in (main, main / "out", main / "case-a" / "out", inputs["root"]):
        with pytest.raises(InputError, match="input folder"):
            run_batch(main, bad, options=OPTIONS)
    assert _snapshot(main) == inputs["snapshot"]
    assert cli.main(["batch", str(main), "-o", str(main / "labels"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "inside the input folder" in err and not (main / "labels").exists()


def test_a_study_done_without_a_file_it_could_not_read_ends_the_run_with_exit_4(inputs, tmp_path, capsys):
    """A run whose only study had a corrupt series exited 0 and said '1 done, 0 failed': a script checking the
    exit code never learnt that one of its files was unreadable."""
    only = tmp_path / "in"
    shutil.copytree(inputs["edge"] / "corrupt", only / "corrupt")
    seg = Segmenter(fb.threshold_segmenter, ("t1c", "t2"), "threshold-test", "1.0.0")
    result = run_batch(only, tmp_path / "out", options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert result.exit_code == EXIT_SOME_FAILED
    assert result.counts == {"done": 1, "failed": 0, "skipped": 0, "with_unreadable_files": 1}
    from SegmentationDeepEditLib.batch.report import format_result

    assert "1 done, 0 failed, 0 already done, 1 with files that could not be read; see " in format_result(result)
    assert (tmp_path / "out" / "corrupt" / "segmentation.nii.gz").is_file()  # the study itself is kept
    # the same through the command line
    with pytest.raises(SystemExit) as info:
        cli.main(["batch", str(only), "-o", str(tmp_path / "out2"), "--spacing", "2", "--model", "none"])
    out = capsys.readouterr().out
    assert info.value.code == EXIT_SOME_FAILED and "1 with files that could not be read" in out, out


def test_a_study_the_model_cannot_segment_needs_review(inputs, tmp_path):
    """A study without an input the model needs was 'done' with needs_review 'no': a user filtering on the
    review flag never saw that it has no segmentation."""
    only_b = tmp_path / "in"
    shutil.copytree(inputs["main"] / "case-b", only_b / "case-b")  # T1c, T1, T2: no FLAIR
    seg = Segmenter(fb.threshold_segmenter, ("t1c", "flair"), "needs-flair", "1.0.0")
    result = run_batch(only_b, tmp_path / "out", options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert result.exit_code == EXIT_OK
    row = _rows(tmp_path / "out" / "summary.csv")[0]
    assert row["needs_review"] == "yes" and row["segmentation"].startswith("not segmented: the model needs flair"), row
    # --model none asks for no segmentation: nothing to review
    result = run_batch(only_b, tmp_path / "out2", options=BatchOptions(spacing_mm=2.0, model="none"))
    assert _rows(tmp_path / "out2" / "summary.csv")[0]["needs_review"] == "no"


def test_an_empty_input_folder_or_a_bad_spacing_is_refused_before_anything_is_written(inputs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["batch", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "empty: no studies found" in err and not (tmp_path / "out").exists(), err
    for spacing in ("0", "-1", "nan"):
        for extra in ([], ["--dry-run"]):
            assert cli.main(["batch", str(inputs["main"]), "-o", str(tmp_path / "out"), "--spacing", spacing] + extra) == 1
            assert "--spacing must be a voxel size above 0 mm" in capsys.readouterr().err
            assert not (tmp_path / "out").exists()


def test_dask_local_cluster_with_two_workers_equals_the_single_process_run(inputs, baseline, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster:
        result = run_batch(inputs["main"], out, options=OPTIONS, scheduler=cluster.scheduler_address)
    assert result.exit_code == EXIT_OK
    assert fb.output_differences(baseline[0], out) == []
    from SegmentationDeepEditLib.batch.run import _usable_cpus

    # two single-thread workers on this machine: each study runs ITK on half its cores (ITK's default, all
    # of them, in every task at once would oversubscribe the machine)
    for study in ("case-a", "case-b"):
        report = json.loads((out / study / "report.json").read_text())
        assert report["seconds"]["itk_threads"] == max(1, _usable_cpus() // 2), report["seconds"]


def test_a_series_already_aligned_to_the_reference_is_taken_as_it_is(shared_data, tmp_path):
    """Co-registered input (as BraTS ships): the registration finds only its own noise (tenths of a mm), which
    resampled would blur every voxel (tumour core Dice 0.75 -> 0.70 in QA). Such a series is taken without a
    transform; one moved by 1.5 voxels is still registered."""
    import SimpleITK as sitk


    case = fb.load_case_cached(str(shared_data / CASE), 2.0)
    study = tmp_path / "in" / "BraTS-like-001"
    study.mkdir(parents=True)
    as_int = {k: sitk.Cast(sitk.Round(v), sitk.sitkInt16) for k, v in case.images.items()}
    sitk.WriteImage(as_int["t1c"], str(study / "BraTS-like-001_t1ce.nii.gz"))
    sitk.WriteImage(as_int["flair"], str(study / "BraTS-like-001_flair.nii.gz"))
    sitk.WriteImage(sitk.Flip(as_int["t1"], [True, True, False]), str(study / "BraTS-like-001_t1.nii.gz"))  # in RAS
    moved = sitk.Image(as_int["t2"])
    moved.SetOrigin(tuple(np.asarray(moved.GetOrigin()) + (3.0, 0.0, 0.0)))  # 3 mm off: 1.5 voxels
    sitk.WriteImage(moved, str(study / "BraTS-like-001_t2.nii.gz"))
    out = tmp_path / "out"
    assert run_batch(tmp_path / "in", out, options=OPTIONS).exit_code == EXIT_OK
    report = json.loads((out / "BraTS-like-001" / "report.json").read_text())
    flair, t2 = report["sequences"]["flair"], report["sequences"]["t2"]
    assert flair["already_aligned"]["largest_shift_mm"] < flair["already_aligned"]["below_mm"] == 2.0, flair
    assert flair["transform_parameters"]["translation_mm"] == [0.0, 0.0, 0.0]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "BraTS-like-001" / "registered" / "flair.nii.gz")))
    assert np.array_equal(written, sitk.GetArrayFromImage(as_int["flair"]))  # voxel for voxel, no blur
    t1 = report["sequences"]["t1"]  # stored in RAS: the same voxels in another order, moved without interpolation
    assert "already_aligned" in t1, t1
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "BraTS-like-001" / "registered" / "t1.nii.gz")))
    assert np.array_equal(written, sitk.GetArrayFromImage(as_int["t1"]))
    assert "already_aligned" not in t2 and abs(abs(t2["transform_parameters"]["translation_mm"][0]) - 3.0) < 0.5, t2


def test_workers_of_one_machine_under_its_name_and_its_ip_share_its_cores():
    pytest.importorskip("distributed")
    from SegmentationDeepEditLib.batch.run import _host_slots

    slots = _host_slots({"tcp://localhost:40001": 1, "tcp://127.0.0.1:40002": 2, "tcp://10.1.2.3:9000": 4,
                         "tcp://10.1.2.3:9001": 4, "tcp://worker-x.invalid:1": 1})
    assert slots == {"127.0.0.1": 3, "10.1.2.3": 8, "worker-x.invalid": 1}  # a name that does not resolve stays


def test_worker_batch_ops_drive_the_same_run_as_the_cli(inputs, baseline, tmp_path):
    """The Slicer Batch tab's path: plan and run through the worker process, the study table, review files."""
    from SegmentationDeepEditLib.batch.report import TABLE_COLUMNS, review_files, table_rows
    from SegmentationDeepEditLib.worker import WorkerClient, WorkerError

    env = dict(os.environ)
    module_dir = REPO / "SegmentationDeepEdit"
    env["PYTHONPATH"] = os.pathsep.join([str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = tmp_path / "out"
    with WorkerClient([sys.executable, "-m", "SegmentationDeepEditLib.worker"], cwd=str(module_dir), env=env,
                      scratch_parent=str(tmp_path)) as client:
        client.start()
        plan = client.request("batch_plan", input_dir=str(inputs["main"]), timeout=300)
        assert [r["study"] for r in plan["rows"]] == ["case-a", "case-b"]
        assert all(r["status"] == "ready" and set(r) == set(TABLE_COLUMNS) for r in plan["rows"])
        assert plan["rows"][0]["sequences"].startswith("t1c (reference)"), plan["rows"][0]
        assert "flair" in plan["rows"][0]["sequences"] and "t1," in plan["rows"][1]["sequences"] + ","
        assert not out.exists(), "planning wrote something"
        with pytest.raises(WorkerError, match="choose the output folder"):
            client.request("batch", input_dir=str(inputs["main"]), output_dir="", timeout=60)

        seen = []
        rid = client.send("batch", input_dir=str(inputs["main"]), output_dir=str(out), model="none", spacing_mm=2.0)
        reply = client.wait(rid, timeout=900, on_message=lambda m: seen.append(m) if "progress" in m else None)
        assert "result" in reply, reply
        result = reply["result"]
    assert result["exit_code"] == EXIT_OK and result["counts"]["done"] == 2
    stages = [m["stage"] for m in seen]
    assert any(s.startswith("1/2 studies") for s in stages) and any(s.startswith("2/2 studies") for s in stages), stages
    assert seen[-1]["progress"] == 1.0
    assert fb.output_differences(baseline[0], out) == []  # the same outputs as deepedit batch / run_batch

    rows = table_rows(plan["plans"], out)
    assert rows == result["rows"]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert all(float(r["seconds"]) > 0 and "registration ok" in r["qc"] for r in rows), rows
    # a study that is running (or was cancelled mid-way) shows as running, with no QC yet
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["studies"]["case-b"]["state"] = "running"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert [r["status"] for r in table_rows(plan["plans"], out)] == ["done", "running"]
    assert table_rows(plan["plans"], out)[1]["qc"] == ""

    files = review_files(out, "case-a")
    assert files["reference"] == "t1c" and [s for s, _ in files["volumes"]] == ["t1c", "t2", "flair"]
    assert all(Path(f).is_file() for _, f in files["volumes"]) and files["segmentation"] is None
    assert Path(files["qc"]).is_file()
    with pytest.raises(InputError, match="no finished output"):
        review_files(out, "no-such-study")


def test_cli_dry_run_workers_and_json(inputs, baseline, tmp_path, capsys):
    main = inputs["main"]
    assert cli.main(["batch", str(main), "-o", str(tmp_path / "dry"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "case-a (dicom, 5 series, 2 other files): reference t1c" in text
    assert "'t2_tirm_tra_dark-fluid'" in text and "flair" in text and "ignored: localizer" in text
    assert not (tmp_path / "dry").exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["batch", str(inputs["edge"]), "-o", str(tmp_path / "dry"), "--dry-run", "--json"])
    assert info.value.code == EXIT_SOME_FAILED
    dry = json.loads(capsys.readouterr().out)
    assert {p["study"]: p["reference"] for p in dry["plans"]} == {"corrupt": "t1c", "no-t1c": None, "repeat": "t1c"}
    out = tmp_path / "out"
    assert cli.main(["batch", str(main), "-o", str(out), *CLI_OPTIONS, "--workers", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed)
    assert summary["counts"] == {"done": 2, "failed": 0, "skipped": 0, "with_unreadable_files": 0} and summary["exit_code"] == 0
    assert fb.FAKE_PATIENT_NAME not in printed
    assert fb.output_differences(baseline[0], out) == []
    assert cli.main(["batch", str(main), "-o", str(tmp_path / "o2"), "--model", "no-such-model"]) == 1
    assert "unknown model" in capsys.readouterr().err


def test_segmentation_step_resolution(monkeypatch):
    monkeypatch.setattr("SegmentationDeepEditLib.bundle.models_dirs", lambda: [])
    step = resolve_segment_step(None)
    assert step.kind == "skip" and step.reason == NO_MODEL
    assert resolve_segment_step("none").kind == "skip"
    with pytest.raises(ModelError, match="unknown model"):
        resolve_segment_step("no-such-model")
    with pytest.raises(InputError, match="not MRI sequences"):
        resolve_segment_step(None, custom=Segmenter(fb.threshold_segmenter, ("ct",), "x"))
    # a brain model installed: optional inputs are passed when present, not required
    fake = type("B", (), {"task": "segmentation", "id": "glioma-test", "version": "0.1.0",
                          "meta": {"inputs": [{"name": "t1c"}, {"name": "t2", "optional": True}, {"name": "flair"}]}})()
    monkeypatch.setattr("SegmentationDeepEditLib.bundle.list_bundles", lambda: [fake])
    step = resolve_segment_step(None)
    assert step.kind == "bundle" and step.inputs == ("t1c", "flair") and step.optional == ("t2",)
    assert step.missing(["t1c", "flair"]) == []
    # a brain model installed, but no runner: reported per study, not a crash
    monkeypatch.setattr(segment_mod, "_core_runner", lambda: None)
    step = resolve_segment_step(None)
    assert step.kind == "skip" and "cannot run automatic models yet" in step.reason


def test_anonymised_dicom_without_series_uids_is_segmented_without_a_dicom_seg(shared_data, tmp_path):
    # Anonymisers that blank SeriesInstanceUID and SOPClassUID leave series that read fine (one per
    # folder and geometry) but that a DICOM SEG cannot reference: the study is done, with NIfTI and
    # .seg.nrrd, and the missing SEG is a warning.
    import pydicom

    case = fb.load_case_cached(str(shared_data / CASE), 2.0)
    study = _build(case, tmp_path / "in", "anon", sequences=("t1c", "t2"), fmt="dicom", seed=41, extras=False)
    for f in sorted(p for p in study.folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.SOPClassUID = ""
        ds.save_as(f)
    seg = Segmenter(fb.threshold_segmenter, ("t1c", "t2"), "threshold-test", "1.0.0")
    out = tmp_path / "out"
    result = run_batch(tmp_path / "in", out, options=BatchOptions(spacing_mm=2.0, segmenter=seg))
    assert result.exit_code == EXIT_OK and [s["state"] for s in result.studies] == ["done"]
    report = json.loads((out / "anon" / "report.json").read_text())
    used = [s for s in report["series"] if s["role"] == "used"]
    assert sorted(s["identified"]["sequence"] for s in used) == ["t1c", "t2"], report["series"]
    assert report["segmentation"]["status"] == "segmented"
    assert "segmentation.dcm" not in report["segmentation"]["files"] and not (out / "anon" / "segmentation.dcm").exists()
    assert (out / "anon" / "segmentation.nii.gz").is_file() and (out / "anon" / "segmentation.seg.nrrd").is_file()
    assert any("no DICOM SEG written" in w and "SeriesInstanceUID" in w for w in report["warnings"])
    # the segmentation itself needs no review for it; the run's own summary carries the warning
    assert _rows(out / "summary.csv")[0]["needs_review"] == "no"
    assert any("no DICOM SEG written" in w for w in result.studies[0]["warnings"])
    from SegmentationDeepEditLib.batch.report import format_result

    shown = format_result(result).splitlines()  # what the command prints: the warning under its study
    assert shown[0].lstrip().startswith("anon") and shown[1].startswith("      warning: no DICOM SEG written"), shown


def test_resume_into_a_folder_that_is_not_a_batch_output_is_refused(inputs, tmp_path):
    # a mistyped -o with --resume replaced the user's study-named folders with batch output
    out = tmp_path / "not-a-batch"
    (out / "case-a").mkdir(parents=True)
    (out / "case-a" / "my-work.txt").write_text("precious")
    with pytest.raises(InputError, match="no batch run \\(no manifest.json\\)"):
        run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    assert (out / "case-a" / "my-work.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["case-a"]


def test_an_empty_or_garbled_lock_left_by_a_kill_is_taken_over(inputs, tmp_path):
    from SegmentationDeepEditLib.batch.manifest import LOCK_NAME, Manifest

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text("")  # a kill between creating the lock and writing it
    for resume in (True, False):  # young: maybe a run writing it right now
        with pytest.raises(InputError, match="one starting now"):
            Manifest.open(out, input_dir=inputs["main"], options={}, resume=resume)
    (out / "manifest.json").write_text("{}")  # a run's folder: the lock is still said first, not "use --resume"
    with pytest.raises(InputError, match="one starting now"):
        Manifest.open(out, input_dir=inputs["main"], options={}, resume=False)
    (out / "manifest.json").unlink()
    old = time.time() - 60
    os.utime(lock, (old, old))
    m = Manifest.open(out, input_dir=inputs["main"], options={}, resume=True)
    try:
        pid, host, token = lock.read_text().split()
        assert int(pid) == os.getpid() and host == socket.gethostname() and token == m.token
        assert Manifest.holds_lock(out, m.token) and not Manifest.holds_lock(out, "another-run")
    finally:
        m.close()
    assert not lock.exists() and not Manifest.holds_lock(out, m.token)
    # a run whose lock another run took over leaves that lock alone when it closes
    m = Manifest.open(out, input_dir=inputs["main"], options={}, resume=True)
    lock.write_text(f"{os.getpid()} {socket.gethostname()} another-runs-token\n")
    m.close()
    assert lock.read_text().split()[2] == "another-runs-token"


def test_a_study_whose_run_has_ended_writes_nothing(inputs, tmp_path):
    # a worker (or Dask task) outliving a driver killed with -9, or a run taken over by a resume:
    # its results must not land in the output folder unrecorded
    from SegmentationDeepEditLib.batch.run import plan_batch, process_study

    plan = next(p for p in plan_batch(inputs["main"]) if p.study.name == "case-b")
    out = tmp_path / "out"
    out.mkdir()
    res = process_study(plan, str(inputs["main"]), str(out), OPTIONS, run_token="a-run-that-is-gone")
    assert res.state == "failed" and "has ended" in res.error
    assert list(out.iterdir()) == []  # neither the study nor its temporary folder
    # the driver killed with -9: its lock still holds its token, but names a process that is gone
    from SegmentationDeepEditLib.batch.manifest import LOCK_NAME, Manifest

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(f"{int(dead.stdout)} {socket.gethostname()} token-of-the-killed-run\n")
    assert not Manifest.holds_lock(out, "token-of-the-killed-run")
    (out / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()} token-of-a-live-run\n")
    assert Manifest.holds_lock(out, "token-of-a-live-run")


def test_batch_worker_processes_end_when_the_driver_is_gone():
    # kill -9 of the driver sends its workers nothing: they watch their parent and exit
    import concurrent.futures as cf

    from SegmentationDeepEditLib.batch import run as run_mod

    code = ("from SegmentationDeepEditLib.batch.run import _exit_with_parent; import time; "
            "_exit_with_parent(1); time.sleep(30)")  # parent 1 is not its parent: as if re-parented after a kill
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], timeout=20, capture_output=True, text=True)
    assert done.returncode == run_mod.ORPHAN_EXIT and done.stderr == "" and time.monotonic() - t0 < 15
    # and the pool of `--workers` starts its processes with that watch
    made = {}

    class Pool:
        def __init__(self, **kw):
            made.update(kw)
            raise RuntimeError("stop here")

    real = cf.ProcessPoolExecutor
    cf.ProcessPoolExecutor = Pool
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            run_mod._run_processes([], Path("in"), Path("out"), OPTIONS, None, 2, lambda *a: None, "token")
    finally:
        cf.ProcessPoolExecutor = real
    assert made["initializer"] is run_mod._exit_with_parent and made["initargs"] == (os.getpid(),)


def test_a_bad_scheduler_address_or_workers_value_writes_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="cannot reach the Dask scheduler nonsense://x:1"):
        run_batch(inputs["main"], out, options=OPTIONS, scheduler="nonsense://x:1")
    assert not out.exists()
    with pytest.raises(InputError, match="--workers must be a whole number"):
        run_batch(inputs["main"], out, options=OPTIONS, workers="2")
    assert not out.exists()


def test_anonymised_studies_stay_apart_and_a_split_anonymised_series_is_joined(shared_data, tmp_path):
    # Blank SeriesInstanceUID and StudyInstanceUID: two patients' folders must not become one study,
    # and a T1c whose export split it over two folders is still one series (not half a reference).
    import pydicom

    from SegmentationDeepEditLib.batch.run import plan_batch

    case = fb.load_case_cached(str(shared_data / CASE), 2.0)
    studies = {}
    for name, seed in (("patient-a", 51), ("patient-b", 52)):
        study = studies[name] = _build(case, tmp_path / "in", name, sequences=("t1c", "flair"), fmt="dicom",
                                       seed=seed, extras=False)
        for f in sorted(p for p in study.folder.rglob("*") if p.is_file()):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = ""
            ds.StudyInstanceUID = ""
            ds.save_as(f)
    t1c_files = sorted((studies["patient-a"].folder / Path(studies["patient-a"].files["t1c"][0]).parent.name).iterdir())
    t1c_folder = t1c_files[0].parent
    n_slices = len(t1c_files)
    part2 = t1c_folder.parent / (t1c_folder.name + "-part2")
    part2.mkdir()
    for f in t1c_files[: n_slices // 2]:
        f.rename(part2 / f.name)
    plans = {p.study.name: p for p in plan_batch(tmp_path / "in")}
    assert sorted(plans) == ["patient-a", "patient-b"]
    for p in plans.values():
        assert p.ok, p.problems
        assert set(p.sequences) == {"t1c", "flair"}, p.warnings
        assert len(p.sequences["t1c"].files) == n_slices  # in patient-a both parts: one series
        assert not any("two series identified" in w for w in p.warnings), p.warnings


def test_the_driver_hands_its_token_to_every_study(inputs, tmp_path):
    # serial path: once another run has taken the folder's lock over, the next study writes nothing
    from SegmentationDeepEditLib.batch.manifest import LOCK_NAME

    out = tmp_path / "out"

    def progress(stage, fraction):
        if stage.startswith("1/2 studies"):
            (out / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()} a-run-that-took-over\n")

    result = run_batch(inputs["main"], out, options=OPTIONS, progress=progress)
    states = sorted((s["state"], s.get("error") or "") for s in result.studies)
    assert [s for s, _ in states] == ["done", "failed"] and "has ended" in states[1][1]
    assert (out / LOCK_NAME).read_text().split()[2] == "a-run-that-took-over"  # left to its owner
    assert len([p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1


def test_attempts_count_finished_attempts_not_interrupted_queues(inputs, tmp_path):
    out = tmp_path / "out"

    def interrupt(stage, fraction):
        if stage.startswith("0/2 studies"):
            raise KeyboardInterrupt  # Ctrl-C once the studies are queued, before any ran

    with pytest.raises(KeyboardInterrupt):
        run_batch(inputs["main"], out, options=OPTIONS, progress=interrupt)
    run_batch(inputs["main"], out, options=OPTIONS, resume=True)
    studies = json.loads((out / "manifest.json").read_text())["studies"]
    assert {name: rec["attempts"] for name, rec in studies.items()} == {"case-a": 1, "case-b": 1}
