"""True room geometries that differ from the nominal one: what calibration must find."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry

__all__ = ["perturbed_imager", "perturbed_geometry"]


def _random_direction(rng: np.random.Generator, length: float) -> np.ndarray:
    v = rng.normal(size=3)
    return length * v / np.linalg.norm(v)


def perturbed_imager(
    imager: ImagerGeometry,
    rng: np.random.Generator,
    source_mm: float = 20.0,
    panel_mm: float = 10.0,
    panel_deg: float = 2.0,
) -> ImagerGeometry:
    """The imager with its source moved ``source_mm``, its panel centre ``panel_mm`` and the panel
    rotated ``panel_deg`` about its centre, each in a random direction (room frame, mm / degrees)."""
    rot = Rotation.from_rotvec(np.radians(_random_direction(rng, panel_deg))).as_matrix()
    centre = imager.pixel_to_room(np.array([(imager.cols - 1) / 2.0, (imager.rows - 1) / 2.0]))
    centre = centre + _random_direction(rng, panel_mm)
    u, v = rot @ imager.col_direction, rot @ imager.row_direction
    row_sp, col_sp = imager.pixel_spacing_mm
    origin = centre - (imager.cols - 1) / 2 * col_sp * u - (imager.rows - 1) / 2 * row_sp * v
    return ImagerGeometry(
        imager.name, imager.source_mm + _random_direction(rng, source_mm), origin, u, v,
        imager.pixel_spacing_mm, imager.rows, imager.cols,
    )


def perturbed_geometry(
    nominal: StereoGeometry,
    rng: np.random.Generator,
    source_mm: float = 20.0,
    panel_mm: float = 10.0,
    panel_deg: float = 2.0,
) -> StereoGeometry:
    """Every imager of ``nominal`` perturbed by :func:`perturbed_imager`."""
    return StereoGeometry(
        tuple(perturbed_imager(im, rng, source_mm, panel_mm, panel_deg) for im in nominal.imagers),
        nominal.calibrated_unix_s,
        "true (perturbed) room of the virtual room",
    )
