"""Tests of batch discovery, sequence identification, mapping files and study plans.

Small DICOM series are written with the batch fixture writer (pydicom, real geometry tags, a
fake patient name); no real data is needed here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from fixtures_batch import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, PROTOCOL, write_dicom_series, write_dicomdir_stub
from SegmentationDeepEditLib.batch.discover import Series, Study, discover_studies
from SegmentationDeepEditLib.batch.identify import IGNORE, Mapping, MappingRule, identify, load_mapping
from SegmentationDeepEditLib.batch.plan import plan_study
from SegmentationDeepEditLib.errors import InputError


# ----------------------------------------------------------------------------- identification


@pytest.mark.parametrize("seq", list(PROTOCOL))
def test_siemens_protocol_series_are_identified_from_names_and_headers(seq):
    p = PROTOCOL[seq]
    ident = identify(p["description"], protocol=p["protocol"], header=p["tags"])
    assert ident.sequence == seq, ident
    assert ident.confidence >= 0.8 and ident.source == "name+header" and not ident.ambiguous


@pytest.mark.parametrize("seq", list(PROTOCOL))
def test_headers_alone_identify_most_sequences(seq):
    """Without any name, the acquisition header still points at the right sequence (T1 vs T1c needs the agent)."""
    ident = identify("series 7", header=PROTOCOL[seq]["tags"])
    assert ident.sequence == seq, ident
    assert ident.source == "header"


@pytest.mark.parametrize("name,expected", [
    ("BraTS-GLI-00001-000-t1c.nii.gz", "t1c"), ("case_t1ce.nii.gz", "t1c"), ("t1gd.nii.gz", "t1c"),
    ("post.nii.gz", "t1c"), ("sub-01_ce-gd_T1w.nii.gz", "t1c"), ("BraTS-GLI-00001-000-t2f.nii.gz", "flair"),
    ("FLAIR.nii.gz", "flair"), ("BraTS-GLI-00001-000-t2w.nii.gz", "t2"), ("BraTS-GLI-00001-000-t1n.nii.gz", "t1"),
    ("sub-01_T1w.nii.gz", "t1"), ("t2.nii", "t2"), ("patient_dwi.nii.gz", "dwi"), ("swi.nrrd", "swi"),
    ("seg.nii.gz", IGNORE), ("brainmask.nii.gz", IGNORE), ("case-seg.nii.gz", IGNORE),
    ("flair_post.nii.gz", "flair"),
])
def test_file_names(name, expected):
    assert identify(file_name=name).sequence == expected


@pytest.mark.parametrize("description,header,expected", [
    ("AAHead_Scout_64ch-head-coil", {}, IGNORE),
    ("localizer", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, IGNORE),
    ("ep2d_diff_3scan_trace_p2_ADC", {"ImageType": "DERIVED\\PRIMARY\\DIFFUSION\\ADC\\ND"}, IGNORE),
    ("t2_swi_tra_p2_Pha_Images", {"ImageType": "ORIGINAL\\PRIMARY\\P\\ND"}, IGNORE),
    ("mIP_Images(SW)", {"ImageType": "DERIVED\\PRIMARY\\MNIP\\ND"}, IGNORE),
    ("SWI_Images", {"ImageType": "ORIGINAL\\PRIMARY\\M\\SWI\\ND"}, "swi"),
    ("T1 AX POST GAD", {}, "t1c"), ("T1W_3D_TFE +C", {}, "t1c"), ("t1_mprage_sag_p2_iso", {}, "t1"),
    ("Ax T2 FRFSE", {}, "t2"), ("AX FLAIR", {}, "flair"), ("t1_vibe_tra", {"ContrastBolusAgent": "Gadovist"}, "t1c"),
    ("t2_fl2d_tra_hemo", {}, None),  # T2* gradient echo: not one of ours, reported as unknown
    ("perfusion_dsc", {}, IGNORE),
    # GE's T1 FLAIR is a T1-weighted inversion recovery, not a FLAIR (it was taken as FLAIR, even post-contrast)
    ("AX T1 FLAIR", {"ScanningSequence": "SE\\IR", "RepetitionTime": 2200, "EchoTime": 9, "InversionTime": 860}, "t1"),
    ("AX T1 FLAIR POST", {"ScanningSequence": "SE\\IR", "RepetitionTime": 2200, "EchoTime": 9, "InversionTime": 860,
                          "ContrastBolusAgent": "GADAVIST"}, "t1c"),
    ("AX T2 FLAIR", {"RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2375}, "flair"),
    # Siemens 2D FLASH is a T1 unless the name says T2* (it was always taken as T2*)
    ("t1_fl2d_tra_KM", {"ScanningSequence": "GR", "RepetitionTime": 250, "EchoTime": 2.5}, "t1c"),
    ("t1_fl2d_tra", {"ScanningSequence": "GR", "RepetitionTime": 250, "EchoTime": 2.5}, "t1"),
    ("fl2d_hemo", {}, None),
    # "+GAD" and "T1+C" mark contrast (they were missed: "+" glued to the word)
    ("T1 AX +GAD", {}, "t1c"), ("AX T1+GAD", {}, "t1c"), ("T1+C", {}, "t1c"), ("T1 AX", {}, "t1"),
])
def test_descriptions_and_headers(description, header, expected):
    assert identify(description, header=header).sequence == expected


def test_conflicting_evidence_is_ambiguous_and_not_used():
    """A name saying T1 with a header saying FLAIR (TI 2500 ms) gives no sequence, and says why."""
    ident = identify("t1_series", header={"InversionTime": 2500, "RepetitionTime": 9000, "EchoTime": 90})
    assert ident.sequence is None and ident.ambiguous
    assert set(ident.candidates[:2]) == {"t1", "flair"}
    assert any("inversion time" in r for r in ident.reasons)


def test_nothing_known_is_unknown():
    ident = identify("series 12")
    assert ident.sequence is None and ident.confidence == 0.0 and not ident.ambiguous


# ------------------------------------------------------------------------------------ mapping


def test_mapping_file_forms_and_precedence(tmp_path):
    simple = tmp_path / "simple.json"
    simple.write_text(json.dumps({"t2_tirm*": "flair", "*pd*": "ignore"}))
    m = load_mapping(simple)
    assert m.lookup("any", "T2_TIRM_tra").sequence == "flair"
    assert m.lookup("any", "t2_tse") is None
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"series": [
        {"study": "case-0*", "match": "t1_vibe*", "number": 12, "sequence": "t1c"},
        {"match": "t1_vibe*", "sequence": "t1"}]}))
    m = load_mapping(full)
    assert m.lookup("case-01", "t1_vibe_tra", 12).sequence == "t1c"
    assert m.lookup("case-01", "t1_vibe_tra", 7).sequence == "t1"
    assert m.lookup("other", "t1_vibe_tra", 12).sequence == "t1"
    assert load_mapping(None).rules == ()


@pytest.mark.parametrize("content,words", [
    ("not json", "not valid JSON"),
    ('{"t2*": "pd"}', "names sequence 'pd'"),
    ('{"series": [{"sequence": "t1"}]}', "matches every series"),
    ('{"series": [{"match": "x", "sequence": "t1", "colour": 1}]}', "unknown keys"),
    ('{"series": [{"number": "5", "sequence": "t1"}]}', "number must be an integer"),
    ('[1, 2]', "must hold a JSON object"),
])
def test_bad_mapping_files(tmp_path, content, words):
    p = tmp_path / "m.json"
    p.write_text(content)
    with pytest.raises(InputError, match=words) as info:
        load_mapping(p)
    assert str(p) in str(info.value)


# --------------------------------------------------------------------------------------- plans


def _series(key, name, number=None, kind="dicom", header=None, files=5):
    return Series(key=key, kind=kind, path=f"/x/{key}", name=name, number=number, series_uid=f"1.2.3.{key}",
                  header=header or {}, files=tuple(f"/x/{key}/{n}" for n in range(files)))


def test_two_series_with_the_same_description_use_the_later_and_report_the_other():
    study = Study("s", "s", (_series("a", "t1_vibe_post", 2), _series("b", "t2_tse_tra", 3), _series("c", "t2_tse_tra", 7)))
    plan = plan_study(study)
    assert plan.ok and dict(plan.chosen) == {"t1c": "a", "t2": "c"}
    roles = {v.series.key: (v.role, v.note) for v in plan.verdicts}
    assert roles["c"][0] == "used" and roles["b"][0] == "not used" and "later series #7" in roles["b"][1]
    assert any("two series identified as t2" in w for w in plan.warnings)


def test_study_without_t1c_cannot_be_planned_and_says_what_it_found():
    study = Study("s", "s", (_series("b", "t2_tse_tra", 3), _series("c", "t2_tirm_tra_dark-fluid", 4)))
    plan = plan_study(study)
    assert not plan.ok and plan.reference is None
    assert "no t1c series (the reference)" in plan.problems[0] and "t2, flair" in plan.problems[0]
    assert "--mapping" in plan.problems[0]
    # another reference on request
    plan = plan_study(study, reference=("t1c", "flair"))
    assert plan.ok and plan.reference == "flair"


def _files(*names):
    return tuple(Series(key=n, kind="file", path=f"/in/flat/{n}", name=n, files=(f"/in/flat/{n}",)) for n in names)


def test_a_folder_of_several_subjects_files_is_refused_rather_than_one_patient_dropped():
    two = _files("BraTS2021_00007_flair.nii.gz", "BraTS2021_00007_t1.nii.gz", "BraTS2021_00007_t1ce.nii.gz",
                 "BraTS2021_00007_t2.nii.gz", "BraTS-GLI-00001-000-t1c.nii.gz", "BraTS-GLI-00001-000-t1n.nii.gz",
                 "BraTS-GLI-00001-000-t2f.nii.gz", "BraTS-GLI-00001-000-t2w.nii.gz")
    plan = plan_study(Study("flat", "flat", two))
    assert not plan.ok and plan.problems == (
        "the folder holds the images of 2 subjects (BraTS-GLI-00001-000, BraTS2021_00007, by their file names): "
        "put each study in its own sub-folder",)
    # one subject's files, with a label map, a repeat and names with a session: one study, as before
    for names in (("sub-01_ses-01_T1w.nii.gz", "sub-01_ses-01_FLAIR.nii.gz", "sub-01_ses-01_ce-gd_T1w.nii.gz"),
                  ("BraTS2021_00007_flair.nii.gz", "BraTS2021_00007_t1ce.nii.gz", "BraTS2021_00007_seg.nii.gz"),
                  ("t1c.nii.gz", "flair.nii.gz", "flair_repeat.nii.gz", "t2.nii.gz"),
                  ("case_pre_t1.nii.gz", "case_pre_flair.nii.gz", "case_post_t1c.nii.gz", "case_post_t2.nii.gz")):
        plan = plan_study(Study("one", "one", _files(*names)))
        assert plan.ok, (names, plan.problems)


def test_mapping_overrides_identification_and_unidentified_series_are_reported():
    study = Study("case-1", "case-1", (_series("a", "series 5", 5), _series("b", "t2_tse_tra", 3),
                                       _series("c", "mystery", 9), _series("d", "AAHead_Scout", 1, files=3)))
    plan = plan_study(study)
    assert not plan.ok
    roles = {v.series.key: v.role for v in plan.verdicts}
    assert roles == {"a": "unknown", "b": "used", "c": "unknown", "d": "ignored"}
    plan = plan_study(study, mapping=Mapping((MappingRule("t1c", match="series 5"),)))
    assert plan.ok and dict(plan.chosen)["t1c"] == "a"
    used = next(v for v in plan.verdicts if v.series.key == "a")
    assert used.identification.source == "mapping" and used.identification.confidence == 1.0


def test_a_ct_study_is_not_planned_and_the_problem_says_it_is_ct():
    ct = _series("a", "ABD PORTAL 3mm", 2, header={"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]})
    ident = identify(ct.name, header=ct.header)
    assert ident.sequence == IGNORE and "Modality CT, not MRI" in ident.reasons[0]
    # the real TotalSegmentator slab: its protocol 'FDG_TK_KM' holds a contrast marker ('KM'); the reason
    # given first (the one the dry run shows) is still the one that decided
    slab = identify("CT Body 3.0", protocol="FDG_TK_KM", header={"Modality": "CT"})
    assert slab.sequence == IGNORE and "Modality CT, not MRI" in slab.reasons[0], slab.reasons
    assert any("contrast marker" in r for r in slab.reasons[1:])
    mr = identify("t1_mprage_post", header={"Modality": "MR"})
    assert mr.sequence == "t1c"  # MR itself is no evidence either way
    plan = plan_study(Study("s", "s", (ct, _series("b", "localizer", 1))))
    assert not plan.ok and [v.role for v in plan.verdicts] == ["ignored", "ignored"]
    problem = plan.problems[0]
    assert "#2 'ABD PORTAL 3mm': ignored, Modality CT, not MRI" in problem and "#1 'localizer': ignored" in problem
    assert "deepedit segment --model liver-lesion" in problem


@pytest.mark.realdata
def test_a_real_ct_dicom_series_in_a_batch_folder_is_recognised_as_ct(shared_data, tmp_path):
    import shutil

    study = tmp_path / "in" / "ct-study"
    study.mkdir(parents=True)
    for f in sorted((shared_data / "dicom" / "ct-3slice-liver").glob("0*.dcm")):
        shutil.copy(f, study)
    (found,) = discover_studies(tmp_path / "in")
    plan = plan_study(found)
    assert not plan.ok and "Modality CT, not MRI" in plan.problems[0] and "liver-lesion" in plan.problems[0]


def test_too_short_dicom_series_is_not_a_volume():
    study = Study("s", "s", (_series("a", "t1_vibe_post", 2, files=2),))
    plan = plan_study(study)
    assert not plan.ok and plan.verdicts[0].role == "ignored" and "not a volume" in plan.verdicts[0].note


# ----------------------------------------------------------------------------------- discovery


def _volume(value: float, size=(12, 10, 6), spacing=(2.0, 2.0, 4.0)) -> sitk.Image:
    arr = np.full(size[::-1], value, np.int16)
    arr[:, 2:8, 3:9] += 100
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, -10.0, -12.0))
    return img


def test_discovery_splits_dicom_by_study_and_series_and_ignores_the_rest(tmp_path):
    inp = tmp_path / "in"
    rng = np.random.default_rng(0)
    # one folder holding two studies (mixed files), a DICOMDIR and a text file
    mixed = inp / "patient-folder"
    for study, n in (("1.2.826.0.1.3680043.99.1", 0), ("1.2.826.0.1.3680043.99.2", 10)):
        for k, seq in enumerate(("t1c", "t2")):
            p = PROTOCOL[seq]
            write_dicom_series(_volume(10 + k), mixed, study_uid=study, series_uid=f"{study}.{k + 1}",
                               description=p["description"], series_number=k + 2, tags=p["tags"], rng=rng,
                               prefix=f"F{n + k}_")
    write_dicomdir_stub(mixed / "DICOMDIR")
    (mixed / "readme.txt").write_text("not an image")
    # a NIfTI study in a nested folder, with a label map
    nested = inp / "sub-01" / "anat"
    nested.mkdir(parents=True)
    sitk.WriteImage(_volume(5), str(nested / "sub-01_ce-gd_T1w.nii.gz"))
    sitk.WriteImage(_volume(6), str(nested / "sub-01_T2w.nii.gz"))
    sitk.WriteImage(_volume(0), str(nested / "sub-01_seg.nii.gz"))
    # a DICOM study in its own folder, series in sub-folders
    for k, seq in enumerate(("t1c", "flair")):
        p = PROTOCOL[seq]
        write_dicom_series(_volume(20 + k), inp / "case-7" / f"S{k}", study_uid="1.2.826.0.1.3680043.99.7",
                           series_uid=f"1.2.826.0.1.3680043.99.7.{k}", description=p["description"], series_number=k + 1,
                           tags=p["tags"])
    studies = discover_studies(inp)
    names = [s.name for s in studies]
    assert len(names) == 4 and "case-7" in names and "sub-01_anat" in names
    split = [s for s in studies if s.name.startswith("patient-folder-")]
    assert len(split) == 2 and all(len(s.series) == 2 for s in split)
    assert all(s.ignored_files == 2 for s in split)  # DICOMDIR and readme.txt, in the folder they share
    case7 = next(s for s in studies if s.name == "case-7")
    assert [s.name for s in case7.series] == [PROTOCOL["t1c"]["description"], PROTOCOL["flair"]["description"]]
    assert case7.series[0].header["ContrastBolusAgent"] == "Gadovist"
    plans = {s.name: plan_study(s) for s in studies}
    assert dict(plans["sub-01_anat"].chosen) == {"t1c": "sub-01_ce-gd_T1w.nii.gz", "t2": "sub-01_T2w.nii.gz"}
    assert dict(plans["case-7"].chosen).keys() == {"t1c", "flair"}
    # no UID or patient attribute in names, keys or headers
    text = json.dumps([p.to_dict() for p in plans.values()])
    for secret in (FAKE_PATIENT_NAME, FAKE_PATIENT_ID, "1.2.826.0.1.3680043.99"):
        assert secret not in text
    assert all(secret not in n for n in names for secret in ("1.2.826",))


def test_discovery_of_a_missing_or_empty_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover_studies(tmp_path / "nope")
    assert discover_studies(tmp_path) == []


def test_a_series_split_over_two_folders_is_one_series(tmp_path):
    """CD and PACS exports split a series' files over folders (DIR000, DIR001): each folder's part was taken as a
    series of its own, and the reference became the 55-slice tail of the T1c."""
    from SegmentationDeepEditLib.batch.run import _read_series

    inp = tmp_path / "in"
    vol = _volume(10, size=(12, 10, 9))
    p = PROTOCOL["t1c"]
    files = write_dicom_series(vol, inp / "EXPORT" / "DIR000", study_uid="1.2.826.0.1.3680043.99.8",
                               series_uid="1.2.826.0.1.3680043.99.8.1", description=p["description"], series_number=3,
                               tags=p["tags"])
    (inp / "EXPORT" / "DIR001").mkdir()
    for f in sorted(files)[:4]:
        f.rename(inp / "EXPORT" / "DIR001" / f.name)
    p2 = PROTOCOL["flair"]
    write_dicom_series(_volume(30), inp / "EXPORT" / "DIR001", study_uid="1.2.826.0.1.3680043.99.8",
                       series_uid="1.2.826.0.1.3680043.99.8.2", description=p2["description"], series_number=4,
                       tags=p2["tags"], prefix="FL")
    studies = discover_studies(inp)
    assert [s.name for s in studies] == ["EXPORT"]
    series = {s.number: s for s in studies[0].series}
    assert sorted(series) == [3, 4] and len(series[3].files) == 9 and len(series[4].files) == 6
    img = _read_series(series[3])
    assert img.GetSize() == (12, 10, 9)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(vol))


def test_segment_takes_an_unnamed_dicom_folder_by_its_series_description(tmp_path):
    """`deepedit segment --input FOLDER` (no NAME=): a folder named S0001 says nothing, its SeriesDescription does,
    as in the batch (QA: it said 'cannot tell from the file name')."""
    from SegmentationDeepEditLib.bundle import load_bundle
    from SegmentationDeepEditLib.segment import resolve_input_names

    study = "1.2.826.0.1.3680043.99.12"
    folders = {}
    for k, seq in enumerate(("t1c", "flair")):
        folders[seq] = tmp_path / f"S000{k + 1}"
        write_dicom_series(_volume(30 + k), folders[seq], study_uid=study, series_uid=f"{study}.{k + 1}",
                           description=PROTOCOL[seq]["description"], series_number=k + 1, tags=PROTOCOL[seq]["tags"],
                           protocol=PROTOCOL[seq]["protocol"])
    paths, notes = resolve_input_names(load_bundle("glioma-regions").meta,
                                       [(None, str(folders["flair"])), (None, str(folders["t1c"]))])
    assert paths == {"flair": str(folders["flair"]), "t1c": str(folders["t1c"])}
    assert ("DICOM series 'S0002' ('t2_tirm_tra_dark-fluid') taken as input 'flair' (from its description, protocol "
            "and header)") in notes
    # a series the model does not take, or one nothing tells apart: said from what was read (QA: 'the file name')
    t1 = tmp_path / "S0005"
    write_dicom_series(_volume(40), t1, study_uid=study, series_uid=f"{study}.5", description="AX T1 PRE",
                       series_number=5, tags=PROTOCOL["t1"]["tags"])
    with pytest.raises(InputError, match=r"by its description \('AX T1 PRE'\), protocol and header this is a t1 image"):
        resolve_input_names(load_bundle("glioma-regions").meta, [(None, str(t1)), (None, str(folders["t1c"]))])
    vague = tmp_path / "S0007"
    write_dicom_series(_volume(50), vague, study_uid=study, series_uid=f"{study}.7", description="Series 7",
                       series_number=7)
    with pytest.raises(InputError, match=r"cannot tell from the folder name or the series' description \('Series 7'\)"):
        resolve_input_names(load_bundle("glioma-regions").meta, [(None, str(vague)), (None, str(folders["t1c"]))])


def test_linked_study_folders_are_followed_each_real_folder_once(tmp_path):
    """Studies linked in from a shared drive (QA: ignored, then called 'no images'); a link back up the tree
    or a second link to the same folder is not walked twice."""
    shared = tmp_path / "shared"
    for study in ("pat1", "pat2"):
        (shared / study).mkdir(parents=True)
        for seq in ("t1c", "flair"):
            sitk.WriteImage(_volume(5), str(shared / study / f"{seq}.nii.gz"))
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "pat1").symlink_to(shared / "pat1", target_is_directory=True)
    (inp / "pat2").symlink_to(shared / "pat2", target_is_directory=True)
    (inp / "pat2-again").symlink_to(shared / "pat2", target_is_directory=True)
    (inp / "loop").symlink_to(inp, target_is_directory=True)
    studies = discover_studies(inp)
    assert [s.name for s in studies] == ["pat1", "pat2"]
    assert all(sorted(x.name for x in s.series) == ["flair.nii.gz", "t1c.nii.gz"] for s in studies)
    from SegmentationDeepEditLib.batch.run import run_batch

    (inp / "empty").mkdir()
    assert run_batch(inp, None, dry_run=True).without_images == ["empty"]  # not the second link, not the loop
