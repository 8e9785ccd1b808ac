"""Which couch positions and exposures a geometry calibration takes (issue 13, ``docs/CALIBRATION.md``).

A single pose of a 150 mm phantom fixes each imager's projection well near the
isocentre but barely its source distance (magnification and perspective trade
off over the phantom's own depth): 3-20 mm of source error from the centre
position alone. The **depth protocol** adds the lever that pins it: the couch
moves the phantom along each imager's own central axis, where it stays centred
in that imager's view (the other imager, which would see it leave its field,
takes no frame there).

Room frame (IEC 61217 fixed system), mm. A couch shift is the phantom's
translation from its setup position, as ``CalibrationFrame.couch_shift_mm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import CalibrationError
from .geometry import StereoGeometry

#: Couch travel along each imager's central axis, mm: +-300 mm with two exposures halves the source's
#: along-the-axis sigma of +-200 mm with one (0.27 vs 0.57 mm; docs/CALIBRATION.md).
AXIS_SHIFT_MM = 300.0
#: Independent exposures at each along-the-axis position.
AXIS_EXPOSURES = 2
#: Couch travel along the room's Y axis (both imagers), mm.
Y_SHIFT_MM = 50.0


@dataclass(frozen=True, slots=True)
class CouchExposure:
    """One exposure of the protocol: the couch shift (room frame, mm) and the imagers that take a frame there."""

    couch_shift_mm: tuple[float, float, float]
    imagers: tuple[str, ...]

    def image_arguments(self, prefix: str = "") -> list[str]:
        """``NAME=FILE@DX,DY,DZ`` arguments of ``spineguide calibrate --image``, with placeholder file names."""
        dx, dy, dz = self.couch_shift_mm
        return [f"{name}={prefix}{name}.tif@{dx:.1f},{dy:.1f},{dz:.1f}" for name in self.imagers]


def _checked_mm(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool):
        raise CalibrationError(f"{what} must be a number (mm), got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{what} must be a number (mm), got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise CalibrationError(f"{what} must be within {lo:g}-{hi:g} mm, got {value!r}")
    return v


def depth_protocol(geometry: StereoGeometry, *, axis_shift_mm: float = AXIS_SHIFT_MM,
                   axis_exposures: int = AXIS_EXPOSURES, y_shift_mm: float = Y_SHIFT_MM) -> tuple[CouchExposure, ...]:
    """The recommended calibration acquisition for ``geometry``'s imagers.

    The centre and +-``y_shift_mm`` along room Y with every imager, then for
    each imager +-``axis_shift_mm`` along its own central axis (the unit
    normal of its panel, source towards panel), ``axis_exposures`` frames of
    that imager alone at each. With the built-in room's two 45 deg imagers
    and the defaults: 3 + 2 x 2 x 2 = 11 exposures, 7 frames per imager.

    Raises
    ------
    CalibrationError
        A shift outside 0-1000 mm, or exposures not an integer 1-10.
    """
    axis = _checked_mm(axis_shift_mm, "axis_shift_mm", 0.0, 1000.0)
    y = _checked_mm(y_shift_mm, "y_shift_mm", 0.0, 1000.0)
    if isinstance(axis_exposures, bool) or not isinstance(axis_exposures, (int, np.integer)) or not (
            1 <= axis_exposures <= 10):
        raise CalibrationError(f"axis_exposures must be an integer 1-10, got {axis_exposures!r}")
    names = tuple(geometry.names)
    out = [CouchExposure((0.0, 0.0, 0.0), names)]
    if y > 0.0:
        out += [CouchExposure((0.0, y, 0.0), names), CouchExposure((0.0, -y, 0.0), names)]
    if axis > 0.0:
        for im in geometry.imagers:
            for sign in (1.0, -1.0):
                shift = tuple(float(v) + 0.0 for v in np.round(sign * axis * np.asarray(im.normal), 6))
                out += [CouchExposure(shift, (im.name,))] * int(axis_exposures)
    return tuple(out)
