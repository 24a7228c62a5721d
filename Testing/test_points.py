"""Point files (markups RAS/LPS, JSON, CSV, FCSV) and the extreme-point rules."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.points import extreme_points_from_mask, read_points, validate_extreme_points

PTS = np.array([[10, 20, 30], [40, 20, 30], [25, 5, 30], [25, 35, 30], [25, 20, 15], [25, 20, 45]], float)


def _image():
    img = sitk.Image(64, 64, 64, sitk.sitkFloat32)
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def _markups(path, pts, system):
    cps = [{"id": str(n), "label": f"P-{n}", "position": list(p), "positionStatus": "defined"} for n, p in enumerate(pts, 1)]
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", "controlPoints": cps}]}
    path.write_text(json.dumps(doc))
    return path


def test_markups_ras_is_converted_to_lps(tmp_path):
    ras = PTS * [-1, -1, 1]
    np.testing.assert_allclose(read_points(_markups(tmp_path / "p.mrk.json", ras, "RAS")), PTS)


def test_markups_lps_is_kept(tmp_path):
    np.testing.assert_allclose(read_points(_markups(tmp_path / "p.mrk.json", PTS, "LPS")), PTS)


def test_markups_without_control_points_is_an_error(tmp_path):
    f = _markups(tmp_path / "empty.mrk.json", [], "LPS")
    with pytest.raises(InputError, match="no control points") as e:
        read_points(f)
    assert "empty.mrk.json" in str(e.value)


def test_plain_json_csv_and_fcsv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(PTS.tolist()))
    (tmp_path / "b.json").write_text(json.dumps({"coordinateSystem": "RAS", "points": (PTS * [-1, -1, 1]).tolist()}))
    (tmp_path / "c.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in PTS))
    fcsv = "# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    fcsv += "\n".join(f"{n},{-p[0]},{-p[1]},{p[2]},0,0,0,1,1,1,0,F-{n},," for n, p in enumerate(PTS))
    (tmp_path / "d.fcsv").write_text(fcsv)
    for name in ("a.json", "b.json", "c.csv", "d.fcsv"):
        np.testing.assert_allclose(read_points(tmp_path / name), PTS, err_msg=name)


def test_bad_csv_row_names_the_line(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2,3\n4,five,6\n")
    with pytest.raises(InputError, match="line 2"):
        read_points(tmp_path / "bad.csv")


@pytest.mark.parametrize("text,sep,line", [("1;2;3\n4;5;6\n", "semicolons", 1),
                                           ("x;y;z\n1,5;2;3\n", "semicolons", 1),
                                           ("1,5;2,5;3,0\n", "semicolons", 1),
                                           ("x,y,z\n1\t2\t3\n", "tabs", 2)])
def test_a_csv_separated_otherwise_is_refused_saying_so(tmp_path, text, sep, line):
    """A spreadsheet saved in a locale with decimal commas writes 1,5;2;3: its first line was taken as a header."""
    (tmp_path / "pts.csv").write_text(text)
    with pytest.raises(InputError, match=f"pts.csv: line {line}: the values are separated by {sep}, not commas"):
        read_points(tmp_path / "pts.csv")


def test_six_good_points_pass():
    np.testing.assert_array_equal(validate_extreme_points(PTS, _image()), PTS)


@pytest.mark.parametrize("n", [5, 7])
def test_wrong_number_of_points(n):
    pts = np.vstack([PTS, PTS[:1] + 1])[:n]
    with pytest.raises(InputError, match=f"exactly 6 points, got {n}"):
        validate_extreme_points(pts, _image())


def test_point_outside_names_the_point():
    pts = PTS.copy()
    pts[3] = [25, 80, 30]
    with pytest.raises(InputError, match="point 4 .* outside the image"):
        validate_extreme_points(pts, _image())


def test_points_on_one_plane():
    pts = PTS.copy()
    pts[:, 2] = 30
    with pytest.raises(InputError, match="one plane .*z coordinates"):
        validate_extreme_points(pts, _image())


def test_extreme_points_of_a_box_mask():
    img = sitk.Image(40, 30, 20, sitk.sitkUInt8)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((5.0, 6.0, 7.0))
    arr = np.zeros((20, 30, 40), np.uint8)
    arr[5:11, 10:21, 8:33] = 1  # k 5..10, j 10..20, i 8..32
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(img)
    pts = extreme_points_from_mask(m)
    assert pts[0][0] == 5 + 8 and pts[1][0] == 5 + 32
    assert pts[2][1] == 6 + 2 * 10 and pts[3][1] == 6 + 2 * 20
    assert pts[4][2] == 7 + 3 * 5 and pts[5][2] == 7 + 3 * 10
    validate_extreme_points(pts, m)
    rng = np.random.default_rng(0)
    jittered = extreme_points_from_mask(m, rng=rng, jitter_mm=2.0)
    assert jittered.shape == (6, 3) and not np.allclose(jittered, pts)
    assert np.abs(jittered - pts).max() < 15


def test_empty_mask_has_no_extreme_points():
    with pytest.raises(InputError, match="empty"):
        extreme_points_from_mask(sitk.Image(4, 4, 4, sitk.sitkUInt8))
