"""Geometry: point <-> index, crop/un-crop round trip, model grids."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from SegmentationDeepEditLib.geometry import (
    Grid, bounding_box_grid, crop, grid_of, index_to_physical, lps_to_ras, physical_to_index, ras_to_lps,
    reorient_axes, resample_to_grid, same_geometry, uncrop)


def _oblique_image(seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=(20, 30, 40)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 3.0))
    img.SetOrigin((10.0, -20.0, 35.5))
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4)
    img.SetDirection(rot.GetMatrix())
    return img


def test_ras_lps_negates_x_and_y():
    p = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(ras_to_lps(p), [[-1, -2, 3], [4, -5, -6]])
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps(p)), p)


def test_index_physical_agree_with_itk_and_round_trip():
    img = _oblique_image()
    idx = np.array([[0, 0, 0], [39, 29, 19], [3.5, 7.25, 1.0]])
    phys = index_to_physical(img, idx)
    for i, p in zip(idx, phys):
        np.testing.assert_allclose(p, img.TransformContinuousIndexToPhysicalPoint(i.tolist()), atol=1e-9)
    np.testing.assert_allclose(physical_to_index(img, phys), idx, atol=1e-9)


def test_crop_uncrop_round_trip_is_exact():
    img = _oblique_image()
    c = crop(img, (5, 3, 2), (25, 20, 15))
    assert c.GetSize() == (20, 17, 13)
    back = uncrop(c, img)
    assert same_geometry(back, img, tol=0)
    assert back.GetSize() == img.GetSize() and back.GetSpacing() == img.GetSpacing()
    assert back.GetOrigin() == img.GetOrigin() and back.GetDirection() == img.GetDirection()
    a, b = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(back)
    np.testing.assert_array_equal(b[2:15, 3:20, 5:25], a[2:15, 3:20, 5:25])
    assert np.all(b[:2] == 0) and np.all(b[:, :, 25:] == 0)


def test_uncrop_refuses_a_crop_off_the_lattice():
    img = _oblique_image()
    c = crop(img, (5, 3, 2), (25, 20, 15))
    c.SetOrigin(tuple(np.asarray(c.GetOrigin()) + 0.3))
    with pytest.raises(ValueError, match="lattice"):
        uncrop(c, img)


def test_resample_to_own_grid_is_identity():
    img = _oblique_image()
    out = resample_to_grid(img, grid_of(img))
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img), atol=1e-5)


@pytest.mark.parametrize("extent,max_size,expect_size,expect_spacing", [
    ((30, 20, 10), (64, 64, 64), (64, 64, 64), 1.0),       # 30+40=70 voxels > 64: coarsen to 70/64 mm
    ((10, 10, 10), (64, 64, 64), (64, 64, 64), 1.0),       # 50 voxels -> padded to 64 at 1 mm
    ((200, 150, 120), (64, 64, 64), (64, 64, 64), 240 / 64),
    ((10, 10, 10), None, (64, 64, 64), 1.0),
])
def test_bounding_box_grid(extent, max_size, expect_size, expect_spacing):
    pts = np.array([[0, 0, 0], extent], float) + np.array([5.0, -3.0, 7.0])
    g = bounding_box_grid(pts, (1.0, 1.0, 1.0), margin_vox=20, max_size=max_size)
    assert g.size == expect_size
    assert all(s % 32 == 0 for s in g.size)
    if extent[0] + 40 > 64 and max_size:
        np.testing.assert_allclose(g.spacing[0], (max(extent) + 40) / 64, rtol=1e-6)
    else:
        assert g.spacing == (expect_spacing,) * 3
    # centred on the points' box, and the box plus margin inside the grid
    centre = np.asarray(g.origin) + (np.asarray(g.size) - 1) / 2 * np.asarray(g.spacing)
    np.testing.assert_allclose(centre, pts.mean(axis=0), atol=1e-9)
    # at least the 20 mm margin (20 voxels of 1 mm) between the points and the grid's outer voxel edges
    idx = physical_to_index(g, pts)
    assert np.all((idx + 0.5) * g.spacing[0] >= 20 - 1e-6)
    assert np.all((np.asarray(g.size) - 0.5 - idx) * g.spacing[0] >= 20 - 1e-6)
    assert g.direction == Grid((1, 1, 1), (1, 1, 1), (0, 0, 0)).direction


def test_all_48_axis_orders_keep_every_voxel_in_place():
    """Permuting/flipping the storage of an image keeps every voxel value at the same LPS point."""
    img = _oblique_image()
    probe_idx = np.array([[0, 0, 0], [39, 29, 19], [7, 11, 13], [20, 2, 17]])
    probe_phys = index_to_physical(img, probe_idx)
    values = [img[[int(v) for v in i]] for i in probe_idx]
    seen = set()
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            r = reorient_axes(img, perm, flips)
            seen.add((perm, flips))
            assert sorted(r.GetSize()) == sorted(img.GetSize())
            D = np.asarray(r.GetDirection()).reshape(3, 3)
            np.testing.assert_allclose(D.T @ D, np.eye(3), atol=1e-12)
            ridx = np.rint(physical_to_index(r, probe_phys)).astype(int)
            np.testing.assert_allclose(physical_to_index(r, probe_phys), ridx, atol=1e-6)
            for i, v in zip(ridx, values):
                assert r[[int(x) for x in i]] == v
    assert len(seen) == 48
