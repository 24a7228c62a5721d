"""The annotation pipeline end to end with the bundled model: geometry exact, Dice real."""

import itertools
import json
import subprocess
import sys

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.annotate import annotate, keep_enclosed_component
from SegmentationDeepEditLib.geometry import grid_of, reorient_axes, resample_to_grid, same_geometry
from SegmentationDeepEditLib.imageio import read_image
from SegmentationDeepEditLib.metrics import dice
from SegmentationDeepEditLib.points import extreme_points_from_mask
from SegmentationDeepEditLib import synthetic


def _mask(label, values):
    m = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(label), values).astype(np.uint8))
    m.CopyInformation(label)
    return m


def _assert_same_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@pytest.fixture(scope="module")
def brain_case():
    case = synthetic.make_brain_case(11)
    truth = synthetic.tumour_core_mask(case.label, "brain")
    return case.images["t1c"], truth


def test_synthetic_tumour_core(brain_case):
    img, truth = brain_case
    r = annotate(img, extreme_points_from_mask(truth), device="cpu")
    _assert_same_geometry(r.mask, img)
    d = dice(r.mask, truth)
    print(f"synthetic brain seed 11: Dice {d:.3f}, {r.seconds['total']:.2f} s")
    assert d >= 0.85
    assert r.device == "cpu" and r.model_id == "deepedit-extreme-points"


def test_tta_runs_and_agrees(brain_case):
    img, truth = brain_case
    pts = extreme_points_from_mask(truth)
    plain = annotate(img, pts, device="cpu")
    tta = annotate(img, pts, device="cpu", tta=True)
    assert dice(tta.mask, plain.mask) > 0.9
    assert dice(tta.mask, truth) >= 0.85


def test_48_axis_orders_give_the_same_segmentation_in_physical_space(brain_case):
    img, truth = brain_case
    pts = extreme_points_from_mask(truth)
    ref = annotate(img, pts, device="cpu").mask
    ref_arr = sitk.GetArrayFromImage(ref)
    worst = 1.0
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            r_img = reorient_axes(img, perm, flips)
            out = annotate(r_img, pts, device="cpu").mask
            _assert_same_geometry(out, r_img)
            back = sitk.GetArrayFromImage(resample_to_grid(out, grid_of(img), interpolator=sitk.sitkNearestNeighbor))
            changed = int((back != ref_arr).sum())
            worst = min(worst, dice(back, ref_arr))
            assert changed <= max(3, 0.001 * ref_arr.sum()), f"perm {perm} flips {flips}: {changed} voxels differ"
    assert worst > 0.998


def test_keep_enclosed_component_drops_distant_blobs():
    m = np.zeros((20, 20, 20), np.uint8)
    m[5:10, 5:10, 5:10] = 1
    m[15:19, 15:19, 15:19] = 1  # a small blob outside the box
    m[0:3, 12:20, 0:20] = 1  # a larger blob (480 voxels) outside the box
    out = keep_enclosed_component(m, np.array([4, 4, 4]), np.array([10, 10, 10]))
    assert out.sum() == 125 and out[7, 7, 7] == 1


def test_real_brain_tumour_core_geometry_and_dice(shared_data):
    d = shared_data / "brain-tumor" / "brats2013-pat0004"
    img = read_image(d / "t1c.nii.gz")
    truth = _mask(read_image(d / "seg.nii.gz", what="label"), [1, 3, 4])  # BraTS 2013: TC = 1 + 3 + 4
    r = annotate(img, extreme_points_from_mask(truth), device="cpu")
    _assert_same_geometry(r.mask, img)
    score = dice(r.mask, truth)
    print(f"brats2013-pat0004 (held out) tumour core: Dice {score:.3f}, {r.seconds['total']:.2f} s")
    assert score >= 0.80  # 0.872 with model 0.1.0


def test_real_ct_liver_with_ras_direction(shared_data):
    d = shared_data / "abdomen-ct" / "totalseg-example"
    img = read_image(d / "ct.nii.gz")
    assert img.GetDirection()[0] == -1.0  # stored RAS: the trap this test is for
    truth = read_image(d / "liver.nii.gz", what="label") > 0
    r = annotate(img, extreme_points_from_mask(truth), device="cpu")
    _assert_same_geometry(r.mask, img)
    score = dice(r.mask, truth)
    print(f"totalseg-example liver: Dice {score:.3f}")
    assert score >= 0.65  # 0.712 with model 0.1.0


def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "SegmentationDeepEditLib.cli", "demo", "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dice"] >= 0.90, summary
    for f in ("image.nrrd", "truth.seg.nrrd", "points.json", "segmentation.seg.nrrd", "overview.png", "result.json"):
        assert (out / f).is_file(), f
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "result.json").read_text())["dice"] == summary["dice"]
    seg = read_image(out / "segmentation.seg.nrrd", what="segmentation")
    assert same_geometry(seg, read_image(out / "image.nrrd"))
    import slicerio  # the segment carries the bundle's Slicer terminology (Morphologically Altered Structure / Mass)
    term = slicerio.read_segmentation(str(out / "segmentation.seg.nrrd"))["segments"][0]["terminology"]
    assert term["category"][1] == "49755003" and term["type"][1] == "4147007"
    # a second run refuses to overwrite
    again = subprocess.run([sys.executable, "-m", "SegmentationDeepEditLib.cli", "demo", "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "overwrite" in again.stderr


def _axis_grid(size=(30, 30, 30), spacing=(1.0, 1.0, 1.0)):
    from SegmentationDeepEditLib.geometry import grid_of

    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    return grid_of(img)


def test_click_threshold_moves_towards_each_clicks_side():
    from SegmentationDeepEditLib.annotate import click_threshold

    grid = _axis_grid(spacing=(2.0, 2.0, 2.0))  # LPS mm = 2 * index
    meta = {"output": {"threshold": 0.5, "click_prior": {"radius_mm": 6.0, "strength": 0.4}}}
    thr = click_threshold(meta, grid, np.array([[10.0, 10.0, 10.0]]), np.array([[40.0, 40.0, 40.0]]))
    assert thr.shape == (30, 30, 30)
    assert thr[5, 5, 5] == pytest.approx(0.1)  # on the positive click: 0.5 - 0.4
    assert thr[20, 20, 20] == pytest.approx(0.9)  # on the negative click: 0.5 + 0.4
    assert thr[8, 5, 5] == pytest.approx(0.5 - 0.4 * np.exp(-36 / 72))  # 6 mm away along k
    assert abs(thr[29, 0, 0] - 0.5) < 1e-3  # far from both
    assert click_threshold(meta, grid, None, None) == 0.5  # no clicks
    assert click_threshold({"output": {"threshold": 0.5}}, grid, np.array([[10.0, 10, 10]]), None) == 0.5


def test_positive_click_prior_adds_the_missed_part_on_a_real_case(shared_data):
    """pat0004 (held out): a click at the centre of the largest missed region recovers more with the prior."""
    from scipy import ndimage as ndi

    from SegmentationDeepEditLib.bundle import load_bundle

    d = shared_data / "brain-tumor" / "brats2013-pat0004"
    img = read_image(d / "t1c.nii.gz")
    truth = _mask(read_image(d / "seg.nii.gz", what="label"), [1, 3, 4])
    pts = extreme_points_from_mask(truth)
    bundle = load_bundle("deepedit-extreme-points")
    assert bundle.meta["output"].get("click_prior"), "the bundled model declares its click prior"
    first = annotate(img, pts, bundle, device="cpu")
    missed = (sitk.GetArrayFromImage(truth) > 0) & (sitk.GetArrayFromImage(first.mask) == 0)
    lab, n = ndi.label(missed)
    biggest = lab == (1 + int(np.argmax(np.bincount(lab.ravel())[1:])))
    dist = ndi.distance_transform_edt(biggest)
    k, j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
    click = np.array([img.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))])
    with_prior = annotate(img, pts, bundle, device="cpu", positive=click)
    bare = dict(bundle.meta, output={k2: v for k2, v in bundle.meta["output"].items() if k2 != "click_prior"})
    plain_bundle = dataclasses.replace(bundle, meta=bare)
    without = annotate(img, pts, plain_bundle, device="cpu", positive=click)
    scores = [dice(m, truth) for m in (first.mask, without.mask, with_prior.mask)]
    print("pat0004 Dice: six points {:.3f}, +1 click {:.3f}, +1 click with prior {:.3f}".format(*scores))
    assert scores[2] > scores[0] and scores[2] >= scores[1]


def test_default_model_follows_the_modality(shared_data):
    """No model named: CT (Hounsfield units) gets the CT-tuned bundle, MRI the default one."""
    from SegmentationDeepEditLib.annotate import default_model_for, looks_like_ct

    ct = read_image(shared_data / "abdomen-ct" / "totalseg-example" / "ct.nii.gz")
    mr = read_image(shared_data / "brain-tumor" / "tcga-du-7294" / "t1c.nii.gz")  # raw intensities
    z = read_image(shared_data / "brain-tumor" / "brats2013-pat0004" / "t1c.nii.gz")  # z-scored
    assert looks_like_ct(ct) and not looks_like_ct(mr) and not looks_like_ct(z)
    assert default_model_for(ct).id == "deepedit-extreme-points-ct"
    assert default_model_for(mr).id == "deepedit-extreme-points" == default_model_for(z).id
    truth = read_image(shared_data / "abdomen-ct" / "totalseg-example" / "liver.nii.gz", what="label") > 0
    r = annotate(ct, extreme_points_from_mask(truth), device="cpu")
    assert r.model_id == "deepedit-extreme-points-ct"
    named = annotate(ct, extreme_points_from_mask(truth), "deepedit-extreme-points", device="cpu")
    assert named.model_id == "deepedit-extreme-points"  # a named model always wins
    assert dice(r.mask, truth) > dice(named.mask, truth)


def test_click_distance_is_exact_on_an_oblique_grid():
    from SegmentationDeepEditLib.annotate import _distance2_mm
    from SegmentationDeepEditLib.geometry import grid_of, index_to_physical

    img = sitk.Image([7, 5, 4], sitk.sitkUInt8)
    img.SetSpacing([0.8, 1.3, 2.5])
    img.SetOrigin([10.0, -20.0, 5.0])
    rot = sitk.VersorTransform([0.3, -0.2, 0.9], 0.7).GetMatrix()
    img.SetDirection(rot)
    grid = grid_of(img)
    p = np.array([12.0, -17.0, 9.0])
    k, j, i = np.meshgrid(np.arange(4), np.arange(5), np.arange(7), indexing="ij")
    centres = index_to_physical(grid, np.stack([i, j, k], -1).reshape(-1, 3)).reshape(4, 5, 7, 3)
    brute = np.sum((centres - p) ** 2, axis=-1)
    assert np.allclose(_distance2_mm(grid, p), brute, rtol=1e-5, atol=1e-3)
