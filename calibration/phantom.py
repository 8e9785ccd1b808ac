"""BB calibration phantoms: the ``bb-phantom/1`` file format and the built-in default.

A phantom is a set of small radio-opaque spheres (BBs) whose centres are known
in the room frame (IEC 61217, mm) with the phantom at its nominal place: the
centre marker sits at the isocentre (``docs/CONVENTIONS.md``). The phantom
is set up with lasers or a Winston-Lutz test; the measured offset of the
centre BB from the MV isocentre, when known, is carried as
``centre_offset_mm`` (room frame, mm) and is added to every marker.

File format (JSON)::

    {"schema": "bb-phantom/1",
     "name": "optional label",
     "centre_offset_mm": [0, 0, 0],          # optional, room frame, mm
     "markers": [{"name": "C", "position_mm": [0, 0, 0],
                  "diameter_mm": 2.0, "material": "tungsten"}, ...],
     "body": {"shape": "box", "size_mm": [150, 150, 150],     # optional
              "material": "pmma", "centre_mm": [0, 0, 0],
              "features": [{"shape": "cylinder", "material": "air",
                            "centre_mm": [30, 0, 0], "axis": [0, 0, 1],
                            "radius_mm": 10, "length_mm": 150}]}}

``body`` (optional; files without it stay valid and mean "body not
modelled") describes the block that holds the BBs, in the same frame as the
markers: an axis-aligned ``box`` (``size_mm``, full edge lengths) or a
``cylinder`` (``radius_mm``, ``length_mm``, ``axis``), of a body material
(:data:`BODY_MATERIALS`), with optional ``features``: holes (material
``air``) and inserts (another material), each a box or cylinder that replaces
the body material where it lies.

Unknown top-level fields are ignored (as every reader of our formats does);
anything malformed raises :class:`PhantomFileError` naming the file, the
marker and the value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import PhantomError, PhantomFileError
from .jsonfile import parse_json_bytes, read_json_document, write_json_document
from .foundation import checked_number
from .foundation import readonly_array as _readonly

__all__ = [
    "PHANTOM_SCHEMA",
    "MIN_MARKERS",
    "MIN_OUT_OF_PLANE_MM",
    "PhantomError",
    "PhantomFileError",
    "Marker",
    "BBPhantom",
    "phantom_from_json",
    "read_phantom",
    "write_phantom",
    "default_phantom",
    "BODY_MATERIALS",
    "BodyPart",
    "PhantomBody",
]

#: Materials a phantom body or its features may be made of (``air`` for holes).
BODY_MATERIALS = ("pmma", "water", "cortical_bone", "air")
_BODY_SHAPES = ("box", "cylinder")

PHANTOM_SCHEMA = "bb-phantom/1"

#: Fewest markers a phantom may have: a 3x4 projection matrix has 11 degrees of
#: freedom and each marker gives two equations, so the linear (DLT) start needs
#: six; fewer leaves nothing to check the fit with.
MIN_MARKERS = 6

#: Smallest RMS distance of the markers from their best-fitting plane, mm. A
#: (nearly) coplanar set of points leaves the depth column of the projection
#: matrix undetermined (the DLT system becomes rank deficient), so the source
#: distance cannot be found. 5 mm is 4 % of the 120 mm default phantom's size.
MIN_OUT_OF_PLANE_MM = 5.0

#: The centre marker is the one at the origin, within this distance, mm.
_CENTRE_TOL_MM = 1e-6


def _vec3(value, what: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PhantomError(f"{what} must be 3 numbers, got {value!r}") from err
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise PhantomError(f"{what} must be 3 finite numbers, got {np.asarray(value).tolist()}")
    return arr


def _positive(value, what: str) -> float:
    return checked_number(value, PhantomError, f"{what} must be a positive number, got {value!r}", minimum=0.0,
                          exclusive_minimum=True)


@dataclass(frozen=True, slots=True)
class BodyPart:
    """A box or a cylinder of one material, in the markers' frame (room frame, phantom at its nominal place, mm).

    Parameters
    ----------
    shape : str
        ``"box"`` (axis-aligned, full edge lengths ``size_mm``) or
        ``"cylinder"`` (``radius_mm``, ``length_mm`` along the unit ``axis``, flat caps).
    material : str
        One of :data:`BODY_MATERIALS`.
    centre_mm : (3,) array
        Centre of the box or of the cylinder's axis segment, mm.
    size_mm : (3,) array
        Box edge lengths along x, y, z, mm (boxes only).
    radius_mm, length_mm : float
        Cylinder radius and length, mm (cylinders only).
    axis : (3,) array
        Cylinder axis (normalised on construction).
    """

    shape: str
    material: str
    centre_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    size_mm: np.ndarray | None = None
    radius_mm: float = 0.0
    length_mm: float = 0.0
    axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))

    def __post_init__(self) -> None:
        if self.shape not in _BODY_SHAPES:
            raise PhantomError(f"body shape must be one of {', '.join(_BODY_SHAPES)}, got {self.shape!r}")
        if self.material not in BODY_MATERIALS:
            raise PhantomError(f"body material must be one of {', '.join(BODY_MATERIALS)}, got {self.material!r}")
        object.__setattr__(self, "centre_mm", _readonly(_vec3(self.centre_mm, "body centre_mm")))
        if self.shape == "box":
            size = _vec3(self.size_mm, "box size_mm")
            if np.any(size <= 0):
                raise PhantomError(f"box size_mm must be positive, got {size.tolist()}")
            object.__setattr__(self, "size_mm", _readonly(size))
        else:
            object.__setattr__(self, "radius_mm", _positive(self.radius_mm, "cylinder radius_mm"))
            object.__setattr__(self, "length_mm", _positive(self.length_mm, "cylinder length_mm"))
            axis = _vec3(self.axis, "cylinder axis")
            norm = float(np.linalg.norm(axis))
            if not norm > 1e-9:
                raise PhantomError("cylinder axis must not be zero")
            object.__setattr__(self, "axis", _readonly(axis / norm))

    def contains(self, points_mm) -> np.ndarray:
        """(N,) bool: which points (same frame, mm) lie inside the part."""
        p = np.atleast_2d(np.asarray(points_mm, dtype=np.float64)) - self.centre_mm
        if self.shape == "box":
            return np.all(np.abs(p) <= self.size_mm / 2.0, axis=1)
        along = p @ self.axis
        radial = np.linalg.norm(p - along[:, None] * self.axis, axis=1)
        return (np.abs(along) <= self.length_mm / 2.0) & (radial <= self.radius_mm)

    def to_json(self) -> dict:
        out = {"shape": self.shape, "material": self.material, "centre_mm": self.centre_mm.tolist()}
        if self.shape == "box":
            out["size_mm"] = self.size_mm.tolist()
        else:
            out.update(radius_mm=self.radius_mm, length_mm=self.length_mm, axis=self.axis.tolist())
        return out

    @classmethod
    def from_json(cls, obj, what: str) -> "BodyPart":
        if not isinstance(obj, dict):
            raise PhantomError(f"{what} must be an object, got {type(obj).__name__}")
        shape = obj.get("shape")
        try:
            if shape == "box":
                return cls("box", obj.get("material"), obj.get("centre_mm", [0.0, 0.0, 0.0]), obj.get("size_mm"))
            return cls(shape, obj.get("material"), obj.get("centre_mm", [0.0, 0.0, 0.0]), None,
                       obj.get("radius_mm"), obj.get("length_mm"), obj.get("axis", [0.0, 0.0, 1.0]))
        except PhantomError as err:
            raise PhantomError(f"{what}: {err}") from err


@dataclass(frozen=True, slots=True)
class PhantomBody:
    """The block that holds the BBs: an outer part and features (holes, inserts) that replace its material.

    Frame: the markers' (room frame with the phantom at its nominal place), mm.
    The outer part may not be ``air``; features must lie inside it (their
    centres, at least) and do not overlap each other's centres.
    """

    outer: BodyPart
    features: tuple[BodyPart, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.outer, BodyPart):
            raise PhantomError(f"body outer part must be a BodyPart, got {type(self.outer).__name__}")
        if self.outer.material == "air":
            raise PhantomError("the body itself cannot be air")
        feats = tuple(self.features)
        for i, f in enumerate(feats):
            if not isinstance(f, BodyPart):
                raise PhantomError(f"body features[{i}] must be a BodyPart, got {type(f).__name__}")
            if not bool(self.outer.contains(f.centre_mm)[0]):
                raise PhantomError(f"body features[{i}] ({f.shape}, {f.material}): its centre "
                                   f"{f.centre_mm.tolist()} lies outside the body")
        object.__setattr__(self, "features", feats)

    def to_json(self) -> dict:
        out = self.outer.to_json()
        out["features"] = [f.to_json() for f in self.features]
        return out

    @classmethod
    def from_json(cls, obj) -> "PhantomBody":
        if not isinstance(obj, dict):
            raise PhantomError(f"'body' must be an object, got {type(obj).__name__}")
        feats = obj.get("features", [])
        if not isinstance(feats, list):
            raise PhantomError("body 'features' must be a list")
        outer = BodyPart.from_json({k: v for k, v in obj.items() if k != "features"}, "body")
        return cls(outer, tuple(BodyPart.from_json(f, f"body features[{i}]") for i, f in enumerate(feats)))


@dataclass(frozen=True, slots=True)
class Marker:
    """One BB of a phantom.

    Parameters
    ----------
    name : str
        Unique label (``"C"`` for the centre marker of the default phantom).
    position_mm : (3,) array
        Centre of the sphere, room frame, mm, phantom at its nominal place.
    diameter_mm : float
        Sphere diameter, mm.
    material : str
        Material name as the attenuation tables know it (``"tungsten"``,
        ``"steel"``, ``"gold"``...).
    """

    name: str
    position_mm: np.ndarray
    diameter_mm: float
    material: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PhantomError(f"marker name must be a non-empty string, got {self.name!r}")
        pos = np.array(self.position_mm, dtype=np.float64)
        if pos.shape != (3,):
            raise PhantomError(f"marker '{self.name}': position_mm must be 3 numbers, got shape {pos.shape}")
        if not np.all(np.isfinite(pos)):
            raise PhantomError(f"marker '{self.name}': position_mm is not finite: {pos.tolist()}")
        d = self.diameter_mm
        if isinstance(d, bool) or not isinstance(d, (int, float, np.floating, np.integer)) or not math.isfinite(d) or d <= 0:
            raise PhantomError(f"marker '{self.name}': diameter_mm must be a positive number, got {d!r}")
        if not isinstance(self.material, str) or not self.material:
            raise PhantomError(f"marker '{self.name}': material must be a non-empty string, got {self.material!r}")
        object.__setattr__(self, "position_mm", _readonly(pos))
        object.__setattr__(self, "diameter_mm", float(d))


@dataclass(frozen=True, slots=True)
class BBPhantom:
    """A calibration phantom: markers in the room frame at the phantom's nominal place.

    Parameters
    ----------
    markers : tuple of Marker
        At least :data:`MIN_MARKERS`, unique names, no two spheres touching,
        not coplanar, exactly one at the origin (the centre marker).
    name : str
        Label for reports and provenance.
    centre_offset_mm : (3,) array
        Measured offset of the centre BB from the MV isocentre (e.g. from a
        Winston-Lutz test), room frame, mm. Zero when not measured.
    body : PhantomBody, optional
        The block holding the BBs (markers' frame); None when not modelled.

    Raises
    ------
    PhantomError
        If any of the conditions above does not hold.
    """

    markers: tuple[Marker, ...]
    name: str = "bb-phantom"
    centre_offset_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    body: PhantomBody | None = None
    _positions: np.ndarray = field(init=False, repr=False, compare=False)
    _centre_index: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        markers = tuple(self.markers)
        for m in markers:
            if not isinstance(m, Marker):
                raise PhantomError(f"phantom '{self.name}': markers must be Marker values, got {type(m).__name__}")
        if len(markers) < MIN_MARKERS:
            raise PhantomError(
                f"phantom '{self.name}': {len(markers)} markers, at least {MIN_MARKERS} are needed "
                "(a projection matrix has 11 degrees of freedom, two per marker)"
            )
        names = [m.name for m in markers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PhantomError(f"phantom '{self.name}': duplicate marker names {dupes}")
        pos = np.stack([m.position_mm for m in markers])
        at_origin = np.flatnonzero(np.linalg.norm(pos, axis=1) <= _CENTRE_TOL_MM)
        if len(at_origin) != 1:
            raise PhantomError(
                f"phantom '{self.name}': exactly one marker must sit at the isocentre [0, 0, 0] "
                f"(the centre marker), found {len(at_origin)}"
            )
        dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        reach = np.array([m.diameter_mm for m in markers])
        touch = dist < (reach[:, None] + reach[None]) / 2.0
        np.fill_diagonal(touch, False)
        if np.any(touch):
            i, j = np.argwhere(touch)[0]
            raise PhantomError(
                f"phantom '{self.name}': markers '{names[i]}' and '{names[j]}' overlap "
                f"(centres {dist[i, j]:.3f} mm apart)"
            )
        out_of_plane = float(np.linalg.svd(pos - pos.mean(axis=0), compute_uv=False)[-1] / math.sqrt(len(pos)))
        if out_of_plane < MIN_OUT_OF_PLANE_MM:
            raise PhantomError(
                f"phantom '{self.name}': markers are (nearly) coplanar: RMS distance from their best plane "
                f"{out_of_plane:.3f} mm, at least {MIN_OUT_OF_PLANE_MM} mm is needed to fix the source distance"
            )
        offset = np.array(self.centre_offset_mm, dtype=np.float64)
        if offset.shape != (3,) or not np.all(np.isfinite(offset)):
            raise PhantomError(
                f"phantom '{self.name}': centre_offset_mm must be 3 finite numbers, got {np.asarray(self.centre_offset_mm).tolist()}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise PhantomError(f"phantom name must be a non-empty string, got {self.name!r}")
        if self.body is not None and not isinstance(self.body, PhantomBody):
            raise PhantomError(f"phantom '{self.name}': body must be a PhantomBody, got {type(self.body).__name__}")
        object.__setattr__(self, "markers", markers)
        object.__setattr__(self, "centre_offset_mm", _readonly(offset))
        object.__setattr__(self, "_positions", _readonly(pos))
        object.__setattr__(self, "_centre_index", int(at_origin[0]))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.markers)

    @property
    def n_markers(self) -> int:
        return len(self.markers)

    @property
    def positions_mm(self) -> np.ndarray:
        """(N, 3) nominal marker centres, room frame, mm (without ``centre_offset_mm``)."""
        return self._positions

    @property
    def diameters_mm(self) -> np.ndarray:
        """(N,) sphere diameters, mm."""
        return _readonly([m.diameter_mm for m in self.markers])

    @property
    def materials(self) -> tuple[str, ...]:
        return tuple(m.material for m in self.markers)

    @property
    def centre_index(self) -> int:
        """Index of the centre marker (the one at the isocentre)."""
        return self._centre_index

    def placed_mm(self, couch_shift_mm=(0.0, 0.0, 0.0), rotation: np.ndarray | None = None) -> np.ndarray:
        """Marker centres in the room frame with the phantom as set up, mm.

        Parameters
        ----------
        couch_shift_mm : (3,) array
            Known couch translation applied after setup, room frame, mm.
        rotation : (3, 3) array, optional
            Rotation of the phantom about its centre marker (room frame).

        Returns
        -------
        (N, 3) array
            ``R p + centre_offset_mm + couch_shift_mm`` for every marker ``p``.
        """
        shift = np.asarray(couch_shift_mm, dtype=np.float64)
        if shift.shape != (3,) or not np.all(np.isfinite(shift)):
            raise PhantomError(f"couch_shift_mm must be 3 finite numbers, got {np.asarray(couch_shift_mm).tolist()}")
        pos = self._positions if rotation is None else self._positions @ np.asarray(rotation, dtype=np.float64).T
        return pos + self.centre_offset_mm + shift

    def to_json(self) -> dict:
        """The ``bb-phantom/1`` document."""
        doc = {
            "schema": PHANTOM_SCHEMA,
            "name": self.name,
            "centre_offset_mm": self.centre_offset_mm.tolist(),
            "markers": [
                {"name": m.name, "position_mm": m.position_mm.tolist(), "diameter_mm": m.diameter_mm, "material": m.material}
                for m in self.markers
            ],
        }
        if self.body is not None:
            doc["body"] = self.body.to_json()
        return doc


def phantom_from_json(obj) -> BBPhantom:
    """Build a :class:`BBPhantom` from a parsed ``bb-phantom/1`` document.

    Raises
    ------
    PhantomFileError
        Unknown schema, missing or malformed fields; the message names the marker.
    """
    if not isinstance(obj, dict):
        raise PhantomFileError(f"a bb-phantom document must be a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if schema != PHANTOM_SCHEMA:
        raise PhantomFileError(f"unknown phantom schema {schema!r}, expected '{PHANTOM_SCHEMA}'")
    entries = obj.get("markers")
    if not isinstance(entries, list):
        raise PhantomFileError("'markers' must be a list of marker objects")
    name = obj.get("name", "bb-phantom")
    markers = []
    try:
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise PhantomFileError(f"markers[{i}] must be an object, got {type(entry).__name__}")
            missing = [k for k in ("name", "position_mm", "diameter_mm", "material") if k not in entry]
            if missing:
                raise PhantomFileError(f"markers[{i}] ({entry.get('name', '?')!s}): missing {', '.join(missing)}")
            try:
                position = np.array(entry["position_mm"], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise PhantomFileError(
                    f"marker '{entry['name']}': position_mm must be 3 numbers, got {entry['position_mm']!r}"
                ) from err
            markers.append(Marker(entry["name"], position, entry["diameter_mm"], entry["material"]))
        offset = obj.get("centre_offset_mm", [0.0, 0.0, 0.0])
        try:
            offset = np.array(offset, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise PhantomFileError(f"centre_offset_mm must be 3 numbers, got {offset!r}") from err
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            body = PhantomBody.from_json(obj["body"]) if obj.get("body") is not None else None
            return BBPhantom(tuple(markers), name, offset, body)
    except PhantomFileError:
        raise
    except PhantomError as err:
        raise PhantomFileError(str(err)) from err
    except FloatingPointError as err:  # e.g. a 1e308 coordinate: refused, never an inf passed on
        raise PhantomFileError(f"phantom '{name}': numbers out of range ({err})") from err


def read_phantom(path: str | os.PathLike) -> BBPhantom:
    """Read a ``bb-phantom/1`` JSON file. Errors name the file and the marker."""
    path = Path(path)
    obj = read_json_document(path, PhantomFileError, "phantom file")
    try:
        return phantom_from_json(obj)
    except PhantomFileError as err:
        raise PhantomFileError(f"{path}: {err}") from err


def write_phantom(phantom: BBPhantom, path: str | os.PathLike) -> Path:
    """Write a phantom as ``bb-phantom/1`` (atomically); returns the path."""
    return write_json_document(phantom.to_json(), path)


def default_phantom() -> BBPhantom:
    """The built-in phantom: 16 tungsten BBs of 2 mm in a 120 mm cube, one at the centre.

    The layout (``calibration/data/default-bb-phantom.json``) was chosen by a
    seeded search on a 1 mm grid so that, in the default room
    (:func:`spineguide.calibration.geometry.default_stereo_geometry`), every two markers'
    projections lie at least 14 mm apart (at isocentre scale) in both imagers;
    it has no symmetry, so its two views and any rotated copy are told apart.
    """
    raw = resources.files("spineguide.calibration").joinpath("data/default-bb-phantom.json").read_bytes()
    return phantom_from_json(parse_json_bytes(raw, "calibration/data/default-bb-phantom.json", PhantomFileError))
