"""The joint constellation search (issue 19): rigid fits, the leave-one-out migration check, the pose search.

Truth is derived: planned points moved by a known pose, evidence maps drawn
from the projections of known seeds, one seed moved by a known vector.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.errors import SeedMigrationError
from spineguide.registration.pose import Pose
from spineguide.tracking.localisation.constellation import evidence_maps, rigid_fit, sample_bilinear, search_constellation
from spineguide.tracking.localisation.joint_search import _moved_by_others
from spineguide.tracking.room.rooms import room_geometry
from spineguide.tracking.localisation.seed_search import ResponseMap

PLANNED = np.array([[-20.0, 10.0, 5.0], [15.0, -12.0, 20.0], [5.0, 25.0, -18.0], [-10.0, -20.0, -10.0],
                    [22.0, 8.0, -25.0]])
POSE = Pose.from_six([6.0, -8.5, 3.2], [2.0, -2.5, 1.5])
NAMES = ("F1", "F2", "F3", "F4", "F5")
LIMIT_MM = 1.5


def test_rigid_fit_recovers_a_known_pose_from_three_or_more_points():
    pose = rigid_fit(PLANNED, POSE.apply(PLANNED), np.ones(len(PLANNED)))
    assert_allclose(pose.rotation, POSE.rotation, atol=1e-12)
    assert_allclose(pose.translation_mm, POSE.translation_mm, atol=1e-9)


def test_two_point_fit_takes_the_smallest_rotation_and_places_both_points():
    two = PLANNED[:2]
    pose = rigid_fit(two, POSE.apply(two), np.ones(2))
    assert_allclose(pose.apply(two), POSE.apply(two), atol=1e-9)
    # The smallest rotation turning one direction onto the other is no larger than the true one.
    angle = np.degrees(np.arccos((np.trace(pose.rotation) - 1) / 2))
    true = np.degrees(np.arccos((np.trace(POSE.rotation) - 1) / 2))
    assert angle <= true + 1e-9


def test_moved_seed_is_named_by_the_others_and_unmoved_ones_are_not():
    measured = POSE.apply(PLANNED)
    found = np.ones(len(PLANNED), bool)
    assert _moved_by_others(PLANNED, measured, found, NAMES, LIMIT_MM) == set()
    # 2 mm along the direction that keeps its distances to two others nearly unchanged: no distance check sees
    # more than the limit, the others' rigid fit does.
    moved = measured.copy()
    d = np.cross(measured[1] - measured[2], measured[3] - measured[2])
    moved[2] += 2.0 * d / np.linalg.norm(d)
    assert _moved_by_others(PLANNED, moved, found, NAMES, LIMIT_MM) == {2}


def test_three_seeds_cannot_name_a_migration_and_two_moved_are_refused():
    measured = POSE.apply(PLANNED)
    moved = measured.copy()
    moved[0] += [2.0, 0.0, 0.0]
    three = np.array([True, True, True, False, False])
    assert _moved_by_others(PLANNED, moved, three, NAMES, LIMIT_MM) == set()  # says nothing; the distances decide
    moved[3] += [0.0, -2.5, 1.0]
    with pytest.raises(SeedMigrationError, match="F1"):
        _moved_by_others(PLANNED, moved, np.ones(5, bool), NAMES, LIMIT_MM)


def _drawn_maps(geometry, seeds_room_mm, rng, clutter=0):
    """Response maps (binning 2) with a Gaussian blob at each seed's projection and optional clutter blobs."""
    out = {}
    for im in geometry.imagers:
        b = 2
        rows, cols = im.rows // b, im.cols // b
        snr = rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32)
        rr, cc = np.mgrid[0:rows, 0:cols]
        px = (im.project(seeds_room_mm) - (b - 1) / 2.0) / b
        blobs = list(px) + [rng.uniform([20, 20], [cols - 20, rows - 20]) for _ in range(clutter)]
        for c, r in blobs:
            snr += 12.0 * np.exp(-((cc - c) ** 2 + (rr - r) ** 2) / (2 * 1.5**2)).astype(np.float32)
        rmap = ResponseMap(snr, np.zeros_like(snr), np.zeros_like(snr), b, 0, 0)
        scale = im.magnification / float(np.min(im.pixel_spacing_mm)) / b
        out[im.name] = evidence_maps(rmap, im.projection_matrix, 2.0, 2.0 * scale, 0.4 * scale)
    return out


@pytest.mark.parametrize("clutter", [0, 40])
def test_pose_search_finds_the_constellation_where_the_maps_put_it(clutter):
    geometry = room_geometry("default", 512)
    rng = np.random.default_rng(7)
    maps = _drawn_maps(geometry, POSE.apply(PLANNED), rng, clutter)
    hyps = search_constellation(maps, PLANNED, Pose.identity(), 12.0, 1.0, 4.0, 3)
    err = np.linalg.norm(hyps[0].pose.apply(PLANNED) - POSE.apply(PLANNED), axis=1)
    # The maps' pixels are 0.4 mm x 2 binned at about 1.5x magnification: 0.5 mm per map pixel; the blobs'
    # peaks (sigma 1.5 map px, noise sigma 1) are found to well within one map pixel.
    assert err.max() <= 0.5, err


def test_evidence_is_relative_to_the_regions_clutter_and_capped():
    snr = np.full((50, 60), 1.0, np.float32)
    snr[10, 10] = 100.0
    rmap = ResponseMap(snr, np.zeros_like(snr), np.zeros_like(snr), 1, 0, 0)
    geometry = room_geometry("default", 512)
    m = evidence_maps(rmap, geometry.imagers[0].projection_matrix, 2.0, 2.0, 0.5)
    assert m.capped.max() == pytest.approx(2.0)  # the outlier is capped at twice the clutter level
    assert m.capped[0, 0] == pytest.approx(1.0)  # the region's 99.5th percentile is 1
    # Bilinear sampling between pixel centres, zero outside the map.
    assert sample_bilinear(m.capped, np.array([[10.5, 10.0]]))[0] == pytest.approx(1.5)
    assert sample_bilinear(m.capped, np.array([[-3.0, 4.0]]))[0] == 0.0


def test_a_two_seed_answer_beside_an_unexplained_seed_in_both_views_is_refused():
    # Two planned seeds agree on one distance only; two other seeds the same distance apart fit them as well.
    # A seed-like object seen in both views away from every planned seed (answer's pose) makes the answer doubtful.
    from types import SimpleNamespace

    from spineguide.tracking.errors import FiducialNotFoundError
    from spineguide.tracking.localisation.detection import Detection
    from spineguide.tracking.localisation.fiducial_config import FiducialConfig
    from spineguide.tracking.localisation.joint_search import _unexplained_seed

    geom = room_geometry("floor")
    names = geom.names
    planned = np.array([[0.0, 0.0, 0.0], [20.0, 5.0, -10.0], [-15.0, 10.0, 12.0], [5.0, -20.0, 25.0]])
    seed_names = ("F1", "F2", "F3", "F4")
    pose = Pose.from_six([1.0, -2.0, 0.5], [0.5, 0.0, -0.5])
    config = FiducialConfig()

    def answer(used):
        return SimpleNamespace(reg=SimpleNamespace(used=np.array(used), pose=pose),
                               corr=SimpleNamespace(found=np.array(used)))

    def dets_at(points):
        return {n: tuple(Detection(n, geom[n].project(p[None])[0], 0.3, 12.0, 16.0, 4.0, 0.0, 40, 0.6)
                         for p in points) for n in names}

    used2 = [True, True, False, False]
    other = pose.apply(planned[2:3])[0] + np.array([8.0, 6.0, -5.0])  # 11 mm from seed F3's place
    with pytest.raises(FiducialNotFoundError, match="seed-like object seen in both views"):
        _unexplained_seed(geom, names, dets_at([other]), answer(used2), planned, seed_names, None, config)
    # A planned seed the search did not verify, seen by the clean-frame detector where the answer puts it: explained.
    _unexplained_seed(geom, names, dets_at([pose.apply(planned[2:3])[0]]), answer(used2), planned, seed_names,
                      None, config)
    # Seen in one view only: nothing to triangulate.
    one = dets_at([other])
    _unexplained_seed(geom, names, {names[0]: one[names[0]], names[1]: ()}, answer(used2), planned, seed_names,
                      None, config)
    # Outside the searched region (the plan's extent + 12 mm + the margin): not the plan's business.
    far = pose.apply(planned[:1])[0] + np.array([0.0, 0.0, 90.0])
    _unexplained_seed(geom, names, dets_at([far]), answer(used2), planned, seed_names, None, config)
    # Three seeds used fix a 6-DoF pose: the geometry decides, no check.
    _unexplained_seed(geom, names, dets_at([other]), answer([True, True, True, False]), planned, seed_names,
                      None, config)
