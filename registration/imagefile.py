"""Image and volume files read with their declared size checked first (CT volumes, masks, kV frames).

A file header can declare any size: a 2 MB ``.mha`` that declares a 2.4 GB
volume must be refused with a message naming the file, not end in a memory
error. Each reader here reads the header alone first (SimpleITK
``ReadImageInformation``, ``numpy.lib.format`` for ``.npy``, the DICOM
attributes for pydicom), then compares the declared pixel data

- with a limit (``max_bytes``, default :data:`MAX_IMAGE_BYTES`), and
- with the file's size: uncompressed pixel data cannot be larger than the
  file, and no zlib/gzip stream expands by more than about 1032:1.

Pixel values stay as stored (no rescaling here); finiteness is checked by the
value types (:class:`spineguide.registration.volume.CTVolume`, the frame checks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["MAX_IMAGE_BYTES", "read_sitk_image", "load_npy", "check_dicom_pixel_size", "dicom_pixel_array"]

#: Largest pixel data (declared bytes) read from one image or volume file by default (1 GiB): a 512x512x1000
#: float32 CT is 1 GiB; a 4096x4096 float32 kV frame 64 MiB.
MAX_IMAGE_BYTES = 2**30
#: Largest expansion of deflate data (zlib's theoretical limit is 1032:1) with some margin for headers.
_MAX_INFLATE_RATIO = 1100

_COMPONENT_BYTES: dict[int, int] = {}


def _component_bytes() -> dict[int, int]:
    """SimpleITK pixel id -> bytes per component (filled on first use: SimpleITK loads only when a file is read)."""
    if not _COMPONENT_BYTES:
        import SimpleITK as sitk

        for name, nbytes in (("UInt8", 1), ("Int8", 1), ("UInt16", 2), ("Int16", 2), ("UInt32", 4), ("Int32", 4),
                             ("UInt64", 8), ("Int64", 8), ("Float32", 4), ("Float64", 8)):
            for prefix in ("sitk", "sitkVector"):
                pid = getattr(sitk, f"{prefix}{name}", None)
                if isinstance(pid, int) and pid >= 0:
                    _COMPONENT_BYTES[pid] = nbytes
        for name, nbytes in (("sitkComplexFloat32", 8), ("sitkComplexFloat64", 16)):
            pid = getattr(sitk, name, None)
            if isinstance(pid, int) and pid >= 0:
                _COMPONENT_BYTES[pid] = nbytes
    return _COMPONENT_BYTES


_HEADER_PROBE_BYTES = 65536

log = logging.getLogger(__name__)
_NATIVE_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stderr_to_log(path: Path) -> Iterator[None]:
    """Keep what native readers print straight to file descriptor 2 (ITK's MetaIO, libpng, libtiff) off the
    terminal: it goes to the debug log instead, so a refused file gives one line, our error, not C++ chatter.

    The redirection lasts only for the read; the lock keeps two reads from interleaving their redirections.
    """
    with _NATIVE_STDERR_LOCK:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to protect
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read(65536).decode("utf-8", errors="replace").strip()
                if text:
                    log.debug("%s: native reader said: %s", path, text)


def _storage(path: Path) -> str:
    """How the pixel data sits in ``path``: ``"raw"`` (uncompressed, in this file), ``"packed"`` (compressed or
    text-encoded, in this file) or ``"elsewhere"`` (a detached header naming another data file)."""
    name = path.name.lower()
    if name.endswith((".gz", ".tif", ".tiff", ".png", ".jpg", ".jpeg")):
        return "packed"
    if name.endswith(".nii") or name.endswith(".img"):
        return "raw"
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEADER_PROBE_BYTES)
    except OSError:
        return "packed"
    if name.endswith((".mha", ".mhd")):
        m = re.search(rb"ElementDataFile\s*=\s*(\S+)", head)
        if m is None or m.group(1) != b"LOCAL":
            return "elsewhere"
        if re.search(rb"CompressedData\s*=\s*True", head, re.IGNORECASE):
            return "packed"
        return "raw"
    if name.endswith((".nrrd", ".nhdr")):
        if re.search(rb"^data ?file:", head, re.MULTILINE):
            return "elsewhere"
        m = re.search(rb"^encoding:\s*(\w+)", head, re.MULTILINE)
        return "raw" if m is not None and m.group(1).lower() == b"raw" else "packed"
    return "packed"


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(_HEADER_PROBE_BYTES)
    except OSError:
        return b""


def _compressed_header(path: Path) -> bool:
    return re.search(rb"CompressedData\s*=\s*True", _head(path), re.IGNORECASE) is not None


def _detached_data_file(path: Path) -> Path | None:
    """The data file a MetaImage/NRRD header names, or None."""
    head = _head(path)
    m = re.search(rb"ElementDataFile\s*=\s*([^\r\n]+)", head) or re.search(rb"^data ?file:\s*([^\r\n]+)", head,
                                                                          re.MULTILINE)
    if m is None:
        return None
    name = m.group(1).strip().decode("utf-8", errors="replace")
    return None if name == "LOCAL" else path.parent / name


_MAX_DIMENSIONS = 4
_MAX_CHANNELS = 4


def _header_fields(path: Path) -> dict[str, str]:
    """``key = value`` (MetaImage) or ``key: value`` (NRRD) lines of a text header, keys lower-cased."""
    fields: dict[str, str] = {}
    head = _head(path)
    end = head.find(b"\n\n") if path.name.lower().endswith((".nrrd", ".nhdr")) else -1
    for line in (head if end < 0 else head[:end]).splitlines():
        text = line.decode("latin-1")
        key, sep, value = text.partition("=" if path.name.lower().endswith((".mha", ".mhd")) else ":")
        if sep and key.strip() and not key.strip().startswith("#"):
            fields.setdefault(key.strip().lower(), value.strip())
        if key.strip().lower() == "elementdatafile":
            break
    return fields


def _ints(text: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split()] if all(len(v) <= 19 for v in text.split()) else None
    except ValueError:
        return None


def _check_text_header(path: Path, error: type[Exception], what: str) -> None:
    """The dimension fields of a MetaImage or NRRD header, checked before SimpleITK sees them: ITK's MetaIO
    does not return on ``NDims = -1`` (found by fuzzing); a header ITK would choke on is refused here."""
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        fields, ndims_key, sizes_key = _header_fields(path), "ndims", "dimsize"
    elif name.endswith((".nrrd", ".nhdr")):
        fields, ndims_key, sizes_key = _header_fields(path), "dimension", "sizes"
    else:
        return
    ndims = _ints(fields.get(ndims_key, ""))
    if ndims is None or len(ndims) != 1 or not 1 <= ndims[0] <= _MAX_DIMENSIONS:
        raise error(f"{path}: cannot read {what}: header field {ndims_key!r} must be 1 to {_MAX_DIMENSIONS}, "
                    f"got {fields.get(ndims_key)!r}"[:300])
    sizes = _ints(fields.get(sizes_key, ""))
    if sizes is None or len(sizes) != ndims[0] or min(sizes) < 1 or max(sizes) > 2**31 - 1:
        raise error(f"{path}: cannot read {what}: header field {sizes_key!r} must be {ndims[0]} sizes of 1 to "
                    f"2**31-1, got {fields.get(sizes_key)!r}"[:300])
    channels = fields.get("elementnumberofchannels")
    if channels is not None:
        n = _ints(channels)
        if n is None or len(n) != 1 or not 1 <= n[0] <= _MAX_CHANNELS:
            raise error(f"{path}: cannot read {what}: ElementNumberOfChannels must be 1 to {_MAX_CHANNELS}, "
                        f"got {channels!r}"[:300])


def _check_data_file(path: Path, error: type[Exception], what: str) -> None:
    """A header may name its pixel data file: only a plain file name beside the header, never a path
    (``ElementDataFile = /etc/passwd``), a list or a pattern; a ``.mha``/``.nrrd`` keeps its data inside."""
    name = path.name.lower()
    if not name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
        return
    data = _detached_data_file(path)
    if data is None:
        return
    if name.endswith((".mha", ".nrrd")):
        raise error(f"{path}: cannot read {what}: the header names a separate data file ({data.name!r}); "
                    f"a {path.suffix} file must hold its own data")
    text = data.name
    if data.parent != path.parent or not text or text in (".", "..") or any(c in text for c in "/\\%") or \
            text.upper().startswith("LIST"):
        raise error(f"{path}: cannot read {what}: data file must be a plain file name beside the header")
    if not data.is_file():
        raise error(f"{path}: cannot read {what}: data file {data.name!r} not found beside the header")


def _check_declared(path: Path, declared_bytes: int, file_bytes: int, storage: str, error: type[Exception],
                    what: str, max_bytes: int) -> None:
    if declared_bytes > max_bytes:
        raise error(f"{path}: cannot read {what}: declares {declared_bytes} bytes of pixel data, more than the "
                    f"{max_bytes}-byte limit")
    if storage == "raw" and declared_bytes > file_bytes:
        raise error(f"{path}: cannot read {what}: declares {declared_bytes} bytes of uncompressed pixel data but the file "
                    f"holds {file_bytes} bytes (truncated or a wrong header)")
    if storage == "packed" and declared_bytes > _MAX_INFLATE_RATIO * max(file_bytes, 1):
        raise error(f"{path}: cannot read {what}: declares {declared_bytes} bytes of pixel data in a {file_bytes}-byte file "
                    f"(no compression expands {_MAX_INFLATE_RATIO}:1; a wrong header)")


def read_sitk_image(path: str | os.PathLike, error: type[Exception], what: str, *,
                    max_bytes: int = MAX_IMAGE_BYTES) -> sitk.Image:
    """Read an image/volume file with SimpleITK after checking its header's declared size.

    Parameters
    ----------
    path : path
        ``.mha``, ``.mhd``, ``.nrrd``, ``.nii(.gz)``, ``.tif``... (anything SimpleITK reads).
    error : exception class
        Raised, naming the file, for every refusal.
    what : str
        What the file is, for messages (``"CT volume"``, ``"kV frame"``).
    max_bytes : int
        Largest declared pixel data accepted, bytes.

    Returns
    -------
    SimpleITK.Image
        As stored (sizes and points in SimpleITK's ``(x, y, z)`` order).

    Raises
    ------
    error
        Missing or unreadable file, a header SimpleITK refuses, a declared size above ``max_bytes`` or
        impossible for the file's size, a pixel type of unknown size.
    """
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: cannot read {what}: is a directory")
    try:
        file_bytes = p.stat().st_size
    except OSError as err:
        raise error(f"{p}: cannot read {what}: {err.strerror or err}") from err
    _check_text_header(p, error, what)
    _check_data_file(p, error, what)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _native_stderr_to_log(p):
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise error(f"{p}: cannot read {what}: {_last_line(err)}") from err
    size = tuple(int(s) for s in reader.GetSize())
    if any(s < 1 for s in size):
        raise error(f"{p}: cannot read {what}: declares an empty grid {size}")
    component_bytes = _component_bytes().get(reader.GetPixelID())
    if component_bytes is None:
        raise error(f"{p}: cannot read {what}: pixel type {reader.GetPixelIDTypeAsString()!r} is not a plain number type")
    declared = int(np.prod(size, dtype=object)) * int(reader.GetNumberOfComponents()) * component_bytes
    storage = _storage(p)
    if storage == "elsewhere":
        data = _detached_data_file(p)
        if data is not None and data.is_file():
            storage, file_bytes = ("packed" if _compressed_header(p) else "raw"), data.stat().st_size
    _check_declared(p, declared, file_bytes, storage, error, what, max_bytes)
    try:
        with _native_stderr_to_log(p):
            return reader.Execute()
    except RuntimeError as err:
        raise error(f"{p}: cannot read {what}: {_last_line(err)}") from err
    except MemoryError as err:
        raise error(f"{p}: cannot read {what}: out of memory for {declared} bytes") from err


def load_npy(path: str | os.PathLike, error: type[Exception], what: str, *,
             max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Load a ``.npy`` array after checking its header (``numpy.lib.format``): numeric dtype, declared size.

    Raises
    ------
    error
        Unreadable file, not a ``.npy`` file, an object/structured/string dtype, a declared size above
        ``max_bytes`` or different from the data the file holds.
    """
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: cannot read {what}: is a directory")
    fmt = np.lib.format
    try:
        with p.open("rb") as fh:
            file_bytes = os.fstat(fh.fileno()).st_size
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(fh, max_header_size=10000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh, max_header_size=10000)
            else:
                raise error(f"{p}: cannot read {what}: unsupported .npy format version {version}")
            offset = fh.tell()
    except OSError as err:
        raise error(f"{p}: cannot read {what}: {err.strerror or err}") from err
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise error(f"{p}: cannot read {what}: not a valid .npy file: {_last_line(err)}") from err
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise error(f"{p}: cannot read {what}: dtype {dtype} is not a plain number type")
    if any(not 0 <= int(s) <= 2**31 - 1 for s in shape) or len(shape) > 32:
        raise error(f"{p}: cannot read {what}: declares an impossible shape {shape}"[:300])
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > max_bytes:
        raise error(f"{p}: cannot read {what}: declares {declared} bytes of pixel data, more than the {max_bytes}-byte limit")
    if declared != file_bytes - offset:
        raise error(f"{p}: cannot read {what}: declares shape {shape} of {dtype} ({declared} bytes) but the file holds "
                    f"{file_bytes - offset} bytes of data")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise error(f"{p}: cannot read {what}: {_last_line(err)}") from err
    return arr


def check_dicom_pixel_size(ds, path: str | os.PathLike, error: type[Exception], what: str, *,
                           max_bytes: int = MAX_IMAGE_BYTES) -> int:
    """Declared pixel bytes of a DICOM dataset (Rows x Columns x Samples x Frames x BitsAllocated / 8), checked.

    Raises
    ------
    error
        Missing or absurd (0028,xxxx) attributes, a size above ``max_bytes``.
    """
    p = Path(path)
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except Exception as err:  # noqa: BLE001 - pydicom parses values lazily and raises many types on bad ones
        raise error(f"{p}: {what}: missing or malformed image pixel attributes (0028,xxxx): "
                    f"{_last_line(err)}") from err
    if min(rows, cols, samples, frames) < 1:
        raise error(f"{p}: {what}: image of {rows}x{cols} pixels, {samples} samples, {frames} frames is empty")
    if bits not in (1, 8, 16, 32, 64):
        raise error(f"{p}: {what}: Bits Allocated (0028,0100) is {bits}, expected 1, 8, 16, 32 or 64")
    declared = rows * cols * samples * frames * max(bits // 8, 1)
    if declared > max_bytes:
        raise error(f"{p}: cannot read {what}: declares {declared} bytes of pixel data, more than the {max_bytes}-byte limit")
    return declared


def dicom_pixel_array(ds, path: str | os.PathLike, error: type[Exception], what: str, *,
                      max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """``ds.pixel_array`` with the declared size checked first and every decoding failure as ``error``.

    pydicom raises many exception types on broken Pixel Data (ValueError, AttributeError, KeyError,
    NotImplementedError, RuntimeError, TypeError, IndexError, struct errors from decoders...); all of them
    mean "this file's pixels cannot be decoded" and become ``error`` naming the file.
    """
    check_dicom_pixel_size(ds, path, error, what, max_bytes=max_bytes)
    try:
        return ds.pixel_array
    except MemoryError as err:
        raise error(f"{Path(path)}: {what}: out of memory decoding the pixel data") from err
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault, named below
        raise error(f"{Path(path)}: cannot decode pixel data ({what}): {type(err).__name__}: "
                    f"{_last_line(err)}") from err


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
