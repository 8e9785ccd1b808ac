"""Raw kV frames: the value type and offline readers (files on disk).

A frame is the raw detector signal, ``image[row, col]``: more transmitted
photons = larger value (bone is dark), ``uint16`` or ``float32``
(docs/CONVENTIONS.md). Offline files: anything SimpleITK reads (``.mha``,
``.nrrd``, ``.tif``...), ``.npy``, and DICOM RT Image / DX.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spineguide.calibration.foundation import checked_number
from spineguide.registration.imagefile import MAX_IMAGE_BYTES, dicom_pixel_array, load_npy, read_sitk_image

from .errors import FrameError

if TYPE_CHECKING:  # annotations only: keeps SciPy (the geometry's) out of the service's frame path imports
    from spineguide.calibration.geometry import ImagerGeometry, StereoGeometry

__all__ = ["KvFrame", "read_frame", "read_stereo_frames", "parse_image_args", "check_frame_pixels"]


def check_frame_pixels(pixels: np.ndarray, imager: ImagerGeometry, where: str) -> np.ndarray:
    """Validate raw frame pixels for an imager; returns a read-only ``uint16`` or ``float32`` array.

    Raises
    ------
    FrameError
        Not 2D, size not the imager's panel, non-finite or negative values,
        or a type that is not a number.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[0] == 1:  # a one-slice volume (3D file of a single frame)
        arr = arr[0]
    if arr.ndim != 2:
        raise FrameError(f"{where}: a kV frame must be a 2D image, got shape {arr.shape}")
    if arr.shape != (imager.rows, imager.cols):
        hint = " (rows and columns swapped?)" if arr.shape == (imager.cols, imager.rows) else ""
        raise FrameError(
            f"{where}: image is {arr.shape[0]}x{arr.shape[1]} (rows x cols) but imager "
            f"'{imager.name}' has a {imager.rows}x{imager.cols} panel{hint}"
        )
    if arr.dtype == np.uint16:
        out = np.array(arr, dtype=np.uint16)
    elif np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        if np.issubdtype(arr.dtype, np.floating):
            # checked before the cast: float64 values beyond float32's range would become inf with a warning
            bad = ~np.isfinite(arr) | (np.abs(arr) > np.finfo(np.float32).max)
            if np.any(bad):
                raise FrameError(f"{where}: {int(np.count_nonzero(bad))} pixels are NaN or infinite"
                                 " (or beyond the float32 range)")
        out = np.array(arr, dtype=np.float32)
        if np.any(out < 0):
            raise FrameError(f"{where}: {int(np.count_nonzero(out < 0))} pixels are negative; a raw frame counts photons")
    else:
        raise FrameError(f"{where}: pixel type {arr.dtype} is not a number type")
    out.setflags(write=False)
    return out


@dataclass(frozen=True, slots=True)
class KvFrame:
    """One raw kV frame of one imager.

    Attributes
    ----------
    imager : str
        Imager name (as in the geometry file).
    pixels : (rows, cols) uint16 or float32, read-only
        Raw detector signal.
    i0 : float or None
        Unattenuated level (flat field) if known; None means "estimate it".
    acquired_unix_s : float or None
        Wall-clock acquisition time, if known.
    pair_id : int or None
        Stereo pair this frame belongs to (wire frames).
    source : str
        Where it came from, for messages.
    """

    imager: str
    pixels: np.ndarray
    i0: float | None = None
    acquired_unix_s: float | None = None
    pair_id: int | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.i0 is not None:
            i0 = checked_number(self.i0, FrameError, f"{self.source}: i0 must be a positive finite number, got {self.i0!r}",
                                minimum=0.0, exclusive_minimum=True)
            object.__setattr__(self, "i0", i0)


def _read_pixels(path: Path, max_bytes: int) -> np.ndarray:
    """Pixels of a frame file, its declared size checked against ``max_bytes`` before any pixel is read."""
    name = path.name.lower()
    if name.endswith(".npy"):
        return load_npy(path, FrameError, ".npy frame", max_bytes=max_bytes)
    if name.endswith(".dcm") or _looks_like_dicom(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path)
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for a broken file
            raise FrameError(f"{path}: cannot read DICOM frame: {type(err).__name__}: {err}") from err
        pixels = dicom_pixel_array(ds, path, FrameError, "DICOM frame", max_bytes=max_bytes)
        try:
            slope = float(ds.get("RescaleSlope", 1.0))
            intercept = float(ds.get("RescaleIntercept", 0.0))
        except Exception as err:  # noqa: BLE001 - pydicom parses values lazily and raises many types on bad ones
            raise FrameError(f"{path}: Rescale Slope/Intercept (0028,1053)/(0028,1052) not numeric: {err}") from err
        if not (math.isfinite(slope) and math.isfinite(intercept)):
            raise FrameError(f"{path}: Rescale Slope/Intercept {slope!r}/{intercept!r} are not finite")
        if slope != 1.0 or intercept != 0.0:
            pixels = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        return pixels
    import SimpleITK as sitk  # here, not at import: the service's frame path never reads image files

    return sitk.GetArrayFromImage(read_sitk_image(path, FrameError, "image", max_bytes=max_bytes))


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_frame(path: str | os.PathLike, imager: ImagerGeometry, i0: float | None = None, *,
               max_bytes: int = MAX_IMAGE_BYTES) -> KvFrame:
    """Read one raw frame (detector signal, ``image[row, col]``) from a file and check it against its imager.

    ``max_bytes`` bounds the pixel data the file's header may declare; it is
    checked before any pixel is read (:mod:`spineguide.registration.imagefile`).

    Raises
    ------
    FrameError
        Missing or unreadable file, a declared size above ``max_bytes`` or
        impossible for the file, wrong size for the imager, NaN or infinite
        pixels, pixel data that cannot be decoded...; the message names the file.
    """
    p = Path(path)
    if p.is_dir():
        raise FrameError(f"{p}: is a directory, not an image file")
    if not p.is_file():
        raise FrameError(f"{p}: no such image file")
    pixels = check_frame_pixels(_read_pixels(p, max_bytes), imager, str(p))
    return KvFrame(imager.name, pixels, i0=i0, source=str(p))


def parse_image_args(values: Iterable[str], option: str = "--image") -> dict[str, Path]:
    """``["A=frames/a.mha", "B=frames/b.mha"]`` -> ``{"A": Path, "B": Path}``; errors name ``option``."""
    out: dict[str, Path] = {}
    for text in values:
        name, sep, file = str(text).partition("=")
        if not sep or not name or not file:
            raise FrameError(f"{option} must be NAME=FILE, got {text!r}")
        if name in out:
            raise FrameError(f"{option} names imager '{name}' twice")
        out[name] = Path(file)
    return out


def read_stereo_frames(
    files: Mapping[str, str | os.PathLike], geometry: StereoGeometry, i0: float | None = None
) -> dict[str, KvFrame]:
    """Read one frame per imager; every imager of the geometry must have exactly one."""
    unknown = sorted(set(files) - set(geometry.names))
    if unknown:
        raise FrameError(f"images given for unknown imager(s) {unknown}; the geometry has {list(geometry.names)}")
    missing = [n for n in geometry.names if n not in files]
    if missing:
        raise FrameError(f"no image given for imager(s) {missing}")
    return {name: read_frame(files[name], geometry[name], i0) for name in geometry.names}
