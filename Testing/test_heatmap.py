"""Gaussian guidance heatmap: mm convention, orientation independence."""

import numpy as np

from SegmentationDeepEditLib.geometry import Grid, index_to_physical
from SegmentationDeepEditLib.heatmap import gaussian_heatmap


def test_peak_at_point_and_sigma_in_mm():
    g = Grid((21, 21, 21), (1.0, 2.0, 0.5), (0.0, 0.0, 0.0))
    p = index_to_physical(g, [[10, 5, 8]])
    h = gaussian_heatmap(p, g, sigma_mm=3.0)
    assert h.shape == (21, 21, 21) and h.dtype == np.float32
    assert h[8, 5, 10] == 1.0 and h.max() == 1.0 and h.min() >= 0
    # 3 mm away along x is 3 voxels, along y 1.5 voxels -> one sigma: exp(-0.5)
    np.testing.assert_allclose(h[8, 5, 13], np.exp(-0.5), rtol=1e-6)
    np.testing.assert_allclose(h[8, 7, 10], np.exp(-0.5 * (4 / 3) ** 2), rtol=1e-6)
    np.testing.assert_allclose(h[14, 5, 10], np.exp(-0.5), rtol=1e-6)


def test_matches_brute_force_on_an_oblique_grid():
    c, s = np.cos(0.5), np.sin(0.5)
    d = (c, -s, 0, s, c, 0, 0, 0, 1)
    g = Grid((12, 10, 8), (1.5, 1.0, 2.0), (3.0, -4.0, 5.0), d)
    pts = np.array([[5.0, 2.0, 9.0], [10.0, 0.0, 12.0]])
    h = gaussian_heatmap(pts, g, 2.5)
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in g.size[::-1]], indexing="ij"), -1).reshape(-1, 3)
    phys = index_to_physical(g, kji[:, ::-1])
    d2 = ((phys[:, None, :] - pts[None]) ** 2).sum(-1)
    brute = np.exp(-d2 / (2 * 2.5 ** 2)).max(axis=1).reshape(h.shape)
    np.testing.assert_allclose(h, brute, atol=1e-6)


def test_no_points_gives_zeros():
    g = Grid((4, 4, 4), (1, 1, 1), (0, 0, 0))
    assert not gaussian_heatmap(np.zeros((0, 3)), g, 2.0).any()
