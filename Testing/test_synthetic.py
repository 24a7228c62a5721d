"""Tests of the synthetic case generator (SegmentationDeepEditLib.synthetic)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.errors import InputError
from SegmentationDeepEditLib.synthetic import (
    BRAIN_LABELS,
    CT_LABELS,
    SyntheticCase,
    make_brain_case,
    make_ct_case,
    tumour_core_mask,
)

# Coarse grids keep the module fast; the defaults are exercised by a few cases only.
BRAIN_FAST = dict(spacing=(1.5, 1.5, 1.5))
CT_FAST = dict(spacing=(1.2, 1.2, 3.0))


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def geometry(img: sitk.Image):
    return (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def centroid_lps(mask: np.ndarray, ref: sitk.Image) -> np.ndarray:
    """Physical (LPS mm) centroid of a [k, j, i] mask on ref's grid."""
    idx = np.argwhere(mask).mean(axis=0)[::-1]
    return np.array(ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    case = fn(*args, **kwargs)
    print(f"{fn.__name__}{args} {kwargs}: {time.perf_counter() - t0:.2f} s, size {case.label.GetSize()}")
    return case


@pytest.fixture(scope="module")
def brain():
    make_brain_case(0, **BRAIN_FAST)  # loads the template once, so that the next time is per case
    return timed(make_brain_case, 11)


@pytest.fixture(scope="module")
def brain_full_rim():
    return make_brain_case(4, rim="full", **BRAIN_FAST)


@pytest.fixture(scope="module")
def ct():
    return timed(make_ct_case, 11)


@pytest.fixture(scope="module")
def ct_hypo():
    # a seed whose lesions are all hypodense or rim-enhancing (none hyperdense)
    for seed in range(100, 140):
        case = make_ct_case(seed, n_lesions=2, **CT_FAST)
        if case.info["n_lesions"] == 2 and all(les["kind"] != "hyperdense" for les in case.info["lesions"]):
            return case
    pytest.fail("no seed with two hypodense lesions")


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("factory,kwargs", [(make_brain_case, dict(thick_slices=4.0)), (make_ct_case, CT_FAST)])
def test_same_seed_same_case(factory, kwargs):
    a, b = factory(7, **kwargs), factory(7, **kwargs)
    assert set(a.images) == set(b.images)
    for name in a.images:
        assert geometry(a.images[name]) == geometry(b.images[name])
        np.testing.assert_array_equal(arr(a.images[name]), arr(b.images[name]))
    np.testing.assert_array_equal(arr(a.label), arr(b.label))
    for name in a.masks:
        np.testing.assert_array_equal(arr(a.masks[name]), arr(b.masks[name]))
    ia = {k: v for k, v in a.info.items() if k != "seconds"}
    ib = {k: v for k, v in b.info.items() if k != "seconds"}
    assert ia == ib


def test_different_seeds_differ(brain, ct):
    other_brain = make_brain_case(12)
    assert other_brain.info["tumour_centre_lps"] != brain.info["tumour_centre_lps"]
    assert geometry(other_brain.label) != geometry(brain.label)
    other_ct = make_ct_case(12)
    assert geometry(other_ct.label) != geometry(ct.label)
    assert other_ct.info["hu"]["liver"] != ct.info["hu"]["liver"]


def test_info_is_json(brain, ct):
    for case in (brain, ct):
        assert isinstance(case, SyntheticCase)
        back = json.loads(json.dumps(case.info))
        assert back["kind"] == case.kind
        assert case.seed == 11


# --------------------------------------------------------------------------- brain


def test_brain_types_and_geometry(brain):
    assert brain.kind == "brain"
    assert set(brain.images) == {"t1", "t1c", "t2", "flair"}
    ref = geometry(brain.label)
    assert brain.label.GetPixelID() == sitk.sitkUInt8
    for img in list(brain.images.values()) + [brain.masks["brain"]]:
        assert geometry(img) == ref
    for img in brain.images.values():
        assert img.GetPixelID() == sitk.sitkFloat32
        assert arr(img).min() >= 0
    d = np.array(brain.label.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    sp = np.array(brain.label.GetSpacing())
    assert np.all((sp >= 0.8 - 1e-6) & (sp <= 5.0 + 1e-6))
    np.testing.assert_allclose(sp, brain.info["spacing"], rtol=1e-5)


def test_brain_labels_and_volumes(brain):
    lab = arr(brain.label)
    values = set(np.unique(lab).tolist())
    assert values <= {0, 1, 2, 4} and {1, 2} <= values
    vox_ml = np.prod(brain.label.GetSpacing()) / 1000.0
    core_ml = np.isin(lab, [1, 4]).sum() * vox_ml
    whole_ml = (lab > 0).sum() * vox_ml
    assert 0.5 < core_ml < 200.0
    assert core_ml < whole_ml < 500.0
    # tumour inside the brain
    brain_mask = arr(brain.masks["brain"]) > 0
    assert (brain_mask[lab > 0]).mean() > 0.99
    # the label sits where info says the tumour is (a check of the geometry)
    c = centroid_lps(np.isin(lab, [1, 4]), brain.label)
    assert np.linalg.norm(c - np.array(brain.info["tumour_centre_lps"])) < 0.4 * brain.info["core_diameter_mm"] + 3


def test_brain_contrasts(brain_full_rim):
    case = brain_full_rim
    lab = arr(case.label)
    brain_mask = arr(case.masks["brain"]) > 0
    normal = brain_mask & (lab == 0)
    flair, t1c, t2 = (arr(case.images[n]) for n in ("flair", "t1c", "t2"))
    assert (lab == 2).sum() > 100 and (lab == 4).sum() > 100 and (lab == 1).sum() > 50
    assert flair[lab == 2].mean() > 1.2 * flair[normal].mean()
    assert t2[lab == 2].mean() > t2[normal].mean()
    assert t1c[lab == 4].mean() > 1.5 * t1c[lab == 1].mean()
    assert t1c[lab == 4].mean() > t1c[normal].mean()


def test_brain_thick_slices_and_requested_spacing():
    thick = make_brain_case(3, thick_slices=5.0)
    assert thick.label.GetSpacing()[2] == pytest.approx(5.0)
    assert thick.info["thick_slices"] is True
    fixed = make_brain_case(3, spacing=(1.25, 1.0, 2.0), size_mm=(120, 130, 100))
    np.testing.assert_allclose(fixed.label.GetSpacing(), (1.25, 1.0, 2.0))
    np.testing.assert_allclose(np.array(fixed.label.GetSize()) * fixed.label.GetSpacing(), (120, 130, 100), atol=2.0)
    # a small field of view still holds the tumour core
    assert np.isin(arr(fixed.label), [1, 4]).sum() > 0


def test_brain_orientation_keeps_anatomy_in_place():
    """Same seed stored axially, sagittally or straight: the tumour stays at the same LPS point."""
    axial = make_brain_case(5, orientation="axial", **BRAIN_FAST)
    sag = make_brain_case(5, orientation="sagittal", **BRAIN_FAST)
    straight = make_brain_case(5, orientation="coronal", oblique=False, **BRAIN_FAST)
    d = np.array(straight.label.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(np.abs(d).sum(axis=0), 1.0)  # a signed permutation: no rotation
    assert axial.info["orientation"] == "axial" and sag.info["orientation"] == "sagittal"
    # the slice normal (k) of a sagittal stack is close to the LPS x axis
    assert abs(np.array(sag.label.GetDirection()).reshape(3, 3)[0, 2]) > np.cos(np.radians(16))
    centres = [centroid_lps(np.isin(arr(c.label), [1, 4]), c.label) for c in (axial, sag, straight)]
    for c in centres[1:]:
        assert np.linalg.norm(c - centres[0]) < 1.5
    vols = [np.isin(arr(c.label), [1, 4]).sum() * np.prod(c.label.GetSpacing()) for c in (axial, sag, straight)]
    assert max(vols) / min(vols) < 1.1


def test_tumour_core_mask(brain, ct):
    core = tumour_core_mask(brain.label, "brain")
    assert geometry(core) == geometry(brain.label) and core.GetPixelID() == sitk.sitkUInt8
    lab = arr(brain.label)
    np.testing.assert_array_equal(arr(core), np.isin(lab, [BRAIN_LABELS["necrotic_non_enhancing_core"],
                                                           BRAIN_LABELS["enhancing"]]).astype(np.uint8))
    liver = tumour_core_mask(ct.label, "ct")
    np.testing.assert_array_equal(arr(liver), (arr(ct.label) >= CT_LABELS["liver"]).astype(np.uint8))
    with pytest.raises(InputError):
        tumour_core_mask(ct.label, "liver")


# --------------------------------------------------------------------------- CT


def test_ct_types_labels_and_geometry(ct):
    assert ct.kind == "ct" and set(ct.images) == {"ct"}
    img = ct.images["ct"]
    assert img.GetPixelID() == sitk.sitkInt16 and ct.label.GetPixelID() == sitk.sitkUInt8
    assert geometry(img) == geometry(ct.label) == geometry(ct.masks["body"])
    d = np.array(img.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    assert abs(d[2, 2]) > np.cos(np.radians(7))  # axial slices, slightly oblique at most
    sp = img.GetSpacing()
    assert 0.7 - 1e-6 <= sp[0] <= 1.0 + 1e-6 and 1.0 - 1e-6 <= sp[2] <= 5.0 + 1e-6
    hu = arr(img)
    lab = arr(ct.label)
    assert set(np.unique(lab).tolist()) <= {0, 1, 2}
    body = arr(ct.masks["body"]) > 0
    assert hu[~body].mean() < -900  # air outside
    assert (body[lab > 0]).mean() > 0.999  # liver inside the body
    liver_ml = (lab >= 1).sum() * np.prod(sp) / 1000.0
    assert 400.0 < liver_ml < 4000.0
    assert 80.0 <= hu[lab == 1].mean() <= 140.0
    assert hu.min() >= -1024 and hu.max() > 300  # bone present


def test_ct_liver_on_patients_right(ct):
    lab = arr(ct.label)
    liver_c = centroid_lps(lab >= 1, ct.label)
    body_c = centroid_lps(arr(ct.masks["body"]) > 0, ct.label)
    # LPS: +x is the patient's left, so the liver has the smaller x
    assert liver_c[0] < body_c[0] - 20
    assert liver_c[0] < ct.info["body_centre_lps"][0]


def test_ct_lesions_darker_than_liver(ct_hypo):
    hu = arr(ct_hypo.images["ct"]).astype(float)
    lab = arr(ct_hypo.label)
    assert (lab == 2).sum() > 10
    assert hu[lab == 2].mean() < hu[lab == 1].mean() - 15
    np.testing.assert_allclose(ct_hypo.label.GetSpacing(), CT_FAST["spacing"])


def test_ct_lesion_count_and_zero_lesions():
    none = make_ct_case(3, n_lesions=0, **CT_FAST)
    assert none.info["n_lesions"] == 0 and not (arr(none.label) == 2).any()
    assert (arr(none.label) == 1).any()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call", [
    lambda: make_brain_case(-1),
    lambda: make_brain_case(1.5),
    lambda: make_brain_case(1, spacing=(1, 0, 1)),
    lambda: make_brain_case(1, spacing=(1, 1)),
    lambda: make_brain_case(1, spacing=1.0, thick_slices=4.0),
    lambda: make_brain_case(1, thick_slices=-2),
    lambda: make_brain_case(1, rim="half"),
    lambda: make_brain_case(1, orientation="oblique"),
    lambda: make_ct_case(1, n_lesions=-1),
    lambda: make_ct_case(True),
])
def test_bad_arguments(call):
    with pytest.raises(InputError):
        call()


def test_native_phase_ct_changes_contrast_only():
    from SegmentationDeepEditLib.synthetic import make_ct_case

    a = make_ct_case(5, spacing=3.0)
    b = make_ct_case(5, spacing=3.0, phase="native")
    la = sitk.GetArrayFromImage(a.label)
    assert np.array_equal(la, sitk.GetArrayFromImage(b.label))
    liver = la == 1
    ha, hb = sitk.GetArrayFromImage(a.images["ct"]), sitk.GetArrayFromImage(b.images["ct"])
    assert np.median(ha[liver]) > 80 and 25 < np.median(hb[liver]) < 75
    body = sitk.GetArrayFromImage(a.masks["body"]) > 0
    fat = body & (ha < -60)
    assert abs(float(np.median(ha[fat])) - float(np.median(hb[fat]))) < 1.0  # non-enhancing tissue unchanged
    with pytest.raises(InputError, match="phase"):
        make_ct_case(5, phase="arterial")


def test_varied_liver_shape_reaches_further_left_and_keeps_the_rest():
    from SegmentationDeepEditLib.synthetic import make_ct_case

    lefts = []
    for seed in range(4):
        a = make_ct_case(seed, spacing=3.0, oblique=False)
        b = make_ct_case(seed, spacing=3.0, oblique=False, liver_shape="varied")
        assert a.info["liver_shape"] == "standard" and b.info["liver_shape"] == "varied"
        assert a.images["ct"].GetSize() == b.images["ct"].GetSize()
        la, lb = sitk.GetArrayFromImage(a.label) > 0, sitk.GetArrayFromImage(b.label) > 0
        assert la.sum() > 0 and lb.sum() > 0 and not np.array_equal(la, lb)
        # the same body (the liver's texture, lesions and noise are drawn after its shape)
        assert np.array_equal(sitk.GetArrayFromImage(a.masks["body"]), sitk.GetArrayFromImage(b.masks["body"]))
        # the left lobe's reach: extent of the liver along the patient's left (+x in LPS)
        def reach(case, mask):
            idx = np.argwhere(mask)[:, ::-1].astype(float)  # i, j, k
            pts = np.array([case.label.TransformContinuousIndexToPhysicalPoint(p) for p in idx[::7]])
            return pts[:, 0].max()
        lefts.append(reach(b, lb) - reach(a, la))
    assert max(lefts) > 15.0  # at least one case's left lobe reaches well further across
    with pytest.raises(InputError, match="liver_shape"):
        make_ct_case(5, liver_shape="round")


def test_varied_core_contrast_moves_non_enhancing_core_towards_edema():
    from SegmentationDeepEditLib.synthetic import make_brain_case

    a = make_brain_case(6200, rim="absent", spacing=2.0, oblique=False)
    b = make_brain_case(6200, rim="absent", spacing=2.0, oblique=False, core_contrast="varied")
    la = sitk.GetArrayFromImage(a.label)
    assert np.array_equal(la, sitk.GetArrayFromImage(b.label))  # same tumour, same label
    assert b.info["core_contrast"] == "varied"
    ia, ib = a.info["intensities"], b.info["intensities"]
    # T1c: the standard core is darker than edema, the varied one 0.92-1.30 x edema
    assert ia["t1c"]["nonenh"] < ia["t1c"]["edema"]
    assert 0.92 <= ib["t1c"]["nonenh"] / ib["t1c"]["edema"] <= 1.30
    assert 0.72 <= ib["flair"]["nonenh"] / ib["flair"]["edema"] <= 0.98
    # and the images show it: core vs edema medians in T1c
    core, edema = la == 1, la == 2
    t1c_a, t1c_b = (sitk.GetArrayFromImage(c.images["t1c"]) for c in (a, b))
    ratio_a = np.median(t1c_a[core]) / np.median(t1c_a[edema])
    ratio_b = np.median(t1c_b[core]) / np.median(t1c_b[edema])
    assert ratio_b > ratio_a
    # the T1 and T2 images are unchanged
    for name in ("t1", "t2"):
        assert np.array_equal(sitk.GetArrayFromImage(a.images[name]), sitk.GetArrayFromImage(b.images[name]))
    with pytest.raises(InputError, match="core_contrast"):
        make_brain_case(5, core_contrast="bright")


def test_chest_ct_reaches_above_the_dome_with_the_heart_and_keeps_the_liver():
    from SegmentationDeepEditLib.synthetic import make_ct_case

    def top_mm(case):  # height of the field of view above the liver's highest voxel (no tilt: k is z)
        la = sitk.GetArrayFromImage(case.label) > 0
        k_top = int(np.flatnonzero(la.any(axis=(1, 2))).max())
        return (case.label.GetSize()[2] - 1 - k_top) * case.label.GetSpacing()[2], la, k_top

    a = make_ct_case(21, spacing=3.0, oblique=False, phase="native")
    b = make_ct_case(21, spacing=3.0, oblique=False, phase="native", chest=True)
    above_a, la, _ = top_mm(a)
    above_b, lb, k_top = top_mm(b)
    assert above_a <= 50.0 and 70.0 <= above_b <= 190.0
    # the same proportions (drawn from the same stream; the noise-driven surface detail differs), a chest above
    assert abs(int(la.sum()) - int(lb.sum())) <= 0.10 * la.sum()
    assert np.array_equal(sitk.GetArrayFromImage(a.masks["body"])[5:40], sitk.GetArrayFromImage(b.masks["body"])[5:40])
    hb = sitk.GetArrayFromImage(b.images["ct"])
    body = sitk.GetArrayFromImage(b.masks["body"]) > 0
    chest = body[k_top + 2:]
    lung = chest & (hb[k_top + 2:] < -600)
    heart_like = chest & (hb[k_top + 2:] > 25) & (hb[k_top + 2:] < 70)  # the native heart: the liver's density
    ml = 27.0 / 1000.0
    assert lung.sum() * ml > 500.0 and heart_like.sum() * ml > 100.0
    assert not lb[k_top + 1:].any()  # nothing above the liver is labelled
