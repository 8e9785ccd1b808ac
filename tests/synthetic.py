"""Shared seeded test data with known answers: small phantoms, geometries and simulated frames.

Import from tests as ``from tests.synthetic import small_thoracolumbar, ...``.
Everything is deterministic and cached (the values are immutable), and sized
for CI: coarse phantoms (3 mm truth grid) and 128-pixel panels of 3.2 mm
(the full 41 cm panel, binned).
"""

from __future__ import annotations

import functools

import numpy as np

from calibration.geometry import StereoGeometry, default_stereo_geometry
from registration.pose import Pose
from tracking.room.kv import DetectorModel, KVSimulator, StereoFrames
from tracking.room.phantoms import Phantom, cervical_phantom, thoracolumbar_phantom

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
