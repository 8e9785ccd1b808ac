"""Per-level rigid deformation of a labelled CT: each vertebra moves by its own rigid transform.

The inter-level motion of a spine between planning CT and treatment (flexion,
lateral bending, axial rotation between vertebrae) as a validation case needs:
every vertebra moved *exactly* rigidly (so that each level has an exact truth
pose), and the soft tissue between them following smoothly. This module builds
such a deformed CT from a :class:`~spineguide.tracking.room.realct.LabelledCT`
(or any CT with a label map on its grid):

1. Each level ``v`` has a rigid transform ``T_v`` in the CT's LPS frame (mm):
   a planned point ``x`` of vertebra ``v`` is at ``T_v(x)`` in the deformed CT.
2. Every vertebra's label mask is carried to its deformed place by
   SimpleITK (nearest neighbour, transform ``T_v^-1``: ITK's resampling
   transform maps output points to input points).
3. An output voxel ``y`` inside exactly one deformed vertebra ``v`` is pulled
   from ``T_v^-1(y)``: the vertebra is rigid, exactly. Anywhere else the
   pull-back point is the inverse-distance-squared blend
   ``sum_v w_v(y) T_v^-1(y)``, ``w_v ~ 1 / d_v(y)^2`` with ``d_v`` the distance
   (mm, Euclidean distance transform) to the deformed vertebra ``v``: soft
   tissue follows its nearest vertebrae, continuously up to their surfaces.
   A voxel that two deformed vertebrae both claim (they collide) is given to
   the cranial one and counted (``conflict_voxels``).
4. The HU are resampled with SimpleITK through that displacement field
   (``sitk.DisplacementFieldTransform``, linear interpolation, nearest-neighbour
   extrapolation past the CT's box, so no air enters at its ends). No resampling
   is written by hand.

Frames (docs/CONVENTIONS.md): transforms in planning-CT LPS mm;
:func:`level_pose_room` turns one into the room-frame :class:`Pose` it is at
perfect setup (about the plan isocentre), so a level's truth pose in a case is
``case_pose.compose(level_pose_room(...))``.

Anatomical axes (the same for every patient position, because LPS is the
patient's own frame): flexion about +x (patient left; positive = the cranial
part tilts anterior, i.e. flexion), lateral bending about +y (posterior;
positive = the cranial part bends toward the patient's left), axial rotation
about +z (superior; positive = the anterior face turns toward the patient's left).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import scipy.ndimage
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from spineguide.calibration.foundation import checked_number
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume, room_from_lps_matrix

from ..errors import SimulationError

__all__ = [
    "LevelDeformation",
    "DeformedCT",
    "random_level_deformation",
    "deform_ct",
    "level_pose_room",
    "rigid_about",
    "DeformOptions",
    "levels_truth",
    "deform_from_options",
    "upsample_for_grid",
    "LEVELS_TRUTH_SCHEMA",
]

#: Soft-min length of the blend (mm): tissue whose distance to a vertebra exceeds its distance to the nearest
#: one by this much weighs e^-1 less for it (module docstring, step 3).
SLAB_FALLOFF_MM = 5.0

#: Schema of the per-level truth file written beside a deformed case's truth.json.
LEVELS_TRUTH_SCHEMA = "realct-levels-truth/1"


def rigid_about(centre_lps_mm: Sequence[float], rotation_deg: Sequence[float],
                translation_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 LPS affine: rotation ``rotation_deg`` = [about +x (left), +y (posterior), +z (superior)]
    (extrinsic xyz, as CONVENTIONS' pose angles) about ``centre_lps_mm``, then ``translation_mm`` (LPS)."""
    c = np.asarray(centre_lps_mm, dtype=np.float64)
    r = Rotation.from_euler("xyz", np.asarray(rotation_deg, dtype=np.float64), degrees=True).as_matrix()
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


@dataclass(frozen=True, slots=True)
class LevelDeformation:
    """Rigid transforms per vertebra, planning-CT LPS mm.

    Attributes
    ----------
    transforms_lps : mapping level name -> (4, 4) array, read-only
        ``x_deformed = T[:3, :3] @ x + T[:3, 3]`` for every point of that vertebra.
    labels : mapping level name -> int
        The label value of each level in the label map.
    """

    transforms_lps: Mapping[str, np.ndarray]
    labels: Mapping[str, int]

    def __post_init__(self) -> None:
        if not self.transforms_lps:
            raise SimulationError("LevelDeformation: no level")
        if set(self.transforms_lps) != set(self.labels):
            raise SimulationError(f"LevelDeformation: transforms for {sorted(self.transforms_lps)}, "
                                  f"labels for {sorted(self.labels)}")
        out = {}
        for name, m in self.transforms_lps.items():
            a = np.array(m, dtype=np.float64)
            if a.shape != (4, 4) or not np.all(np.isfinite(a)):
                raise SimulationError(f"LevelDeformation: level {name}: a finite 4x4 affine is needed, got {a.shape}")
            r = a[:3, :3]
            if not np.allclose(r.T @ r, np.eye(3), atol=1e-9) or np.linalg.det(r) < 0 or not np.allclose(a[3], [0, 0, 0, 1]):
                raise SimulationError(f"LevelDeformation: level {name}: not a proper rigid transform")
            a.setflags(write=False)
            out[name] = a
        object.__setattr__(self, "transforms_lps", MappingProxyType(out))
        object.__setattr__(self, "labels", MappingProxyType({k: int(v) for k, v in self.labels.items()}))

    def to_json(self) -> dict:
        """Per level: the LPS rotation (deg, extrinsic xyz about the LPS origin) and translation (mm)."""
        out = {}
        for name, m in self.transforms_lps.items():
            out[name] = {"label": self.labels[name], "matrix_lps": m.tolist(),
                         "rotation_deg_lps": Rotation.from_matrix(m[:3, :3]).as_euler("xyz", degrees=True).tolist()}
        return out


@dataclass(frozen=True, slots=True)
class DeformedCT:
    """A CT whose vertebrae were moved each by its own rigid transform.

    Attributes
    ----------
    ct : CTVolume
        Deformed HU on the planning CT's grid, same patient position.
    labels : (nk, nj, ni) int16 array
        The label map carried to the deformed places (nearest neighbour).
    conflict_voxels : int
        Output voxels that two deformed vertebrae both claimed (given to the cranial one).
    max_displacement_mm : float
        Largest displacement of the field (mm).
    """

    ct: CTVolume
    labels: np.ndarray
    conflict_voxels: int
    max_displacement_mm: float


def _inside_deformed(labels_img: sitk.Image, value: int, transform_lps: np.ndarray,
                     reference: sitk.Image | None = None) -> np.ndarray:
    """Bool ``[k, j, i]`` on ``reference``'s grid (default: the labels'): output voxels whose pull-back point
    ``T^-1(y)`` is labelled ``value``."""
    inv = np.linalg.inv(transform_lps)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(inv[:3, :3].ravel().tolist())
    tx.SetTranslation(inv[:3, 3].tolist())
    mask = sitk.Cast(labels_img == value, sitk.sitkUInt8)
    out = sitk.Resample(mask, labels_img if reference is None else reference, tx, sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


def _refined_grid(image: sitk.Image, factors: tuple[int, int, int]) -> sitk.Image:
    """An empty image covering ``image``'s voxels with ``factors`` (i, j, k) x finer voxels along its axes (same
    box, same direction): fine voxel centres at the coarse index ``-0.5 + (m + 0.5) / factor``."""
    ref = sitk.Image([n * f for n, f in zip(image.GetSize(), factors)], sitk.sitkUInt8)
    ref.SetSpacing([sp / f for sp, f in zip(image.GetSpacing(), factors)])
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 / f for f in factors]))
    return ref


def _upsample_factors(upsample) -> tuple[int, int, int]:
    """``upsample`` (an int, or one per axis i, j, k) as three integers 1..8; SimulationError otherwise."""
    values = (upsample,) * 3 if isinstance(upsample, (int, np.integer)) and not isinstance(upsample, bool) else upsample
    try:
        out = tuple(values)
    except TypeError:
        out = ()
    if len(out) != 3 or any(isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 1 <= f <= 8
                            for f in out):
        raise SimulationError(
            f"deform_ct: upsample must be an integer 1..8 or three of them (i, j, k), got {upsample!r}")
    return tuple(int(f) for f in out)


def deform_ct(ct: CTVolume, labels: np.ndarray, deformation: LevelDeformation, *,
              upsample: int | tuple[int, int, int] = 1) -> DeformedCT:
    """The CT with each level of ``deformation`` moved rigidly, soft tissue blended (module docstring).

    Parameters
    ----------
    ct : CTVolume
        Planning CT (any direction cosines; LPS mm).
    labels : (nk, nj, ni) int array
        Label map on the CT's grid; ``deformation.labels`` names the values used.
    deformation : LevelDeformation
    upsample : int or (3,) ints
        The deformed CT's grid is ``upsample`` x finer than the planning CT's along each axis (or per axis i, j, k;
        same box). With 1 a moved vertebra is the planning CT's linear interpolant sampled again on the same coarse
        grid: a second
        sampling that blurs it by an amount that varies with the sub-voxel offset across it, which the unmoved
        target does not get (with 3 mm voxels this alone puts a single level 0.6-0.9 deg off in a 2D/3D
        registration, docs/PER_LEVEL.md). On a grid of about 1 mm the moved vertebra keeps the planning CT's
        detail. The blend of the soft tissue is computed on the coarse grid and interpolated (linearly) to the
        fine one; every fine voxel inside a deformed vertebra is pulled back by its rigid transform exactly.

    Returns
    -------
    DeformedCT
        ``ct`` and ``labels`` on the output grid (the planning grid when ``upsample`` is 1).

    Raises
    ------
    SimulationError
        Label map on another grid, a level label absent from the map, a bad ``upsample``.
    """
    lab = np.asarray(labels)
    if lab.shape != ct.hu.shape:
        raise SimulationError(f"deform_ct: label map shape {lab.shape} differs from the CT's {ct.hu.shape}")
    factors = _upsample_factors(upsample)
    ct_img = ct.to_sitk()
    ct_img = sitk.Cast(ct_img, sitk.sitkFloat32)
    lab_img = sitk.GetImageFromArray(lab.astype(np.int16))
    lab_img.CopyInformation(ct_img)
    names = sorted(deformation.labels, key=lambda n: deformation.labels[n])  # VerSe: cranial first
    shape = lab.shape
    kji = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = ct.index_to_lps(kji[::-1].T)  # output voxel centres, LPS mm, (N, 3)
    spacing_kji = np.asarray(ct.spacing_mm, dtype=np.float64)[::-1]
    inside = np.zeros(shape, dtype=np.int16)  # index + 1 of the level owning a voxel, 0 none
    conflicts = 0
    dists = []
    for n, name in enumerate(names):
        value = deformation.labels[name]
        if not np.any(lab == value):
            raise SimulationError(f"deform_ct: level {name} (label {value}) is not in the label map")
        t = deformation.transforms_lps[name]
        mine = _inside_deformed(lab_img, value, t)
        conflicts += int(np.count_nonzero(mine & (inside > 0)))
        inside[mine & (inside == 0)] = n + 1
        dists.append(scipy.ndimage.distance_transform_edt(~mine, sampling=spacing_kji).ravel())
    d_min = np.min(dists, axis=0)
    weight_sum = np.zeros(pts.shape[0])
    pulled = np.zeros_like(pts)
    for name, d_mm in zip(names, dists):
        inv = np.linalg.inv(deformation.transforms_lps[name])
        # 1/d^2 makes the blend continuous at each vertebra's surface; the soft-min factor makes tissue
        # far from the spine follow the vertebra whose slab it lies in, not an average of the whole spine.
        w = np.exp(-(d_mm - d_min) / SLAB_FALLOFF_MM) / np.maximum(d_mm, 1e-6) ** 2
        weight_sum += w
        pulled += w[:, None] * (pts @ inv[:3, :3].T + inv[:3, 3])
    pulled /= weight_sum[:, None]
    owner = inside.ravel()
    for n, name in enumerate(names):
        sel = owner == n + 1
        if np.any(sel):
            inv = np.linalg.inv(deformation.transforms_lps[name])
            pulled[sel] = pts[sel] @ inv[:3, :3].T + inv[:3, 3]  # exactly rigid inside the vertebra
    disp = (pulled - pts).reshape(*shape, 3)  # LPS mm, the same as ITK's physical frame
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.CopyInformation(ct_img)
    max_disp = float(np.max(np.linalg.norm(disp, axis=-1)))
    del pts, pulled, dists, weight_sum, d_min, owner, disp  # the coarse work arrays (a fine grid is large)
    reference = ct_img
    if factors != (1, 1, 1):
        # The blend, interpolated to the fine grid; inside each deformed vertebra the exact rigid pull-back.
        reference = _refined_grid(ct_img, factors)
        fine = sitk.Resample(field, reference, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID(), True)
        disp = sitk.GetArrayFromImage(fine)
        inside = np.zeros(disp.shape[:3], dtype=np.int16)
        for n, name in enumerate(names):
            t = deformation.transforms_lps[name]
            mine = _inside_deformed(lab_img, deformation.labels[name], t, reference) & (inside == 0)
            inside[mine] = n + 1
            inv = np.linalg.inv(t)
            # Fine voxel m along an axis is at the planning CT's index -0.5 + (m + 0.5) / factor (_refined_grid).
            y = ct.index_to_lps((np.argwhere(mine)[:, ::-1] + 0.5) / np.asarray(factors, dtype=np.float64) - 0.5)
            disp[mine] = y @ inv[:3, :3].T + inv[:3, 3] - y
        max_disp = float(np.max(np.linalg.norm(disp, axis=-1)))
        field = sitk.GetImageFromArray(disp, isVector=True)
        del disp
        field.CopyInformation(reference)
    tx = sitk.DisplacementFieldTransform(field)
    out = sitk.Resample(ct_img, reference, tx, sitk.sitkLinear, -1000.0, sitk.sitkFloat32, True)
    hu = sitk.GetArrayFromImage(out)
    new_labels = np.zeros(hu.shape, dtype=np.int16)
    for n, name in enumerate(names):
        new_labels[inside == n + 1] = deformation.labels[name]
    deformed = CTVolume(hu, np.asarray(reference.GetSpacing()), np.asarray(reference.GetOrigin()), ct.direction,
                        ct.patient_position, f"{ct.source} (levels deformed)")
    return DeformedCT(deformed, new_labels, conflicts, max_disp)


def random_level_deformation(
    centroids_lps_mm: Mapping[str, Sequence[float]],
    labels: Mapping[str, int],
    fixed: str,
    seed: int | np.random.Generator,
    max_rotation_deg: float = 2.0,
    max_translation_mm: float = 0.5,
) -> LevelDeformation:
    """A seeded spine deformation: ``fixed`` stays, each joint away from it bends by a random rigid motion.

    Levels are chained outward from ``fixed`` (ordered by label, cranial first):
    each intervertebral joint gets rotations uniform in ``+-max_rotation_deg``
    about the patient's left, posterior and superior axes through the midpoint
    of the two centroids (the disc), plus a translation uniform in
    ``+-max_translation_mm`` per LPS axis; a level's transform is its inner
    neighbour's followed by the joint's, so ``fixed`` keeps the case's pose and
    a level two joints away carries both.

    Raises
    ------
    SimulationError
        ``fixed`` not among the levels, bad amplitudes.
    """
    if fixed not in labels:
        raise SimulationError(f"random_level_deformation: fixed level {fixed!r} not among {sorted(labels)}")
    rot = checked_number(max_rotation_deg, SimulationError, f"max_rotation_deg must be 0..20 deg, got {max_rotation_deg!r}",
                         minimum=0.0, maximum=20.0)
    tra = checked_number(max_translation_mm, SimulationError,
                         f"max_translation_mm must be 0..20 mm, got {max_translation_mm!r}", minimum=0.0, maximum=20.0)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    order = sorted(labels, key=lambda n: labels[n])
    i0 = order.index(fixed)
    out = {fixed: np.eye(4)}
    for step in (1, -1):  # caudal side, then cranial side
        i = i0
        while 0 <= i + step < len(order):
            inner, outer = order[i], order[i + step]
            disc = 0.5 * (np.asarray(centroids_lps_mm[inner], float) + np.asarray(centroids_lps_mm[outer], float))
            # The disc moves with the inner level; the joint's motion happens about its moved place.
            moved_disc = out[inner][:3, :3] @ disc + out[inner][:3, 3]
            joint = rigid_about(moved_disc, rng.uniform(-rot, rot, 3), rng.uniform(-tra, tra, 3))
            out[outer] = joint @ out[inner]
            i += step
    return LevelDeformation(out, labels)


def level_pose_room(transform_lps: np.ndarray, isocentre_lps_mm: Sequence[float], position) -> Pose:
    """The room-frame pose (about the isocentre, perfect setup) of an LPS rigid transform.

    With ``M = room_from_lps`` (CONVENTIONS table) and ``p = M (x - iso)``:
    ``p' = M A M^T p + M (A iso + b - iso)``.
    """
    m = room_from_lps_matrix(position)
    a = np.asarray(transform_lps, dtype=np.float64)
    iso = np.asarray(isocentre_lps_mm, dtype=np.float64)
    return Pose(m @ a[:3, :3] @ m.T, m @ (a[:3, :3] @ iso + a[:3, 3] - iso))


@dataclass(frozen=True, slots=True)
class DeformOptions:
    """How :func:`spineguide.tracking.room.realct.build_set` deforms each case's spine.

    Attributes
    ----------
    levels : tuple of str, or None
        Vertebrae that move (VerSe names; None: every labelled one). A case's
        target level must be among them; it keeps the case's pose.
    seed : int
        Seed of the deformations (case ``n`` uses ``default_rng([seed, n])``).
    max_rotation_deg, max_translation_mm : float
        Largest joint motion per axis; each case scales both by a factor drawn
        uniform in ``[min_scale, 1]`` so a set holds small and large deformations.
    min_scale : float
    grid_mm : float
        Largest voxel side (mm) of the deformed CT each case images: along each axis the planning CT's grid is
        refined by the smallest integer factor that reaches it (:func:`deform_ct`'s ``upsample``; 1 mm: a 3 mm CT
        is deformed on a 1 mm grid, 1.5 mm voxels become 0.75 mm, 0.98 x 0.98 x 2 mm become 0.98 x 0.98 x 1 mm).
        Why: a moved vertebra sampled again on the coarse grid is blurred unevenly, an error the unmoved target
        does not have (docs/PER_LEVEL.md).
    """

    levels: tuple[str, ...] | None = None
    seed: int = 18
    max_rotation_deg: float = 2.0
    max_translation_mm: float = 0.5
    min_scale: float = 0.2
    grid_mm: float = 1.0

    def __post_init__(self) -> None:
        checked_number(self.max_rotation_deg, SimulationError,
                       f"deformation rotation must be 0..20 deg, got {self.max_rotation_deg!r}", minimum=0.0, maximum=20.0)
        checked_number(self.max_translation_mm, SimulationError,
                       f"deformation translation must be 0..20 mm, got {self.max_translation_mm!r}", minimum=0.0,
                       maximum=20.0)
        checked_number(self.min_scale, SimulationError, f"min_scale must be 0..1, got {self.min_scale!r}",
                       minimum=0.0, maximum=1.0)
        checked_number(self.grid_mm, SimulationError, f"deformed grid must be 0.25..20 mm, got {self.grid_mm!r}",
                       minimum=0.25, maximum=20.0)
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))
            if not self.levels:
                raise SimulationError("DeformOptions.levels: give at least one level, or None for all")

    def deformation(self, labelled, target: str, index: int) -> LevelDeformation:
        """The deformation of case ``index`` (target ``target``) of a :class:`LabelledCT`."""
        names = labelled.levels if self.levels is None else self.levels
        labels = {n: labelled.label_of(n) for n in names}
        if target not in labels:
            raise SimulationError(f"deformed levels {', '.join(names)} do not include the case's target {target}")
        rng = np.random.default_rng([int(self.seed), int(index)])
        scale = rng.uniform(self.min_scale, 1.0)
        cents = {n: labelled.centroid_lps_mm(n) for n in names}
        return random_level_deformation(cents, labels, target, rng, scale * self.max_rotation_deg,
                                        scale * self.max_translation_mm)

    def upsample_for(self, ct: CTVolume) -> tuple[int, int, int]:
        """:func:`deform_ct`'s ``upsample`` for ``ct`` (i, j, k): per axis the smallest factor that makes the voxel
        side at most ``grid_mm`` (at most 8)."""
        return upsample_for_grid(ct, self.grid_mm)

    def settings(self) -> dict:
        return {"levels": None if self.levels is None else list(self.levels), "seed": int(self.seed),
                "max_rotation_deg": self.max_rotation_deg, "max_translation_mm": self.max_translation_mm,
                "min_scale": self.min_scale, "grid_mm": self.grid_mm, "module": "spineguide.tracking.room.deform"}


def upsample_for_grid(ct: CTVolume, grid_mm: float) -> tuple[int, int, int]:
    """Per axis (i, j, k) the smallest integer factor (1..8) that refines ``ct``'s voxel side to at most ``grid_mm``."""
    return tuple(int(min(max(math.ceil(float(sp) / grid_mm - 1e-9), 1), 8)) for sp in ct.spacing_mm)


def levels_truth(deformation: LevelDeformation, isocentre_lps_mm: Sequence[float], position, pose: Pose,
                 tracking_pose: Pose, centroids_lps_mm: Mapping[str, Sequence[float]], conflict_voxels: int = 0) -> dict:
    """The ``realct-levels-truth/1`` document: per level its exact pose in the set-up and the tracking pair.

    A level's pose is the case's pose after the level's own motion in the CT:
    ``pose.compose(level_pose_room(T_v, iso, position))`` (room frame, CONVENTIONS).
    Levels are listed cranial to caudal (by label value).
    """
    out = []
    for name in sorted(deformation.labels, key=lambda n: deformation.labels[n]):
        t = deformation.transforms_lps[name]
        d = level_pose_room(t, isocentre_lps_mm, position)
        out.append({"name": name, "label": deformation.labels[name],
                    "centroid_lps_mm": [float(v) for v in centroids_lps_mm[name]],
                    "deformation_room": d.to_json(), "transform_lps": t.tolist(),
                    "pose": pose.compose(d).to_json(), "tracking_pose": tracking_pose.compose(d).to_json()})
    return {"schema": LEVELS_TRUTH_SCHEMA, "patient_position": getattr(position, "value", str(position)),
            "isocentre_lps_mm": [float(v) for v in isocentre_lps_mm], "levels": out,
            "conflict_voxels": int(conflict_voxels)}


def deform_from_options(levels: str | None, seed: int = 18, max_rotation_deg: float = 2.0,
                        max_translation_mm: float = 0.5, grid_mm: float = 1.0) -> DeformOptions | None:
    """:class:`DeformOptions` from the command line of ``build.py`` / ``spineguide simulate-ct``:
    ``levels`` None (no deformation), ``"all"`` (every labelled level) or comma-separated names."""
    if levels is None:
        return None
    names = None if levels.strip() == "all" else tuple(v.strip() for v in levels.split(",") if v.strip())
    return DeformOptions(names, int(seed), max_rotation_deg, max_translation_mm, grid_mm=grid_mm)
