"""DICOM SEG output: frames on the source series' grid, one segment per label value, bad inputs refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.dicomseg import write_dicom_seg
from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.imageio import read_image


@pytest.mark.realdata
def test_dicom_seg_round_trip_on_a_real_series(shared_data, tmp_path):
    import highdicom as hd

    folder = shared_data / "dicom" / "ge-t1-mprage"  # 130 files, names not in slice order, oblique
    img = read_image(folder)
    a = sitk.GetArrayFromImage(img)
    lab = np.zeros(a.shape, np.uint8)
    lab[a > np.percentile(a, 98)] = 1
    lab[40:60, 100:140, 100:140] = 2
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(img)
    files = sorted(folder.iterdir())
    before = {f: f.stat().st_mtime_ns for f in files}
    segs = [{"value": 1, "name": "Bright", "color": [1, 0, 0]},
            {"value": 2, "name": "Liver", "color": [0, 1, 0], "terminology": "SCT^10200004^Liver"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_dicom_seg(label, segs, files, tmp_path / "seg.dcm", model_id="test-model", model_version="1.2.3")
        seg = hd.seg.segread(str(out))
        vol = seg.get_volume()
    assert vol.array.shape == lab.shape + (2,)
    got = vol.array
    if not np.array_equal(got[..., 0], lab == 1):  # highdicom may stack frames in the other direction
        got = got[::-1]
    assert np.array_equal(got[..., 0], lab == 1) and np.array_equal(got[..., 1], lab == 2)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Bright", "Liver"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert {f: f.stat().st_mtime_ns for f in files} == before  # sources untouched
    with pytest.raises(InputError, match="exists"):
        write_dicom_seg(label, segs, files, out)
    with pytest.raises(InputError, match="no segments"):
        write_dicom_seg(label, [], files, tmp_path / "other.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]


def test_dicom_seg_refuses_sources_that_are_not_dicom(tmp_path):
    bad = tmp_path / "not.dcm"
    bad.write_bytes(b"not dicom at all")
    label = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    with pytest.raises(InputError, match="not.dcm"):
        write_dicom_seg(label, [{"value": 1, "name": "x", "color": [1, 0, 0]}], [bad], tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_segment_codes_from_a_slicer_terminology_entry_or_a_bare_code():
    from SegmentationDeepEditLib.dicomseg import _category_and_type

    entry = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
             "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    cat, typ = _category_and_type(entry)
    assert (cat.value, cat.meaning, typ.value, typ.meaning) == ("123037004", "Anatomical Structure", "10200004", "Liver")
    cat, typ = _category_and_type("SCT^10200004^Liver")
    assert cat is None and typ.value == "10200004" and typ.scheme_designator == "SCT"
    assert _category_and_type(None) == (None, None)
    assert _category_and_type("Tumour") == (None, None)
