"""Per-level rigid deformation of a labelled CT: each vertebra exactly rigid, exact truth per level.

Synthetic CTs built here: two labelled boxes of textured "bone" in soft tissue,
on isotropic grids, so that a translation by whole voxels or a 90 degree
rotation about a voxel-centre axis maps the grid onto itself and the deformed
HU can be checked exactly (interpolation then reproduces voxel values).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume, PatientPosition, room_from_lps_matrix
from spineguide.tracking.errors import SimulationError
from spineguide.tracking.room.deform import (
    DeformOptions,
    LevelDeformation,
    deform_ct,
    deform_from_options,
    level_pose_room,
    random_level_deformation,
    rigid_about,
)
from spineguide.tracking.room.kv import DetectorModel
from spineguide.tracking.room.realct import VERTEBRA_NAMES, LabelledCT, build_set

#: HU of a voxel moved by a grid-to-grid transform: SimpleITK's linear interpolation at an exact
#: voxel centre returns that voxel's value up to float32 rounding of the weights (~1e-7 relative of 1500 HU).
EXACT_HU_TOL = 1e-3
#: Pose algebra in float64 on 100 mm lever arms.
ALGEBRA_TOL_MM = 1e-9

L1, L2 = VERTEBRA_NAMES.index("L1") + 1, VERTEBRA_NAMES.index("L2") + 1
SPACING_MM = 2.0


def _two_levels() -> tuple[CTVolume, np.ndarray]:
    """31 x 25 x 25 voxels of 2 mm: soft tissue (40 HU), two 7^3-voxel textured bone boxes along z (L1 above L2).

    L1 is centred on voxel (12, 12, 21) [i, j, k], L2 on (12, 12, 9); the gap between them is 5 voxels.
    """
    rng = np.random.default_rng(3)
    hu = np.full((31, 25, 25), 40.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.int16)
    for label, k in ((L1, 21), (L2, 9)):
        box = (slice(k - 3, k + 4), slice(9, 16), slice(9, 16))
        hu[box] = rng.uniform(300.0, 1500.0, (7, 7, 7)).astype(np.float32)  # texture: every voxel distinct
        labels[box] = label
    ct = CTVolume(hu, (SPACING_MM,) * 3, (-24.0, -24.0, -30.0), np.eye(3), "HFS", "two levels")
    return ct, labels


def _voxel_lps(ct: CTVolume, ijk) -> np.ndarray:
    return ct.index_to_lps(np.asarray(ijk, dtype=np.float64))


def test_a_level_translated_by_whole_voxels_carries_its_hu_exactly_and_the_other_stays():
    ct, labels = _two_levels()
    shift_mm = np.array([2 * SPACING_MM, -SPACING_MM, 0.0])  # (+2, -1, 0) voxels in (i, j, k)
    t1 = rigid_about(_voxel_lps(ct, [12, 12, 21]), (0, 0, 0), shift_mm)
    d = LevelDeformation({"L1": t1, "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    out = deform_ct(ct, labels, d)
    k, j, i = np.nonzero(labels == L1)
    assert_allclose(out.ct.hu[k, j - 1, i + 2], ct.hu[k, j, i], rtol=0, atol=EXACT_HU_TOL)
    k, j, i = np.nonzero(labels == L2)
    assert_allclose(out.ct.hu[k, j, i], ct.hu[k, j, i], rtol=0, atol=EXACT_HU_TOL)
    assert np.count_nonzero(out.labels == L1) == np.count_nonzero(labels == L1)
    assert out.conflict_voxels == 0
    assert out.ct.patient_position is ct.patient_position and out.ct.hu.shape == ct.hu.shape


def test_a_level_rotated_90_deg_about_its_centre_moves_every_voxel_to_its_rotated_place():
    ct, labels = _two_levels()
    centre = _voxel_lps(ct, [12, 12, 21])
    # +90 deg about +z (superior): LPS x -> y, y -> -x; about a voxel centre on a square grid: grid to grid.
    t1 = rigid_about(centre, (0, 0, 90.0))
    d = LevelDeformation({"L1": t1, "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    out = deform_ct(ct, labels, d)
    k, j, i = np.nonzero(labels == L1)
    di, dj = i - 12, j - 12
    assert_allclose(out.ct.hu[k, 12 + di, 12 - dj], ct.hu[k, j, i], rtol=0, atol=EXACT_HU_TOL)
    assert not np.allclose(out.ct.hu[k, j, i], ct.hu[k, j, i])  # it did move (textured box)


def test_identity_deformation_returns_the_ct_unchanged():
    ct, labels = _two_levels()
    d = LevelDeformation({"L1": np.eye(4), "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    out = deform_ct(ct, labels, d)
    assert_allclose(out.ct.hu, ct.hu, rtol=0, atol=EXACT_HU_TOL)
    assert out.max_displacement_mm < ALGEBRA_TOL_MM  # the blend of identical maps, to float64 rounding


def test_an_upsampled_grid_covers_the_same_box_and_holds_the_ct_at_its_voxel_centres():
    ct, labels = _two_levels()
    d = LevelDeformation({"L1": np.eye(4), "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    out = deform_ct(ct, labels, d, upsample=3)
    assert out.ct.hu.shape == tuple(3 * n for n in ct.hu.shape)
    assert_allclose(out.ct.spacing_mm, np.asarray(ct.spacing_mm) / 3.0, rtol=0, atol=1e-12)
    # The outer faces of the two grids coincide: fine index -0.5 is coarse index -0.5.
    assert_allclose(out.ct.index_to_lps(np.array([-0.5, -0.5, -0.5])), ct.index_to_lps(np.array([-0.5, -0.5, -0.5])),
                    rtol=0, atol=ALGEBRA_TOL_MM)
    # Fine voxel 3 n + 1 is centred on coarse voxel n: the CT's own value there.
    assert_allclose(out.ct.hu[1::3, 1::3, 1::3], ct.hu, rtol=0, atol=EXACT_HU_TOL)
    assert np.count_nonzero(out.labels == L1) == 27 * np.count_nonzero(labels == L1)
    per_axis = deform_ct(ct, labels, d, upsample=(1, 1, 2))  # slices only (k)
    assert per_axis.ct.hu.shape == (2 * ct.hu.shape[0],) + ct.hu.shape[1:]
    assert_allclose(per_axis.ct.spacing_mm, [SPACING_MM, SPACING_MM, SPACING_MM / 2], rtol=0, atol=1e-12)
    # Fine slice 2 n + 1 lies a quarter voxel above coarse slice n: linear interpolation 3/4 c[n] + 1/4 c[n + 1].
    assert_allclose(per_axis.ct.hu[1:-1:2], 0.75 * ct.hu[:-1] + 0.25 * ct.hu[1:], rtol=0, atol=EXACT_HU_TOL)


def _moved_l1(upsample: int):
    ct, labels = _two_levels()
    t1 = rigid_about(_voxel_lps(ct, [12.3, 11.6, 21.2]), (1.3, -0.7, 2.1), (0.35, -0.2, 0.15))
    d = LevelDeformation({"L1": t1, "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    return ct, t1, deform_ct(ct, labels, d, upsample=upsample)


def _linear(ct: CTVolume, hu: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of ``hu`` (on ``ct``'s grid) at LPS points, by scipy (not ITK)."""
    import scipy.ndimage

    a = np.asarray(ct.lps_from_index)
    ijk = (lps - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    return scipy.ndimage.map_coordinates(hu.astype(np.float64), ijk[:, ::-1].T, order=1, mode="nearest")


def test_an_upsampled_moved_level_is_the_planning_ct_moved_exactly_on_the_fine_grid():
    """Inside the moved vertebra every fine voxel holds the planning CT's linear interpolant at ``T^-1(y)``."""
    ct, t1, out = _moved_l1(3)
    kji = np.argwhere(out.labels == L1)
    assert len(kji) > 27 * 300
    y = out.ct.index_to_lps(kji[:, ::-1].astype(np.float64))
    inv = np.linalg.inv(t1)
    want = _linear(ct, ct.hu, y @ inv[:3, :3].T + inv[:3, 3])
    assert_allclose(out.ct.hu[tuple(kji.T)], want, rtol=0, atol=1e-2)  # float32 weights, ~1e-7 x 1500 HU


def test_upsampling_removes_most_of_the_second_sampling_error_of_a_moved_level():
    """Why ``upsample`` exists: a renderer interpolates the deformed CT again. On the coarse grid the moved
    vertebra read back between voxel centres differs from the planning CT's interpolant moved (what a rigid
    patient's frames hold) by a blur that varies across it; on a 3x finer grid that error shrinks to about a
    third (the planning interpolant has kinks at every coarse voxel plane, so the error of reading it back
    goes with the fine spacing, not its square: 65 -> 25 HU rms on this white-noise texture)."""
    rng = np.random.default_rng(8)
    errors = {}
    for up in (1, 3):
        ct, t1, out = _moved_l1(up)
        # Points well inside the moved box (its centre +-2 coarse voxels), where no blend reaches.
        centre = t1[:3, :3] @ _voxel_lps(ct, [12.0, 12.0, 21.0]) + t1[:3, 3]
        y = centre + rng.uniform(-2.0 * SPACING_MM, 2.0 * SPACING_MM, (4000, 3))
        inv = np.linalg.inv(t1)
        want = _linear(ct, ct.hu, y @ inv[:3, :3].T + inv[:3, 3])
        errors[up] = float(np.sqrt(np.mean((_linear(out.ct, out.ct.hu, y) - want) ** 2)))
    assert errors[1] > 50.0  # HU: the coarse second sampling is far from negligible on 300-1500 HU texture
    assert errors[3] < 0.5 * errors[1]


def test_deform_options_refine_the_grid_to_the_asked_voxel_size():
    assert DeformOptions().upsample_for(_two_levels()[0]) == (2, 2, 2)  # 2 mm -> 1 mm
    assert DeformOptions(grid_mm=2.0).upsample_for(_two_levels()[0]) == (1, 1, 1)
    assert DeformOptions(grid_mm=0.7).upsample_for(_two_levels()[0]) == (3, 3, 3)
    thick = CTVolume(np.zeros((4, 5, 6), np.float32), (0.98, 0.98, 2.0), (0.0, 0.0, 0.0), np.eye(3), "HFS", "slices")
    assert DeformOptions().upsample_for(thick) == (1, 1, 2)  # only the slices are refined
    assert DeformOptions().settings()["grid_mm"] == 1.0
    with pytest.raises(SimulationError, match="deformed grid"):
        DeformOptions(grid_mm=0.0)
    ct, labels = _two_levels()
    from spineguide.tracking.room.realct import CaseRenderer

    with pytest.raises(SimulationError, match="plan must be a LabelledCT"):
        CaseRenderer(LabelledCT(ct, labels, "two levels"), {"room": default_stereo_geometry(panel_pixels=64)},
                     plan="plan.mha")
    for bad in (0, 9, True, 1.5, (1, 2), (1, 1, 0), "2"):
        with pytest.raises(SimulationError, match="upsample must be an integer"):
            deform_ct(ct, labels, LevelDeformation({"L1": np.eye(4)}, {"L1": L1}), upsample=bad)


def test_soft_tissue_between_levels_follows_a_continuous_blend():
    """A column of voxels from L1 down to L2: the pulled-back HU of uniform tissue stays tissue (no hole, no
    air) and the labels end exactly where each level's transform puts them."""
    ct, labels = _two_levels()
    t1 = rigid_about(_voxel_lps(ct, [12, 12, 21]), (4.0, -3.0, 2.0), (0.6, -0.4, 0.8))
    d = LevelDeformation({"L1": t1, "L2": np.eye(4)}, {"L1": L1, "L2": L2})
    out = deform_ct(ct, labels, d)
    gap = out.ct.hu[14:16, 12, 12]  # between the boxes (L2 ends at k=12, L1 starts at k=18): tissue
    assert_allclose(gap, 40.0, rtol=0, atol=EXACT_HU_TOL)
    assert np.all(np.isfinite(out.ct.hu)) and out.ct.hu.min() >= 40.0 - EXACT_HU_TOL  # no air pulled in


@pytest.mark.parametrize("position", list(PatientPosition))
def test_level_pose_in_the_room_moves_a_planned_point_where_the_deformed_ct_puts_it(position):
    iso = np.array([3.0, -20.0, 310.0])
    x = np.array([[10.0, -40.0, 330.0], [-15.0, 5.0, 290.0]])
    t = rigid_about([0.0, -30.0, 320.0], (3.0, -2.0, 5.0), (1.0, 0.5, -2.0))
    m = room_from_lps_matrix(position)
    pose = level_pose_room(t, iso, position)
    moved_room = (x @ t[:3, :3].T + t[:3, 3] - iso) @ m.T
    assert_allclose(pose.apply((x - iso) @ m.T), moved_room, rtol=0, atol=ALGEBRA_TOL_MM)


def test_random_deformation_keeps_the_target_still_is_seeded_and_chains_outward():
    cents = {"T12": [0, -100, 420.0], "L1": [0, -110, 385.0], "L2": [0, -120, 350.0], "L3": [0, -130, 315.0]}
    labs = {n: VERTEBRA_NAMES.index(n) + 1 for n in cents}
    a = random_level_deformation(cents, labs, "L2", 7, 2.0, 0.5)
    b = random_level_deformation(cents, labs, "L2", 7, 2.0, 0.5)
    assert_array_equal(a.transforms_lps["L2"], np.eye(4))
    for n in cents:
        assert_array_equal(a.transforms_lps[n], b.transforms_lps[n])
    # T12 is two joints from L2: its transform is L1's followed by the T12-L1 joint's, so differs from L1's.
    assert not np.allclose(a.transforms_lps["T12"], a.transforms_lps["L1"])
    none = random_level_deformation(cents, labs, "L2", 7, 0.0, 0.0)
    for n in cents:
        assert_allclose(none.transforms_lps[n], np.eye(4), rtol=0, atol=1e-12)


def test_bad_deformation_inputs_are_refused_by_name():
    ct, labels = _two_levels()
    with pytest.raises(SimulationError, match="fixed level 'L4'"):
        random_level_deformation({"L1": [0, 0, 0]}, {"L1": L1}, "L4", 1)
    shear = np.eye(4)
    shear[0, 1] = 0.1
    with pytest.raises(SimulationError, match="level L1: not a proper rigid transform"):
        LevelDeformation({"L1": shear}, {"L1": L1})
    with pytest.raises(SimulationError, match="level L3 .* not in the label map"):
        deform_ct(ct, labels, LevelDeformation({"L3": np.eye(4)}, {"L3": VERTEBRA_NAMES.index("L3") + 1}))
    with pytest.raises(SimulationError, match="label map shape"):
        deform_ct(ct, labels[1:], LevelDeformation({"L1": np.eye(4)}, {"L1": L1}))
    with pytest.raises(SimulationError, match="deformation rotation"):
        DeformOptions(max_rotation_deg=-1.0)
    assert deform_from_options(None) is None
    assert deform_from_options("L1, L2").levels == ("L1", "L2")
    assert deform_from_options("all").levels is None


def test_deformed_set_writes_each_levels_exact_pose_beside_the_truth(tmp_path):
    ct, labels = _two_levels()
    lct = LabelledCT(ct, labels, "two levels")
    room = default_stereo_geometry(panel_pixels=96)
    deform = DeformOptions(levels=None, seed=5, max_rotation_deg=3.0, max_translation_mm=1.0)
    build_set(tmp_path / "set", lct, {"room": room}, ["L2"], ["own"], 2, seed=1, detector=DetectorModel(i0=3000.0),
              deform=deform)
    manifest_deform = deform.settings()
    for n in range(2):
        folder = tmp_path / "set" / "cases" / f"{n:04d}"
        truth = json.loads((folder / "truth.json").read_text())
        lt = json.loads((folder / "levels_truth.json").read_text())
        assert lt["schema"] == "realct-levels-truth/1" and lt["target"] == "L2" and lt["deform"] == manifest_deform
        by_name = {lv["name"]: lv for lv in lt["levels"]}
        assert [lv["name"] for lv in lt["levels"]] == ["L1", "L2"]  # cranial first
        pose = Pose.from_six(truth["pose"]["translation_mm"], truth["pose"]["rotation_deg"])
        got = by_name["L2"]["pose"]
        assert_allclose(got["translation_mm"], pose.translation_mm, rtol=0, atol=ALGEBRA_TOL_MM)  # target keeps it
        expect = deform.deformation(lct, "L2", n)
        d1 = level_pose_room(expect.transforms_lps["L1"], truth["isocentre_lps_mm"], "HFS")
        want = pose.compose(d1)
        assert_allclose(by_name["L1"]["pose"]["translation_mm"], want.translation_mm, rtol=0, atol=ALGEBRA_TOL_MM)
        assert_allclose(by_name["L1"]["pose"]["rotation_deg"], want.rotation_deg, rtol=0, atol=1e-9)
        assert d1.angle_deg() > 0.0
        # The frames image a deformed CT on a 2x finer grid (2 mm -> 1 mm); the plan's ROI stays the plan's.
        import SimpleITK as sitk

        roi = sitk.ReadImage(str(folder / "roi.mha"))
        assert roi.GetSize() == ct.hu.shape[::-1] and roi.GetSpacing() == (SPACING_MM,) * 3
        assert_array_equal(sitk.GetArrayFromImage(roi).astype(bool), labels == L2)
        assert_allclose(truth["isocentre_lps_mm"], lct.centroid_lps_mm("L2"), rtol=0, atol=ALGEBRA_TOL_MM)


def test_cli_simulate_ct_deforms_the_levels_and_writes_their_truth(tmp_path, capsys):
    import SimpleITK as sitk

    from spineguide.calibration.io import write_geometry
    from spineguide.tracking.cli.main import main

    ct, labels = _two_levels()
    sitk.WriteImage(ct.to_sitk(), str(tmp_path / "ct.mha"))
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(ct.to_sitk())
    sitk.WriteImage(lab, str(tmp_path / "labels.mha"))
    room = write_geometry(default_stereo_geometry(panel_pixels=96), tmp_path / "room.json")
    base = ["simulate-ct", "--ct", str(tmp_path / "ct.mha"), "--labels", str(tmp_path / "labels.mha"), "--rooms",
            str(room), "--projectors", "own", "--cases", "1", "--i0", "3000", "--quiet", "--levels", "L1"]
    assert main(base + ["--deform-levels", "all", "--deform-seed", "4", "--out", str(tmp_path / "set")]) == 0
    manifest = json.loads((tmp_path / "set" / "set.json").read_text())
    assert manifest["deform"]["seed"] == 4 and manifest["deform"]["levels"] is None
    lt = json.loads((tmp_path / "set" / "cases" / "0000" / "levels_truth.json").read_text())
    assert lt["target"] == "L1" and [lv["name"] for lv in lt["levels"]] == ["L1", "L2"]
    capsys.readouterr()
    assert main(base + ["--deform-levels", "L2", "--out", str(tmp_path / "bad")]) == 2
    assert "do not include the case's target L1" in capsys.readouterr().err
