"""Stereo kV simulator: raw transmission frames of a phantom at a patient pose, with ground truth.

Image model, per imager and pixel (docs/CONVENTIONS.md, "kV images"):

``expected = blur( i0 * heel(col) * exp(-L_anatomy) * T_seeds + scatter )``,
``frame = Poisson(expected)``, then dead (0) and hot (65535) pixels,
clipped to 65535 and stored as uint16 (or float32).

- ``L_anatomy`` is the DRR line integral (:func:`spineguide.registration.drr.compute_drr`)
  of the phantom's seed-free truth anatomy converted to attenuation at the
  imaging energy (:meth:`AttenuationVolume.from_ct`), one ray per pixel centre.
- ``T_seeds`` is the transmission of the gold seeds, computed analytically:
  the exact chord of every sub-ray through the posed cylinder or sphere times
  gold's linear attenuation at the imaging energy, averaged as transmission
  ``mean(exp(-mu chord))`` over ``n x n`` sub-rays per pixel (partial
  coverage). The tissue a seed displaces (~0.2% of gold's mu) is ignored.
- ``heel`` is a linear gain across the columns (anode-heel effect),
  ``1 + g (col / (cols - 1) - 0.5)``.
- ``scatter`` is ``fraction`` times a wide Gaussian smoothing of the primary.
- detector blur (Gaussian, sigma in pixels) acts on the expected signal; the
  quantum noise drawn afterwards is therefore white (a simplification).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

import cv2
import numpy as np

from spineguide.calibration.foundation import checked_number
from spineguide.calibration.foundation import readonly_array as _ro
from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry
from spineguide.registration.attenuation import DEFAULT_IMAGING_ENERGY_KEV, linear_attenuation_per_mm
from spineguide.registration.drr import AttenuationVolume, compute_drr
from spineguide.registration.errors import RegistrationError
from spineguide.registration.pose import Pose
from spineguide.registration.volume import room_from_lps_matrix

from ..errors import SimulationError
from .phantoms import Phantom, SeedShape

__all__ = [
    "SimulationError",
    "OutputDtype",
    "DetectorModel",
    "FrameTruth",
    "StereoFrames",
    "KVSimulator",
    "BBFrames",
    "render_bb_frames",
    "seed_transmission",
    "sphere_chord_mm",
    "cylinder_chord_mm",
    "HOT_PIXEL_VALUE",
]

#: Value of a hot (stuck) pixel: the top of the uint16 range.
HOT_PIXEL_VALUE = 65535.0


class OutputDtype(Enum):
    """Pixel type of simulated frames."""

    UINT16 = "uint16"
    FLOAT32 = "float32"


@dataclass(frozen=True, slots=True)
class DetectorModel:
    """Source output, detector response and defects of the simulated frames.

    Attributes
    ----------
    i0 : float
        Unattenuated signal (flat field) per pixel, detector counts.
    blur_sigma_px : float
        Detector blur (Gaussian) in panel pixels; 0 for none.
    scatter_fraction : float
        Scatter as a fraction of the smoothed primary; 0 for none.
    scatter_sigma_mm : float
        Width (Gaussian sigma) of the scatter kernel on the panel, mm.
    heel_gradient : float
        Relative gain change across the panel's columns (anode-heel
        effect), e.g. 0.1 for +-5%; 0 for none.
    dead_pixels, hot_pixels : int
        Number of pixels per frame stuck at 0 / at :data:`HOT_PIXEL_VALUE`.
    noise : bool
        Draw Poisson quantum noise; False gives the expected signal (float).
    dtype : OutputDtype
        ``uint16`` (clipped to 0..65535, rounded) or ``float32``.
    seed_supersampling : int
        Sub-rays per pixel and axis for the analytic seeds.
    """

    i0: float = 20000.0
    blur_sigma_px: float = 0.5
    scatter_fraction: float = 0.0
    scatter_sigma_mm: float = 40.0
    heel_gradient: float = 0.0
    dead_pixels: int = 0
    hot_pixels: int = 0
    noise: bool = True
    dtype: OutputDtype = OutputDtype.UINT16
    seed_supersampling: int = 4

    def __post_init__(self) -> None:
        checks = (
            ("i0", self.i0, 1.0, 65535.0),
            ("blur_sigma_px", self.blur_sigma_px, 0.0, 50.0),
            ("scatter_fraction", self.scatter_fraction, 0.0, 5.0),
            ("scatter_sigma_mm", self.scatter_sigma_mm, 1.0, 1000.0),
            ("heel_gradient", self.heel_gradient, -1.0, 1.0),
        )
        for name, value, lo, hi in checks:
            v = checked_number(value, SimulationError, f"detector model: {name} = {value!r} is outside [{lo:g}, {hi:g}]",
                               minimum=lo, maximum=hi)
            object.__setattr__(self, name, v)
        for name in ("dead_pixels", "hot_pixels", "seed_supersampling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "seed_supersampling" else 0):
                raise SimulationError(f"detector model: {name} must be a non-negative integer, got {v!r}")
        object.__setattr__(self, "dtype", OutputDtype(self.dtype))


@dataclass(frozen=True, slots=True)
class FrameTruth:
    """What a simulated stereo pair really shows.

    Attributes
    ----------
    pose : Pose
        Patient pose (room frame, CONVENTIONS) at which the frames were made.
    i0 : float
        Flat-field level used (counts), before the heel gain.
    energy_kev : float
        Effective imaging energy, keV.
    seed_names : tuple of str
    seeds_room_mm : (N, 3) array
        Seed centres at the pose, room frame, mm.
    seeds_px : mapping imager -> (N, 2) array
        ``ImagerGeometry.project`` of ``seeds_room_mm``: ``(col, row)`` pixels.
    dead_px, hot_px : mapping imager -> (M, 2) int array
        ``(col, row)`` of the defective pixels.
    """

    pose: Pose
    i0: float
    energy_kev: float
    seed_names: tuple[str, ...]
    seeds_room_mm: np.ndarray
    seeds_px: Mapping[str, np.ndarray]
    dead_px: Mapping[str, np.ndarray] = field(default_factory=dict)
    hot_px: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds_room_mm", _ro(np.reshape(self.seeds_room_mm, (-1, 3))))
        for name in ("seeds_px", "dead_px", "hot_px"):
            dtype = np.float64 if name == "seeds_px" else np.int64
            value = MappingProxyType({k: _ro(np.reshape(v, (-1, 2)), dtype) for k, v in dict(getattr(self, name)).items()})
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class StereoFrames:
    """One simulated stereo pair: ``frames[imager]`` is ``image[row, col]``; ``truth`` its ground truth."""

    frames: Mapping[str, np.ndarray]
    truth: FrameTruth

    def __post_init__(self) -> None:
        frames = {}
        for k, v in dict(self.frames).items():
            v = np.array(v)
            v.setflags(write=False)
            frames[k] = v
        object.__setattr__(self, "frames", MappingProxyType(frames))


# ---------------------------------------------------------------------------- analytic chords
def sphere_chord_mm(source_mm: np.ndarray, directions: np.ndarray, centre_mm: np.ndarray, radius_mm: float) -> np.ndarray:
    """Chord length (mm) of rays ``source + t d`` (unit ``d``, (N, 3)) through a sphere, room frame."""
    w = np.asarray(centre_mm, float) - np.asarray(source_mm, float)
    along = directions @ w
    d2 = float(w @ w) - along**2
    return 2.0 * np.sqrt(np.maximum(radius_mm**2 - d2, 0.0))


def cylinder_chord_mm(
    source_mm: np.ndarray, directions: np.ndarray, centre_mm: np.ndarray, axis: np.ndarray, length_mm: float, radius_mm: float
) -> np.ndarray:
    """Chord length (mm) of rays ``source + t d`` (unit ``d``, (N, 3)) through a flat-capped cylinder.

    The ray-cylinder interval (the quadratic of the infinite cylinder)
    intersected with the slab between the end caps; room frame, mm.
    """
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    w = np.asarray(source_mm, float) - np.asarray(centre_mm, float)
    wa = float(w @ a)
    w_perp = w - wa * a
    da = directions @ a
    d_perp = directions - da[:, None] * a
    qa = np.einsum("ij,ij->i", d_perp, d_perp)
    qb = 2.0 * (d_perp @ w_perp)
    qc = float(w_perp @ w_perp) - radius_mm**2
    half = length_mm / 2.0
    big = 1e12
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = qb * qb - 4.0 * qa * qc
        root = np.sqrt(np.maximum(disc, 0.0))
        parallel = qa < 1e-14
        t1 = np.where(parallel, -big, (-qb - root) / (2.0 * np.where(parallel, 1.0, qa)))
        t2 = np.where(parallel, big, (-qb + root) / (2.0 * np.where(parallel, 1.0, qa)))
        miss = np.where(parallel, qc > 0, disc <= 0)
        flat = np.abs(da) < 1e-14
        c1 = np.where(flat, -big, (-half - wa) / np.where(flat, 1.0, da))
        c2 = np.where(flat, big, (half - wa) / np.where(flat, 1.0, da))
    lo_cap, hi_cap = np.minimum(c1, c2), np.maximum(c1, c2)
    if abs(wa) > half:
        hi_cap = np.where(flat, -big, hi_cap)
    chord = np.minimum(t2, hi_cap) - np.maximum(t1, lo_cap)
    return np.where(miss, 0.0, np.maximum(chord, 0.0))


@dataclass(frozen=True)
class _Marker:
    centre_mm: np.ndarray  # room
    axis: np.ndarray  # room unit vector
    length_mm: float
    radius_mm: float
    sphere: bool
    mu_per_mm: float

    def reach_mm(self) -> float:
        return (0.0 if self.sphere else self.length_mm / 2.0) + self.radius_mm

    def chord(self, source, dirs) -> np.ndarray:
        if self.sphere:
            return sphere_chord_mm(source, dirs, self.centre_mm, self.radius_mm)
        return cylinder_chord_mm(source, dirs, self.centre_mm, self.axis, self.length_mm, self.radius_mm)


def _windows(imager: ImagerGeometry, markers: Sequence[_Marker]) -> list[tuple[int, int, int, int, list[_Marker]]]:
    """Pixel windows (row0, row1, col0, col1, markers) covering every marker's shadow, merged where they touch."""
    boxes = []
    for m in markers:
        r = m.reach_mm()
        corners = m.centre_mm + r * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
        px = imager.project(corners)
        c0, r0 = np.floor(px.min(axis=0)).astype(int) - 2
        c1, r1 = np.ceil(px.max(axis=0)).astype(int) + 3
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, imager.rows), min(c1, imager.cols)
        if r1 > r0 and c1 > c0:
            boxes.append([r0, r1, c0, c1, [m]])
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    boxes[i] = [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), a[4] + b[4]]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [tuple(b) for b in boxes]


def _window_subrays(imager: ImagerGeometry, markers: Sequence[_Marker], n: int):
    """Per merged marker window (:func:`_windows`): ``(r0, r1, c0, c1, markers, source_mm, directions)`` of
    ``n x n`` sub-rays per pixel (room frame), ordered so that a per-ray array reshapes to ``(h, n, w, n)``."""
    sub = (np.arange(n) + 0.5) / n - 0.5
    for r0, r1, c0, c1, group in _windows(imager, markers):
        cols = (np.arange(c0, c1)[:, None] + sub[None, :]).ravel()
        rows = (np.arange(r0, r1)[:, None] + sub[None, :]).ravel()
        cc, rr = np.meshgrid(cols, rows)
        src, dirs = imager.backproject(np.stack([cc.ravel(), rr.ravel()], axis=1))
        yield r0, r1, c0, c1, group, src, dirs


def seed_transmission(imager: ImagerGeometry, markers: Sequence[_Marker], supersampling: int) -> np.ndarray:
    """Per-pixel transmission (0..1] of analytic markers, averaged over ``n x n`` sub-rays per pixel."""
    out = np.ones((imager.rows, imager.cols), dtype=np.float64)
    n = int(supersampling)
    for r0, r1, c0, c1, group, src, dirs in _window_subrays(imager, markers, n):
        line = np.zeros(len(dirs))
        for m in group:
            line += m.mu_per_mm * m.chord(src, dirs)
        t = np.exp(-line).reshape(r1 - r0, n, c1 - c0, n).mean(axis=(1, 3))
        out[r0:r1, c0:c1] *= t
    return out


# ---------------------------------------------------------------------------- detector
def _detector_chain(
    primary: np.ndarray, imager: ImagerGeometry, det: DetectorModel, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heel, scatter, blur, noise, defects, output type. ``primary`` in counts (float64)."""
    rows, cols = primary.shape
    signal = primary
    if det.heel_gradient:
        signal = signal * (1.0 + det.heel_gradient * (np.arange(cols) / max(cols - 1, 1) - 0.5))[None, :]
    if det.scatter_fraction:
        # A wide kernel: blur a coarse copy and bring it back (cheap, and scatter is smooth anyway).
        sigma_px = det.scatter_sigma_mm / float(np.mean(imager.pixel_spacing_mm))
        f = max(1, int(sigma_px // 4))
        small = cv2.resize(signal.astype(np.float32), (max(cols // f, 1), max(rows // f, 1)), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigma_px / f, borderType=cv2.BORDER_REPLICATE)
        signal = signal + det.scatter_fraction * cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)
    if det.blur_sigma_px > 0:
        signal = cv2.GaussianBlur(np.asarray(signal, np.float64), (0, 0), det.blur_sigma_px, borderType=cv2.BORDER_REPLICATE)
    frame = rng.poisson(signal).astype(np.float64) if det.noise else np.array(signal, dtype=np.float64)
    n_bad = det.dead_pixels + det.hot_pixels
    dead = hot = np.zeros((0, 2), dtype=np.int64)
    if n_bad:
        flat = rng.choice(rows * cols, size=n_bad, replace=False)
        cr = np.stack([flat % cols, flat // cols], axis=1)
        dead, hot = cr[: det.dead_pixels], cr[det.dead_pixels :]
        frame[dead[:, 1], dead[:, 0]] = 0.0
        frame[hot[:, 1], hot[:, 0]] = HOT_PIXEL_VALUE
    if det.dtype is OutputDtype.UINT16:
        frame = np.clip(np.rint(frame), 0, 65535).astype(np.uint16)
    else:
        frame = np.clip(frame, 0, 65535).astype(np.float32)
    return frame, dead, hot


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SimulationError(f"seed must be an integer or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _mu(material: str, energy_kev: float) -> float:
    try:
        return linear_attenuation_per_mm(material, energy_kev)
    except RegistrationError as err:
        raise SimulationError(f"cannot attenuate with {material!r} at {energy_kev} keV: {err}") from err


# ---------------------------------------------------------------------------- simulator
class KVSimulator:
    """Raw stereo kV frames of one phantom in one room.

    The phantom's truth anatomy is converted to attenuation at ``energy_kev``
    once, at construction; each :meth:`render` then costs two DRRs plus the
    analytic seeds and the detector model.

    Parameters
    ----------
    phantom : Phantom
    geometry : StereoGeometry
        Imagers, room frame.
    energy_kev : float
        Effective energy of the imaging beam, keV (the planning-CT DRRs of a
        registration may use another: a contrast mismatch).
    detector : DetectorModel
        Default detector model of :meth:`render`.
    """

    def __init__(
        self,
        phantom: Phantom,
        geometry: StereoGeometry,
        energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
        detector: DetectorModel | None = None,
    ) -> None:
        if not isinstance(phantom, Phantom):
            raise SimulationError(f"expected a Phantom, got {type(phantom).__name__}")
        if not isinstance(geometry, StereoGeometry):
            raise SimulationError(f"expected a StereoGeometry, got {type(geometry).__name__}")
        self.phantom = phantom
        self.geometry = geometry
        self.energy_kev = float(energy_kev)
        self.detector = DetectorModel() if detector is None else detector
        try:
            self.volume = AttenuationVolume.from_ct(phantom.anatomy, phantom.isocentre_lps_mm, self.energy_kev)
        except RegistrationError as err:
            raise SimulationError(f"phantom {phantom.name!r} at {energy_kev} keV: {err}") from err
        self._seed_mu = {s.material: _mu(s.material, self.energy_kev) for s in phantom.seeds}
        self._room_from_lps = room_from_lps_matrix(phantom.anatomy.patient_position)

    def markers(self, pose: Pose) -> list[_Marker]:
        """The phantom's seeds at ``pose``, room frame."""
        centres = pose.apply(self.phantom.seeds_room_mm())
        out = []
        for seed, c in zip(self.phantom.seeds, centres):
            axis = pose.rotation @ (self._room_from_lps @ seed.axis_lps)
            out.append(
                _Marker(c, axis, seed.length_mm, seed.radius_mm, seed.shape is SeedShape.SPHERE, self._seed_mu[seed.material])
            )
        return out

    def line_integrals(self, pose: Pose | None = None) -> dict[str, np.ndarray]:
        """Noise-free ``-ln(I / i0)`` per imager (anatomy DRR + seeds, no blur, scatter or heel), float64."""
        pose = Pose.identity() if pose is None else pose
        markers = self.markers(pose)
        out = {}
        for im in self.geometry.imagers:
            drr = compute_drr(self.volume, im, pose).astype(np.float64)
            out[im.name] = drr - np.log(seed_transmission(im, markers, self.detector.seed_supersampling))
        return out

    def render(self, pose: Pose | None = None, seed: int | np.random.Generator = 0, detector: DetectorModel | None = None) -> StereoFrames:
        """A stereo pair of raw frames at ``pose`` (default identity) with its ground truth.

        Parameters
        ----------
        pose : Pose, optional
            Patient pose, room frame (CONVENTIONS).
        seed : int or numpy Generator
            Noise and defect generator (deterministic for an integer).
        detector : DetectorModel, optional
            Overrides the simulator's default.

        Returns
        -------
        StereoFrames
            ``frames[name]`` of shape ``(rows, cols)``; truth with seed centres
            in room mm and ``(col, row)`` pixels.
        """
        pose = Pose.identity() if pose is None else pose
        if not isinstance(pose, Pose):
            raise SimulationError(f"render needs a Pose, got {type(pose).__name__}")
        det = self.detector if detector is None else detector
        rng = _rng(seed)
        markers = self.markers(pose)
        frames, dead, hot, seeds_px = {}, {}, {}, {}
        seeds_room = np.array([m.centre_mm for m in markers]).reshape(-1, 3)
        for im in self.geometry.imagers:
            drr = compute_drr(self.volume, im, pose).astype(np.float64)
            primary = det.i0 * np.exp(-drr) * seed_transmission(im, markers, det.seed_supersampling)
            frames[im.name], dead[im.name], hot[im.name] = _detector_chain(primary, im, det, rng)
            seeds_px[im.name] = im.project(seeds_room) if len(seeds_room) else np.zeros((0, 2))
        truth = FrameTruth(pose, det.i0, self.energy_kev, tuple(s.name for s in self.phantom.seeds), seeds_room, seeds_px, dead, hot)
        return StereoFrames(frames, truth)


# ---------------------------------------------------------------------------- BB phantom
@dataclass(frozen=True, slots=True)
class BBFrames:
    """Simulated frames of a BB (calibration) phantom.

    Attributes
    ----------
    frames : mapping imager -> (rows, cols) array
    centres_px : mapping imager -> (N, 2) array
        ``(col, row)`` projection of each BB centre.
    bb_positions_room_mm : (N, 3) array
    i0 : float
    """

    frames: Mapping[str, np.ndarray]
    centres_px: Mapping[str, np.ndarray]
    bb_positions_room_mm: np.ndarray
    i0: float


def render_bb_frames(
    geometry: StereoGeometry,
    bb_positions_room_mm: np.ndarray,
    diameters_mm: float | Sequence[float],
    material: str = "tungsten",
    i0: float = 20000.0,
    *,
    energy_kev: float = DEFAULT_IMAGING_ENERGY_KEV,
    background_line_integral: float = 0.3,
    texture_amplitude: float = 0.0,
    detector: DetectorModel | None = None,
    seed: int | np.random.Generator = 0,
) -> BBFrames:
    """Frames of metal spheres at room positions, with exact sphere chords, over a flat or textured background.

    Parameters
    ----------
    geometry : StereoGeometry
        The (true) imaging geometry, room frame.
    bb_positions_room_mm : (N, 3) array
        Sphere centres, room frame, mm.
    diameters_mm : float or (N,) floats
    material : str
        ``"tungsten"``, ``"iron"`` (steel) or ``"gold"``.
    i0 : float
        Flat-field level, counts (overrides ``detector.i0``).
    energy_kev : float
        Effective beam energy, keV.
    background_line_integral : float
        Uniform attenuation of the phantom body (e.g. its acrylic block).
    texture_amplitude : float
        Amplitude of a smooth seeded random line-integral texture; 0 for flat.
    detector : DetectorModel, optional
        Blur, noise, defects (``i0`` is taken from the argument).
    seed : int or numpy Generator

    Returns
    -------
    BBFrames
    """
    pts = np.asarray(bb_positions_room_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise SimulationError(f"bb_positions_room_mm must be a finite (N, 3) array with N >= 1, got shape {pts.shape}")
    diam = np.broadcast_to(np.asarray(diameters_mm, dtype=np.float64), (len(pts),))
    if not np.all(np.isfinite(diam)) or np.any(diam <= 0):
        raise SimulationError(f"BB diameters must be positive, got {np.asarray(diameters_mm).tolist()}")
    for name, v in (("background_line_integral", background_line_integral), ("texture_amplitude", texture_amplitude)):
        checked_number(v, SimulationError, f"{name} must be >= 0, got {v}", minimum=0.0)
    mu = _mu(material, energy_kev)
    base = DetectorModel() if detector is None else detector
    det = DetectorModel(
        i0, base.blur_sigma_px, base.scatter_fraction, base.scatter_sigma_mm, base.heel_gradient,
        base.dead_pixels, base.hot_pixels, base.noise, base.dtype, base.seed_supersampling,
    )
    rng = _rng(seed)
    markers = [_Marker(p, np.array([0.0, 0.0, 1.0]), d, d / 2.0, True, mu) for p, d in zip(pts, diam)]
    frames, centres = {}, {}
    for im in geometry.imagers:
        line = np.full((im.rows, im.cols), float(background_line_integral))
        if texture_amplitude > 0:
            coarse = rng.normal(0.0, 1.0, size=(12, 12)).astype(np.float32)
            smooth = cv2.resize(coarse, (im.cols, im.rows), interpolation=cv2.INTER_CUBIC)
            line += texture_amplitude * smooth / max(float(np.abs(smooth).max()), 1e-9)
            line = np.maximum(line, 0.0)
        primary = det.i0 * np.exp(-line) * seed_transmission(im, markers, det.seed_supersampling)
        frames[im.name], _, _ = _detector_chain(primary, im, det, rng)
        centres[im.name] = _ro(im.project(pts))
    for v in frames.values():
        v.setflags(write=False)
    return BBFrames(MappingProxyType(frames), MappingProxyType(centres), _ro(pts), float(i0))
