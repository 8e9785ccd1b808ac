"""DRR projector against analytic line integrals, the projection matrix and pose semantics.

Objects are voxelised with partial-volume supersampling, so every voxel holds
``mu * (fraction of the voxel inside the object)``. The projector is exact for
that voxel-constant volume; what remains is the model's error at the object's
surface, which is bounded by the boundary voxels a ray crosses. See
``BOUNDARY_CHORD_FRACTION`` for which rays are compared and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.drr import (
    compute_drr_pose_derivatives,
    DRR_METADATA_PREFIX,
    AttenuationVolume,
    PanelRegion,
    compute_drr,
    compute_drr_batch,
    write_drr_images,
)
from spineguide.registration.errors import DRRError
from spineguide.registration.pose import Pose
from spineguide.registration.attenuation import MU_TABLE_OFFSET, int16_hu_mu_table
from spineguide.registration.volume import CTVolume, room_from_lps_matrix

# The accuracy requirement on analytic line integrals.
LINE_INTEGRAL_RTOL = 0.005
# The geometric requirement: a small dense object lands where the matrix says.
CENTROID_TOL_PX = 0.1
# Float32 output (6e-8 relative) plus float64 traversal in two different index frames.
SAME_RAY_ATOL = 1e-5

VOXEL_MM = 0.4
N_VOXELS = 160  # 64 mm cube around the isocentre
MU_PER_MM = 0.02  # water at ~60 keV
SUPERSAMPLE = 4  # 4^3 sub-points per boundary voxel: fraction error ~1/64 of a voxel, averaged along rays

# Which rays are compared with the analytic chords. The projector is exact for the
# voxel-constant volume (it agrees with rays sampled through the same voxels, and with
# plastimatch's exact Siddon in benchmarks/bench_drr.py); the model itself is not exact at a
# surface: a partly filled voxel spreads its content over the whole voxel, so a ray gains or
# loses path wherever it runs through partial voxels. Crossing the surface near its normal,
# a ray meets one or two such voxels and the error is a fraction of a voxel (about h/4 per
# crossing, h = voxel size, for these shapes); running near the surface (a grazing ray, or
# one that skims a flat face from inside) it meets many and the error grows to several
# voxels. A ray is compared when
#   - it crosses the surface within 26 deg of the normal at entry and exit,
#   - between those crossings it stays at least 2 h inside the object (no partial voxel
#     other than the two crossings), and
#   - its chord is at least 100 h, so that ~h/2 of misplaced path is within 0.5%.
# All three are fixed by the analytic geometry before any DRR is computed.
MIN_INCIDENCE_COS = 0.9
MIN_CLEARANCE_MM = 2 * VOXEL_MM
MIN_CHORD_MM = 100 * VOXEL_MM


# ---------------------------------------------------------------- helpers
def grid(n: int = N_VOXELS, voxel_mm: float = VOXEL_MM, centre_room_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """room_from_index of an axis-aligned cube of n^3 voxels centred on ``centre_room_mm``."""
    m = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    m[:3, 3] = np.asarray(centre_room_mm) - voxel_mm * (n - 1) / 2.0
    return m


def voxelise(inside: Callable[[np.ndarray], np.ndarray], room_from_index: np.ndarray, n: int) -> np.ndarray:
    """Fraction of each voxel inside a convex object, ``[k, j, i]`` float32.

    Voxels whose 8 corners agree are wholly in or out (exact for a convex body
    whose curvature radius is far above the voxel size); the others are
    supersampled on a ``SUPERSAMPLE^3`` grid.
    """
    c = np.arange(n + 1, dtype=np.float64) - 0.5
    lin, off = room_from_index[:3, :3], room_from_index[:3, 3]
    # Axis-aligned grids only: corner room coordinates separate per axis.
    assert np.allclose(lin, np.diag(np.diag(lin)))
    x = (c * lin[0, 0] + off[0])[None, None, :]
    y = (c * lin[1, 1] + off[1])[None, :, None]
    z = (c * lin[2, 2] + off[2])[:, None, None]
    corners = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    ins = inside(corners)
    count = sum(ins[a : a + n, b : b + n, d : d + n].astype(np.int8) for a in (0, 1) for b in (0, 1) for d in (0, 1))
    frac = (count == 8).astype(np.float32)
    k, j, i = np.nonzero((count > 0) & (count < 8))
    centres = np.stack([i, j, k], axis=-1).astype(np.float64) @ lin.T + off
    o = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    sub = np.stack(np.meshgrid(o, o, o, indexing="ij"), axis=-1).reshape(-1, 3) @ lin.T
    frac[k, j, i] = inside(centres[:, None, :] + sub[None]).mean(axis=1)
    return frac


def rays(imager, region: PanelRegion | None = None):
    """Source (3,) and unit directions (rows, cols, 3) of the DRR's rays, room frame."""
    region = PanelRegion.whole(imager) if region is None else region
    cols, rows = region.pixel_centres()
    cc, rr = np.meshgrid(cols, rows)
    pts = imager.pixel_to_room(np.stack([cc.ravel(), rr.ravel()], axis=1)).reshape(len(rows), len(cols), 3)
    e = pts - imager.source_mm
    return imager.source_mm, e / np.linalg.norm(e, axis=-1, keepdims=True)


def _incidence(e, normal):
    return np.abs(np.einsum("...i,...i", e, normal / np.linalg.norm(normal, axis=-1, keepdims=True)))


def sphere_chord(src, e, centre, radius):
    """Chord (mm), |cos| of the incidence (same at entry and exit), entry distance from the source."""
    w = src - np.asarray(centre)
    b = e @ w
    disc = b * b - (w @ w - radius**2)
    chord = 2.0 * np.sqrt(np.maximum(disc, 0.0))
    return chord, chord / (2.0 * radius), -b - chord / 2.0


def cylinder_chord(src, e, centre, axis, radius, half_length):
    """Chord (mm) through a finite cylinder, the smaller |cos| of entry/exit incidence, entry distance."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    w = src - np.asarray(centre)
    ea = e @ axis
    wa = w @ axis
    ep = e - ea[..., None] * axis
    wp = w - wa * axis
    a = np.einsum("...i,...i", ep, ep)
    b = ep @ wp
    disc = b * b - a * (wp @ wp - radius**2)
    root = np.sqrt(np.maximum(disc, 0.0))
    t1, t2 = (-b - root) / a, (-b + root) / a
    u1, u2 = (-half_length - wa) / ea, (half_length - wa) / ea
    ulo, uhi = np.minimum(u1, u2), np.maximum(u1, u2)
    lo, hi = np.maximum(t1, ulo), np.minimum(t2, uhi)
    chord = np.where(disc > 0, np.maximum(hi - lo, 0.0), 0.0)
    cosines = []
    for t, on_side in ((lo, t1 >= ulo), (hi, t2 <= uhi)):
        radial = ep * t[..., None] + wp  # perpendicular offset from the axis at the crossing
        cos_side = _incidence(e, radial + 1e-300)
        cos_cap = np.abs(ea)
        cosines.append(np.where(on_side, cos_side, cos_cap))
    return chord, np.minimum(*cosines), lo


def box_chord(src, e, centre, rotation, half_sizes):
    """Chord through a box with axes = columns of ``rotation`` (slab method in the box frame),
    the smaller |cos| of the entry and exit faces, and the entry distance from the source."""
    eb = e @ rotation
    wb = (src - np.asarray(centre)) @ rotation
    with np.errstate(divide="ignore"):
        t0 = (-np.asarray(half_sizes) - wb) / eb
        t1 = (np.asarray(half_sizes) - wb) / eb
    near, far = np.minimum(t0, t1), np.maximum(t0, t1)
    lo, hi = np.max(near, axis=-1), np.min(far, axis=-1)
    cos_in = np.take_along_axis(np.abs(eb), np.argmax(near, axis=-1)[..., None], -1)[..., 0]
    cos_out = np.take_along_axis(np.abs(eb), np.argmin(far, axis=-1)[..., None], -1)[..., 0]
    return np.maximum(hi - lo, 0.0), np.minimum(cos_in, cos_out), lo


def _rodrigues(k, a):
    k = np.asarray(k, float) / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def compare_with_chords(drr, src, e, chord_cos_entry, depth: Callable[[np.ndarray], np.ndarray]):
    """Compare the rays fit for comparison (see MIN_INCIDENCE_COS) with ``mu * chord``.

    ``depth(p)`` is the distance (mm) of room points inside the object's surface.
    """
    chords, cosines, entry = chord_cos_entry
    use = (chords >= MIN_CHORD_MM) & (cosines >= MIN_INCIDENCE_COS)
    # Interior of the chord, leaving out the stretch within MIN_CLEARANCE_MM of each crossing.
    margin = 1.5 * MIN_CLEARANCE_MM / MIN_INCIDENCE_COS
    f = np.linspace(0.0, 1.0, 48)
    t = entry[..., None] + margin + f * np.maximum(chords - 2 * margin, 0.0)[..., None]
    inner = depth(src + e[..., None, :] * t[..., None])
    use &= np.all(inner >= MIN_CLEARANCE_MM - 1e-9, axis=-1)
    assert use.sum() >= 300, f"only {use.sum()} rays fit for comparison"
    assert_allclose(drr[use], MU_PER_MM * chords[use], rtol=LINE_INTEGRAL_RTOL, atol=0)


GEOM = default_stereo_geometry(panel_pixels=160, pixel_spacing_mm=0.8)
M = grid()
SPHERE_C = np.array([1.0, -1.5, 2.0])
SPHERE_R = 29.0


def sphere_depth(centre, radius):
    return lambda p: radius - np.linalg.norm(p - centre, axis=-1)


@pytest.fixture(scope="module")
def sphere_volume() -> AttenuationVolume:
    return AttenuationVolume(MU_PER_MM * voxelise(lambda p: sphere_depth(SPHERE_C, SPHERE_R)(p) >= 0, M, N_VOXELS), M)


CYL_C = np.array([-1.0, 1.0, 0.5])
CYL_AXIS = np.array([0.25, 1.0, 0.15]) / np.linalg.norm([0.25, 1.0, 0.15])
CYL_R, CYL_HALF = 23.0, 25.0


def cylinder_depth(centre, axis, radius, half_length):
    def depth(p):
        w = p - centre
        a = w @ axis
        radial = np.sqrt(np.maximum(np.sum(w * w, axis=-1) - a * a, 0.0))
        return np.minimum(radius - radial, half_length - np.abs(a))

    return depth


@pytest.fixture(scope="module")
def cylinder_volume() -> AttenuationVolume:
    depth = cylinder_depth(CYL_C, CYL_AXIS, CYL_R, CYL_HALF)
    return AttenuationVolume(MU_PER_MM * voxelise(lambda p: depth(p) >= 0, M, N_VOXELS), M)


# A thick plate (box) whose normal is 10 deg off imager A's central ray, so A's rays cross
# its broad faces steeply; 42 x 52 mm across, 40 mm thick, inside the 64 mm cube.
SLAB_C = np.array([0.5, -0.7, 1.3])
_A_BEAM = -GEOM["A"].source_mm / np.linalg.norm(GEOM["A"].source_mm)
SLAB_ROT = _rodrigues([0.3, 1.0, 0.2], np.radians(10.0)) @ np.column_stack(
    [np.cross([0.0, 1.0, 0.0], _A_BEAM), [0.0, 1.0, 0.0], _A_BEAM]
)
SLAB_HALF = np.array([21.0, 26.0, 20.0])


def box_depth(centre, rot, half):
    return lambda p: np.min(half - np.abs((p - centre) @ rot), axis=-1)


@pytest.fixture(scope="module")
def slab_volume() -> AttenuationVolume:
    depth = box_depth(SLAB_C, SLAB_ROT, SLAB_HALF)
    return AttenuationVolume(MU_PER_MM * voxelise(lambda p: depth(p) >= 0, M, N_VOXELS), M)


# ------------------------------------------------------- analytic values
@pytest.mark.parametrize("name", ["A", "B"])
def test_sphere_line_integrals(sphere_volume, name):
    im = GEOM[name]
    drr = compute_drr(sphere_volume, im)
    src, e = rays(im)
    compare_with_chords(drr, src, e, sphere_chord(src, e, SPHERE_C, SPHERE_R), sphere_depth(SPHERE_C, SPHERE_R))
    # Rays that miss the sphere by more than a voxel diagonal see nothing (the rest is air).
    far = sphere_chord(src, e, SPHERE_C, SPHERE_R + 2 * VOXEL_MM)[0] == 0
    assert far.sum() > 1000 and np.all(drr[far] == 0.0)


@pytest.mark.parametrize("name", ["A", "B"])
def test_tilted_cylinder_line_integrals(cylinder_volume, name):
    src, e = rays(GEOM[name])
    compare_with_chords(
        compute_drr(cylinder_volume, GEOM[name]),
        src,
        e,
        cylinder_chord(src, e, CYL_C, CYL_AXIS, CYL_R, CYL_HALF),
        cylinder_depth(CYL_C, CYL_AXIS, CYL_R, CYL_HALF),
    )


def test_oblique_slab_line_integrals(slab_volume):
    src, e = rays(GEOM["A"])
    compare_with_chords(
        compute_drr(slab_volume, GEOM["A"]),
        src,
        e,
        box_chord(src, e, SLAB_C, SLAB_ROT, SLAB_HALF),
        box_depth(SLAB_C, SLAB_ROT, SLAB_HALF),
    )


# ------------------------------------------------------------- geometry
def centroid_px(drr: np.ndarray, region: PanelRegion) -> np.ndarray:
    rr, cc = np.indices(drr.shape)
    w = drr.astype(np.float64)
    return np.array([(w * cc).sum() / w.sum() + region.col0, (w * rr).sum() / w.sum() + region.row0])


@pytest.mark.parametrize("position", ["HFS", "FFP"])
@pytest.mark.parametrize("name", ["A", "B"])
def test_small_dense_object_lands_on_the_projected_pixel(position, name):
    # A dense bead (peak 3000 HU, Gaussian of 1 voxel sigma = 0.5 mm) centred on a voxel. It is
    # point-symmetric about that voxel centre, so its mass centre is exactly there whatever the
    # HU -> mu model. Two things would bias an intensity-weighted centroid without any geometric
    # error, and are avoided: a hard-edged block's footprint, point-sampled by pixels, aliases
    # by tenths of a pixel; and a grid with planes parallel to the rays (here: any grid with an
    # axis along room Y, as the beams lie in the X-Z plane) gives each ray a single voxel slab,
    # so the footprint along rows is a staircase of ~2-px steps. So the CT axes are oblique
    # (25 deg about (1, 2, 3) in LPS) and the bead's footprint is smooth (~2 px sigma).
    # Truth: CT -> room mapping, the pose, and the imager's projection matrix.
    direction = _rodrigues([1.0, 2.0, 3.0], np.radians(25.0))
    centre_ijk = np.array([8.0, 14.0, 11.0])
    k, j, i = np.indices((24, 24, 24))
    r2 = (i - centre_ijk[0]) ** 2 + (j - centre_ijk[1]) ** 2 + (k - centre_ijk[2]) ** 2
    hu = (-1000.0 + 4000.0 * np.exp(-r2 / 2.0) * (r2 <= 16)).astype(np.float32)  # cut at 4 sigma: symmetric
    ct = CTVolume(hu, (0.5, 0.5, 0.5), (20.0, -35.0, 110.0), direction, position)
    iso_lps = np.array([21.0, -27.0, 116.0])
    bead_lps = ct.index_to_lps(centre_ijk[None])[0]
    pose = Pose.from_six([2.5, -1.5, 3.0], [2.0, -3.0, 4.0])
    geom = default_stereo_geometry()  # full 1024 panel, 0.4 mm pixels
    im = geom[name]
    expected = im.project(pose.apply(ct.lps_to_room(bead_lps, iso_lps)))
    region = PanelRegion.centred(im, expected, 32, 32)
    drr = compute_drr(AttenuationVolume.from_ct(ct, iso_lps), im, pose, region)
    assert_allclose(centroid_px(drr, region), expected, rtol=0, atol=CENTROID_TOL_PX)


# -------------------------------------------------------- pose semantics
def test_translated_pose_equals_the_moved_sphere(sphere_volume):
    pose = Pose.from_six([1.5, -2.0, 1.0], [0.0, 0.0, 0.0])
    moved = SPHERE_C + pose.translation_mm
    for name in ("A", "B"):
        src, e = rays(GEOM[name])
        compare_with_chords(
            compute_drr(sphere_volume, GEOM[name], pose),
            src,
            e,
            sphere_chord(src, e, moved, SPHERE_R),
            sphere_depth(moved, SPHERE_R),
        )


def test_rotated_pose_equals_the_moved_cylinder(cylinder_volume):
    # Rotations are about the isocentre: the cylinder's centre goes to R c + t, its axis to R a.
    pose = Pose.from_six([1.0, 2.0, -1.5], [8.0, -5.0, 12.0])
    centre, axis = pose.apply(CYL_C), pose.rotation @ CYL_AXIS
    for name in ("A", "B"):
        src, e = rays(GEOM[name])
        compare_with_chords(
            compute_drr(cylinder_volume, GEOM[name], pose),
            src,
            e,
            cylinder_chord(src, e, centre, axis, CYL_R, CYL_HALF),
            cylinder_depth(centre, axis, CYL_R, CYL_HALF),
        )


def test_rolled_pose_turns_the_slab_to_face_imager_b(slab_volume):
    # A roll of ~90 deg about +Y takes imager A's beam direction onto imager B's, so B sees
    # the plate as A did; the plate's centre and axes move by the pose (about the isocentre).
    pose = Pose.from_six([-1.0, 0.5, 1.5], [3.0, 88.0, -2.0])
    centre, rot = pose.apply(SLAB_C), pose.rotation @ SLAB_ROT
    src, e = rays(GEOM["B"])
    compare_with_chords(
        compute_drr(slab_volume, GEOM["B"], pose),
        src,
        e,
        box_chord(src, e, centre, rot, SLAB_HALF),
        box_depth(centre, rot, SLAB_HALF),
    )


# ------------------------------------------------ regions, binning, masks
def test_region_is_exactly_the_crop_of_the_whole_panel(cylinder_volume):
    im = GEOM["A"]
    pose = Pose.from_six([1.0, 0.0, -2.0], [1.0, 2.0, 3.0])
    full = compute_drr(cylinder_volume, im, pose)
    region = PanelRegion(37, 51, 40, 60)
    part = compute_drr(cylinder_volume, im, pose, region)
    assert np.array_equal(part, full[37:77, 51:111])
    binned_full = compute_drr(cylinder_volume, im, pose, binning=2)
    binned_part = compute_drr(cylinder_volume, im, pose, PanelRegion(40, 20, 64, 64), binning=2)
    assert np.array_equal(binned_part, binned_full[20:52, 10:42])


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_binning_equals_the_binned_imager(sphere_volume, factor):
    im = GEOM["B"]
    assert_allclose(
        compute_drr(sphere_volume, im, binning=factor),
        compute_drr(sphere_volume, im.binned(factor)),
        rtol=0,
        atol=SAME_RAY_ATOL,
    )


def test_masked_equals_volume_times_mask(sphere_volume):
    k, j, i = np.indices(sphere_volume.mu_per_mm.shape)
    mask = (i > 40) & (i < 90) & (j + k > 120)
    im = GEOM["A"]
    pose = Pose.from_six([2.0, 1.0, 0.0], [0.0, 3.0, 0.0])
    times = AttenuationVolume(sphere_volume.mu_per_mm * mask, sphere_volume.room_from_index)
    expected = compute_drr(times, im, pose)
    masked = sphere_volume.masked(mask)
    assert masked.mu_per_mm.shape < sphere_volume.mu_per_mm.shape  # cropped to the mask's box
    assert_allclose(compute_drr(masked, im, pose), expected, rtol=0, atol=SAME_RAY_ATOL)


# The projection of a downsampled volume keeps the attenuation "mass" (block means), so
# the panel sum changes only through (a) the cone-beam weighting over the ~1.5 mm a block
# spreads its mass (relative magnification change ~ 1.5 / 2200 ~ 7e-4 at the very worst,
# averaging out across the sphere) and (b) sampling the edge of the projection at pixel
# centres (a few edge pixels of ~10^4 inside). 0.1% bounds both.
PANEL_SUM_RTOL = 0.001


def test_downsampled_keeps_the_total_integral(sphere_volume):
    im = GEOM["B"]
    full = compute_drr(sphere_volume, im).sum(dtype=np.float64)
    for factor in (2, 4):
        coarse = compute_drr(sphere_volume.downsampled(factor), im).sum(dtype=np.float64)
        assert_allclose(coarse, full, rtol=PANEL_SUM_RTOL, atol=0)


def test_downsampled_keeps_voxel_centres():
    m = grid(8, 1.0, (5.0, -3.0, 2.0))
    vol = AttenuationVolume(np.ones((8, 8, 8), np.float32), m)
    half = vol.downsampled(2)
    # New voxel (0,0,0) is the centre of old voxels 0..1.
    assert_allclose(half.room_from_index[:3, 3], m[:3, :3] @ [0.5, 0.5, 0.5] + m[:3, 3], rtol=0, atol=1e-12)
    assert half.mu_per_mm.shape == (4, 4, 4)
    assert vol.downsampled(1) is vol



def test_downsampled_per_axis_factors_keep_centres_and_means():
    m = grid(8, 1.0, (5.0, -3.0, 2.0))
    rng = np.random.default_rng(3)
    mu = rng.random((8, 8, 8)).astype(np.float32)  # (k, j, i)
    vol = AttenuationVolume(mu, m)
    coarse = vol.downsampled((2, 4, 1))  # f_i, f_j, f_k
    assert coarse.mu_per_mm.shape == (8, 2, 4)
    # Voxel (i, j, k) = (0, 0, 0) averages i 0..1, j 0..3, k 0 and sits at their centre.
    assert_allclose(coarse.mu_per_mm[0, 0, 0], mu[0, 0:4, 0:2].mean(), rtol=1e-6)
    assert_allclose(coarse.room_from_index[:3, 3], m[:3, :3] @ [0.5, 1.5, 0.0] + m[:3, 3], rtol=0, atol=1e-12)
    assert_allclose(coarse.room_from_index[:3, :3], m[:3, :3] @ np.diag([2.0, 4.0, 1.0]), rtol=0, atol=1e-12)
    assert vol.downsampled((1, 1, 1)) is vol
    for bad in ((2, 2), (0, 1, 1), (True, 1, 1), (1.5, 1, 1)):
        with pytest.raises(DRRError, match="pyramid factor"):
            vol.downsampled(bad)

# ------------------------------------------------------------- writing
def test_write_drr_images_writes_what_compute_drr_gives(tmp_path):
    hu = np.full((20, 22, 24), -1000.0, np.float32)
    hu[5:15, 6:16, 7:17] = 800.0
    ct = CTVolume(hu, (1.0, 1.1, 1.2), (-12.0, -12.0, -12.0), np.eye(3), "HFS")
    iso = [0.0, 0.0, 0.0]
    geom = default_stereo_geometry(48, 2.0)
    pose = Pose.from_six([1.0, -2.0, 0.5], [1.0, 0.0, -2.0])
    paths = write_drr_images(ct, geom, iso, tmp_path / "out", pose=pose, imagers=["B"], energy_kev=80.0)
    assert list(paths) == ["B"] and paths["B"].name == "drr_B.mha"
    image = sitk.ReadImage(str(paths["B"]))
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (48, 48)
    assert_allclose(image.GetSpacing(), (2.0, 2.0), rtol=0, atol=0)
    expected = compute_drr(AttenuationVolume.from_ct(ct, iso, 80.0), geom["B"], pose)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    assert image.GetMetaData(DRR_METADATA_PREFIX + "imager") == "B"
    for key, value in (("pose_translation_mm", [1.0, -2.0, 0.5]), ("pose_rotation_deg", [1.0, 0.0, -2.0])):
        stored = json.loads(image.GetMetaData(DRR_METADATA_PREFIX + key))
        assert_allclose(stored, value, rtol=0, atol=1e-9)  # degrees through a rotation matrix and back
    both = write_drr_images(ct, geom, iso, tmp_path / "all")
    assert sorted(both) == ["A", "B"]


# Whole-HU CTs kept as int16 project through the attenuation table (what `spineguide drr` does).
def _int16_box_ct(position: str) -> tuple[CTVolume, list[tuple[np.ndarray, np.ndarray, int]]]:
    """Air (-1024 HU padding and -1000 HU) around a 900 HU box holding a 40 HU box, faces on voxel
    boundaries; and each box's LPS centre, half sizes (mm) and HU."""
    spacing = np.array([0.9, 1.1, 1.5])
    origin = np.array([-20.0, -25.0, -30.0])
    hu = np.full((40, 50, 44), -1024, np.int16)
    hu[2:-2, 2:-2, 2:-2] = -1000
    boxes = []
    for (k0, k1, j0, j1, i0, i1), value in (((8, 30, 10, 41, 6, 37), 900), ((14, 22, 20, 30, 15, 25), 40)):
        hu[k0:k1, j0:j1, i0:i1] = value
        lo = origin + spacing * (np.array([i0, j0, k0]) - 0.5)
        hi = origin + spacing * (np.array([i1, j1, k1]) - 0.5)
        boxes.append(((lo + hi) / 2, (hi - lo) / 2, value))
    return CTVolume(hu, spacing, origin, np.eye(3), position), boxes


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_int16_ct_drr_equals_the_analytic_line_integrals(tmp_path, position):
    # Boxes whose faces are voxel boundaries are voxel-constant exactly: every ray's integral is
    # sum(chord x mu) up to float rounding, grazing rays included.
    ct, boxes = _int16_box_ct(position)
    iso = np.array([-1.0, 2.0, 1.5])
    geom = default_stereo_geometry(64, 1.6)
    pose = Pose.from_six([2.0, -1.0, 3.0], [4.0, -3.0, 6.0])
    paths = write_drr_images(ct, geom, iso, tmp_path, pose=pose)
    table = int16_hu_mu_table()
    r = room_from_lps_matrix(position)
    for name in ("A", "B"):
        drr = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[name]))).astype(np.float64)
        src, e = rays(geom[name])
        expected = np.zeros(drr.shape)
        outer_chord = None
        for k, (centre_lps, half_mm, value) in enumerate(boxes):
            # The patient moved by the pose: the box's room centre and axes move with it.
            centre_room = pose.rotation @ (r @ (centre_lps - iso)) + pose.translation_mm
            chord, _, _ = box_chord(src, e, centre_room, pose.rotation @ r, half_mm)
            mu_inner = float(table[value + MU_TABLE_OFFSET])
            mu_outer = float(table[boxes[0][2] + MU_TABLE_OFFSET])
            # The inner box replaces the outer's material where it sits.
            expected += chord * (mu_outer if k == 0 else mu_inner - mu_outer)
            outer_chord = chord if k == 0 else outer_chord
        assert (outer_chord > 0).mean() > 0.2, "the boxes must cover a good part of the panel"
        # float32 output (6e-8 relative) and float64 traversal: 1e-6 of the line integral.
        assert_allclose(drr, expected, rtol=1e-6, atol=1e-6)


def test_int16_ct_drr_is_bit_for_bit_its_float_copys(tmp_path):
    # The same whole HU as int16 (table) and as float32 (converted volume): the same images exactly,
    # at a pose, for both imagers, with metal, bone, soft tissue, air and padding below -1000 HU.
    rng = np.random.default_rng(11)
    hu = rng.integers(-1024, 3072, size=(30, 34, 38)).astype(np.int16)
    hu[:, :, :5] = -1024
    as_int = CTVolume(hu, (1.2, 1.0, 2.5), (-20.0, -17.0, -35.0), np.eye(3), "HFP")
    as_float = CTVolume(hu.astype(np.float32), (1.2, 1.0, 2.5), (-20.0, -17.0, -35.0), np.eye(3), "HFP")
    geom = default_stereo_geometry(48, 2.0)
    pose = Pose.from_six([1.0, -2.0, 0.5], [1.0, 0.5, -2.0])
    for energy_kev in (60.0, 80.0):
        a = write_drr_images(as_int, geom, [1.0, 0.0, -2.0], tmp_path / "int", pose=pose, energy_kev=energy_kev)
        b = write_drr_images(as_float, geom, [1.0, 0.0, -2.0], tmp_path / "float", pose=pose, energy_kev=energy_kev)
        for name in ("A", "B"):
            ia, ib = sitk.ReadImage(str(a[name])), sitk.ReadImage(str(b[name]))
            assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
            assert sitk.GetArrayFromImage(ia).max() > 1.0
            assert {k: ia.GetMetaData(k) for k in ia.GetMetaDataKeys()} == \
                {k: ib.GetMetaData(k) for k in ib.GetMetaDataKeys()}
    air = CTVolume(np.full((6, 6, 6), -1000, np.int16), (1, 1, 1), (-3, -3, -3), np.eye(3), "HFS")
    paths = write_drr_images(air, geom, [0.0, 0.0, 0.0], tmp_path / "air")
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(paths["A"]))).any()


def test_write_drr_images_refuses_unknown_imager(tmp_path):
    ct = CTVolume(np.zeros((4, 4, 4), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3), "HFS")
    with pytest.raises(DRRError, match=r"imager 'C' is not in the geometry \(imagers: A, B\)"):
        write_drr_images(ct, GEOM, [0, 0, 0], tmp_path, imagers=["C"])
    with pytest.raises(DRRError, match="no imager selected"):
        write_drr_images(ct, GEOM, [0, 0, 0], tmp_path, imagers=[])


# ------------------------------------------------------------- batched poses
@pytest.mark.parametrize("parallel", [False, True])
def test_batch_is_bit_identical_to_one_drr_per_pose(cylinder_volume, parallel):
    # Same rays, same traversal, only scheduled together: the batch must equal the singles exactly.
    poses = [Pose.identity(), Pose.from_six([1.5, -2.0, 1.0], [0.0, 0.0, 0.0]), Pose.from_six([0.5, 1.0, -1.0], [3.0, -2.0, 4.0])]
    region = PanelRegion(20, 30, 100, 90)
    for name in ("A", "B"):
        batch = compute_drr_batch(cylinder_volume, GEOM[name], poses, region, 2, parallel=parallel)
        singles = np.stack([compute_drr(cylinder_volume, GEOM[name], p, region, 2) for p in poses])
        assert batch.shape == singles.shape
        assert np.array_equal(batch, singles)


def test_batch_of_a_moved_sphere_matches_its_chords(sphere_volume):
    # The second pose of a batch against the analytic chords of the moved sphere (not just self-consistency).
    pose = Pose.from_six([1.5, -2.0, 1.0], [0.0, 0.0, 0.0])
    moved = SPHERE_C + pose.translation_mm
    src, e = rays(GEOM["A"])
    drrs = compute_drr_batch(sphere_volume, GEOM["A"], [Pose.identity(), pose])
    compare_with_chords(drrs[1], src, e, sphere_chord(src, e, moved, SPHERE_R), sphere_depth(moved, SPHERE_R))


def test_batch_refusals(sphere_volume):
    with pytest.raises(DRRError, match="non-empty sequence of Pose"):
        compute_drr_batch(sphere_volume, GEOM["A"], [])
    with pytest.raises(DRRError, match="non-empty sequence of Pose"):
        compute_drr_batch(sphere_volume, GEOM["A"], [np.eye(4)])
    with pytest.raises(DRRError, match="binning must be a positive integer"):
        compute_drr_batch(sphere_volume, GEOM["A"], [Pose.identity()], binning=0)
    with pytest.raises(DRRError, match=r"imager 'A': region rows 100\.\.179"):
        compute_drr_batch(sphere_volume, GEOM["A"], [Pose.identity()], region=PanelRegion(100, 0, 80, 10))


# ------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_binning(sphere_volume, bad):
    with pytest.raises(DRRError, match="binning must be a positive integer"):
        compute_drr(sphere_volume, GEOM["A"], binning=bad)


def test_region_outside_the_panel(sphere_volume):
    with pytest.raises(DRRError, match=r"imager 'A': region rows 100\.\.179, cols 0\.\.9 exceeds the 160x160 panel"):
        compute_drr(sphere_volume, GEOM["A"], region=PanelRegion(100, 0, 80, 10))
    with pytest.raises(DRRError, match=r"region 3x3 is smaller than one 4x4 bin"):
        compute_drr(sphere_volume, GEOM["A"], region=PanelRegion(0, 0, 3, 3), binning=4)
    with pytest.raises(DRRError, match="non-negative start and positive size"):
        PanelRegion(-1, 0, 5, 5)
    with pytest.raises(DRRError, match=r"PanelRegion\.rows must be an integer, got 2\.0"):
        PanelRegion(0, 0, 2.0, 5)


def test_mask_errors(sphere_volume):
    with pytest.raises(DRRError, match=r"mask shape \(3, 3, 3\) does not match the volume \(160, 160, 160\)"):
        sphere_volume.masked(np.ones((3, 3, 3), bool))
    with pytest.raises(DRRError, match="mask selects no voxel"):
        sphere_volume.masked(np.zeros((160, 160, 160), bool))


def test_volume_keeps_its_own_copy_of_borrowed_arrays():
    # A SimpleITK view is freed with its image; a writeable array may change afterwards.
    image = sitk.GetImageFromArray(np.full((4, 5, 6), 0.25, np.float32))
    from_view = AttenuationVolume(sitk.GetArrayViewFromImage(image), np.eye(4))
    del image
    source = np.full((4, 5, 6), 0.5, np.float32)
    from_array = AttenuationVolume(source, np.eye(4))
    source[:] = 9.0
    assert np.all(from_view.mu_per_mm == 0.25) and np.all(from_array.mu_per_mm == 0.5)
    assert not from_array.mu_per_mm.flags.writeable


def test_invalid_attenuation_volumes():
    with pytest.raises(DRRError, match="must be 3D"):
        AttenuationVolume(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(DRRError, match="finite and non-negative"):
        AttenuationVolume(np.full((2, 2, 2), -1.0), np.eye(4))
    with pytest.raises(DRRError, match="finite 4x4"):
        AttenuationVolume(np.zeros((2, 2, 2)), np.eye(3))
    with pytest.raises(DRRError, match="invertible affine"):
        AttenuationVolume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(DRRError, match=r"pyramid factor must be an integer >= 1 or three of them, got 0"):
        AttenuationVolume(np.zeros((2, 2, 2)), np.eye(4)).downsampled(0)
    with pytest.raises(DRRError, match=r"too small for factor 4"):
        AttenuationVolume(np.zeros((2, 2, 2)), np.eye(4)).downsampled(4)


def test_empty_volume_gives_a_zero_drr():
    drr = compute_drr(AttenuationVolume(np.zeros((4, 4, 4), np.float32), grid(4, 1.0)), GEOM["A"])
    assert drr.shape == (160, 160) and not drr.any()


# ------------------------------------------------------ Joseph projector and its derivatives
@pytest.mark.parametrize("name", ["A", "B"])
def test_joseph_sphere_line_integrals(sphere_volume, name):
    # The slice-interpolating projector integrates the same voxelised sphere: the same chords.
    im = GEOM[name]
    drr = compute_drr_batch(sphere_volume, im, [Pose.identity()], projector="joseph")[0]
    src, e = rays(im)
    compare_with_chords(drr, src, e, sphere_chord(src, e, SPHERE_C, SPHERE_R), sphere_depth(SPHERE_C, SPHERE_R))
    far = sphere_chord(src, e, SPHERE_C, SPHERE_R + 2 * VOXEL_MM)[0] == 0
    assert far.sum() > 1000 and np.all(drr[far] == 0.0)


def test_joseph_moved_cylinder_line_integrals(cylinder_volume):
    pose = Pose.from_six([1.5, -2.0, 1.0], [0.0, 0.0, 0.0])
    src, e = rays(GEOM["B"])
    drr = compute_drr_batch(cylinder_volume, GEOM["B"], [Pose.identity(), pose], projector="joseph")[1]
    moved = CYL_C + pose.translation_mm
    compare_with_chords(drr, src, e, cylinder_chord(src, e, moved, CYL_AXIS, CYL_R, CYL_HALF),
                        cylinder_depth(moved, CYL_AXIS, CYL_R, CYL_HALF))


#: A smooth blob on thick slices (as a planning CT's 2 mm slices). The bilinear interpolant has
#: kinks at voxel faces; central differences over +-h straddle some of them, so they approach
#: the exact derivative only as ~sqrt(h) (worst parameter, the roll: 7.6% at h = 0.3, 1.3% at
#: 0.01, 0.5% at 0.001; float32 rounding stays below 0.1% there).
BLOB_SPACING_MM = (0.9, 1.1, 2.5)
DERIVATIVE_STEP = 1e-3  # mm and degrees
DERIVATIVE_RTOL = 0.01


@pytest.fixture(scope="module")
def blob_volume() -> AttenuationVolume:
    shape = (30, 70, 80)  # k (2.5 mm), j, i
    m = np.diag([*BLOB_SPACING_MM, 1.0])
    m[:3, 3] = -np.asarray(BLOB_SPACING_MM) * (np.array(shape[::-1]) - 1) / 2.0 + [2.0, -3.0, 1.0]
    k, j, i = np.indices(shape)
    room = np.stack([i, j, k], axis=-1) @ m[:3, :3].T + m[:3, 3]
    # Two ellipsoidal Gaussian blobs with different sizes: derivatives that differ per parameter.
    mu = 0.03 * np.exp(-0.5 * np.sum((room / [14.0, 9.0, 20.0]) ** 2, axis=-1))
    mu += 0.02 * np.exp(-0.5 * np.sum(((room - [10.0, 5.0, -12.0]) / [5.0, 7.0, 6.0]) ** 2, axis=-1))
    return AttenuationVolume(mu.astype(np.float32), m)


def _six_parameter_poses(base: Pose, centre: np.ndarray):
    """``x -> Pose`` (translation mm, rotation deg about ``centre`` then ``base``) and d matrix / dx."""
    def pose(x):
        r = Pose.from_six([0, 0, 0], x[3:]).rotation
        return Pose(r, centre + x[:3] - r @ centre).compose(base)

    eps = 1e-6
    d = np.stack([(pose(eps * e).matrix - pose(-eps * e).matrix) / (2 * eps) for e in np.eye(6)])
    return pose, d


@pytest.mark.parametrize("name", ["A", "B"])
def test_joseph_pose_derivatives_equal_small_step_differences(blob_volume, name):
    im = GEOM[name]
    base = Pose.from_six([1.0, -2.0, 0.5], [2.0, -1.0, 3.0])
    pose, dpose = _six_parameter_poses(base, np.array([3.0, 1.0, -2.0]))
    region = PanelRegion(30, 20, 100, 120)
    out = compute_drr_pose_derivatives(blob_volume, im, pose(np.zeros(6)), dpose, region, 2)
    assert out.shape == (7, 50, 60)
    # Item 0 is the Joseph DRR itself, bit for bit.
    assert np.array_equal(out[0], compute_drr_batch(blob_volume, im, [pose(np.zeros(6))], region, 2, projector="joseph")[0])
    h = DERIVATIVE_STEP
    for p in range(6):
        e = np.eye(6)[p] * h
        both = compute_drr_batch(blob_volume, im, [pose(e), pose(-e)], region, 2, projector="joseph").astype(np.float64)
        fd = (both[0] - both[1]) / (2 * h)
        assert np.abs(fd).max() > 1e-3, f"parameter {p} does not move the DRR: a weak test"
        err = np.linalg.norm(out[1 + p] - fd) / np.linalg.norm(fd)
        assert err < DERIVATIVE_RTOL, f"parameter {p}: relative error {err:.4f}"



def test_joseph_ray_subset_traces_exactly_the_masked_pixels(blob_volume):
    """``rays`` leaves the masked pixels bit-identical to the full DRR and its derivatives, the rest 0."""
    im = GEOM["A"]
    base = Pose.from_six([1.0, -2.0, 0.5], [2.0, -1.0, 3.0])
    pose, dpose = _six_parameter_poses(base, np.array([3.0, 1.0, -2.0]))
    region = PanelRegion(30, 20, 100, 120)
    rays = np.zeros((50, 60), bool)
    rays[10:30, 5:40] = True
    rays[::7, ::3] = True
    full = compute_drr_batch(blob_volume, im, [base], region, 2, projector="joseph")[0]
    part = compute_drr_batch(blob_volume, im, [base], region, 2, projector="joseph", rays=rays)[0]
    assert np.abs(full[rays]).max() > 1e-3
    assert np.array_equal(part[rays], full[rays]) and not part[~rays].any()
    dfull = compute_drr_pose_derivatives(blob_volume, im, pose(np.zeros(6)), dpose, region, 2)
    dpart = compute_drr_pose_derivatives(blob_volume, im, pose(np.zeros(6)), dpose, region, 2, rays=rays)
    assert np.array_equal(dpart[:, rays], dfull[:, rays]) and not dpart[:, ~rays].any()
    with pytest.raises(DRRError, match="rays must be a bool array"):
        compute_drr_batch(blob_volume, im, [base], region, 2, projector="joseph", rays=rays[:-1])
    with pytest.raises(DRRError, match="rays must be a bool array"):
        compute_drr_pose_derivatives(blob_volume, im, base, dpose, region, 2, rays=rays.astype(np.uint8))
    with pytest.raises(DRRError, match="Joseph projector only"):
        compute_drr_batch(blob_volume, im, [base], region, 2, projector="siddon", rays=rays)

def test_joseph_is_smooth_where_siddon_steps_across_thick_slices(blob_volume):
    # Translation along the slice axis (room y here) moves rays across 2.5 mm slices they run
    # nearly parallel to: the voxel-constant integral changes in steps, Joseph's varies smoothly,
    # so its second differences over a 0.1 mm sweep stay small compared with Siddon's.
    im = GEOM["A"]
    region = PanelRegion(40, 40, 80, 80)
    sweep = [Pose.from_six([0.0, y, 0.0], [0, 0, 0]) for y in np.linspace(0.0, 2.5, 26)]
    rough = {}
    for proj in ("siddon", "joseph"):
        d = compute_drr_batch(blob_volume, im, sweep, region, 2, projector=proj).astype(np.float64)
        rough[proj] = np.abs(np.diff(d, 2, axis=0)).mean()
    assert rough["joseph"] < 0.2 * rough["siddon"], rough


def test_joseph_refusals_and_empty_volume(sphere_volume):
    with pytest.raises(DRRError, match="projector must be one of"):
        compute_drr_batch(sphere_volume, GEOM["A"], [Pose.identity()], projector="trilinear")
    with pytest.raises(DRRError, match=r"pose_derivatives must be a finite \(n, 4, 4\) array"):
        compute_drr_pose_derivatives(sphere_volume, GEOM["A"], Pose.identity(), np.zeros((6, 3, 4)))
    with pytest.raises(DRRError, match=r"pose_derivatives must be a finite"):
        compute_drr_pose_derivatives(sphere_volume, GEOM["A"], Pose.identity(), np.full((1, 4, 4), np.nan))
    with pytest.raises(DRRError, match="pose must be a Pose"):
        compute_drr_pose_derivatives(sphere_volume, GEOM["A"], np.eye(4), np.zeros((6, 4, 4)))
    empty = AttenuationVolume(np.zeros((4, 4, 4), np.float32), grid(4, 1.0))
    assert not compute_drr_batch(empty, GEOM["A"], [Pose.identity()], projector="joseph").any()
    assert not compute_drr_pose_derivatives(empty, GEOM["A"], Pose.identity(), np.zeros((6, 4, 4))).any()


def test_joseph_skips_only_empty_space():
    # A sparse volume (two small blocks in a large empty box): the projector skips samples outside
    # each plane's non-zero extent. The DRR is linear in mu, so adding a uniform 1e-3 everywhere
    # (nothing left to skip) must add exactly the uniform volume's DRR.
    m = grid(60, 1.0)
    mu = np.zeros((60, 60, 60), np.float32)
    mu[20:26, 30:41, 10:14] = 0.03
    mu[40:44, 12:16, 35:50] = 0.05
    sparse = AttenuationVolume(mu, m)
    eps = np.float32(1e-3)
    dense = AttenuationVolume(mu + eps, m)
    uniform = AttenuationVolume(np.full_like(mu, eps), m)
    pose = Pose.from_six([1.0, -2.0, 0.5], [3.0, -2.0, 4.0])
    for name in ("A", "B"):
        args = ([pose], PanelRegion(20, 20, 120, 120), 1)
        a, b, c = (compute_drr_batch(v, GEOM[name], *args, projector="joseph")[0] for v in (sparse, dense, uniform))
        assert a.max() > 0.1 and np.count_nonzero(a) > 500
        assert_allclose(a + c, b, rtol=0, atol=2e-6)


def test_plane_extents_bound_the_non_zero_voxels():
    from spineguide.registration._joseph_kernels import plane_extents

    mu = np.zeros((5, 6, 7), np.float32)  # k, j, i
    mu[2, 1, 3] = 1.0
    mu[2, 4, 5] = 1.0
    ext = plane_extents(mu)
    assert ext.shape == (3, 7, 4)
    # Plane k = 2 (axis q = 2; in-plane axes i, j): i in 3..5, j in 1..4 -> open intervals grown by one.
    assert_allclose(ext[2, 2], [2.0, 6.0, 0.0, 5.0])
    # Plane i = 5 (q = 0; axes j, k): the single voxel (j 4, k 2).
    assert_allclose(ext[0, 5], [3.0, 5.0, 1.0, 3.0])
    # Empty planes reject every sample (lo == hi).
    for q, iq in ((2, 0), (0, 0), (1, 0), (2, 6)):
        assert ext[q, iq, 0] >= ext[q, iq, 1]
