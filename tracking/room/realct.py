"""Real patient CT in the virtual room: a labelled CT loader and stereo validation cases with exact truth.

The phantoms of :mod:`spineguide.tracking.room.phantoms` are cleaner than a patient.
This module takes any CT plus a per-vertebra label map (NIfTI, MHA/NRRD or a
DICOM series folder for the CT), and renders stereo kV pairs of it at known
patient poses, by two independent projectors: spineguide's own Siddon DRR
(:func:`spineguide.registration.drr.compute_drr`) and plastimatch's exact ray tracer
(``plastimatch drr``, Debian package ``plastimatch``). ``datasets/realct/``
holds the recipe that fetches a public CT and builds a set with it.

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

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry
from spineguide.calibration.io import write_geometry
from spineguide.registration.attenuation import DEFAULT_IMAGING_ENERGY_KEV, hu_to_mu_per_mm
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.errors import RegistrationError
from spineguide.registration.pose import Pose
from spineguide.registration.volume import CTVolume, PatientPosition, read_ct, room_from_lps_matrix

from ..errors import SimulationError
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
    "CaseRenderer",
    "plastimatch_available",
    "plastimatch_drr",
    "write_case",
    "build_set",
    "TRUTH_SCHEMA",
    "BEYOND_ENDS_MAX_HU",
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


class CaseRenderer:
    """Raw stereo pairs of a labelled CT at known poses, by either projector.

    The whole CT, converted to attenuation at ``energy_kev``, is both the
    anatomy imaged and (separately, by the registration) the planning CT, so
    the only differences between a case's frames and the registration's model
    are the projector, the noise and detector effects, and the ROI.

    Parameters
    ----------
    labelled : LabelledCT
    geometries : mapping room name -> StereoGeometry
        Room frame.
    detector : DetectorModel
        i0, blur, scatter, heel, defects and noise of the frames
        (:mod:`spineguide.tracking.room.kv`'s detector chain). The clinic-like chain of
        :mod:`spineguide.tracking.room.chain` (spectrum, material paths) needs a
        water/bone decomposition of the CT that this module does not make
        yet: ``chain_hook`` is where it goes.
    energy_kev : float
        Effective imaging energy for the HU -> mu conversion, keV.
    chain_hook : callable, optional
        ``f(line_integrals, imager, detector, rng) -> frame`` replacing the
        detector chain (line integrals dimensionless, ``image[row, col]``).
    plastimatch_threads : int
    beyond_ends_mm : float
        Tissue past the CT's superior and inferior ends in the frames: the end
        slices, with HU capped at :data:`BEYOND_ENDS_MAX_HU` (soft tissue, no
        bone), repeated over this length (mm) at both ends. A patient does not
        stop where the CT does; without it the frames show a step where the
        whole body ends, an edge no radiograph has. The cap keeps a vertebra cut
        by the CT's end from growing into a long bony column; the vertebrae
        really beyond the ends are unknown and left out. 0 images the CT alone.
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
    ) -> None:
        if not geometries:
            raise SimulationError("CaseRenderer needs at least one room geometry")
        self.labelled = labelled
        self.geometries = dict(geometries)
        self.detector = DetectorModel() if detector is None else detector
        self.energy_kev = float(energy_kev)
        self.chain_hook = chain_hook
        self.plastimatch_threads = int(plastimatch_threads)
        ct = labelled.ct
        if not np.isfinite(beyond_ends_mm) or not 0.0 <= beyond_ends_mm <= 1000.0:
            raise SimulationError(f"beyond_ends_mm must be 0..1000 mm, got {beyond_ends_mm!r}")
        self.beyond_ends_mm = float(beyond_ends_mm)
        # Slices added at each end along k (the CT's superior axis on the canonical grid).
        self._pad_slices = int(np.ceil(self.beyond_ends_mm / float(ct.spacing_mm[2]) - 1e-9))
        hu = ct.hu
        if self._pad_slices:
            n = self._pad_slices
            soft = np.minimum(hu, np.float32(BEYOND_ENDS_MAX_HU))
            hu = np.concatenate([np.repeat(soft[:1], n, axis=0), hu, np.repeat(soft[-1:], n, axis=0)])
        self._mu = hu_to_mu_per_mm(hu, self.energy_kev)
        self._mu.setflags(write=False)
        self._index_shift = np.eye(4)
        self._index_shift[2, 3] = -self._pad_slices  # imaged index k -> CT index k - pad
        self._room_from_lps = room_from_lps_matrix(ct.patient_position)
        self._volumes: dict[str, AttenuationVolume] = {}
        self._mu_file: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def isocentre_lps_mm(self, level: str) -> np.ndarray:
        """Plan isocentre of a level: its label centroid, CT LPS mm."""
        return self.labelled.centroid_lps_mm(level)

    def _volume(self, level: str) -> AttenuationVolume:
        if level not in self._volumes:
            room_from_ct_index = self.labelled.ct.room_from_index(self.isocentre_lps_mm(level))
            self._volumes[level] = AttenuationVolume(self._mu, room_from_ct_index @ self._index_shift)
        return self._volumes[level]

    def _plastimatch_volume(self) -> Path:
        if self._mu_file is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="realct_mu_")
            ct = self.labelled.ct
            img = sitk.GetImageFromArray(np.asarray(self._mu, dtype=np.float32))
            img.SetSpacing(tuple(float(v) for v in ct.spacing_mm))
            img.SetDirection(tuple(float(v) for v in ct.direction.ravel()))
            img.SetOrigin(tuple(float(v) for v in ct.index_to_lps(np.array([0.0, 0.0, -self._pad_slices]))))
            self._mu_file = Path(self._tmp.name) / "mu.mha"
            sitk.WriteImage(img, str(self._mu_file))  # uncompressed: plastimatch reads it fast
        return self._mu_file

    def close(self) -> None:
        """Remove the temporary attenuation file plastimatch reads."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self._mu_file = None, None

    def line_integrals(self, level: str, room: str, pose: Pose, projector: Projector | str) -> dict[str, np.ndarray]:
        """Noise-free ``-ln(I / i0)`` per imager (float64, ``image[row, col]``), isocentre at ``level``."""
        projector = Projector(projector)
        if room not in self.geometries:
            raise SimulationError(f"unknown room {room!r} (rooms: {', '.join(self.geometries)})")
        geometry = self.geometries[room]
        out = {}
        for im in geometry.imagers:
            if projector is Projector.OWN:
                out[im.name] = compute_drr(self._volume(level), im, pose).astype(np.float64)
            else:
                out[im.name] = plastimatch_drr(self._plastimatch_volume(), im, pose, self._room_from_lps,
                                               self.isocentre_lps_mm(level), self.plastimatch_threads)
        return out

    def frames(self, level: str, room: str, pose: Pose, projector: Projector | str, seed: int) -> dict[str, np.ndarray]:
        """Raw frames (detector counts, ``image[row, col]``) per imager: ``i0 exp(-L)`` through the detector chain."""
        rng = _rng(seed)
        out = {}
        for name, line in self.line_integrals(level, room, pose, projector).items():
            im = self.geometries[room][name]
            if self.chain_hook is not None:
                out[name] = np.asarray(self.chain_hook(line, im, self.detector, rng))
            else:
                out[name] = _detector_chain(self.detector.i0 * np.exp(-line), im, self.detector, rng)[0]
        return out


def write_case(out_dir: str | os.PathLike, case: RealCTCase, renderer: CaseRenderer, ct_file: str, labels_file: str) -> Path:
    """Render one case (set-up and tracking pairs) and write its folder.

    Files: ``frame_<imager>.mha`` and ``tracking_frame_<imager>.mha`` (raw
    frames, ``i0`` in the metadata), ``geometry.json`` (``kv-geometry/1``),
    ``roi.mha`` (uint8 mask of the target level on the CT grid) and
    ``truth.json`` (``realct-truth/1``: poses in the room frame with
    ``translation_mm`` / ``rotation_deg``, level, label, isocentre in CT LPS
    mm, projector, room, i0, the CT and label files relative to the set).

    Returns
    -------
    Path of the case folder.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = renderer.geometries[case.room]
    det = renderer.detector
    files = {}
    for prefix, pose, seed in (("frame", case.pose, case.seed), ("tracking_frame", case.tracking_pose, case.seed + 1)):
        for name, frame in renderer.frames(case.level, case.room, pose, case.projector, seed).items():
            row_sp, col_sp = geometry[name].pixel_spacing_mm
            fname = f"{prefix}_{name}.mha"
            write_frame(frame, folder / fname, name, det.i0, (row_sp, col_sp))
            files.setdefault(prefix, {})[name] = fname
    write_geometry(geometry, folder / "geometry.json")
    roi = sitk.GetImageFromArray(renderer.labelled.mask(case.level).astype(np.uint8))
    roi.CopyInformation(renderer.labelled.ct.to_sitk())
    sitk.WriteImage(roi, str(folder / "roi.mha"), useCompression=True)
    truth = {
        "schema": TRUTH_SCHEMA,
        "index": case.index,
        "level": case.level,
        "label": renderer.labelled.label_of(case.level),
        "level_truncated": renderer.labelled.truncated(case.level),
        "room": case.room,
        "projector": case.projector.value,
        "isocentre_lps_mm": [float(v) for v in renderer.isocentre_lps_mm(case.level)],
        "patient_position": renderer.labelled.ct.patient_position.value,
        "pose": case.pose.to_json(),
        "tracking_pose": case.tracking_pose.to_json(),
        "i0": det.i0,
        "energy_kev": renderer.energy_kev,
        "beyond_ends_mm": renderer.beyond_ends_mm,
        "seed": case.seed,
        "frames": files["frame"],
        "tracking_frames": files["tracking_frame"],
        "ct": ct_file,
        "labels": labels_file,
    }
    (folder / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return folder


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
    detector, beyond_ends_mm, plastimatch_threads
        As for :class:`CaseRenderer`.
    progress : callable, optional
        ``progress(case, seconds)`` after each case is written (the CLI prints).

    Returns
    -------
    dict
        What was built (levels, truncated levels, rooms, projectors, counts,
        i0, CT grid), for the set's manifest.

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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ct_img = labelled.ct.to_sitk()
    sitk.WriteImage(ct_img, str(out / "ct.mha"), useCompression=True)
    lab = sitk.GetImageFromArray(labelled.labels)
    lab.CopyInformation(ct_img)
    sitk.WriteImage(lab, str(out / "labels.mha"), useCompression=True)
    renderer = CaseRenderer(labelled, geometries, detector, plastimatch_threads=plastimatch_threads,
                            beyond_ends_mm=beyond_ends_mm)
    cases = plan_cases(list(levels), list(geometries), projectors, n_cases, seed)
    try:
        for case in cases:
            t0 = time.monotonic()
            write_case(out / "cases" / f"{case.index:04d}", case, renderer, "../../ct.mha", "../../labels.mha")
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
        "i0": renderer.detector.i0,
        "beyond_ends_mm": renderer.beyond_ends_mm,
        "patient_position": labelled.ct.patient_position.value,
        "ct_voxels_ijk": list(labelled.ct.shape_ijk),
        "ct_spacing_mm": [float(v) for v in labelled.ct.spacing_mm],
    }
