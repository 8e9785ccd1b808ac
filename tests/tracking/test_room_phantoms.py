"""Virtual-room phantoms: tissues where claimed, labels, seeds, determinism, bad arguments."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.registration.volume import PatientPosition
from tests.synthetic import small_cervical, small_thoracolumbar
from spineguide.tracking.errors import VirtualPhantomError
from spineguide.tracking.room.phantoms import (
    CERVICAL_MODEL_ORIGIN_LPS_MM,
    HU,
    PLANNING_SEED_HU,
    THORACOLUMBAR_MODEL_ORIGIN_LPS_MM,
    Seed,
    SeedShape,
    thoracolumbar_phantom,
)
from spineguide.tracking.room._shapes import Ellipsoid, Layer, voxelise

# The truth anatomy has no noise: a voxel whose whole footprint lies inside one
# tissue carries exactly that tissue's HU (float32 blending of a single layer).
EXACT_HU_TOL = 1e-3


def _hu_at_model(volume, origin_lps, model_mm):
    ijk = np.rint(volume.lps_to_index(np.asarray(model_mm, float) + origin_lps)).astype(int)
    return float(volume.hu[ijk[2], ijk[1], ijk[0]])


@pytest.mark.parametrize(
    ("tissue", "model_mm"),
    [
        ("lung", (80.0, 2.0, 120.0)),  # centre of the left lung, above the diaphragm domes
        ("soft_tissue", (-130.0, 10.0, -100.0)),  # lateral abdominal wall, below the lungs
        ("fat", (158.0, -15.0, 0.0)),  # between the 165 mm skin and the 151 mm fat boundary
        ("air", (-170.0, -136.0, -130.0)),  # corner of the field, outside the body
        ("muscle", (32.0, 62.0, -60.0)),  # centre of the left paraspinal muscle
    ],
)
def test_thoracolumbar_tissue_hu_is_where_the_model_puts_it(tissue, model_mm):
    ph = small_thoracolumbar()
    assert_allclose(_hu_at_model(ph.anatomy, THORACOLUMBAR_MODEL_ORIGIN_LPS_MM, model_mm), HU[tissue], rtol=0, atol=EXACT_HU_TOL)


def test_isocentre_is_in_cancellous_bone_of_the_target_vertebra():
    ph = small_thoracolumbar()
    ijk = np.rint(ph.anatomy.lps_to_index(ph.isocentre_lps_mm)).astype(int)
    assert_allclose(ph.anatomy.hu[ijk[2], ijk[1], ijk[0]], HU["cancellous"], rtol=0, atol=EXACT_HU_TOL)
    pk = np.rint(ph.planning_ct.lps_to_index(ph.isocentre_lps_mm)).astype(int)
    assert ph.labels[pk[2], pk[1], pk[0]] == ph.target_label
    assert ph.target_name == "L1"
    assert [ph.label_names[k] for k in sorted(ph.label_names)] == ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4"]


def test_partial_volume_voxelisation_conserves_a_spheres_volume():
    # Occupancy summed over voxels is the solid's volume; 3^3 sub-samples in the surface band
    # leave an error of the order of (band voxels) * (1/27) * voxel / sqrt(band voxels).
    sphere = Ellipsoid((0.3, -0.2, 0.1), (7.0, 7.0, 7.0))
    hu, _ = voxelise([Layer(sphere, 1.0)], (20, 20, 20), np.full(3, -9.5), np.ones(3), background_hu=0.0)
    volume_tol_mm3 = 0.01 * 4.0 / 3.0 * np.pi * 7.0**3  # 1%: far above the sampling error, far below a voxel shell (~600 mm^3)
    assert_allclose(float(hu.sum()), 4.0 / 3.0 * np.pi * 7.0**3, rtol=0, atol=volume_tol_mm3)


def test_planning_ct_grid_differs_from_truth_grid_and_is_hfs():
    ph = small_thoracolumbar()
    assert ph.planning_ct.patient_position is PatientPosition.HFS
    assert not np.allclose(ph.planning_ct.spacing_mm, ph.anatomy.spacing_mm)
    offset_vox = (ph.planning_ct.origin_lps_mm - ph.anatomy.origin_lps_mm) / ph.planning_ct.spacing_mm
    assert np.all(np.abs(offset_vox - np.rint(offset_vox)) > 0.1)


def test_default_seeds_are_three_noncollinear_gold_cylinders_with_one_in_the_target_vertebra():
    ph = small_thoracolumbar()
    assert len(ph.seeds) == 3
    for s in ph.seeds:
        assert s.material == "gold" and s.shape is SeedShape.CYLINDER
        assert 0.8 <= s.diameter_mm <= 1.2 and 3.0 <= s.length_mm <= 5.0
    c = np.stack([s.centre_lps_mm for s in ph.seeds])
    area2 = np.linalg.norm(np.cross(c[1] - c[0], c[2] - c[0]))
    assert area2 > 100.0  # twice the triangle area, mm^2: far from collinear
    ijk = np.rint(ph.planning_ct.lps_to_index(ph.seeds[0].centre_lps_mm)).astype(int)
    assert ph.labels[ijk[2], ijk[1], ijk[0]] == ph.target_label


def test_no_seeds_when_not_asked():
    assert small_thoracolumbar(with_seeds=False).seeds == ()
    assert small_cervical().seeds == ()


def test_seeds_are_burnt_into_the_planning_ct_only():
    # Gold is ~4e5 HU: any voxel a seed touches, including the one holding its centre, clips at 3071 HU.
    ph = thoracolumbar_phantom(truth_spacing_mm=6.0, planning_spacing_mm=2.0)
    for s in ph.seeds:
        ijk = np.rint(ph.planning_ct.lps_to_index(s.centre_lps_mm)).astype(int)
        assert_allclose(ph.planning_ct.hu[ijk[2], ijk[1], ijk[0]], PLANNING_SEED_HU, rtol=0, atol=EXACT_HU_TOL)
    assert ph.anatomy.hu.max() < PLANNING_SEED_HU - 1000.0


def test_phantom_is_deterministic_for_a_seed_and_levels_differ():
    a = thoracolumbar_phantom(truth_spacing_mm=4.0, planning_spacing_mm=(4.0, 4.0, 6.0), seed=3)
    b = thoracolumbar_phantom(truth_spacing_mm=4.0, planning_spacing_mm=(4.0, 4.0, 6.0), seed=3)
    c = thoracolumbar_phantom(truth_spacing_mm=4.0, planning_spacing_mm=(4.0, 4.0, 6.0), seed=4)
    assert np.array_equal(a.anatomy.hu, b.anatomy.hu) and np.array_equal(a.planning_ct.hu, b.planning_ct.hu)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.anatomy.hu, c.anatomy.hu)


def test_adjacent_levels_are_not_copies_of_each_other():
    # Centre each vertebra's label mask on the next one's: sizes and seeded asymmetry keep the
    # overlap (Dice) well below the 1.0 of copies, so a wrong-level match is detectable.
    lab = thoracolumbar_phantom(truth_spacing_mm=6.0, planning_spacing_mm=(2.0, 2.0, 3.0), seed=3).labels
    for n in range(1, 8):
        m1, m2 = lab == n, lab == n + 1
        shift = np.rint(np.array(np.nonzero(m2)).mean(axis=1) - np.array(np.nonzero(m1)).mean(axis=1)).astype(int)
        moved = np.roll(m1, tuple(shift), axis=(0, 1, 2))
        dice = 2.0 * np.count_nonzero(moved & m2) / (np.count_nonzero(m1) + np.count_nonzero(m2))
        assert dice < 0.95, f"levels {n} and {n + 1} overlap with Dice {dice:.3f}"


def test_cervical_phantom_has_mask_shell_skull_and_airway():
    ph = small_cervical()
    o = CERVICAL_MODEL_ORIGIN_LPS_MM
    assert ph.target_name == "C4"
    assert_allclose(_hu_at_model(ph.anatomy, o, (0.0, -24.0, -40.0)), HU["air"], rtol=0, atol=EXACT_HU_TOL)  # trachea
    assert_allclose(_hu_at_model(ph.anatomy, o, (0.0, 0.0, 140.0)), HU["brain"], rtol=0, atol=EXACT_HU_TOL)
    # The mask shell (2.5 mm) is only partly resolved on a 3 mm grid, but it is there: plastic between skin and air gap.
    line = [_hu_at_model(ph.anatomy, o, (0.0, y, -60.0)) for y in np.arange(-80.0, -62.0, 0.5)]
    assert max(line) > -700.0 and min(line) <= HU["air"] + EXACT_HU_TOL


def test_unknown_target_level_is_an_error():
    with pytest.raises(VirtualPhantomError, match="target vertebra 'C9' is not in this phantom"):
        thoracolumbar_phantom(truth_spacing_mm=6.0, planning_spacing_mm=6.0, target="C9")


def test_bad_spacing_is_an_error():
    with pytest.raises(VirtualPhantomError, match="truth_spacing_mm must be one or three positive numbers"):
        thoracolumbar_phantom(truth_spacing_mm=(1.0, -1.0, 1.0))
    with pytest.raises(VirtualPhantomError, match="planning_spacing_mm must be at most 8 mm"):
        thoracolumbar_phantom(truth_spacing_mm=6.0, planning_spacing_mm=20.0)


def test_bad_seed_is_an_error():
    with pytest.raises(VirtualPhantomError, match="seed 'X': axis_lps must be a non-zero 3-vector"):
        Seed("X", (0, 0, 0), (0, 0, 0), 4.0, 1.0)
    with pytest.raises(VirtualPhantomError, match="seed 'S': a sphere has length_mm == diameter_mm"):
        Seed("S", (0, 0, 0), (0, 0, 1), 4.0, 1.0, SeedShape.SPHERE)


def test_labels_must_match_planning_grid():
    ph = small_thoracolumbar()
    with pytest.raises(VirtualPhantomError, match="labels shape"):
        dataclasses.replace(ph, labels=np.zeros((2, 2, 2), np.uint8))
