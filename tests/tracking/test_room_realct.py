"""Real-CT validation cases: NIfTI RAS/LPS loading, label selection, case truth, plastimatch vs our projector.

All inputs are tiny synthetic volumes written here (no download). The NIfTI
files are written byte by byte from the NIfTI-1 header layout, so the
RAS -> LPS handling is checked against the standard, not against SimpleITK's
own writer.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume
from spineguide.tracking.errors import SimulationError
from spineguide.tracking.room.kv import DetectorModel
from spineguide.tracking.room.realct import (
    BEYOND_ENDS_MAX_HU,
    build_set,
    VERTEBRA_NAMES,
    CaseRenderer,
    LabelledCT,
    LabelScheme,
    Projector,
    canonical_axial,
    plan_cases,
    plastimatch_available,
    read_labelled_ct,
    write_case,
)

#: Positions are float32 in the NIfTI header: 1e-4 mm covers their rounding at 100 mm.
POSITION_TOL_MM = 1e-4
#: Centroid of a projected smooth bead vs the projection of its centre: perspective weights
#: the bead's near and far halves by (1 +- 8 mm / 2200 mm)^2, a ~1e-3 px shift; point sampling
#: of the voxel-constant bead's image adds a few 1e-3 px. 0.02 px (5 um at the isocentre) is
#: far below anything a registration resolves, and 1/10 of a one-voxel (1 mm) error.
BEAD_PX_TOL = 0.02
#: The two projectors on a smooth volume. Both integrate voxel-constant attenuation exactly,
#: so most pixels agree to float32 rounding: the median relative difference must stay below
#: 1e-4 (measured 5e-8), which a geometric offset of 0.01 px would already exceed on this
#: volume's edges.
PROJECTOR_MEDIAN_REL_TOL = 1e-4
#: plastimatch 1.9.4's "exact" tracer loses part of a voxel on some rays (up to 6% of the line
#: integral here; checked against a 2e6-step sampling of the same rays, which our Siddon
#: matches to 2e-5), never adds any: it may exceed ours only by float32 rounding.
PROJECTOR_EXCESS_REL_TOL = 1e-5
#: Such losses above 1% of the image's largest line integral: measured 0-1.3% of the pixels
#: with signal for beams in the axial plane, 9-13% for beams tilted out of it; 20% allowed.
PROJECTOR_LOSS_REL = 0.01
PROJECTOR_LOSS_FRACTION = 0.20


def _need_plastimatch() -> None:
    """Skip without plastimatch, except in CI, which must install it (apt-get install plastimatch)."""
    if not plastimatch_available():
        if os.environ.get("CI"):
            pytest.fail("plastimatch (apt-get install plastimatch) is required in CI")
        pytest.skip("plastimatch not installed (apt-get install plastimatch)")


# ------------------------------------------------------------------ NIfTI writer (test fixture)
def write_nifti(path: Path, data_kji: np.ndarray, ras_from_ijk: np.ndarray) -> Path:
    """A NIfTI-1 file (.nii) with the sform ``ras_from_ijk`` (4x4, mm) and ``data[k, j, i]``.

    Header layout from nifti1.h: sizeof_hdr @0, dim @40, datatype @70, bitpix @72,
    pixdim @76, vox_offset @108, scl_slope @112, xyzt_units @123, qform_code @252,
    sform_code @254, srow_x/y/z @280/296/312, magic @344; data at byte 352.
    """
    data = np.ascontiguousarray(data_kji)
    codes = {np.dtype(np.int16): (4, 16), np.dtype(np.float32): (16, 32), np.dtype(np.uint8): (2, 8)}
    datatype, bitpix = codes[data.dtype]
    nk, nj, ni = data.shape
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    spacing = np.linalg.norm(ras_from_ijk[:3, :3], axis=0)
    struct.pack_into("<8f", hdr, 76, 1.0, *spacing, 0, 0, 0, 0)
    struct.pack_into("<fff", hdr, 108, 352.0, 1.0, 0.0)
    hdr[123] = 2  # NIFTI_UNITS_MM
    struct.pack_into("<hh", hdr, 252, 0, 1)  # no qform; sform = scanner coordinates
    for row in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *ras_from_ijk[row])
    hdr[344:348] = b"n+1\x00"
    path.write_bytes(bytes(hdr) + b"\x00" * 4 + data.tobytes())
    return path


#: A permuted, flipped RAS affine: i -> -x (2 mm), j -> +z (1.5 mm), k -> +y (3 mm).
RAS_FROM_IJK = np.array([[-2.0, 0.0, 0.0, 10.0], [0.0, 0.0, 3.0, -20.0], [0.0, 1.5, 0.0, 30.0], [0, 0, 0, 1]])
SHAPE_KJI = (5, 7, 6)


def _lps(ras_from_ijk: np.ndarray, ijk) -> np.ndarray:
    ras = ras_from_ijk[:3, :3] @ np.asarray(ijk, dtype=float) + ras_from_ijk[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS: x and y change sign


@pytest.fixture()
def nifti_pair(tmp_path):
    ct = np.full(SHAPE_KJI, -1000, dtype=np.int16)
    ct[3, 2, 1] = 1500  # voxel (i, j, k) = (1, 2, 3)
    labels = np.zeros(SHAPE_KJI, dtype=np.uint8)
    labels[3, 2, 1] = 31  # TotalSegmentator 'total' v2: vertebrae_L1
    labels[1, 5, 4] = 32  # vertebrae_T12 at (i, j, k) = (4, 5, 1)
    labels[0, 0, 0] = 5  # liver: not a vertebra, dropped
    return write_nifti(tmp_path / "ct.nii", ct, RAS_FROM_IJK), write_nifti(tmp_path / "lab.nii", labels, RAS_FROM_IJK)


def test_nifti_ras_voxel_lands_at_its_lps_position(nifti_pair):
    ct_path, lab_path = nifti_pair
    lct = read_labelled_ct(ct_path, lab_path, LabelScheme.TOTALSEGMENTATOR, "HFS")
    assert_allclose(lct.ct.direction, np.eye(3), atol=0)
    assert sorted(lct.ct.hu.shape) == sorted(SHAPE_KJI)
    kji = np.argwhere(lct.ct.hu == 1500)
    assert len(kji) == 1
    assert_allclose(lct.ct.index_to_lps(kji[0, ::-1]), _lps(RAS_FROM_IJK, (1, 2, 3)), rtol=0, atol=POSITION_TOL_MM)
    assert_allclose(lct.ct.spacing_mm, [2.0, 3.0, 1.5], rtol=0, atol=1e-6)  # LPS x, y, z


def test_totalsegmentator_labels_become_verse_numbers_on_the_same_voxels(nifti_pair):
    lct = read_labelled_ct(*nifti_pair, scheme="totalsegmentator")
    assert lct.levels == ("T12", "L1")
    assert lct.label_of("L1") == VERTEBRA_NAMES.index("L1") + 1 == 20
    assert_allclose(lct.centroid_lps_mm("L1"), _lps(RAS_FROM_IJK, (1, 2, 3)), rtol=0, atol=POSITION_TOL_MM)
    assert_allclose(lct.centroid_lps_mm("T12"), _lps(RAS_FROM_IJK, (4, 5, 1)), rtol=0, atol=POSITION_TOL_MM)
    assert np.count_nonzero(lct.labels) == 2  # the liver label is not a vertebra
    assert lct.ct.hu[lct.mask("L1")].tolist() == [1500.0]


def test_level_not_in_the_map_is_named(nifti_pair):
    lct = read_labelled_ct(*nifti_pair, scheme="totalsegmentator")
    with pytest.raises(SimulationError, match=r"level L3 is not in the label map \(levels: T12, L1\)"):
        lct.label_of("L3")
    with pytest.raises(SimulationError, match="unknown vertebra 'X9'"):
        lct.mask("X9")


def test_label_map_on_another_grid_is_refused(tmp_path, nifti_pair):
    ct_path, _ = nifti_pair
    shifted = RAS_FROM_IJK.copy()
    shifted[0, 3] += 1.0
    other = write_nifti(tmp_path / "other.nii", np.ones(SHAPE_KJI, dtype=np.uint8) * 20, shifted)
    with pytest.raises(SimulationError, match="other.nii: label map on another grid: origin"):
        read_labelled_ct(ct_path, other)
    small = write_nifti(tmp_path / "small.nii", np.ones((2, 2, 2), dtype=np.uint8), RAS_FROM_IJK)
    with pytest.raises(SimulationError, match="small.nii: label map on another grid"):
        read_labelled_ct(ct_path, small)


def test_label_map_without_vertebrae_and_missing_file_are_refused(tmp_path, nifti_pair):
    ct_path, _ = nifti_pair
    none = write_nifti(tmp_path / "none.nii", np.zeros(SHAPE_KJI, dtype=np.uint8), RAS_FROM_IJK)
    with pytest.raises(SimulationError, match="none.nii: no vertebra label"):
        read_labelled_ct(ct_path, none)
    with pytest.raises(SimulationError, match="nope.nii: no such label map file"):
        read_labelled_ct(ct_path, tmp_path / "nope.nii")
    floats = write_nifti(tmp_path / "float.nii", np.zeros(SHAPE_KJI, dtype=np.float32), RAS_FROM_IJK)
    with pytest.raises(SimulationError, match="float.nii: a label map must hold integer"):
        read_labelled_ct(ct_path, floats)


def test_oblique_grid_is_refused_not_resampled():
    img = sitk.Image(4, 4, 4, sitk.sitkInt16)
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(SimulationError, match="oblique.mha: voxel axes are oblique"):
        canonical_axial(img, "oblique.mha")


SIGNED_PERMUTATIONS = [
    (perm, signs) for perm in itertools.permutations(range(3)) for signs in itertools.product((1.0, -1.0), repeat=3)
]


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS)
def test_canonical_axial_keeps_every_voxel_at_its_physical_point(perm, signs):
    rng = np.random.default_rng(7)
    img = sitk.GetImageFromArray(rng.integers(-1000, 2000, size=(3, 4, 5)).astype(np.int16))
    d = np.zeros((3, 3))
    d[list(perm), [0, 1, 2]] = signs
    img.SetDirection(tuple(d.ravel()))
    img.SetSpacing((0.7, 1.1, 2.3))
    img.SetOrigin((5.0, -7.0, 11.0))
    out = canonical_axial(img, "test")
    assert_allclose(np.array(out.GetDirection()), np.eye(3).ravel(), atol=0)
    for idx in itertools.product(range(5), range(4), range(3)):
        point = img.TransformIndexToPhysicalPoint(idx)
        back = out.TransformPhysicalPointToContinuousIndex(point)
        assert_allclose(back, np.round(back), atol=1e-9)
        assert out[tuple(int(round(v)) for v in back)] == img[idx]


# ------------------------------------------------------------------ cases
SPACING_MM = 1.0
BEAD_LPS_MM = np.array([5.0, -4.0, 6.0])  # bead centre (a voxel centre)
BEAD_SIGMA_MM = 2.0


def _tiny_labelled() -> LabelledCT:
    """41^3 voxels of 1 mm, air, a smooth bony bead (Gaussian, sigma 2 mm) off the isocentre; L1 label at the origin.

    A smooth bead, symmetric about a voxel centre: its projection is sampled at pixel
    centres without the quantised edges a sharp cube would show (those move a centroid
    by up to ~0.05 px).
    """
    n = 41
    origin = np.full(3, -20.0)
    kk, jj, ii = np.indices((n, n, n), dtype=np.float64)
    r2 = (ii + origin[0] - BEAD_LPS_MM[0]) ** 2 + (jj + origin[1] - BEAD_LPS_MM[1]) ** 2 + (kk + origin[2] - BEAD_LPS_MM[2]) ** 2
    hu = (-1000.0 + 4000.0 * np.exp(-r2 / (2 * BEAD_SIGMA_MM**2)) * (r2 < (4 * BEAD_SIGMA_MM) ** 2)).astype(np.float32)
    labels = np.zeros(hu.shape, dtype=np.int16)
    labels[16:25, 16:25, 16:25] = VERTEBRA_NAMES.index("L1") + 1  # centroid at LPS (0, 0, 0)
    labels[26:35, 16:25, 16:25] = VERTEBRA_NAMES.index("T12") + 1
    return LabelledCT(CTVolume(hu, (SPACING_MM,) * 3, origin, np.eye(3), "HFS", "tiny"), labels, "tiny labels")


def _small_room() -> StereoGeometry:
    return default_stereo_geometry(panel_pixels=128)


def _bead_centroid_px(drr: np.ndarray) -> np.ndarray:
    w = np.asarray(drr, dtype=np.float64)
    rows, cols = np.indices(w.shape)
    return np.array([np.sum(w * cols), np.sum(w * rows)]) / np.sum(w)


POSE = Pose.from_six([2.0, -3.0, 1.5], [2.0, -1.0, 3.0])


@pytest.mark.parametrize("projector", list(Projector))
def test_rendered_bead_lands_where_the_geometry_projects_it(projector):
    if projector is Projector.PLASTIMATCH:
        _need_plastimatch()
    lct = _tiny_labelled()
    renderer = CaseRenderer(lct, {"room": _small_room()})
    try:
        iso = renderer.isocentre_lps_mm("L1")
        assert_allclose(iso, [0.0, 0.0, 0.0], atol=1e-9)
        bead_room = lct.ct.lps_to_room(BEAD_LPS_MM[None], iso)
        for name, drr in renderer.line_integrals("L1", "room", POSE, projector).items():
            expected = _small_room()[name].project(POSE.apply(bead_room))[0]
            assert_allclose(_bead_centroid_px(drr), expected, rtol=0, atol=BEAD_PX_TOL)
    finally:
        renderer.close()


def _smooth_labelled() -> LabelledCT:
    """A soft-tissue ellipsoid with a bony column and a rib-like bar, 2 mm voxels (smooth, not blocky)."""
    kk, jj, ii = np.meshgrid(np.arange(30), np.arange(36), np.arange(40), indexing="ij")
    x, y, z = (ii - 19.5) * 2.0, (jj - 17.5) * 2.0, (kk - 14.5) * 2.0
    hu = np.where((x / 36) ** 2 + (y / 30) ** 2 < 1.0, 40.0, -1000.0)
    hu = np.where(x**2 + (y - 8) ** 2 < 100.0, 700.0 + 10.0 * z, hu)
    hu = np.where((np.abs(y + 15) < 3) & (np.abs(z - 5) < 4), 400.0, hu).astype(np.float32)
    labels = np.where(x**2 + (y - 8) ** 2 < 100.0, np.where(z < 0, 21, 20), 0).astype(np.int16)
    ct = CTVolume(hu, (2.0, 2.0, 2.0), (-39.0, -35.0, -29.0), np.eye(3), "HFS", "smooth")
    return LabelledCT(ct, labels, "smooth labels")


def _floor_like_room(panel_pixels: int = 160) -> StereoGeometry:
    """Floor sources, ceiling panels, beams tilted 8 deg along the couch (out of the axial plane)."""
    imagers = []
    tilt, ang = np.radians(8.0), np.radians(35.0)
    for name, side in (("A", -1.0), ("B", 1.0)):
        towards = np.array([side * np.sin(ang) * np.cos(tilt), -np.sin(tilt), -np.cos(ang) * np.cos(tilt)])
        source, n = 1500.0 * towards, -towards
        v = np.array([0.0, 1.0, 0.0]) - n[1] * n
        v /= np.linalg.norm(v)
        u = np.cross(v, n)
        origin = source + 2300.0 * n - (panel_pixels - 1) / 2.0 * 0.6 * (u + v)
        imagers.append(ImagerGeometry(name, source, origin, u, v, (0.6, 0.6), panel_pixels, panel_pixels))
    return StereoGeometry(tuple(imagers), 0.0, "test floor room")


@pytest.mark.parametrize("room", ["default", "floor"])
def test_plastimatch_and_our_projector_agree(room):
    _need_plastimatch()
    lct = _smooth_labelled()
    geometry = default_stereo_geometry(panel_pixels=160, pixel_spacing_mm=0.8) if room == "default" else _floor_like_room()
    renderer = CaseRenderer(lct, {room: geometry})
    try:
        ours = renderer.line_integrals("L1", room, POSE, Projector.OWN)
        theirs = renderer.line_integrals("L1", room, POSE, Projector.PLASTIMATCH)
    finally:
        renderer.close()
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.max() > 1.0  # the column and the bar are on the panel
        inside = a > 0.1 * a.max()
        assert np.median(np.abs(a - b)[inside] / a[inside]) < PROJECTOR_MEDIAN_REL_TOL, f"imager {name}"
        assert np.max(b - a) < PROJECTOR_EXCESS_REL_TOL * a.max(), f"imager {name}: plastimatch above ours"
        losses = (a - b) > PROJECTOR_LOSS_REL * a.max()
        assert np.count_nonzero(losses) < PROJECTOR_LOSS_FRACTION * np.count_nonzero(inside), f"imager {name}"


def test_plastimatch_needs_a_panel_square_to_the_central_ray():
    _need_plastimatch()
    lct = _smooth_labelled()
    im = default_stereo_geometry(panel_pixels=64)["A"]
    skew = ImagerGeometry("A", im.source_mm + np.array([0.0, 50.0, 0.0]), im.origin_mm, im.col_direction,
                          im.row_direction, im.pixel_spacing_mm, im.rows, im.cols)
    renderer = CaseRenderer(lct, {"skew": StereoGeometry((skew, default_stereo_geometry(panel_pixels=64)["B"]), 0.0, "")})
    try:
        with pytest.raises(SimulationError, match="imager 'A': the panel is not perpendicular"):
            renderer.line_integrals("L1", "skew", Pose.identity(), Projector.PLASTIMATCH)
    finally:
        renderer.close()


def test_planned_cases_share_poses_across_projectors_and_stay_within_the_start_errors():
    cases = plan_cases(["T12", "L1", "L2"], ["default", "floor"], ["own", "plastimatch"], 40, seed=3)
    assert [c.index for c in cases] == list(range(40))
    for own, pm in zip(cases[0::2], cases[1::2]):
        assert (own.projector, pm.projector) == (Projector.OWN, Projector.PLASTIMATCH)
        assert np.array_equal(own.pose.matrix, pm.pose.matrix) and own.seed == pm.seed and (own.level, own.room) == (pm.level, pm.room)
    assert {(c.level, c.room) for c in cases} == {(lv, rm) for lv in ("T12", "L1", "L2") for rm in ("default", "floor")}
    for c in cases:
        t, r = c.pose.six()
        assert np.all(np.abs(t) <= 10.0) and np.all(np.abs(r) <= 4.0)
        motion = c.tracking_pose.compose(c.pose.inverse())
        assert np.linalg.norm(motion.translation_mm) <= 2.0 + 1e-9 and motion.angle_deg() <= 1.0 + 1e-9
    again = plan_cases(["T12", "L1", "L2"], ["default", "floor"], ["own", "plastimatch"], 40, seed=3)
    assert all(np.array_equal(x.pose.matrix, y.pose.matrix) for x, y in zip(again, cases))
    with pytest.raises(SimulationError, match="at least one level"):
        plan_cases([], ["default"], ["own"], 1, seed=0)


def test_written_case_holds_frames_truth_geometry_and_the_target_roi(tmp_path):
    lct = _tiny_labelled()
    det = DetectorModel(i0=5000.0)
    renderer = CaseRenderer(lct, {"room": _small_room()}, det)
    case = plan_cases(["T12"], ["room"], ["own"], 1, seed=5)[0]
    folder = write_case(tmp_path / "c0", case, renderer, "../ct.mha", "../labels.mha")
    truth = json.loads((folder / "truth.json").read_text())
    assert truth["schema"] == "realct-truth/1" and truth["level"] == "T12" and truth["label"] == 19
    assert truth["projector"] == "own" and truth["i0"] == 5000.0 and truth["level_truncated"] is False
    assert_allclose(truth["isocentre_lps_mm"], lct.centroid_lps_mm("T12"), atol=1e-9)
    assert_allclose(Pose.from_six(**truth["pose"]).matrix, case.pose.matrix, atol=1e-12)
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "roi.mha")))
    assert np.array_equal(roi != 0, lct.mask("T12"))
    for key in ("frames", "tracking_frames"):
        for name, fname in truth[key].items():
            img = sitk.ReadImage(str(folder / fname))
            assert img.GetMetaData("spineguide_i0") == repr(5000.0) and img.GetSize() == (128, 128)
    assert json.loads((folder / "geometry.json").read_text())["schema"] == "kv-geometry/1"
    # Noise-free check of the frames' model: i0 exp(-L) with L the DRR (no noise, no blur).
    quiet = CaseRenderer(lct, {"room": _small_room()}, DetectorModel(i0=5000.0, noise=False, blur_sigma_px=0.0,
                                                                  dtype="float32"))
    frames = quiet.frames("T12", "room", case.pose, "own", seed=0)
    lines = quiet.line_integrals("T12", "room", case.pose, "own")
    for name in frames:
        assert_allclose(frames[name], 5000.0 * np.exp(-lines[name]), rtol=1e-6)


@pytest.mark.parametrize("projector", list(Projector))
def test_tissue_beyond_the_ends_is_the_end_slices_repeated_without_bone(projector):
    if projector is Projector.PLASTIMATCH:
        _need_plastimatch()
    lct = _smooth_labelled()
    pad = 4  # slices of 2 mm: 8 mm at each end
    ct = lct.ct
    soft = np.minimum(ct.hu, BEYOND_ENDS_MAX_HU)  # the column's bone is capped to soft tissue
    hu = np.concatenate([np.repeat(soft[:1], pad, axis=0), ct.hu, np.repeat(soft[-1:], pad, axis=0)])
    labels = np.pad(lct.labels, ((pad, pad), (0, 0), (0, 0)))
    origin = ct.origin_lps_mm - np.array([0.0, 0.0, pad * ct.spacing_mm[2]])
    longer = LabelledCT(CTVolume(hu, ct.spacing_mm, origin, np.eye(3), "HFS", "longer"), labels, "longer labels")
    room = {"room": default_stereo_geometry(panel_pixels=96, pixel_spacing_mm=1.2)}
    extended = CaseRenderer(lct, room, beyond_ends_mm=7.5)  # rounds up to 4 slices
    explicit = CaseRenderer(longer, room)
    try:
        assert_allclose(extended.isocentre_lps_mm("L1"), explicit.isocentre_lps_mm("L1"), atol=1e-9)
        a = extended.line_integrals("L1", "room", POSE, projector)
        b = explicit.line_integrals("L1", "room", POSE, projector)
        plain = CaseRenderer(lct, room).line_integrals("L1", "room", POSE, Projector.OWN)
    finally:
        extended.close()
        explicit.close()
    for name in a:
        assert_allclose(a[name], b[name], rtol=0, atol=1e-5)  # float32 sums of the same voxels
        assert np.max(a[name] - plain[name]) > 0.1  # the added slices are in the image
    with pytest.raises(SimulationError, match="beyond_ends_mm must be 0..1000 mm"):
        CaseRenderer(lct, room, beyond_ends_mm=-1.0)


def test_truncated_level_is_reported():
    lct = _tiny_labelled()
    labels = np.array(lct.labels)
    labels[38:41, 16:25, 16:25] = VERTEBRA_NAMES.index("T11") + 1  # reaches the last slice
    cut = LabelledCT(lct.ct, labels, "cut")
    assert cut.truncated("T11") and not cut.truncated("L1")


def test_built_set_holds_the_canonical_ct_labels_and_one_folder_per_case(tmp_path):
    lct = _tiny_labelled()
    built = build_set(tmp_path / "set", lct, {"room": _small_room()}, ["T12", "L1"], ["own"], 3, seed=1,
                      detector=DetectorModel(i0=3000.0))
    assert built["cases"] == 3 and built["levels"] == ["T12", "L1"] and built["truncated_levels"] == []
    ct = sitk.ReadImage(str(tmp_path / "set" / "ct.mha"))
    assert_allclose(sitk.GetArrayFromImage(ct), lct.ct.hu)
    assert_allclose(ct.GetOrigin(), lct.ct.origin_lps_mm)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "set" / "labels.mha"))), lct.labels)
    levels = [json.loads((tmp_path / "set" / "cases" / f"{n:04d}" / "truth.json").read_text())["level"] for n in range(3)]
    assert levels == ["T12", "L1", "T12"]
    with pytest.raises(SimulationError, match="level L4 is not in the label map"):
        build_set(tmp_path / "bad", lct, {"room": _small_room()}, ["L4"], ["own"], 1, seed=1)


def test_cli_simulate_ct_builds_a_set_from_any_ct_and_labels(tmp_path, nifti_pair, capsys):
    from spineguide.calibration.io import write_geometry
    from spineguide.tracking.cli.main import main

    ct_path, lab_path = nifti_pair
    room = write_geometry(_small_room(), tmp_path / "room.json")
    base = ["simulate-ct", "--ct", str(ct_path), "--labels", str(lab_path), "--scheme", "totalsegmentator",
            "--rooms", str(room), "--projectors", "own", "--cases", "2", "--i0", "3000", "--quiet"]
    assert main(base + ["--levels", "T12,L1", "--out", str(tmp_path / "set")]) == 0
    manifest = json.loads((tmp_path / "set" / "set.json").read_text())
    assert manifest["schema"] == "realct-set/1" and manifest["cases"] == 2 and manifest["levels"] == ["T12", "L1"]
    truths = [json.loads((tmp_path / "set" / "cases" / f"{n:04d}" / "truth.json").read_text()) for n in range(2)]
    assert [t["level"] for t in truths] == ["T12", "L1"]
    capsys.readouterr()
    assert main(base + ["--levels", "L4", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "level L4 is not in the label map" in err and err.count("\n") == 1
