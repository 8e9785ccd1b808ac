"""Built-in treatment rooms of the virtual room: the default ceiling-source room and a floor-source room.

Each room is an ordinary :class:`spineguide.calibration.geometry.StereoGeometry` (what a
``kv-geometry/1`` file holds, ``geometry.to_json()``), nominal, never
calibrated. ``ROOMS`` names them for the simulator, the benchmarks and the
tests.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from spineguide.calibration.foundation import enum_member, enum_values
from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry, default_stereo_geometry

from ..errors import SimulationError

__all__ = ["Room", "floor_source_geometry", "room_geometry"]

#: Floor-source room: source-isocentre and source-panel distances (mm), beam angle
#: from vertical and tilt towards +Y (deg), panel size and pixel pitch.
FLOOR_SOURCE_TO_ISOCENTRE_MM = 1500.0
FLOOR_SOURCE_TO_DETECTOR_MM = 2300.0
FLOOR_ANGLE_FROM_VERTICAL_DEG = 35.0
FLOOR_TILT_DEG = 8.0
FLOOR_PANEL_PIXELS = 1024
FLOOR_PIXEL_SPACING_MM = 0.3


class Room(Enum):
    """The built-in rooms."""

    DEFAULT = "default"
    FLOOR = "floor"


def floor_source_geometry(
    panel_pixels: int = FLOOR_PANEL_PIXELS, pixel_spacing_mm: float = FLOOR_PIXEL_SPACING_MM
) -> StereoGeometry:
    """A room unlike the default one: floor sources, ceiling panels, beams tilted along the couch.

    Modelled loosely on floor-mounted tube / ceiling-mounted panel stereo
    systems (the ExacTrac layout: Jin et al., Med. Dosim. 33(2) 2008): two
    sources below the couch at 35 degrees from vertical either side of the
    isocentre (70 degrees between the beams), both beams tilted 8 degrees
    towards +Y (the gantry), source-isocentre 1500 mm, source-panel 2300 mm
    (magnification 1.53), panels of 0.3 mm pixels (0.196 mm at the
    isocentre). Nominal figures, not a vendor's specification.

    Imager ``A``'s source is on the room -X side (below the couch), ``B`` the
    mirror image at +X; rows run along the panel's projection of +Y and
    ``col x row`` points from the source to the panel.

    Parameters
    ----------
    panel_pixels : int
        Rows and columns of each panel.
    pixel_spacing_mm : float
        Pixel pitch on the panel, mm.
    """
    sad, sid = FLOOR_SOURCE_TO_ISOCENTRE_MM, FLOOR_SOURCE_TO_DETECTOR_MM
    ang, tilt = math.radians(FLOOR_ANGLE_FROM_VERTICAL_DEG), math.radians(FLOOR_TILT_DEG)
    imagers = []
    for name, side in (("A", -1.0), ("B", 1.0)):
        # Unit vector from the isocentre to the source: below the couch, to `side`, and back along -Y by the tilt.
        towards = np.array([side * math.sin(ang) * math.cos(tilt), -math.sin(tilt), -math.cos(ang) * math.cos(tilt)])
        source = sad * towards
        n = -towards
        y = np.array([0.0, 1.0, 0.0])
        v = y - (y @ n) * n
        v /= np.linalg.norm(v)
        u = np.cross(v, n)
        centre = source + sid * n
        half = (panel_pixels - 1) / 2.0
        origin = centre - half * pixel_spacing_mm * u - half * pixel_spacing_mm * v
        imagers.append(ImagerGeometry(name, source, origin, u, v, (pixel_spacing_mm, pixel_spacing_mm),
                                      panel_pixels, panel_pixels))
    return StereoGeometry(
        tuple(imagers),
        0.0,
        "spineguide floor-source room: floor sources at 35 deg from vertical, 70 deg apart, tilted 8 deg towards "
        f"+Y; source-isocentre {sad:g} mm, source-panel {sid:g} mm; {panel_pixels}x{panel_pixels} pixels of "
        f"{pixel_spacing_mm:g} mm (nominal, not calibrated)",
    )


def room_geometry(room: Room | str, panel_pixels: int | None = None) -> StereoGeometry:
    """The geometry of a built-in room (``"default"`` or ``"floor"``), optionally with smaller panels.

    A smaller panel keeps the room's physical pixel pitch (fast tests).

    Raises
    ------
    SimulationError
        Unknown room name.
    """
    room = enum_member(Room, room, SimulationError, f"unknown room {room!r} (known: {', '.join(enum_values(Room))})")
    if room is Room.DEFAULT:
        return default_stereo_geometry() if panel_pixels is None else default_stereo_geometry(panel_pixels)
    return floor_source_geometry() if panel_pixels is None else floor_source_geometry(panel_pixels)
