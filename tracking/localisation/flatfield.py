"""Panel flat-field (gain) and dark (offset) correction of raw kV frames.

A flat panel reads ``raw = gain * signal + offset`` per pixel: the offset
(dark) map is what the panel reads with the beam off, the gain map its
relative response to a uniform beam (mean about 1). A clinic's panel
calibration records both; the correction ``signal = (raw - offset) / gain``
undoes them exactly, and pixels the calibration marks bad (a gain of 0, or a
given defect mask: dead lines) are returned as a defect mask for the
detector to inpaint (``FlatField.correct`` inpaints them itself, for the
anatomy registration, which compares whole image regions). Maps are
``map[row, col]``, in the frame's counts.

Maps come from any file SimpleITK reads or ``.npy`` (``read_flat_field``),
named per imager in the ``kv-geometry/1`` file's optional ``flat_field``
extension object (``gain``, ``offset`` and ``defects``: non-zero = a bad
pixel) or on the command line (``--gain A=FILE --offset A=FILE``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import FrameError
from ..frames import parse_image_args
from ._kernels import flat_correct

__all__ = ["FlatField", "correct_frames", "flat_fields_from_args", "flat_fields_from_geometry_json", "read_flat_field", "read_map"]

#: Gains at or below this are a pixel the calibration could not measure (dead): a defect, not a division.
MIN_GAIN = 1e-3


@dataclass(frozen=True, slots=True)
class FlatField:
    """Gain and offset maps of one imager, ``map[row, col]``.

    Attributes
    ----------
    imager : str
    gain : (rows, cols) float32 array or None
        Relative response (mean about 1); None for a unit gain.
    offset_counts : (rows, cols) float32 array or None
        Dark signal, counts; None for zero.
    defects : (rows, cols) bool array or None
        Pixels to inpaint (dead lines, gains below ``MIN_GAIN``).
    """

    imager: str
    gain: np.ndarray | None = None
    offset_counts: np.ndarray | None = None
    defects: np.ndarray | None = None
    # Derived once: 1 / gain (a multiply per pixel, not a divide) and the defect tiles that ``correct`` inpaints.
    _inv_gain: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _tiles: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = None
        bad = None
        for name in ("gain", "offset_counts"):
            m = getattr(self, name)
            if m is None:
                continue
            arr = np.array(m, dtype=np.float32)
            if arr.ndim != 2:
                raise FrameError(f"imager '{self.imager}': {name} map must be 2D (rows, cols), got shape {arr.shape}")
            if shape is not None and arr.shape != shape:
                raise FrameError(f"imager '{self.imager}': gain {shape} and offset {arr.shape} maps differ in shape")
            shape = arr.shape
            finite = np.isfinite(arr)
            if not finite.all():
                raise FrameError(f"imager '{self.imager}': {name} map holds {int((~finite).sum())} non-finite values")
            if name == "gain":
                if np.any(arr < 0):
                    raise FrameError(f"imager '{self.imager}': gain map holds negative values (min {arr.min():g})")
                bad = arr <= MIN_GAIN
                arr[bad] = 1.0
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        defects = self.defects
        if defects is not None:
            defects = np.array(defects, dtype=bool)
            if defects.ndim != 2 or (shape is not None and defects.shape != shape):
                raise FrameError(f"imager '{self.imager}': defect map {defects.shape} does not match the maps {shape}")
        if bad is not None and bad.any():
            defects = bad if defects is None else defects | bad
        if defects is not None:
            defects.setflags(write=False)
        object.__setattr__(self, "defects", defects)
        if self.gain is not None:
            inv = (np.float32(1.0) / self.gain).astype(np.float32)
            inv.setflags(write=False)
            object.__setattr__(self, "_inv_gain", inv)
        if defects is not None and defects.any() and not defects.all():
            object.__setattr__(self, "_tiles", _defect_tiles(defects))

    @property
    def shape(self) -> tuple[int, int] | None:
        for m in (self.gain, self.offset_counts, self.defects):
            if m is not None:
                return m.shape
        return None

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """The corrected signal ``(raw - offset) / gain`` of a raw frame, float32, clipped below at 0.

        Raises
        ------
        FrameError
            Frame shape different from the maps.
        """
        raw = np.asarray(frame)
        shape = self.shape
        if shape is not None and raw.shape != shape:
            raise FrameError(f"imager '{self.imager}': frame {raw.shape} does not match its flat-field maps {shape}")
        if self.offset_counts is None and self._inv_gain is None:
            return np.maximum(raw.astype(np.float32), np.float32(0.0))  # a copy
        return flat_correct(raw, _UNUSED_MAP if self.offset_counts is None else self.offset_counts,
                            _UNUSED_MAP if self._inv_gain is None else self._inv_gain,
                            self.offset_counts is not None, self._inv_gain is not None)

    def correct(self, frame: np.ndarray) -> np.ndarray:
        """:meth:`apply`, then the defect pixels filled from their neighbours (OpenCV inpainting,
        Navier-Stokes, 2 px radius: on a smooth signal within 1% where Telea's was 6%): a frame whose dead
        lines no longer draw edges, float32 counts, ``[row, col]``.

        For methods that compare whole image regions (the anatomy registration); the fiducial
        detector takes the defect mask instead and inpaints only its windows.
        """
        out = self.apply(frame)
        if self.defects is not None and self.defects.any():
            if self.defects.all():
                raise FrameError(f"imager '{self.imager}': every pixel is marked defective")
            # Each dead line, and each group of other defects, is inpainted in its own region (``_defect_tiles``).
            for (r0, r1, c0, c1), inpaint, keep in self._tiles:
                tile = out[r0:r1, c0:c1]
                filled = cv2.inpaint(tile, inpaint, INPAINT_RADIUS_PX, cv2.INPAINT_NS)
                np.copyto(tile, filled, where=keep.view(bool))
        return out


#: Inpainting radius (px) of ``FlatField.correct`` and the margin its tiles keep around each group of defects.
INPAINT_RADIUS_PX = 2
# Stands in for a map a FlatField does not have (never read).
_UNUSED_MAP = np.zeros((1, 1), np.float32)
_TILE_MARGIN_PX = 5 * INPAINT_RADIUS_PX  # NS inpainting reads up to ~4 radii away: 2r + 2 was not enough


def _defect_tiles(defects: np.ndarray) -> tuple:
    """The regions ``FlatField.correct`` inpaints one by one, in order: ``((r0, r1, c0, c1), inpaint, keep)``,
    two uint8 masks on the region: the pixels the inpainting fills (every defect not filled by an earlier
    region) and those of its result kept.

    A dead line (a row or column more than half defective) gets a strip the line's width plus
    ``_TILE_MARGIN_PX`` either side, across the frame, rows first; a row strip keeps the defects within
    ``INPAINT_RADIUS_PX`` of its rows (a crossing column's pixels there too: further out the strip cuts the
    column's context), a column strip the rest of its column. The defects left (pixels, clusters) get the
    bounding box of each group whose margins touch, grown by the margin. Every defect pixel is kept from
    exactly one region. What the inpainting reads around a kept pixel lies inside its region, so a frame with
    dead lines costs the lines' strips, not the whole frame.
    """
    rows, cols = defects.shape
    m, r = _TILE_MARGIN_PX, INPAINT_RADIUS_PX
    tiles = []
    dead_rows = defects.mean(axis=1) > 0.5
    dead_cols = defects.mean(axis=0) > 0.5
    left = defects.copy()  # defects not kept from any region yet
    for axis, dead in ((0, dead_rows), (1, dead_cols)):
        idx = np.flatnonzero(dead)
        if idx.size == 0:
            continue
        # runs of dead lines, merged when their strips would overlap
        runs = [[int(idx[0]), int(idx[0])]]
        for k in idx[1:]:
            if k - runs[-1][1] > 2 * m:
                runs.append([int(k), int(k)])
            else:
                runs[-1][1] = int(k)
        n = defects.shape[axis]
        for lo, hi in runs:
            a0, a1 = max(0, lo - m), min(n, hi + m + 1)
            box = (a0, a1, 0, cols) if axis == 0 else (0, rows, a0, a1)
            region = np.s_[box[0] : box[1], box[2] : box[3]]
            inpaint = left[region].copy()
            keep = inpaint.copy()
            if axis == 0:  # keep the rows' own band; a crossing column further out waits for its strip
                k0, k1 = max(0, lo - r) - a0, min(n, hi + r + 1) - a0
                keep[:k0, :] = False
                keep[k1:, :] = False
            tiles.append((box, inpaint, keep))
            left[region] &= ~keep
    if left.any():
        grown = cv2.dilate(left.astype(np.uint8), np.ones((2 * m + 1,) * 2, np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(grown, connectivity=8)
        for k in range(1, n):
            c0, r0, w, h = (int(v) for v in stats[k, :4])
            region = np.s_[r0 : r0 + h, c0 : c0 + w]
            # Two groups' bounding boxes may overlap although their grown pixels do not: each region fills
            # every defect not kept yet in its box (none is read as signal) and keeps only its own group's.
            inpaint = left[region].copy()
            keep = inpaint & (labels[region] == k)
            tiles.append(((r0, r0 + h, c0, c0 + w), inpaint, keep))
            left[region] &= ~keep
    out = []
    for box, inpaint, keep in tiles:
        if keep.any():
            masks = tuple(np.ascontiguousarray(x, dtype=np.uint8) for x in (inpaint, keep))
            for x in masks:
                x.setflags(write=False)
            out.append((box, *masks))
    return tuple(out)


def correct_frames(flat_fields: Mapping[str, FlatField] | None, frames: Mapping[str, np.ndarray]) -> dict:
    """Imager -> :meth:`FlatField.correct` of its frame, or the frame as given when it has no flat field."""
    flat = flat_fields or {}
    return {name: flat[name].correct(frame) if name in flat else frame for name, frame in frames.items()}


def read_map(path: str | os.PathLike, what: str, imager: str) -> np.ndarray:
    """A 2D map from ``.npy`` or any image SimpleITK reads, ``map[row, col]`` float32."""
    from spineguide.registration.imagefile import (  # declared size checked before reading
        load_npy,
        read_sitk_image,
    )

    p = Path(path)
    try:
        if p.suffix.lower() == ".npy":
            arr = load_npy(p, FrameError, f"{what} map")
        else:
            import SimpleITK as sitk

            arr = sitk.GetArrayFromImage(read_sitk_image(p, FrameError, f"{what} map"))
    except FrameError as err:
        raise FrameError(f"imager '{imager}': cannot read {what} map {str(p)!r}: {err}") from err
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim != 2:
        raise FrameError(f"imager '{imager}': {what} map {str(p)!r} is not a 2D image (shape {arr.shape})")
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > np.finfo(np.float32).max):
        raise FrameError(f"imager '{imager}': {what} map {str(p)!r} holds NaN, infinite or out-of-range values")
    return arr.astype(np.float32)


def read_flat_field(imager: str, gain_path: str | os.PathLike | None = None,
                    offset_path: str | os.PathLike | None = None,
                    defects_path: str | os.PathLike | None = None) -> FlatField:
    """The flat field of one imager from a gain and/or an offset map file, and a defect map (non-zero = bad)."""
    gain = None if gain_path is None else read_map(gain_path, "gain", imager)
    offset = None if offset_path is None else read_map(offset_path, "offset", imager)
    defects = None if defects_path is None else read_map(defects_path, "defect", imager) != 0
    if defects is not None and gain is None and offset is None:
        raise FrameError(f"imager '{imager}': a defect map needs a gain or an offset map with it")
    return FlatField(imager, gain, offset, defects)


def flat_fields_from_geometry_json(obj: Mapping, base_dir: str | os.PathLike = ".") -> dict[str, FlatField]:
    """Flat fields named in a ``kv-geometry/1`` document's optional extension.

    ``{"flat_field": {"A": {"gain": "gainA.npy", "offset": "darkA.npy", "defects": "deadA.npy"}}}``
    (``defects`` optional: non-zero marks a pixel the panel cannot read);
    relative paths are taken from ``base_dir`` (the geometry file's folder).
    Readers of the geometry that do not know the field ignore it (CONVENTIONS).
    """
    ext = obj.get("flat_field")
    if ext is None:
        return {}
    if not isinstance(ext, Mapping):
        raise FrameError(f"kv-geometry flat_field must be an object of imager -> maps, got {type(ext).__name__}")
    out = {}
    for name, entry in ext.items():
        if not isinstance(entry, Mapping) or not set(entry) <= {"gain", "offset", "defects"} or \
                not set(entry) & {"gain", "offset"} or not all(isinstance(v, str) and v for v in entry.values()):
            raise FrameError(f"kv-geometry flat_field['{name}'] must hold 'gain' and/or 'offset' paths "
                             f"(and optionally 'defects'), got {entry!r}")
        paths = {k: Path(base_dir) / str(v) for k, v in entry.items()}
        out[str(name)] = read_flat_field(str(name), paths.get("gain"), paths.get("offset"), paths.get("defects"))
    return out


def flat_fields_from_geometry_file(path: str | os.PathLike) -> dict[str, FlatField]:
    """Flat fields named in a ``kv-geometry/1`` file (:func:`flat_fields_from_geometry_json` of its document, map
    paths relative to the file's folder); empty when it names none.

    Raises
    ------
    GeometryFileError
        The file cannot be read as JSON.
    FrameError
        A bad ``flat_field`` entry or map.
    """
    from spineguide.calibration.errors import GeometryFileError
    from spineguide.calibration.jsonfile import read_json_document

    path = Path(path)
    doc = read_json_document(path, GeometryFileError, "geometry file")
    return flat_fields_from_geometry_json(doc, path.parent) if isinstance(doc, Mapping) else {}


def flat_fields_from_args(gains, offsets, known: Mapping[str, FlatField] | None = None) -> dict[str, FlatField]:
    """Flat fields from ``--gain NAME=FILE`` / ``--offset NAME=FILE`` options, over ``known`` ones (geometry file)."""
    gain, offset = parse_image_args(gains or (), "--gain"), parse_image_args(offsets or (), "--offset")
    out = dict(known or {})
    for name in sorted(set(gain) | set(offset)):
        base = out.get(name)
        g = read_map(gain[name], "gain", name) if name in gain else (None if base is None else base.gain)
        o = read_map(offset[name], "offset", name) if name in offset else (None if base is None else base.offset_counts)
        out[name] = FlatField(name, g, o, None if base is None else base.defects)
    return out
