"""Seed search in a planning CT: known seeds among bone and a metal streak."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from spineguide.registration.ct_seeds import CTSeedConfig, CTSeedError, candidates_to_fiducials, find_ct_seeds
from spineguide.registration.volume import CTVolume

SPACING_MM = np.array([0.8, 0.8, 1.5])  # i, j, k
SHAPE_KJI = (40, 72, 72)
#: A quarter voxel per axis. The centroid of a symmetric blurred blob is
#: unbiased, but gold is clipped at the scanner's 3071 HU: a flat-topped blob
#: one slice thick only tells its centre to about a quarter of the spacing.
INPLANE_TOL_MM = 0.2  # x, y: 0.8 mm pixels
AXIAL_TOL_MM = 0.375  # z: 1.5 mm slices


def assert_centres(got, truth):
    assert_allclose(got[..., :2], truth[..., :2], rtol=0, atol=INPLANE_TOL_MM)
    assert_allclose(got[..., 2], truth[..., 2], rtol=0, atol=AXIAL_TOL_MM)


def _capsule_coverage(centre_ijk, axis_mm, length_mm, diameter_mm, sub=3):
    """Fraction of each voxel inside a capsule (cylinder with round caps), by sub-sampling."""
    occ = np.zeros(SHAPE_KJI)
    c = np.asarray(centre_ijk, float)
    half = int(np.ceil((length_mm / 2 + diameter_mm) / SPACING_MM.min())) + 2
    lo = np.maximum(np.floor(c).astype(int) - half, 0)
    hi = np.minimum(np.floor(c).astype(int) + half + 1, np.array(SHAPE_KJI[::-1]))
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    ax = np.asarray(axis_mm, float) / np.linalg.norm(axis_mm)
    seg = (length_mm - diameter_mm) / 2
    for dk in offs:
        for dj in offs:
            for di in offs:
                kk, jj, ii = np.mgrid[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
                p = (np.stack([ii + di, jj + dj, kk + dk], axis=-1) - c) * SPACING_MM
                t = np.clip(p @ ax, -seg, seg)
                d = np.linalg.norm(p - t[..., None] * ax, axis=-1)
                occ[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] += (d <= diameter_mm / 2) / sub**3
    return occ


SEEDS_IJK = np.array([[20.3, 30.6, 12.4], [45.7, 25.2, 20.5], [36.1, 50.4, 27.8]])
AXES_MM = np.array([[1.0, 0.2, 0.0], [0.0, 0.3, 1.0], [0.6, -0.8, 0.1]])


def _phantom(direction=np.eye(3), origin=(-30.0, -120.0, 400.0)):
    hu = np.full(SHAPE_KJI, 40.0)
    hu[:, 35:60, 10:62] = 1100.0  # vertebral body
    hu[5:35, 40:44, 20:50] = 1900.0  # dense cortical plate: bright, but not metal
    occ = sum(_capsule_coverage(c, a, 3.5, 1.0) for c, a in zip(SEEDS_IJK, AXES_MM))
    hu = hu + occ * 60000.0  # gold: far above the display range before blur
    hu = ndimage.gaussian_filter(hu, 0.6)  # scanner blur
    hu[30, 10, 5:65] = 2900.0  # a one-voxel streak across an axial slice, 48 mm long
    hu[30, 11, 5:65] = 2700.0
    hu = np.minimum(hu, 3071.0)  # the scanner's clip
    return CTVolume(hu, SPACING_MM, origin, direction, "HFS", "phantom")


def test_seeds_found_at_their_lps_centres_and_streak_rejected():
    ct = _phantom()
    found = find_ct_seeds(ct)
    assert len(found) == 3
    truth = ct.index_to_lps(SEEDS_IJK)
    got = np.array([c.centre_lps_mm for c in found])
    order = [int(np.argmin(np.linalg.norm(truth - g, axis=1))) for g in got]
    assert sorted(order) == [0, 1, 2]
    assert_centres(got, truth[order])
    for c in found:
        assert c.peak_hu >= 2500 and 0.2 <= c.volume_mm3 <= 60 and c.length_mm <= 9


def test_rotated_grid_maps_centres_to_lps():
    flip = np.diag([-1.0, -1.0, 1.0])  # a CT stored right-to-left, anterior-to-posterior reversed
    ct = _phantom(direction=flip, origin=(30.0, 120.0, 400.0))
    got = np.array([c.centre_lps_mm for c in find_ct_seeds(ct)])
    truth = ct.index_to_lps(SEEDS_IJK)
    for t in truth:
        assert_centres(got[np.argmin(np.linalg.norm(got - t, axis=1))], t)


def test_streak_is_kept_when_elongation_limits_are_lifted():
    # The same search without the shape limits sees the streak: it is the shape test that rejects it.
    ct = _phantom()
    loose = CTSeedConfig(max_length_mm=1000.0, max_elongation=1000.0, max_volume_mm3=1000.0)
    assert len(find_ct_seeds(ct, loose)) == 4


def test_no_metal_gives_no_candidates():
    ct = CTVolume(np.full((8, 8, 8), 1500.0), (1, 1, 1), (0, 0, 0), np.eye(3), "HFS")
    assert find_ct_seeds(ct) == ()


def test_candidates_become_fiducials():
    fs = candidates_to_fiducials(find_ct_seeds(_phantom()))
    assert fs.names == ("F1", "F2", "F3")


def test_no_candidates_cannot_become_fiducials():
    with pytest.raises(CTSeedError, match="no seed candidates"):
        candidates_to_fiducials(())


def test_not_a_ct_is_refused():
    with pytest.raises(CTSeedError, match="needs a CTVolume"):
        find_ct_seeds(np.zeros((4, 4, 4)))


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold_hu": -1.0}, "threshold_hu"),
    ({"min_volume_mm3": 10.0, "max_volume_mm3": 5.0}, "must be below"),
    ({"max_elongation": float("inf")}, "max_elongation"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(CTSeedError, match=match):
        CTSeedConfig(**kwargs)
