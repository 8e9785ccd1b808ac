"""Shared seeded test data with known answers: small phantoms, geometries and simulated frames.

Import from tests as ``from tests.synthetic import small_thoracolumbar, ...``.
Everything is deterministic and cached (the values are immutable), and sized
for CI: coarse phantoms (3 mm truth grid) and 128-pixel panels of 3.2 mm
(the full 41 cm panel, binned).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from spineguide.calibration.geometry import StereoGeometry, default_stereo_geometry
from spineguide.registration.pose import Pose
from spineguide.tracking.room.kv import DetectorModel, KVSimulator, StereoFrames
from spineguide.tracking.room.phantoms import Phantom, cervical_phantom, thoracolumbar_phantom

#: Panel of the small test geometry: 128 x 128 pixels of 3.2 mm (same 41 cm field as the default).
SMALL_PANEL_PIXELS = 128
SMALL_PIXEL_SPACING_MM = 3.2


@functools.lru_cache(maxsize=4)
def small_geometry(panel_pixels: int = SMALL_PANEL_PIXELS, pixel_spacing_mm: float = SMALL_PIXEL_SPACING_MM) -> StereoGeometry:
    """The default stereo room with a small, coarse panel."""
    return default_stereo_geometry(panel_pixels=panel_pixels, pixel_spacing_mm=pixel_spacing_mm)


@functools.lru_cache(maxsize=4)
def small_thoracolumbar(with_seeds: bool = True, seed: int = 0) -> Phantom:
    """Thoracolumbar phantom on a 3 mm truth grid and a 3 x 3 x 4 mm planning grid (< 1 s)."""
    return thoracolumbar_phantom(truth_spacing_mm=3.0, planning_spacing_mm=(3.0, 3.0, 4.0), with_seeds=with_seeds, seed=seed)


@functools.lru_cache(maxsize=2)
def small_cervical(seed: int = 0) -> Phantom:
    """Cervical phantom on a 3 mm truth grid and a 3 x 3 x 4 mm planning grid (< 1 s)."""
    return cervical_phantom(truth_spacing_mm=3.0, planning_spacing_mm=(3.0, 3.0, 4.0), seed=seed)


@functools.lru_cache(maxsize=4)
def small_simulator(phantom_name: str = "thoracolumbar", energy_kev: float = 60.0) -> KVSimulator:
    """A simulator of a small phantom in the small room (default detector, i0 = 20000)."""
    phantom = small_thoracolumbar() if phantom_name == "thoracolumbar" else small_cervical()
    return KVSimulator(phantom, small_geometry(), energy_kev=energy_kev)


def small_frames(
    translation_mm=(0.0, 0.0, 0.0),
    rotation_deg=(0.0, 0.0, 0.0),
    seed: int = 0,
    phantom_name: str = "thoracolumbar",
    detector: DetectorModel | None = None,
) -> StereoFrames:
    """A small stereo pair at a known pose, with its truth (``frames.truth``)."""
    sim = small_simulator(phantom_name)
    return sim.render(Pose.from_six(translation_mm, rotation_deg), seed=seed, detector=detector)


def projected_points(geometry: StereoGeometry, points_room_mm: np.ndarray, noise_px: float = 0.0, seed: int = 0) -> dict:
    """``(col, row)`` projections of room points in every imager, with optional seeded Gaussian noise (px)."""
    rng = np.random.default_rng(seed)
    pts = np.atleast_2d(np.asarray(points_room_mm, dtype=np.float64))
    return {im.name: im.project(pts) + rng.normal(0.0, noise_px, size=(len(pts), 2)) for im in geometry.imagers}


# ---------------------------------------------------------------------------- seed frames with known truth
# Analytic kV frames for seed detection (tests/tracking/test_detection.py,
# test_fiducials.py): a soft-tissue ramp, a vertebra-like dense block with a
# cortical rim (blurred edges), gold seeds as capsules (cylinder +
# hemispherical caps; a sphere when length = diameter) whose line integrals
# are exact chords ``2 sqrt(r^2 - d^2)`` times gold's attenuation, integrated
# over each pixel's area (5 x 5 sub-samples, averaged in transmission as a
# detector does), then Poisson noise and panel defects. A capsule is
# symmetric about its centre, so the true centre of its image is the centre
# it was drawn at.


#: Gold at 60 keV effective (registration.attenuation), 1/mm.
GOLD_MU_PER_MM = 8.7
#: The issue's benchmark flat-field level (counts).
SEED_I0 = 20000.0


@dataclass(frozen=True)
class Seed2D:
    """A seed drawn on the panel: centre (col, row) px, axis angle from +col, sizes in panel px."""

    centre_px: tuple[float, float]
    angle_deg: float
    length_px: float
    diameter_px: float


def seed_on_panel(imager, centre_px, angle_deg, length_mm=3.5, diameter_mm=1.0) -> Seed2D:
    """A seed of physical size (mm at the isocentre) drawn through the imager's magnification."""
    scale = imager.magnification / float(imager.pixel_spacing_mm[0])
    return Seed2D(tuple(centre_px), angle_deg, length_mm * scale, diameter_mm * scale)


def background_line_integrals(rows, cols, bone_box=None, rim=0.25, bone=1.5, base=2.5):
    """Soft-tissue ramp plus a rotated dense block with a cortical rim; blurred edges (ln units)."""
    import cv2

    rr, cc = np.indices((rows, cols), dtype=np.float64)
    lint = base + 0.6 * cc / cols + 0.3 * rr / rows
    if bone_box is not None:
        (bc, br), (bw, bh), ang = bone_box
        a = math.radians(ang)
        u = (cc - bc) * math.cos(a) + (rr - br) * math.sin(a)
        v = -(cc - bc) * math.sin(a) + (rr - br) * math.cos(a)
        inside = (np.abs(u) <= bw / 2) & (np.abs(v) <= bh / 2)
        core = (np.abs(u) <= bw / 2 - 2) & (np.abs(v) <= bh / 2 - 2)
        lint = lint + bone * inside + rim * (inside & ~core)
    lint = cv2.GaussianBlur(lint.astype(np.float32), (0, 0), 0.8)
    return lint.astype(np.float64)


def panel_seed_transmission(rows, cols, seeds, mm_per_panel_px, mu_per_mm=GOLD_MU_PER_MM, sub=5):
    """Pixel-averaged transmission exp(-mu * chord) of capsule seeds (1 outside seeds)."""
    trans = np.ones((rows, cols))
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    for s in seeds:
        c0, r0 = s.centre_px
        half = int(math.ceil(s.length_px / 2 + s.diameter_px + 2))
        r_lo, r_hi = max(0, int(r0) - half), min(rows, int(r0) + half + 2)
        c_lo, c_hi = max(0, int(c0) - half), min(cols, int(c0) + half + 2)
        rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi]
        ys = rr[..., None, None] + offs[:, None]
        xs = cc[..., None, None] + offs[None, :]
        a = math.radians(s.angle_deg)
        u = (xs - c0) * math.cos(a) + (ys - r0) * math.sin(a)
        v = -(xs - c0) * math.sin(a) + (ys - r0) * math.cos(a)
        seg = max(0.0, (s.length_px - s.diameter_px) / 2)
        du = np.maximum(np.abs(u) - seg, 0.0)
        d2 = du**2 + v**2
        rad = s.diameter_px / 2
        chord_px = 2 * np.sqrt(np.maximum(rad**2 - d2, 0.0))
        t = np.exp(-mu_per_mm * chord_px * mm_per_panel_px).mean(axis=(-1, -2))
        trans[r_lo:r_hi, c_lo:c_hi] *= t
    return trans


def render_kv_frame(
    imager,
    seeds,
    rng,
    i0=SEED_I0,
    bone_box=None,
    dead=(),
    hot=(),
    dead_column=None,
    saturated_box=None,
    dtype=np.uint16,
):
    """Raw frame (more photons = larger value) with Poisson noise; ``None`` rng for noise-free."""
    rows, cols = imager.rows, imager.cols
    lint = background_line_integrals(rows, cols, bone_box)
    mm_per_px = float(imager.pixel_spacing_mm[0]) / imager.magnification
    expected = i0 * np.exp(-lint) * panel_seed_transmission(rows, cols, seeds, mm_per_px)
    counts = expected if rng is None else rng.poisson(expected).astype(np.float64)
    if saturated_box is not None:
        r0, r1, c0, c1 = saturated_box
        counts[r0:r1, c0:c1] = 65535
    for r, c in dead:
        counts[r, c] = 0
    for r, c in hot:
        counts[r, c] = 65535
    if dead_column is not None:
        counts[:, dead_column] = 0
    return np.clip(counts, 0, 65535).astype(dtype)


def match_detections(dets, truth_px, radius_px):
    """For each true centre, the nearest detection within radius (or None)."""
    out = []
    for t in truth_px:
        best = min(dets, key=lambda d: np.hypot(*(d.centre_px - t)), default=None)
        out.append(best if best is not None and np.hypot(*(best.centre_px - t)) <= radius_px else None)
    return out


# ---------------------------------------------------------------------------- seeds in the virtual room
#: Panel of the virtual-room seed tests: 256 x 256 pixels of 0.8 mm (a 2x-binned panel cropped to
#: 205 mm): a 1 mm seed is ~2 pixels wide, as in the fiducial tests.
SEED_PANEL_PIXELS = 256
SEED_PIXEL_SPACING_MM = 0.8


_SEED_SIMULATORS: dict = {}


def _seed_simulator(seeds: tuple) -> KVSimulator:
    """One simulator per seed set (cached: the seeds' values are immutable, their arrays unhashable)."""
    key = tuple((s.name, tuple(s.centre_lps_mm), tuple(s.axis_lps), s.length_mm, s.diameter_mm, s.shape, s.material)
                for s in seeds)
    if key not in _SEED_SIMULATORS:
        phantom = replace(small_thoracolumbar(), seeds=seeds)
        _SEED_SIMULATORS[key] = KVSimulator(phantom, small_geometry(SEED_PANEL_PIXELS, SEED_PIXEL_SPACING_MM))
    return _SEED_SIMULATORS[key]


def seed_phantom_seeds() -> tuple:
    """The small thoracolumbar phantom's seeds (``spineguide.tracking.room.Seed``, planning-CT LPS)."""
    return small_thoracolumbar().seeds


def seed_frames(
    pose: Pose | None = None,
    seeds: tuple | None = None,
    seed: int = 0,
    detector: DetectorModel | None = None,
) -> StereoFrames:
    """A stereo pair of the small thoracolumbar phantom on the 0.8 mm seed panel, with truth.

    ``seeds`` replaces the phantom's seeds (e.g. one moved, dropped or
    added: ``dataclasses.replace(seed_phantom_seeds()[k], centre_lps_mm=...)``);
    the anatomy is unchanged, so pairs rendered with different seeds at the
    same pose and noise seed differ only around the seeds.
    """
    sim = _seed_simulator(seed_phantom_seeds() if seeds is None else tuple(seeds))
    return sim.render(Pose.identity() if pose is None else pose, seed=seed, detector=detector)


def seeds_room_mm(seeds: tuple | None = None) -> np.ndarray:
    """Room positions (mm, perfect setup) of the given seeds (default: the phantom's) in the small phantom."""
    phantom = small_thoracolumbar()
    chosen = phantom.seeds if seeds is None else seeds
    pts = np.stack([s.centre_lps_mm for s in chosen])
    return phantom.planning_ct.lps_to_room(pts, phantom.isocentre_lps_mm)
