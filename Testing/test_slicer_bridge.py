"""The decisions the Slicer module delegates to the core: geometry, points tags, hints, input guesses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib import slicer_bridge as SB
from SegmentationDeepEditLib.errors import InputError


def _oblique_image():
    image = sitk.Image(7, 5, 4, sitk.sitkInt16)
    image.SetSpacing((0.7, 1.3, 3.0))
    image.SetOrigin((12.5, -40.0, 7.25))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix())  # all axes oblique
    return image


# --- geometry ------------------------------------------------------------------------------------


def test_ijk_to_ras_puts_every_voxel_where_itk_does():
    image = _oblique_image()
    m = SB.ijk_to_ras_from_lps_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    for index in [(0, 0, 0), (6, 0, 0), (0, 4, 0), (0, 0, 3), (6, 4, 3), (3, 2, 1)]:
        ras = (m @ np.array([*index, 1.0]))[:3]
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)


def test_lps_geometry_round_trip():
    image = _oblique_image()
    m = SB.ijk_to_ras_from_lps_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    spacing, origin, direction = SB.lps_geometry_from_ijk_to_ras(m)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(direction, image.GetDirection(), atol=1e-12)


def test_slicer_default_axial_volume_is_identity_in_lps():
    """Slicer's IJK->RAS for a DICOM-like axial volume is diag(-s, -s, s): identity direction in LPS."""
    spacing, origin, direction = SB.lps_geometry_from_ijk_to_ras(np.diag([-0.5, -0.5, 2.0, 1.0]))
    np.testing.assert_allclose(spacing, (0.5, 0.5, 2.0))
    np.testing.assert_allclose(direction, np.eye(3).reshape(-1))
    np.testing.assert_allclose(origin, (0.0, 0.0, 0.0), atol=0)


@pytest.mark.parametrize("matrix, message", [
    (np.diag([1.0, 0.0, 1.0, 1.0]), "zero or invalid spacing"),
    (np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float), "sheared"),
])
def test_bad_matrices_are_refused(matrix, message):
    with pytest.raises(InputError, match=message):
        SB.lps_geometry_from_ijk_to_ras(matrix)


def test_volume_array_becomes_an_image_with_lps_geometry():
    image = _oblique_image()
    arr = np.arange(4 * 5 * 7, dtype=np.int16).reshape(4, 5, 7)  # [k, j, i]
    m = SB.ijk_to_ras_from_lps_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    out = SB.image_from_volume_array(arr, m)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    assert out.GetSize() == (7, 5, 4)
    ras = (m @ np.array([6, 4, 3, 1.0]))[:3]
    np.testing.assert_allclose(out.TransformIndexToPhysicalPoint((6, 4, 3)), ras * [-1, -1, 1], atol=1e-9)
    arr[0, 0, 0] = 999
    assert sitk.GetArrayViewFromImage(out)[0, 0, 0] != 999, "the pixels must be copied"
    with pytest.raises(InputError, match="3D scalar"):
        SB.image_from_volume_array(np.zeros((2, 3, 4, 3)), m)


def test_mask_must_lie_on_the_volume_grid():
    image = _oblique_image()
    m = SB.ijk_to_ras_from_lps_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    mask[3, 2, 1] = 1
    arr = SB.check_mask_fits_volume(mask, m, (4, 5, 7))
    assert arr.dtype == np.uint8 and arr.shape == (4, 5, 7) and arr[1, 2, 3] == 1
    moved = sitk.Image(mask)
    moved.SetOrigin((12.5, -40.0, 8.25))
    with pytest.raises(InputError, match="does not lie on the volume's voxel grid"):
        SB.check_mask_fits_volume(moved, m, (4, 5, 7))
    with pytest.raises(InputError, match="voxel grid"):
        SB.check_mask_fits_volume(mask, m, (4, 5, 8))


# --- points kept with a segment ------------------------------------------------------------------


def test_points_tag_round_trip():
    rng = np.random.default_rng(1)
    extreme, positive = rng.normal(0, 50, (6, 3)), rng.normal(0, 50, (2, 3))
    text = SB.points_tag_value(extreme, positive, None, "deepedit-extreme-points")
    data = json.loads(text)
    assert data["coordinateSystem"] == "LPS" and data["format"] == SB.POINTS_FORMAT and data["negative"] == []
    back = SB.parse_points_tag(text)
    np.testing.assert_allclose(back.extreme, extreme, atol=1e-4)
    np.testing.assert_allclose(back.positive, positive, atol=1e-4)
    assert back.negative.shape == (0, 3) and back.model_id == "deepedit-extreme-points"


def test_points_tag_survives_the_seg_nrrd_tag_format():
    """.seg.nrrd stores tags as "key:value|key:value|" on one header line: no "|", no line break."""
    text = SB.points_tag_value(np.zeros((6, 3)), model_id="odd|model\nname")
    assert "|" not in text and "\n" not in text and ":" not in SB.POINTS_TAG
    assert SB.parse_points_tag(text).model_id == "odd|model\nname"


def test_points_tag_in_ras_is_converted():
    text = json.dumps({"format": SB.POINTS_FORMAT, "coordinateSystem": "RAS", "extreme": [[1, 2, 3]] * 6})
    np.testing.assert_allclose(SB.parse_points_tag(text).extreme, [[-1, -2, 3]] * 6)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "other/1"}), "format"),
    (json.dumps({"format": SB.POINTS_FORMAT, "extreme": [[1, 2]]}), "finite"),
    (json.dumps({"format": SB.POINTS_FORMAT, "extreme": [["a", 2, 3]]}), "not numbers"),
    (json.dumps({"format": SB.POINTS_FORMAT, "coordinateSystem": "XYZ", "extreme": []}), "coordinateSystem"),
])
def test_malformed_points_tags_are_errors(text, message):
    with pytest.raises(InputError, match=message):
        SB.parse_points_tag(text)


# --- hints ---------------------------------------------------------------------------------------


def test_hint_names_the_next_extreme_then_says_what_to_do():
    assert "Point 1 of 6" in SB.next_extreme_hint(0) and "right-most" in SB.next_extreme_hint(0)
    assert "Point 4 of 6" in SB.next_extreme_hint(3) and "posterior" in SB.next_extreme_hint(3)
    assert "inferior" in SB.next_extreme_hint(5)
    assert "All six" in SB.next_extreme_hint(6)
    assert "delete 1" in SB.next_extreme_hint(7)
    assert [SB.extreme_point_label(i) for i in range(7)] == ["R", "L", "A", "P", "S", "I", "7"]


# --- guessing inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [
    ("T1", "t1"), ("t1_mprage", "t1"), ("T1 post Gd", "t1c"), ("T1c", "t1c"), ("BraTS_t1ce", "t1c"),
    ("t1_vibe_KM", "t1c"), ("T1+C", "t1c"), ("T2", "t2"), ("t2_tse_tra", "t2"), ("FLAIR", "flair"),
    ("t2_flair_tra", "flair"), ("case01_t2f", "flair"), ("CT abdomen", "ct"), ("ct_portal", "ct"),
    ("MRHead", None), ("sequence 5", None),
])
def test_sequence_of_name(name, kind):
    assert SB.sequence_of_name(name) == kind


def test_guess_glioma_inputs_from_names():
    inputs = [{"name": "t1c", "modality": "MR"}, {"name": "t2", "modality": "MR"}, {"name": "flair", "modality": "MR"}]
    names = ["T1 native", "T1 post Gd", "T2 TSE", "FLAIR axial"]
    assert SB.guess_input_volumes(inputs, names) == [1, 2, 3]
    # reordered volumes, a missing one: the rest still found, the missing one left to the user
    assert SB.guess_input_volumes(inputs, ["flair", "t1ce"]) == [1, None, 0]


def test_native_t1_is_not_taken_for_contrast_t1():
    inputs = [{"name": "t1", "modality": "MR"}]
    assert SB.guess_input_volumes(inputs, ["T1 post contrast"]) == [None]
    assert SB.guess_input_volumes(inputs, ["T1 post contrast", "T1 native"]) == [1]


def test_single_input_models_take_the_only_volume():
    assert SB.guess_input_volumes([{"name": "image", "modality": "any"}], ["MRHead"]) == [0]
    assert SB.guess_input_volumes([{"name": "ct", "modality": "CT"}], ["Abdomen CT", "Mask"]) == [0]
    assert SB.guess_input_volumes([{"name": "image", "modality": "any"}], []) == [None]


# --- terminology ---------------------------------------------------------------------------------

TUMOUR = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered Structure"
          "~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~^^~^^")


def test_terminology_of_label():
    assert SB.terminology_of_label({"terminology": TUMOUR}) == TUMOUR
    assert SB.terminology_of_label({"name": "x"}) is None
    assert SB.terminology_of_label({"terminology": "Tumour"}) is None
    assert SB.terminology_of_label({"terminology": TUMOUR.replace("~^^~^^", "")}) is None


def test_segments_from_result_prefers_overlapping_regions():
    from SegmentationDeepEditLib.slicer_bridge import segments_from_result

    result = {"segments": [{"value": 1, "name": "core", "color": [1, 0, 0]}, {"value": 2, "name": "edema", "color": [0, 1, 0]},
                           {"value": 4, "name": "enh", "color": [1, 1, 0]}],
              "regions": [{"name": "ET", "values": [4], "color": [1, 1, 0]}, {"name": "TC", "values": [1, 4], "color": [1, 0, 0]},
                          {"name": "WT", "values": [1, 2, 4], "color": [0, 1, 0]}]}
    segs = segments_from_result(result)
    assert [s["name"] for s in segs] == ["ET", "TC", "WT"] and segs[2]["values"] == [1, 2, 4]
    result["regions"] = []
    segs = segments_from_result(result)
    assert [(s["name"], s["values"]) for s in segs] == [("core", [1]), ("edema", [2]), ("enh", [4])]


def test_batch_request_from_the_batch_tab(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    # an unset pathlib.Path parameter reads "." in Slicer: that is "not chosen", never the current folder
    for unset in ("", ".", None):
        with pytest.raises(InputError, match="choose the folder of studies"):
            SB.batch_request(unset, tmp_path / "out")
    with pytest.raises(InputError, match="does not exist"):
        SB.batch_request(tmp_path / "nope", tmp_path / "out")
    assert SB.batch_request(studies, ".", plan_only=True) == {"input_dir": str(studies)}
    with pytest.raises(InputError, match="choose an output folder"):
        SB.batch_request(studies, ".")
    with pytest.raises(InputError, match="1 or more"):
        SB.batch_request(studies, tmp_path / "out", workers=0)
    fields = SB.batch_request(studies, tmp_path / "out", model="", workers=2, resume=True, device="cpu")
    assert fields == {"input_dir": str(studies), "output_dir": str(tmp_path / "out"), "model": None, "workers": 2,
                      "resume": True, "device": "cpu"}
    assert SB.batch_request(studies, tmp_path / "out", model="none")["model"] == "none"
    with pytest.raises(InputError, match="mapping file does not exist"):
        SB.batch_request(studies, tmp_path / "out", mapping=tmp_path / "map.json")
    (tmp_path / "map.json").write_text("{}")
    assert SB.batch_request(studies, ".", mapping=tmp_path / "map.json", plan_only=True)["mapping"] == str(tmp_path / "map.json")
    assert "mapping" not in SB.batch_request(studies, ".", mapping=".", plan_only=True)


def test_batch_model_choices_are_brain_models_default_first():
    from SegmentationDeepEditLib.batch.segment import DEFAULT_BRAIN_MODEL, batch_models
    from SegmentationDeepEditLib.bundle import list_bundles

    bundles = list_bundles()
    ids = [b.id for b in batch_models(bundles)]
    assert ids and ids[0] == DEFAULT_BRAIN_MODEL
    assert "brain-tumor-2d" in ids
    assert "liver-lesion" not in ids and "deepedit-extreme-points" not in ids  # CT input; annotation model


# ---------------------------------------------------------------- worker messages

def test_route_worker_messages_answers_each_request_once_and_drops_strays():
    a, b = {"kind": "annotate"}, {"kind": "load"}
    pending = {1: a, 2: b}
    events = SB.route_worker_messages([
        {"ready": True},                                   # no id: dropped
        {"log": "model loaded"},
        {"id": 1, "progress": 0.5, "stage": "inference"},
        {"id": 9, "result": {}},                           # a cancelled request: dropped
        {"id": 2, "error": "no such model"},
        {"id": 1, "result": {"label": "x"}},
        {"id": 1, "result": {"label": "again"}},           # already answered: dropped
    ], pending)
    assert [(e.kind, e.context) for e in events] == [("log", None), ("progress", a), ("error", b), ("result", a)]
    assert events[0].message["log"] == "model loaded" and events[3].message["result"] == {"label": "x"}
    assert pending == {}


def test_route_worker_messages_reports_requests_lost_when_the_worker_exits():
    a, b = {"kind": "annotate"}, {"kind": "segment"}
    pending = {1: a, 2: b}
    events = SB.route_worker_messages([{"id": 1, "progress": 0.2}, {"exited": -9}, {"exited": -9},
                                       {"id": 2, "result": {}}], pending)
    assert [e.kind for e in events] == ["progress", "lost"]  # one report; nothing after the exit
    assert events[1].contexts == [a, b] and events[1].message["exited"] == -9
    assert pending == {}
    assert SB.route_worker_messages([{"exited": 0}], {}) == []  # a clean exit with nothing pending


# ------------------------------------------------------------- which segment a result replaces


def test_only_a_segment_made_here_is_replaced_by_a_result():
    # e.g. Slicer selects a hand-painted "Liver" after the current segment is deleted: never overwritten
    assert SB.segment_to_replace("Segment_1", exists=True, has_points=True) == "Segment_1"
    assert SB.segment_to_replace("Segment_1", exists=True, has_points=False) == ""
    assert SB.segment_to_replace("Segment_1", exists=False, has_points=True) == ""  # deleted meanwhile
    assert SB.segment_to_replace("", exists=False, has_points=False) == ""


def test_a_result_becomes_the_refined_segment_only_when_nothing_changed_since_it_was_sent():
    target = SB.AnnotationTarget()
    # first run of object A into segmentation S: its new segment is what the next clicks refine
    a = target.ticket("S", "")
    assert target.adopts(a, "S", "")
    # "New object" while A's first run is still going: A's result must not become the new object's segment
    a = target.ticket("S", "")
    target.detach()
    assert not target.adopts(a, "S", "")
    # the user chose another output segmentation T (its "Segment_1" is not ours) while a run was going
    b = target.ticket("S", "Segment_1")
    target.detach()
    assert not target.adopts(b, "T", "")
    # another segment chosen in the selector while a run was going
    c = target.ticket("S", "Segment_1")
    target.detach()
    assert not target.adopts(c, "S", "Segment_2")
    # a refinement of the current segment, nothing changed: stays current
    d = target.ticket("S", "Segment_2")
    assert target.adopts(d, "S", "Segment_2")
    assert not target.adopts(d, "S", "Segment_3") and not target.adopts(d, None, "Segment_2")
