"""Real patient CT in the virtual room: a labelled CT loader and stereo validation cases with exact truth.

The phantoms of :mod:`spineguide.tracking.room.phantoms` are cleaner than a patient.
This module takes any CT plus a per-vertebra label map (NIfTI, MHA/NRRD or a
DICOM series folder for the CT), and renders stereo kV pairs of it at known
patient poses, by two independent projectors: spineguide's own Siddon DRR
(:func:`spineguide.registration.drr.compute_drr`) and plastimatch's exact ray tracer
(``plastimatch drr``, Debian package ``plastimatch``), through either the
simple detector chain of :mod:`spineguide.tracking.room.kv` or the clinic-like
chain of :mod:`spineguide.tracking.room.chain` (water / bone path lengths of the
CT, an analytic couch top under the patient, lag between a case's two pairs;
:class:`CaseRenderer`). ``datasets/realct/`` holds the recipe that fetches a
public CT and builds a set with it.

Frames (docs/CONVENTIONS.md): planning CT in DICOM LPS mm, poses and
geometry in the room frame (IEC 61217), ``p_actual = R p_planned + t`` about
the isocentre. NIfTI files store RAS; SimpleITK's reader turns them into LPS
(ITK's convention), and :func:`read_labelled_ct` then reorders the voxel axes
exactly (flips and permutations only, no resampling) so that the CT's
direction cosines are the identity: an axial grid with i along +x (left),
j along +y (posterior), k along +z (superior).

Labels are stored in the VerSe numbering (C1..C7 = 1..7, T1..T12 = 8..19,
L1..L5 = 20..24), consecutive along the spine as
:meth:`spineguide.registration.anatomy.RegionOfInterest.from_labels` expects; maps in
TotalSegmentator's ``total`` numbering (v2: S1 = 26, L5 = 27, ..., C1 = 50)
are converted on reading.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spineguide.calibration.foundation import checked_number
from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry
from spineguide.calibration.jsonfile import write_json_document
from spineguide.registration.attenuation import DEFAULT_IMAGING_ENERGY_KEV, hu_to_mu_per_mm
from spineguide.registration.ctfile import read_ct
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.errors import RegistrationError
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume, PatientPosition, room_from_lps_matrix

from ..errors import SimulationError
from .chain import ChainConfig, ChainFrame, DetectorMaps, MaterialPaths, render_chain_frame, water_bone_fractions
from .io import write_frame
from .kv import DetectorModel, _detector_chain, _rng

__all__ = [
    "LabelScheme",
    "Projector",
    "VERTEBRA_NAMES",
    "LabelledCT",
    "read_labelled_ct",
    "canonical_axial",
    "RealCTCase",
    "plan_cases",
    "CouchTop",
    "slab_path_mm",
    "pixel_centres_room_mm",
    "CaseRenderer",
    "plastimatch_available",
    "plastimatch_drr",
    "write_case",
    "write_panel_maps",
    "imaging_from_options",
    "build_set",
    "TRUTH_SCHEMA",
    "BEYOND_ENDS_MAX_HU",
    "COUCH_BODY_HU",
]

#: Schema of a case's truth file.
TRUTH_SCHEMA = "realct-truth/1"

#: Vertebra names in VerSe order: label value = index + 1.
VERTEBRA_NAMES: tuple[str, ...] = (
    tuple(f"C{i}" for i in range(1, 8)) + tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
)

#: TotalSegmentator ``total`` task (v2) label value -> vertebra name (its map_to_binary.py).
_TOTALSEG_IDS = {27 + n: f"L{5 - n}" for n in range(5)} | {32 + n: f"T{12 - n}" for n in range(12)} | {
    44 + n: f"C{7 - n}" for n in range(7)
}

#: A vertebra whose label reaches within this many slices of the CT's first or last slice is truncated.
TRUNCATION_SLICES = 1

#: HU cap of the end slices repeated past the CT's ends (soft tissue: no bone is invented there).
BEYOND_ENDS_MAX_HU = 100.0

#: CT number (HU) separating the body from the air under it, for the couch height (air and lung are below).
COUCH_BODY_HU = -500.0

#: plastimatch measures path length in cm: its line integral of a 1/mm volume is 1/10 of ours.
_PLASTIMATCH_CM_PER_MM = 10.0


class LabelScheme(Enum):
    """How a label map numbers the vertebrae."""

    VERSE = "verse"
    TOTALSEGMENTATOR = "totalsegmentator"


class Projector(Enum):
    """The DRR projector that made a case's frames."""

    OWN = "own"
    PLASTIMATCH = "plastimatch"


# ----------------------------------------------------------------------------- loader
def canonical_axial(image: sitk.Image, what: str) -> sitk.Image:
    """The same image with identity direction cosines, by flipping and permuting voxel axes (exact).

    Every voxel keeps its LPS position; only the storage order changes.

    Raises
    ------
    SimulationError
        Direction cosines that are not a signed permutation (an oblique grid,
        which would need resampling), or a non-3D image; ``what`` names the file.
    """
    if image.GetDimension() != 3:
        raise SimulationError(f"{what}: expected a 3D image, got {image.GetDimension()}D")
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: LPS of i, j, k
    axis = np.argmax(np.abs(d), axis=0)
    sign = np.sign(d[axis, [0, 1, 2]])
    perm = np.zeros((3, 3))
    perm[axis, [0, 1, 2]] = sign
    if sorted(axis.tolist()) != [0, 1, 2] or np.max(np.abs(d - perm)) > 1e-4:
        raise SimulationError(
            f"{what}: voxel axes are oblique (direction {np.round(d, 4).tolist()}); resample it to an axial grid first"
        )
    if np.array_equal(axis, [0, 1, 2]) and np.all(sign > 0):
        return image
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    ijk = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # [i, j, k]
    order = [int(np.nonzero(axis == a)[0][0]) for a in range(3)]  # old index axis feeding LPS axis a
    xyz = ijk.transpose(order)
    for a in range(3):
        if sign[order[a]] < 0:
            xyz = np.flip(xyz, axis=a)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    for n in range(3):
        if sign[n] < 0:
            origin = origin + d[:, n] * spacing[n] * (size[n] - 1)
    out = sitk.GetImageFromArray(np.ascontiguousarray(xyz.transpose(2, 1, 0)))
    out.SetSpacing(tuple(float(spacing[order[a]]) for a in range(3)))
    out.SetOrigin(tuple(float(v) for v in origin))
    out.SetDirection(tuple(np.eye(3).ravel()))
    return out


def _read_image(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise SimulationError(f"{path}: no such {what} file")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise SimulationError(f"{path}: no DICOM series in the folder")
            reader.SetFileNames(names)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise SimulationError(f"{path}: cannot read the {what}: {str(err).strip().splitlines()[-1]}") from err


@dataclass(frozen=True, slots=True)
class LabelledCT:
    """A planning CT on an axial LPS grid with its vertebra labels.

    Attributes
    ----------
    ct : CTVolume
        HU, identity direction cosines (LPS axes), with its patient position.
    labels : (nk, nj, ni) int16 array, read-only
        VerSe vertebra numbers on the CT's grid, 0 outside every vertebra.
    labels_source : str
        File the labels came from, for messages.
    """

    ct: CTVolume
    labels: np.ndarray
    labels_source: str

    def __post_init__(self) -> None:
        lab = np.array(self.labels, dtype=np.int16)
        if lab.shape != self.ct.hu.shape:
            raise SimulationError(f"{self.labels_source}: label map shape {lab.shape} differs from the CT's {self.ct.hu.shape}")
        if lab.min() < 0 or lab.max() > len(VERTEBRA_NAMES):
            raise SimulationError(f"{self.labels_source}: labels must be 0..{len(VERTEBRA_NAMES)} (VerSe numbers)")
        lab.setflags(write=False)
        object.__setattr__(self, "labels", lab)

    @property
    def levels(self) -> tuple[str, ...]:
        """Vertebra names present, superior to inferior."""
        return tuple(VERTEBRA_NAMES[v - 1] for v in sorted(int(v) for v in np.unique(self.labels) if v))

    def label_of(self, level: str) -> int:
        """VerSe number of a vertebra name present in the map (``"L1"`` -> 20).

        Raises
        ------
        SimulationError
            Unknown name or a level the map does not hold (names the ones it does).
        """
        if level not in VERTEBRA_NAMES:
            raise SimulationError(f"{self.labels_source}: unknown vertebra {level!r} (expected C1..C7, T1..T12, L1..L5)")
        value = VERTEBRA_NAMES.index(level) + 1
        if not np.any(self.labels == value):
            raise SimulationError(f"{self.labels_source}: level {level} is not in the label map (levels: {', '.join(self.levels)})")
        return value

    def mask(self, level: str) -> np.ndarray:
        """Boolean ``[k, j, i]`` mask of one vertebra."""
        return self.labels == self.label_of(level)

    def centroid_lps_mm(self, level: str) -> np.ndarray:
        """Centroid of a vertebra's voxel centres, CT LPS mm."""
        kji = np.argwhere(self.mask(level))
        return self.ct.index_to_lps(kji[:, ::-1].mean(axis=0))

    def truncated(self, level: str) -> bool:
        """True where the vertebra reaches the CT's first or last slice (part of it lies outside the CT)."""
        ks = np.nonzero(self.mask(level).any(axis=(1, 2)))[0]
        nk = self.labels.shape[0]
        return bool(ks.min() < TRUNCATION_SLICES or ks.max() > nk - 1 - TRUNCATION_SLICES)


def read_labelled_ct(
    ct_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    scheme: LabelScheme | str = LabelScheme.VERSE,
    patient_position: PatientPosition | str = PatientPosition.HFS,
    grid_tolerance_mm: float = 0.01,
) -> LabelledCT:
    """Read a CT and its vertebra label map onto one axial LPS grid.

    Parameters
    ----------
    ct_path : path
        CT in HU: ``.nii``/``.nii.gz`` (RAS on disk, LPS once read),
        ``.mha``/``.nrrd``, or a DICOM series folder.
    labels_path : path
        Label map on the same grid (a NIfTI/MHA/NRRD file).
    scheme : LabelScheme or str
        Numbering of the label map (``verse`` or ``totalsegmentator``).
    patient_position : PatientPosition or str
        Position on the couch (NIfTI does not record it); a DICOM series'
        own (0018,5100) value must agree.
    grid_tolerance_mm : float
        Largest difference of origin (mm) and voxel size (mm) between the two
        files' grids still taken as the same grid.

    Returns
    -------
    LabelledCT
        CT and labels with identity direction cosines (exact reordering).

    Raises
    ------
    SimulationError
        Unreadable file, oblique grid, label map on another grid, no vertebra
        label; each message names the file.
    """
    ct_p, lab_p = Path(ct_path), Path(labels_path)
    scheme = LabelScheme(scheme)
    position = PatientPosition.parse(patient_position)
    ct_img = _read_image(ct_p, "CT")
    if ct_p.is_dir():
        try:
            position = read_ct(ct_p, position).patient_position  # checks the series' own position
        except RegistrationError as err:
            raise SimulationError(str(err)) from err
    lab_img = _read_image(lab_p, "label map")
    if lab_img.GetNumberOfComponentsPerPixel() != 1 or lab_img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        raise SimulationError(f"{lab_p}: a label map must hold integer scalars, got {lab_img.GetPixelIDTypeAsString()}")
    ct_img = canonical_axial(ct_img, str(ct_p))
    lab_img = canonical_axial(lab_img, str(lab_p))
    if ct_img.GetSize() != lab_img.GetSize():
        raise SimulationError(f"{lab_p}: label map on another grid: {lab_img.GetSize()} voxels, CT {ct_img.GetSize()}")
    for what, a, b in (("origin", ct_img.GetOrigin(), lab_img.GetOrigin()), ("spacing", ct_img.GetSpacing(), lab_img.GetSpacing())):
        if np.max(np.abs(np.subtract(a, b))) > grid_tolerance_mm:
            raise SimulationError(
                f"{lab_p}: label map on another grid: {what} {np.round(b, 3).tolist()} mm, CT {np.round(a, 3).tolist()} mm"
            )
    raw = sitk.GetArrayFromImage(lab_img).astype(np.int64)
    verse = np.zeros(raw.shape, dtype=np.int16)
    if scheme is LabelScheme.VERSE:
        keep = (raw >= 1) & (raw <= len(VERTEBRA_NAMES))
        verse[keep] = raw[keep]
    else:
        for value, name in _TOTALSEG_IDS.items():
            verse[raw == value] = VERTEBRA_NAMES.index(name) + 1
    if not np.any(verse):
        raise SimulationError(f"{lab_p}: no vertebra label C1..L5 in the map ({scheme.value} numbering)")
    try:
        ct = CTVolume.from_sitk(sitk.Cast(ct_img, sitk.sitkFloat32), position, str(ct_p))
    except RegistrationError as err:
        raise SimulationError(str(err)) from err
    return LabelledCT(ct, verse, str(lab_p))


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True, slots=True)
class RealCTCase:
    """One validation case: what to render and its exact answer.

    Attributes
    ----------
    index : int
    level : str
        Target vertebra (``"L2"``); the plan isocentre is its label centroid.
    room : str
        Name of the stereo geometry (a key of the renderer's geometries).
    projector : Projector
    pose : Pose
        Patient pose of the set-up pair (room frame, CONVENTIONS).
    tracking_pose : Pose
        Patient pose of the second pair (``motion o pose``, motion <= 2 mm / 1 deg),
        registered in tracking mode from the first result.
    seed : int
        Noise seed of the set-up pair (``seed + 1`` for the tracking pair).
    """

    index: int
    level: str
    room: str
    projector: Projector
    pose: Pose
    tracking_pose: Pose
    seed: int


def plan_cases(
    levels: Sequence[str],
    rooms: Sequence[str],
    projectors: Sequence[Projector | str],
    n_cases: int,
    seed: int,
    max_translation_mm: float = 10.0,
    max_rotation_deg: float = 4.0,
    max_motion_mm: float = 2.0,
    max_motion_deg: float = 1.0,
) -> list[RealCTCase]:
    """``n_cases`` cases cycling through every (level, room, projector), random start errors.

    Consecutive cases share a pose and noise seed across the projectors (the
    projector varies fastest), then the room, then the level, so that any
    prefix of the list compares the projectors on the same poses. Start errors
    are uniform per axis in ``+-max_translation_mm`` (room X, Y, Z) and
    ``+-max_rotation_deg`` (pitch, roll, yaw); the tracking motion is uniform
    per axis and scaled to stay within ``max_motion_mm`` and
    ``max_motion_deg`` (vector norms). Deterministic for a seed.
    """
    if not levels or not rooms or not projectors or n_cases < 1:
        raise SimulationError("plan_cases needs at least one level, room, projector and case")
    projectors = [Projector(pj) for pj in projectors]
    rng = np.random.default_rng(seed)
    out: list[RealCTCase] = []
    base = 0
    while len(out) < n_cases:
        room = rooms[base % len(rooms)]
        level = levels[(base // len(rooms)) % len(levels)]
        pose = Pose.from_six(rng.uniform(-max_translation_mm, max_translation_mm, 3),
                             rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
        motion = Pose.from_six(rng.uniform(-1, 1, 3) * max_motion_mm / np.sqrt(3),
                               rng.uniform(-1, 1, 3) * max_motion_deg / np.sqrt(3))
        case_seed = int(rng.integers(0, 2**31 - 2))
        for projector in projectors[: n_cases - len(out)]:
            out.append(RealCTCase(len(out), level, room, projector, pose, motion.compose(pose), case_seed))
        base += 1
    return out


def plastimatch_available() -> bool:
    """True where the ``plastimatch`` command is on the PATH."""
    return shutil.which("plastimatch") is not None


def _plastimatch_args(imager: ImagerGeometry, pose: Pose, room_from_lps: np.ndarray, iso_lps: np.ndarray) -> list[str]:
    """plastimatch drr options that reproduce ``imager`` for a patient at ``pose``, in the CT's LPS frame.

    Moving the patient by ``P`` is moving the imager by ``P^-1``: the source,
    the panel axes and the central-ray point (the isocentre) are carried by
    ``P^-1`` and then taken from the room to LPS (``R^T``, plus the
    isocentre). plastimatch puts the source at ``o + sad * nrm`` and a panel
    perpendicular to ``nrm`` at ``sid`` from the source, ``vup`` pointing from
    the panel centre towards row 0, and ``-c`` is the (row, col) pixel that
    the central ray meets. The imager's panel must be perpendicular to its
    central ray (true of every built-in room).
    """
    inv = pose.inverse()
    lps_from_room = room_from_lps.T
    src = inv.apply(imager.source_mm[None])[0]
    o_room = inv.apply(np.zeros((1, 3)))[0]
    axis = src - o_room
    sad = float(np.linalg.norm(axis))
    nrm = lps_from_room @ (axis / sad)
    vup = lps_from_room @ (inv.rotation @ -imager.row_direction)
    if abs(float(imager.normal @ (imager.source_mm / np.linalg.norm(imager.source_mm)))) < 1.0 - 1e-9:
        raise SimulationError(f"imager '{imager.name}': the panel is not perpendicular to the central ray (plastimatch needs it)")
    centre = imager.project(np.zeros((1, 3)))[0]  # (col, row), unchanged by moving the whole imager
    row_sp, col_sp = imager.pixel_spacing_mm
    o_lps = iso_lps + lps_from_room @ o_room
    return [
        "--sad", f"{sad:.6f}", "--sid", f"{imager.source_to_detector_mm:.6f}",
        "-r", f"{imager.rows} {imager.cols}", "-z", f"{imager.rows * row_sp:.6f} {imager.cols * col_sp:.6f}",
        "-c", f"{centre[1]:.6f} {centre[0]:.6f}",
        "-n", " ".join(f"{v:.12f}" for v in nrm), "--vup", " ".join(f"{v:.12f}" for v in vup),
        "-o", " ".join(f"{v:.6f}" for v in o_lps),
    ]  # fmt: skip


def _read_pfm(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.readline().strip() != b"Pf":
            raise SimulationError(f"{path}: plastimatch output is not a greyscale PFM")
        width, height = (int(v) for v in f.readline().split())
        scale = float(f.readline())
        data = np.frombuffer(f.read(), dtype="<f4" if scale < 0 else ">f4")
    # plastimatch writes row 0 (the row ``vup`` points to) first.
    return data.reshape(height, width).astype(np.float64)


def plastimatch_drr(
    mu_file: str | os.PathLike,
    imager: ImagerGeometry,
    pose: Pose,
    room_from_lps: np.ndarray,
    iso_lps_mm: Sequence[float],
    threads: int = 1,
    timeout_s: float = 600.0,
) -> np.ndarray:
    """Line integrals (dimensionless) through an attenuation volume file, by ``plastimatch drr`` (exact Siddon).

    Parameters
    ----------
    mu_file : path
        Attenuation in 1/mm on the CT's LPS grid (``.mha``).
    imager : ImagerGeometry
        Room frame.
    pose : Pose
        Patient pose (room frame, CONVENTIONS).
    room_from_lps : (3, 3) array
        The CT's patient-position rotation (:func:`spineguide.registration.volume.room_from_lps_matrix`).
    iso_lps_mm : (3,) sequence
        Plan isocentre, CT LPS mm.
    threads : int
        OpenMP threads for plastimatch.
    timeout_s : float
        Wall-clock limit of the plastimatch process, seconds.

    Returns
    -------
    (rows, cols) float64, ``image[row, col]`` as our DRRs.

    Raises
    ------
    SimulationError
        plastimatch missing, failing or timing out.
    """
    if not plastimatch_available():
        raise SimulationError("plastimatch is not installed (Debian package 'plastimatch')")
    args = _plastimatch_args(imager, pose, np.asarray(room_from_lps, dtype=np.float64), np.asarray(iso_lps_mm, dtype=np.float64))
    with tempfile.TemporaryDirectory(prefix="realct_pm_") as tmp:
        prefix = Path(tmp) / "drr"
        cmd = ["plastimatch", "drr", "-i", "exact", "-P", "none", "-t", "pfm", *args, "-O", str(prefix), str(mu_file)]
        env = dict(os.environ, OMP_NUM_THREADS=str(int(threads)))
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise SimulationError(f"plastimatch drr ran past {timeout_s:g} s") from err
        out = Path(tmp) / "drr0000.pfm"
        if res.returncode != 0 or not out.exists():
            raise SimulationError(f"plastimatch drr failed ({res.returncode}): {(res.stderr or res.stdout)[-300:]}")
        return _read_pfm(out) * _PLASTIMATCH_CM_PER_MM


# ------------------------------------------------------------------------------ couch
def slab_path_mm(
    source_mm: Sequence[float],
    points_mm: np.ndarray,
    z_low_mm: float,
    z_high_mm: float,
    half_width_mm: float = np.inf,
) -> np.ndarray:
    """Length (mm) of each segment ``source -> point`` inside a horizontal slab of the room.

    The slab is ``z_low_mm <= Z <= z_high_mm`` and ``|X| <= half_width_mm``,
    unbounded along Y (room frame, IEC 61217: X lateral, Y towards the gantry
    along the couch, Z up; mm). Analytic: the segment's parameter interval
    inside the Z band and the X band, clipped to the segment, times its length.

    Parameters
    ----------
    source_mm : (3,) sequence
        Segment start (an X-ray source), room mm.
    points_mm : (..., 3) array
        Segment ends (e.g. pixel centres), room mm.
    z_low_mm, z_high_mm : float
        The slab's bottom and top, room Z mm (``z_low_mm <= z_high_mm``).
    half_width_mm : float
        Half the slab's extent across the couch (room X about 0), mm; ``inf`` for an infinite slab.

    Returns
    -------
    (...) float64 array of path lengths, mm (0 where the segment misses the slab).

    Raises
    ------
    SimulationError
        Non-finite source or points, or a slab with ``z_low_mm > z_high_mm`` or a negative width.
    """
    src = np.asarray(source_mm, dtype=np.float64)
    pts = np.asarray(points_mm, dtype=np.float64)
    if src.shape != (3,) or pts.ndim < 1 or pts.shape[-1] != 3 or not (np.all(np.isfinite(src)) and np.all(np.isfinite(pts))):
        raise SimulationError(f"slab path: need a finite (3,) source and (..., 3) points, got {src.shape} and {pts.shape}")
    if not (math.isfinite(z_low_mm) and math.isfinite(z_high_mm)) or z_low_mm > z_high_mm or not half_width_mm >= 0:
        raise SimulationError(f"slab path: bad slab Z {z_low_mm}..{z_high_mm} mm, half width {half_width_mm} mm")
    d = pts - src
    t_lo = np.zeros(pts.shape[:-1])
    t_hi = np.ones(pts.shape[:-1])
    for axis, lo, hi in ((2, z_low_mm, z_high_mm), (0, -half_width_mm, half_width_mm)):
        if not np.isfinite(hi - lo):
            continue
        da = d[..., axis]
        flat = da == 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (lo - src[axis]) / da
            b = (hi - src[axis]) / da
        inside_flat = (lo <= src[axis]) & (src[axis] <= hi)
        enter = np.where(flat, -np.inf if inside_flat else np.inf, np.minimum(a, b))
        leave = np.where(flat, np.inf if inside_flat else -np.inf, np.maximum(a, b))
        t_lo = np.maximum(t_lo, enter)
        t_hi = np.minimum(t_hi, leave)
    return np.clip(t_hi - t_lo, 0.0, None) * np.linalg.norm(d, axis=-1)


def pixel_centres_room_mm(imager: ImagerGeometry) -> np.ndarray:
    """Room position (mm, IEC 61217 room frame) of every pixel centre of a panel, ``(rows, cols, 3)``."""
    row_sp, col_sp = imager.pixel_spacing_mm
    cols = np.arange(imager.cols, dtype=np.float64)[None, :, None] * col_sp * imager.col_direction
    rows = np.arange(imager.rows, dtype=np.float64)[:, None, None] * row_sp * imager.row_direction
    return imager.origin_mm + rows + cols


@dataclass(frozen=True, slots=True)
class CouchTop:
    """An analytic carbon-fibre couch top, fixed in the room: in the kV frames, not in the CT.

    A horizontal slab (room frame, IEC 61217, docs/CONVENTIONS.md: X lateral,
    Y towards the gantry along the couch, Z up), unbounded along Y,
    ``width_mm`` across X centred on the isocentre (X = 0); from its top
    surface down: a carbon-fibre skin, a foam core, a second skin. It is not
    moved by the patient pose (a couch that has not been corrected). Each
    layer's attenuation is counted as water of the layer's density (path x
    density / 1 g/cm3, a water-equivalent path added to the anatomy's water
    path): carbon fibre 1.4 g/cm3 x 2 x 1.5 mm + foam 0.05 g/cm3 x 50 mm =
    6.7 mm of water for a perpendicular ray, ~1.8 mm aluminium at 60 keV,
    inside the 1.2-2.4 mm Al-equivalent that 21 CFR 1020.30(n) allows a
    table top (docs/VIRTUAL_ROOM.md). Carbon's mass attenuation is ~13 % below
    water's at 60 keV (NIST XCOM), so counting it as water leans to a slightly
    more visible couch.

    Attributes
    ----------
    width_mm : float
        Extent across the couch (room X), mm.
    skin_mm, skin_density : float
        Thickness (mm) and density (g/cm3) of each carbon-fibre skin.
    foam_mm, foam_density : float
        Thickness (mm) and density (g/cm3) of the foam core.
    gap_mm : float
        Air between the patient's lowest skin point under the isocentre (from
        the CT, :meth:`CaseRenderer.couch_top_z_mm`) and the top surface, mm.
    top_z_mm : float or None
        Room Z (mm, isocentre at 0) of the top surface, overriding the CT's skin.
    """

    width_mm: float = 500.0
    skin_mm: float = 1.5
    skin_density: float = 1.4
    foam_mm: float = 50.0
    foam_density: float = 0.05
    gap_mm: float = 3.0
    top_z_mm: float | None = None

    def __post_init__(self) -> None:
        for name in ("width_mm", "skin_mm", "skin_density", "foam_mm", "foam_density", "gap_mm"):
            v = getattr(self, name)
            v = checked_number(v, SimulationError, f"couch top: {name} = {v!r} must be a finite number in 0..5000",
                               minimum=0.0, maximum=5000.0)
            object.__setattr__(self, name, v)
        if self.width_mm <= 0 or self.thickness_mm <= 0:
            raise SimulationError(f"couch top: width {self.width_mm} mm and thickness {self.thickness_mm} mm must be > 0")
        if self.top_z_mm is not None:
            v = self.top_z_mm
            v = checked_number(v, SimulationError, f"couch top: top_z_mm must be a finite number or None, got {v!r}")
            object.__setattr__(self, "top_z_mm", v)

    @property
    def thickness_mm(self) -> float:
        """Total thickness (two skins and the foam), mm."""
        return 2.0 * self.skin_mm + self.foam_mm

    @property
    def water_equivalent_mm(self) -> float:
        """Water-equivalent thickness for a ray perpendicular to the couch, mm."""
        return 2.0 * self.skin_mm * self.skin_density + self.foam_mm * self.foam_density

    def layers(self, top_z_mm: float) -> tuple[tuple[float, float, float], ...]:
        """``(z_low_mm, z_high_mm, density)`` of the skins and the foam, room Z mm, top surface at ``top_z_mm``."""
        t = float(top_z_mm)
        s, f = self.skin_mm, self.foam_mm
        return ((t - s, t, self.skin_density), (t - s - f, t - s, self.foam_density),
                (t - 2 * s - f, t - s - f, self.skin_density))

    def water_equivalent_path_mm(self, imager: ImagerGeometry, top_z_mm: float) -> np.ndarray:
        """Water-equivalent path (mm) of every pixel's ray (source -> pixel centre), ``(rows, cols)`` float64.

        ``top_z_mm``: room Z of the couch's top surface (mm, isocentre at 0).
        """
        pts = pixel_centres_room_mm(imager)
        out = np.zeros((imager.rows, imager.cols))
        for z_low, z_high, density in self.layers(top_z_mm):
            if density > 0 and z_high > z_low:
                out += density * slab_path_mm(imager.source_mm, pts, z_low, z_high, self.width_mm / 2.0)
        return out

    def settings(self) -> dict:
        """The couch's numbers (mm, g/cm3), JSON-ready."""
        return {"width_mm": self.width_mm, "skin_mm": self.skin_mm, "skin_density_g_cm3": self.skin_density,
                "foam_mm": self.foam_mm, "foam_density_g_cm3": self.foam_density, "gap_mm": self.gap_mm,
                "top_z_mm_override": self.top_z_mm, "water_equivalent_mm": self.water_equivalent_mm,
                "model": "carbon-fibre skins around foam, counted as water of their density, fixed in the room"}


class CaseRenderer:
    """Raw stereo pairs of a labelled CT at known poses, by either projector, through either imaging chain.

    The whole CT is both the anatomy imaged and (separately, by the
    registration) the planning CT, so the only differences between a case's
    frames and the registration's model are the projector, the imaging chain
    (noise, detector effects, spectrum, scatter, couch), and the ROI.

    Two imaging chains:

    - **simple** (``chain=None``): the CT converted to attenuation at
      ``energy_kev``, ``i0 exp(-L)`` through :mod:`spineguide.tracking.room.kv`'s
      detector chain (``detector``).
    - **clinic-like** (``chain=ChainConfig(...)``): the CT split into water
      and cortical-bone fractions (:func:`spineguide.tracking.room.chain.water_bone_fractions`),
      each projected by the case's projector into path lengths (mm), an
      analytic couch top (:class:`CouchTop`) added to the water path, and
      :func:`spineguide.tracking.room.chain.render_chain_frame` (spectrum and beam
      hardening, scatter, heel, gain / offset maps and dead lines of
      :class:`~spineguide.tracking.room.chain.DetectorMaps` fixed per room and
      imager, lag, blur, noise).

    Parameters
    ----------
    labelled : LabelledCT
    geometries : mapping room name -> StereoGeometry
        Room frame.
    detector : DetectorModel
        i0, blur, scatter, heel, defects and noise of the simple chain (unused with ``chain``).
    energy_kev : float
        Effective imaging energy of the simple chain's HU -> mu conversion
        (and of :meth:`line_integrals`), keV.
    chain_hook : callable, optional
        ``f(line_integrals, imager, detector, rng) -> frame`` replacing the
        simple detector chain (line integrals dimensionless, ``image[row, col]``);
        not allowed together with ``chain``.
    plastimatch_threads : int
    beyond_ends_mm : float
        Tissue past the CT's superior and inferior ends in the frames: the end
        slices, with HU capped at :data:`BEYOND_ENDS_MAX_HU` (soft tissue, no
        bone), repeated over this length (mm) at both ends. A patient does not
        stop where the CT does; without it the frames show a step where the
        whole body ends, an edge no radiograph has. The cap keeps a vertebra cut
        by the CT's end from growing into a long bony column; the vertebrae
        really beyond the ends are unknown and left out. 0 images the CT alone.
        The water / bone decomposition is made of this padded volume.
    chain : ChainConfig, optional
        The clinic-like chain (e.g. ``ChainConfig.clinic()``); None for the simple one.
    couch : CouchTop or bool, optional
        The couch top under the patient in the frames (never in the CT):
        ``True`` for :class:`CouchTop`'s defaults, ``False`` for none; by
        default on with ``chain`` and off without. With the simple chain its
        water-equivalent path is added as water at ``energy_kev``.
    plan : LabelledCT, optional
        The planning CT and labels when ``labelled`` (what is imaged) is not the plan itself, e.g. a CT
        deformed per level on a finer grid: the isocentres (label centroids) and the written ROI come from
        it. Default: ``labelled``.

    Raises
    ------
    SimulationError
        No room, a bad ``beyond_ends_mm``, a ``chain`` that is not a
        ChainConfig, ``chain`` with ``chain_hook``, a ``couch`` that is not a CouchTop or bool,
        a ``plan`` that is not a LabelledCT.
    """

    def __init__(
        self,
        labelled: LabelledCT,
        geometries: Mapping[str, StereoGeometry],
        detector: DetectorModel | None = None,
        energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
        chain_hook=None,
        plastimatch_threads: int = 1,
        beyond_ends_mm: float = 0.0,
        chain: ChainConfig | None = None,
        couch: CouchTop | bool | None = None,
        plan: LabelledCT | None = None,
    ) -> None:
        if not geometries:
            raise SimulationError("CaseRenderer needs at least one room geometry")
        if chain is not None and not isinstance(chain, ChainConfig):
            raise SimulationError(f"CaseRenderer: chain must be a ChainConfig or None, got {type(chain).__name__}")
        if chain is not None and chain_hook is not None:
            raise SimulationError("CaseRenderer: give either chain (the clinic-like chain) or chain_hook, not both")
        if couch is None:
            couch = chain is not None
        if isinstance(couch, bool):
            couch = CouchTop() if couch else None
        elif not isinstance(couch, CouchTop):
            raise SimulationError(f"CaseRenderer: couch must be a CouchTop, a bool or None, got {type(couch).__name__}")
        self.labelled = labelled
        self.plan = labelled if plan is None else plan
        if not isinstance(self.plan, LabelledCT):
            raise SimulationError(f"CaseRenderer: plan must be a LabelledCT, got {type(self.plan).__name__}")
        self.geometries = dict(geometries)
        self.detector = DetectorModel() if detector is None else detector
        self.energy_kev = float(energy_kev)
        self.chain_hook = chain_hook
        self.chain = chain
        self.couch = couch
        self.plastimatch_threads = int(plastimatch_threads)
        ct = labelled.ct
        self.beyond_ends_mm = checked_number(beyond_ends_mm, SimulationError,
                                             f"beyond_ends_mm must be 0..1000 mm, got {beyond_ends_mm!r}",
                                             minimum=0.0, maximum=1000.0)
        # Slices added at each end along k (the CT's superior axis on the canonical grid).
        self._pad_slices = int(np.ceil(self.beyond_ends_mm / float(ct.spacing_mm[2]) - 1e-9))
        hu = ct.hu
        if self._pad_slices:
            n = self._pad_slices
            soft = np.minimum(hu, np.float32(BEYOND_ENDS_MAX_HU))
            hu = np.concatenate([np.repeat(soft[:1], n, axis=0), hu, np.repeat(soft[-1:], n, axis=0)])
        self._hu = hu  # the imaged (padded) CT numbers
        self._mu = hu_to_mu_per_mm(hu, self.energy_kev)
        self._mu.setflags(write=False)
        self._index_shift = np.eye(4)
        self._index_shift[2, 3] = -self._pad_slices  # imaged index k -> CT index k - pad
        self._room_from_lps = room_from_lps_matrix(ct.patient_position)
        self._volumes: dict[str, AttenuationVolume] = {}
        self._fractions: tuple[np.ndarray, np.ndarray] | None = None
        self._material_volumes: dict[str, tuple[AttenuationVolume, AttenuationVolume]] = {}
        self._couch_top: dict[str, float] = {}
        self._couch_paths: dict[tuple[str, str, str], np.ndarray] = {}
        self._maps: dict[tuple[str, str], DetectorMaps] = {}
        self._files: dict[str, Path] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def i0(self) -> float:
        """Unattenuated signal of the frames, counts (the chain's, else the detector's)."""
        return float(self.chain.i0 if self.chain is not None else self.detector.i0)

    def isocentre_lps_mm(self, level: str) -> np.ndarray:
        """Plan isocentre of a level: its label centroid in the plan, CT LPS mm."""
        return self.plan.centroid_lps_mm(level)

    def _room_from_imaged_index(self, level: str) -> np.ndarray:
        return self.labelled.ct.room_from_index(self.isocentre_lps_mm(level)) @ self._index_shift

    def _volume(self, level: str) -> AttenuationVolume:
        if level not in self._volumes:
            self._volumes[level] = AttenuationVolume(self._mu, self._room_from_imaged_index(level))
        return self._volumes[level]

    def _water_bone(self) -> tuple[np.ndarray, np.ndarray]:
        if self._fractions is None:
            water, bone = water_bone_fractions(self._hu)
            water.setflags(write=False)  # read-only and owning: AttenuationVolume shares them, no copy
            bone.setflags(write=False)
            self._fractions = (water, bone)
        return self._fractions

    def _material_volume(self, level: str) -> tuple[AttenuationVolume, AttenuationVolume]:
        if level not in self._material_volumes:
            room = self._room_from_imaged_index(level)
            water, bone = self._water_bone()
            self._material_volumes[level] = (AttenuationVolume(water, room), AttenuationVolume(bone, room))
        return self._material_volumes[level]

    def _plastimatch_file(self, name: str, volume: np.ndarray) -> Path:
        """``volume`` (imaged grid) as an uncompressed ``.mha`` in this renderer's temporary folder, once."""
        if name not in self._files:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="realct_mu_")
            ct = self.labelled.ct
            img = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
            img.SetSpacing(tuple(float(v) for v in ct.spacing_mm))
            img.SetDirection(tuple(float(v) for v in ct.direction.ravel()))
            img.SetOrigin(tuple(float(v) for v in ct.index_to_lps(np.array([0.0, 0.0, -self._pad_slices]))))
            path = Path(self._tmp.name) / f"{name}.mha"
            sitk.WriteImage(img, str(path))  # uncompressed: plastimatch reads it fast
            self._files[name] = path
        return self._files[name]

    def _plastimatch_volume(self) -> Path:
        return self._plastimatch_file("mu", self._mu)

    def close(self) -> None:
        """Remove the temporary volume files plastimatch reads (attenuation, water and bone fractions)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._files.clear()

    def _geometry(self, room: str) -> StereoGeometry:
        if room not in self.geometries:
            raise SimulationError(f"unknown room {room!r} (rooms: {', '.join(self.geometries)})")
        return self.geometries[room]

    def line_integrals(self, level: str, room: str, pose: Pose, projector: Projector | str) -> dict[str, np.ndarray]:
        """Noise-free ``-ln(I / i0)`` of the CT at ``energy_kev`` per imager (float64, ``image[row, col]``),
        isocentre at ``level``; no couch."""
        projector = Projector(projector)
        geometry = self._geometry(room)
        out = {}
        for im in geometry.imagers:
            if projector is Projector.OWN:
                out[im.name] = compute_drr(self._volume(level), im, pose).astype(np.float64)
            else:
                out[im.name] = plastimatch_drr(self._plastimatch_volume(), im, pose, self._room_from_lps,
                                               self.isocentre_lps_mm(level), self.plastimatch_threads)
        return out

    def anatomy_paths(self, level: str, room: str, pose: Pose, projector: Projector | str) -> dict[str, MaterialPaths]:
        """Water and cortical-bone path lengths (mm) through the (padded) CT per imager, no couch.

        Each fraction volume of :func:`~spineguide.tracking.room.chain.water_bone_fractions`
        projected by the case's projector: ``compute_drr`` of it, or
        ``plastimatch drr`` of it as a temporary ``.mha`` (both are linear in
        the volume, so a fraction's line integral is its path length in mm).
        Patient ``pose`` in the room frame (CONVENTIONS), isocentre at ``level``.
        """
        projector = Projector(projector)
        geometry = self._geometry(room)
        out = {}
        for im in geometry.imagers:
            if projector is Projector.OWN:
                water_vol, bone_vol = self._material_volume(level)
                water = compute_drr(water_vol, im, pose).astype(np.float64)
                bone = compute_drr(bone_vol, im, pose).astype(np.float64)
            else:
                fw, fb = self._water_bone()
                iso = self.isocentre_lps_mm(level)
                water = plastimatch_drr(self._plastimatch_file("water", fw), im, pose, self._room_from_lps, iso,
                                        self.plastimatch_threads)
                bone = plastimatch_drr(self._plastimatch_file("bone", fb), im, pose, self._room_from_lps, iso,
                                       self.plastimatch_threads)
            out[im.name] = MaterialPaths(water, bone)
        return out

    def posterior_skin_z_mm(self, level: str) -> float:
        """Room Z (mm, isocentre at 0, identity pose) of the patient's lowest skin point under the isocentre.

        Along the vertical room line through the isocentre, downwards (room
        -Z; the posterior direction of a supine patient): past any air or gas
        the isocentre may sit in, through the first run of voxels above
        :data:`COUCH_BODY_HU`, to the face of its last voxel (to a quarter of
        the smallest voxel size). Stopping at the first air keeps a CT
        scanner's own table, if the CT holds one below an air gap, out of the
        patient. Where the body reaches the CT's edge, that edge.

        Raises
        ------
        SimulationError
            No tissue above :data:`COUCH_BODY_HU` under the isocentre.
        """
        ct = self.labelled.ct
        iso = self.isocentre_lps_mm(level)
        down_lps = self._room_from_lps.T @ np.array([0.0, 0.0, -1.0])
        step = 0.25 * float(np.min(ct.spacing_mm))
        extent = float(np.linalg.norm(np.asarray(ct.shape_ijk, dtype=np.float64) * ct.spacing_mm))
        dist = np.arange(0.0, extent + step, step)
        ijk = np.rint(ct.lps_to_index(iso + dist[:, None] * down_lps)).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(ct.shape_ijk)), axis=1)
        n_in = int(np.argmin(inside)) if not inside.all() else len(inside)
        body = ct.hu[ijk[:n_in, 2], ijk[:n_in, 1], ijk[:n_in, 0]] > COUCH_BODY_HU
        if not body.any():
            raise SimulationError(f"level {level}: no tissue above {COUCH_BODY_HU:g} HU below the isocentre "
                                  "to put the couch under; give CouchTop(top_z_mm=...)")
        first = int(np.argmax(body))
        run = body[first:]
        last = first + (int(np.argmin(run)) - 1 if not run.all() else len(run) - 1)
        return -(float(dist[last]) + 0.5 * step)

    def couch_top_z_mm(self, level: str) -> float | None:
        """Room Z (mm, isocentre at 0) of the couch top's upper surface for cases at ``level``; None without a couch.

        ``CouchTop.top_z_mm`` where given, else :meth:`posterior_skin_z_mm` minus ``CouchTop.gap_mm``.
        """
        if self.couch is None:
            return None
        if level not in self._couch_top:
            top = self.couch.top_z_mm
            self._couch_top[level] = float(top) if top is not None else self.posterior_skin_z_mm(level) - self.couch.gap_mm
        return self._couch_top[level]

    def couch_water_mm(self, level: str, room: str) -> dict[str, np.ndarray]:
        """Water-equivalent path (mm) of the couch per imager, ``(rows, cols)`` float64; zeros without a couch.

        The couch is fixed in the room, so this does not depend on the patient pose.
        """
        geometry = self._geometry(room)
        out = {}
        for im in geometry.imagers:
            key = (level, room, im.name)
            if key not in self._couch_paths:
                if self.couch is None:
                    path = np.zeros((im.rows, im.cols))
                else:
                    path = self.couch.water_equivalent_path_mm(im, self.couch_top_z_mm(level))
                path.setflags(write=False)
                self._couch_paths[key] = path
            out[im.name] = self._couch_paths[key]
        return out

    def material_paths(self, level: str, room: str, pose: Pose, projector: Projector | str) -> dict[str, MaterialPaths]:
        """What the clinic-like chain images per imager: :meth:`anatomy_paths` with the couch's
        water-equivalent path (:meth:`couch_water_mm`) added to the water path, mm."""
        couch = self.couch_water_mm(level, room)
        return {name: MaterialPaths(p.water_mm + couch[name], p.bone_mm)
                for name, p in self.anatomy_paths(level, room, pose, projector).items()}

    def detector_maps(self, room: str, imager: str) -> DetectorMaps:
        """The fixed gain, offset and dead-line maps of one panel under the chain (``DetectorMaps.make``,
        panel index = the imager's place in the room's geometry), made once per room and imager.

        Raises
        ------
        SimulationError
            No chain, unknown room or imager.
        """
        if self.chain is None:
            raise SimulationError("detector maps need a CaseRenderer made with chain=ChainConfig(...)")
        geometry = self._geometry(room)
        if imager not in geometry.names:
            raise SimulationError(f"room {room!r} has no imager '{imager}' (imagers: {', '.join(geometry.names)})")
        key = (room, imager)
        if key not in self._maps:
            im = geometry[imager]
            self._maps[key] = DetectorMaps.make(im.rows, im.cols, self.chain, geometry.names.index(imager))
        return self._maps[key]

    def chain_frames(
        self,
        level: str,
        room: str,
        pose: Pose,
        projector: Projector | str,
        seed: int | np.random.Generator,
        previous: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, ChainFrame]:
        """Frames of the clinic-like chain per imager, with their noise-free stages (counts, ``image[row, col]``).

        Parameters
        ----------
        level, room, pose, projector
            As for :meth:`material_paths` (pose in the room frame).
        seed : int or numpy Generator
            Noise of this pair (the imagers in the geometry's order).
        previous : mapping imager -> array, optional
            The previous frame's ``ChainFrame.signal`` per imager (image lag).

        Raises
        ------
        SimulationError
            No chain.
        """
        if self.chain is None:
            raise SimulationError("chain_frames needs a CaseRenderer made with chain=ChainConfig(...)")
        rng = _rng(seed)
        out = {}
        for name, paths in self.material_paths(level, room, pose, projector).items():
            prev = None if previous is None else previous.get(name)
            out[name] = render_chain_frame(paths, self.geometries[room][name], self.chain,
                                           self.detector_maps(room, name), rng, (), prev)
        return out

    def frames(self, level: str, room: str, pose: Pose, projector: Projector | str, seed: int,
               previous: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Raw frames (detector counts, ``image[row, col]``) per imager.

        With ``chain``: :meth:`chain_frames` (``previous`` = the last frame's
        signal per imager, for lag). Without: ``i0 exp(-L)`` through the simple
        detector chain (``L`` plus the couch's water-equivalent path times
        water's attenuation at ``energy_kev`` when there is a couch).
        """
        if self.chain is not None:
            return {name: f.raw for name, f in self.chain_frames(level, room, pose, projector, seed, previous).items()}
        rng = _rng(seed)
        couch = self.couch_water_mm(level, room) if self.couch is not None else None
        mu_water = float(hu_to_mu_per_mm(np.zeros(1, np.float32), self.energy_kev)[0])
        out = {}
        for name, line in self.line_integrals(level, room, pose, projector).items():
            if couch is not None:
                line = line + mu_water * couch[name]
            im = self.geometries[room][name]
            if self.chain_hook is not None:
                out[name] = np.asarray(self.chain_hook(line, im, self.detector, rng))
            else:
                out[name] = _detector_chain(self.detector.i0 * np.exp(-line), im, self.detector, rng)[0]
        return out

    def imaging_settings(self) -> dict:
        """How the frames are made, JSON-ready: the chain (``simple`` with its detector model and energy,
        or ``clinic-like`` with :meth:`ChainConfig.settings`) and the couch (mm, g/cm3) or None."""
        couch = None if self.couch is None else self.couch.settings()
        if self.chain is not None:
            return {"chain": "clinic-like", "module": "spineguide.tracking.room.chain",
                    "i0": self.i0, "settings": self.chain.settings(),
                    "materials": "water / cortical bone fractions of the HU (chain.water_bone_fractions)",
                    "lag": "tracking frames carry lag_fraction x the set-up frame's signal", "couch": couch}
        det = {}
        for name in self.detector.__dataclass_fields__:
            v = getattr(self.detector, name)
            det[name] = v.value if isinstance(v, Enum) else v
        return {"chain": "simple", "module": "spineguide.tracking.room.kv", "i0": self.i0,
                "energy_kev": self.energy_kev, "settings": det, "custom_hook": self.chain_hook is not None,
                "couch": couch}


def write_panel_maps(panels_dir: str | os.PathLike, renderer: CaseRenderer, room: str) -> dict[str, dict[str, str]]:
    """The clinic-like chain's fixed panel maps of one room as a clinic's panel calibration records them.

    Writes ``<panels_dir>/<room>/{gain,offset,defects}_<imager>.npy`` (gain relative, offset counts,
    defects uint8 1 = dead pixel; ``map[row, col]``) unless present, and returns the ``kv-geometry/1``
    ``flat_field`` extension for them, paths absolute (:func:`write_case` makes them relative).
    """
    folder = Path(panels_dir) / room
    folder.mkdir(parents=True, exist_ok=True)
    ext = {}
    for name in renderer.geometries[room].names:
        maps = renderer.detector_maps(room, name)
        paths = {k: folder / f"{k}_{name}.npy" for k in ("gain", "offset", "defects")}
        for key, arr in (("gain", maps.gain), ("offset", maps.offset_counts), ("defects", maps.dead.astype(np.uint8))):
            if not paths[key].exists():
                np.save(paths[key], arr)
        ext[name] = {k: str(v) for k, v in paths.items()}
    return ext


def write_case(out_dir: str | os.PathLike, case: RealCTCase, renderer: CaseRenderer, ct_file: str, labels_file: str,
               panels_dir: str | os.PathLike | None = None) -> Path:
    """Render one case (set-up and tracking pairs) and write its folder.

    Files: ``frame_<imager>.mha`` and ``tracking_frame_<imager>.mha`` (raw
    frames, ``i0`` in the metadata), ``geometry.json`` (``kv-geometry/1``),
    ``roi.mha`` (uint8 mask of the target level on the CT grid) and
    ``truth.json`` (``realct-truth/1``: poses in the room frame with
    ``translation_mm`` / ``rotation_deg``, level, label, isocentre in CT LPS
    mm, projector, room, i0 (counts), ``energy_kev`` (the simple chain's
    energy; with the clinic-like chain only that of :meth:`CaseRenderer.line_integrals`,
    the spectrum is in ``imaging``), ``imaging`` (:meth:`CaseRenderer.imaging_settings`),
    ``couch_top_z_mm`` (room Z of the couch's top surface, mm, or null), the
    CT and label files relative to the set). With the clinic-like chain the
    tracking pair carries the set-up pair's lag (same imager), and the panel
    maps are written once per room under ``panels_dir`` (default: the case
    folder; :func:`write_panel_maps`) and named, relative to the case, in
    ``geometry.json``'s ``flat_field`` extension, so the frames can be
    dark- and gain-corrected as a clinic's are.

    Returns
    -------
    Path of the case folder.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = renderer.geometries[case.room]
    files: dict[str, dict[str, str]] = {}
    previous = None
    for prefix, pose, seed in (("frame", case.pose, case.seed), ("tracking_frame", case.tracking_pose, case.seed + 1)):
        if renderer.chain is not None:
            stages = renderer.chain_frames(case.level, case.room, pose, case.projector, seed, previous)
            previous = {name: f.signal for name, f in stages.items()}
            frames = {name: f.raw for name, f in stages.items()}
        else:
            frames = renderer.frames(case.level, case.room, pose, case.projector, seed)
        for name, frame in frames.items():
            row_sp, col_sp = geometry[name].pixel_spacing_mm
            fname = f"{prefix}_{name}.mha"
            write_frame(frame, folder / fname, name, renderer.i0, (row_sp, col_sp))
            files.setdefault(prefix, {})[name] = fname
    doc = geometry.to_json()
    if renderer.chain is not None:
        ext = write_panel_maps(folder if panels_dir is None else panels_dir, renderer, case.room)
        doc["flat_field"] = {name: {k: os.path.relpath(v, folder) for k, v in entry.items()}
                             for name, entry in ext.items()}
    write_json_document(doc, folder / "geometry.json")
    roi = sitk.GetImageFromArray(renderer.plan.mask(case.level).astype(np.uint8))
    roi.CopyInformation(renderer.plan.ct.to_sitk())
    sitk.WriteImage(roi, str(folder / "roi.mha"), useCompression=True)
    truth = {
        "schema": TRUTH_SCHEMA,
        "index": case.index,
        "level": case.level,
        "label": renderer.plan.label_of(case.level),
        "level_truncated": renderer.plan.truncated(case.level),
        "room": case.room,
        "projector": case.projector.value,
        "isocentre_lps_mm": [float(v) for v in renderer.isocentre_lps_mm(case.level)],
        "patient_position": renderer.plan.ct.patient_position.value,
        "pose": case.pose.to_json(),
        "tracking_pose": case.tracking_pose.to_json(),
        "i0": renderer.i0,
        "energy_kev": renderer.energy_kev,
        "imaging": renderer.imaging_settings(),
        "couch_top_z_mm": renderer.couch_top_z_mm(case.level),
        "beyond_ends_mm": renderer.beyond_ends_mm,
        "seed": case.seed,
        "frames": files["frame"],
        "tracking_frames": files["tracking_frame"],
        "ct": ct_file,
        "labels": labels_file,
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return folder


#: Unattenuated signal of each imaging chain when none is given, counts.
DEFAULT_I0 = {"simple": 20000.0, "clinic": 6000.0}
#: Scatter-to-primary ratio of the clinic-like chain when none is given.
DEFAULT_SPR = 1.0


def imaging_from_options(chain: str, i0: float | None = None, spr: float | None = None,
                         couch: str | None = None) -> tuple[DetectorModel | None, ChainConfig | None, bool | None]:
    """``(detector, chain, couch)`` for :func:`build_set` from the command-line choices of
    ``build.py`` and ``spineguide simulate-ct``.

    ``chain``: ``"simple"`` (:class:`DetectorModel`) or ``"clinic"`` (``ChainConfig.clinic``); ``i0``
    counts (default :data:`DEFAULT_I0` of the chain); ``spr`` clinic only (default :data:`DEFAULT_SPR`);
    ``couch``: ``"on"``, ``"off"`` or None (the renderer's default for the chain).

    Raises
    ------
    SimulationError
        An unknown chain, or ``spr`` with the simple chain.
    """
    if chain not in DEFAULT_I0:
        raise SimulationError(f"imaging chain must be one of {sorted(DEFAULT_I0)}, got {chain!r}")
    if chain == "simple" and spr is not None:
        raise SimulationError("--spr needs --chain clinic")
    level = DEFAULT_I0[chain] if i0 is None else i0
    on = None if couch is None else couch == "on"
    if chain == "clinic":
        return None, ChainConfig.clinic(i0=level, scatter_to_primary=DEFAULT_SPR if spr is None else spr), on
    return DetectorModel(i0=level), None, on


def build_set(
    out_dir: str | os.PathLike,
    labelled: LabelledCT,
    geometries: Mapping[str, StereoGeometry],
    levels: Sequence[str],
    projectors: Sequence[Projector | str],
    n_cases: int,
    seed: int,
    detector: DetectorModel | None = None,
    beyond_ends_mm: float = 0.0,
    plastimatch_threads: int = 1,
    progress=None,
    chain: ChainConfig | None = None,
    couch: CouchTop | bool | None = None,
    deform=None,
) -> dict:
    """Write a whole validation set: ``ct.mha``, ``labels.mha`` and ``cases/NNNN/`` (:func:`write_case`).

    Parameters
    ----------
    out_dir : path
        Created if missing.
    labelled : LabelledCT
    geometries : mapping room name -> StereoGeometry
        Room frame.
    levels : sequence of str
        Target vertebrae (VerSe names); each must be in the label map.
    projectors, n_cases, seed
        As for :func:`plan_cases` (start errors +-10 mm / +-4 deg).
    detector, beyond_ends_mm, plastimatch_threads, chain, couch
        As for :class:`CaseRenderer` (``chain`` None: the simple chain).
    progress : callable, optional
        ``progress(case, seconds)`` after each case is written (the CLI prints).
    deform : spineguide.tracking.room.deform.DeformOptions, optional
        Per-level rigid deformation of the spine: each case images its own
        deformed CT (:func:`spineguide.tracking.room.deform.deform_ct`; the
        target keeps the case's pose, its neighbours move), while ``ct.mha``
        stays the planning CT; ``levels_truth.json`` beside ``truth.json``
        holds each level's exact poses.

    Returns
    -------
    dict
        What was built (levels, truncated levels, rooms, projectors, counts,
        i0, imaging chain and couch, couch top per level, CT grid), for the set's manifest.

    Raises
    ------
    SimulationError
        A level missing from the map (named), plastimatch missing, bad options.
    """
    projectors = [Projector(p) for p in projectors]
    if Projector.PLASTIMATCH in projectors and not plastimatch_available():
        raise SimulationError("plastimatch is not installed (Debian package 'plastimatch'); use the own projector only")
    for level in levels:
        labelled.label_of(level)
    renderer = CaseRenderer(labelled, geometries, detector, plastimatch_threads=plastimatch_threads,
                            beyond_ends_mm=beyond_ends_mm, chain=chain, couch=couch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ct_img = labelled.ct.to_sitk()
    sitk.WriteImage(ct_img, str(out / "ct.mha"), useCompression=True)
    lab = sitk.GetImageFromArray(labelled.labels)
    lab.CopyInformation(ct_img)
    sitk.WriteImage(lab, str(out / "labels.mha"), useCompression=True)
    cases = plan_cases(list(levels), list(geometries), projectors, n_cases, seed)
    try:
        for case in cases:
            t0 = time.monotonic()
            folder = out / "cases" / f"{case.index:04d}"
            if deform is None:
                write_case(folder, case, renderer, "../../ct.mha", "../../labels.mha", out / "panels")
            else:
                _write_deformed_case(folder, case, labelled, renderer, deform, out / "panels")
            if progress is not None:
                progress(case, time.monotonic() - t0)
    finally:
        renderer.close()
    return {
        "levels": list(levels),
        "truncated_levels": [lv for lv in levels if labelled.truncated(lv)],
        "rooms": {name: g.notes for name, g in geometries.items()},
        "projectors": [p.value for p in projectors],
        "cases": len(cases),
        "seed": int(seed),
        "i0": renderer.i0,
        "imaging": renderer.imaging_settings(),
        "couch_top_z_mm": {lv: renderer.couch_top_z_mm(lv) for lv in levels},
        "beyond_ends_mm": renderer.beyond_ends_mm,
        "patient_position": labelled.ct.patient_position.value,
        "ct_voxels_ijk": list(labelled.ct.shape_ijk),
        "ct_spacing_mm": [float(v) for v in labelled.ct.spacing_mm],
        "deform": None if deform is None else deform.settings(),
    }


def _write_deformed_case(folder: Path, case: RealCTCase, labelled: LabelledCT, renderer: CaseRenderer, deform,
                         panels_dir: Path) -> Path:
    """:func:`write_case` of a case whose spine is deformed per level, plus its ``levels_truth.json``."""
    from .deform import deform_ct, levels_truth

    deformation = deform.deformation(labelled, case.level, case.index)
    deformed = deform_ct(labelled.ct, labelled.labels, deformation, upsample=deform.upsample_for(labelled.ct))
    # The deformed CT is imaged (on its own, possibly finer, grid); the isocentre (target centroid) and roi.mha
    # stay the plan's.
    imaged = LabelledCT(deformed.ct, deformed.labels, f"{labelled.labels_source} (deformed)")
    case_renderer = CaseRenderer(imaged, renderer.geometries, renderer.detector, renderer.energy_kev, renderer.chain_hook,
                                 renderer.plastimatch_threads, renderer.beyond_ends_mm, renderer.chain,
                                 renderer.couch if renderer.couch is not None else False, plan=labelled)
    try:
        write_case(folder, case, case_renderer, "../../ct.mha", "../../labels.mha", panels_dir)
    finally:
        case_renderer.close()
    names = deformation.labels
    doc = levels_truth(deformation, renderer.isocentre_lps_mm(case.level), labelled.ct.patient_position, case.pose,
                       case.tracking_pose, {n: labelled.centroid_lps_mm(n) for n in names}, deformed.conflict_voxels)
    doc["target"] = case.level
    doc["truncated"] = {n: labelled.truncated(n) for n in names}
    doc["deform"] = deform.settings()
    (folder / "levels_truth.json").write_text(json.dumps(doc, indent=1) + "\n")
    return folder
