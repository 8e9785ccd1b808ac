"""Fuzzing every file reader and command-line value parser: any input gives a valid value or the reader's
named error with a message, never another exception and never a hang.

The example count comes from the hypothesis profile (tests/conftest.py: ``ci`` by default, ``deep`` for
>= 10^5 examples: ``HYPOTHESIS_PROFILE=deep python -m pytest -m fuzz``). Each example is cheap: small
documents, files of at most a few kB, no numba compilation, no sockets.
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import assume, example, given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from spineguide.calibration.errors import GeometryFileError, PhantomFileError, QAHistoryError
from spineguide.calibration.geometry import StereoGeometry, default_stereo_geometry
from spineguide.calibration.io import geometry_from_json, read_geometry
from spineguide.calibration.jsonfile import MAX_INT_DIGITS, parse_json_bytes, read_json_document
from spineguide.calibration.phantom import BBPhantom, default_phantom, phantom_from_json, read_phantom
from spineguide.calibration.qa import read_history
from spineguide.registration.dicom_ct import read_dicom_ct
from spineguide.registration.dicom_rt import RTPlanInfo, StructureSet, read_rtplan, read_rtstruct
from spineguide.registration.errors import DicomRTError, FiducialFileError, PatientPositionError, VolumeFileError
from spineguide.registration.imagefile import load_npy, read_sitk_image
from spineguide.registration.io import FiducialSet, fiducials_from_json, read_fiducials
from spineguide.registration.volume import CTVolume
from spineguide.tracking.cli.main import CliError, _UsageError, build_parser, parse_six, parse_triplet_mm, rejoin_negative_values
from spineguide.tracking.errors import FrameError
from spineguide.tracking.frames import KvFrame, read_frame

pytestmark = pytest.mark.fuzz

DATA_DIR = Path(__file__).resolve().parent / "data"
GEOMETRY_DOC = json.loads((DATA_DIR / "geometry-example.json").read_text(encoding="utf-8"))
FIDUCIALS_DOC = {"schema": "fiducials/1", "fiducials": [{"name": "F1", "position_mm": [1.5, -20.0, 30.0]},
                                                        {"name": "F2", "position_mm": [-12.0, 4.0, 2.5]}]}
PHANTOM_DOC = default_phantom().to_json()
SMALL_MAX_BYTES = 2**20  # image fuzzing: nothing bigger than 1 MiB is ever decoded


class DocError(ValueError):
    """The error class the fuzzed JSON parser is asked to raise."""


def _is_json_value(v, depth=0) -> bool:
    """A value the hardened parser may return: finite floats, 64-bit ints, str keys, bounded depth."""
    if depth > 64:
        return False
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, int):
        return abs(v) <= 2**63
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_is_json_value(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) for k in v) and all(_is_json_value(x, depth + 1) for x in v.values())
    return False


def _parse(raw: bytes, **kwargs):
    """parse_json_bytes: a valid value, or DocError naming the document; anything else fails the test."""
    try:
        value = parse_json_bytes(raw, "doc", DocError, **kwargs)
    except DocError as err:
        assert str(err).startswith("doc: ") and len(str(err)) > len("doc: ")
        return DocError
    assert _is_json_value(value)
    return value


# ------------------------------------------------------------------------------ JSON
json_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                            max_size=4),
                           max_leaves=25)


@given(st.binary(max_size=4096))
@example(b"\xef\xbb\xbf{}")
@example(b'"\\ud800"')
@example(b"1e999")
@example(b"-Infinity")
def test_json_arbitrary_bytes(raw):
    _parse(raw)


@given(json_values)
def test_json_round_trip_of_valid_documents(value):
    assert _parse(json.dumps(value).encode("utf-8")) == value


@given(st.integers(0, 3000), st.sampled_from(["[", "{\"a\":"]), st.booleans())
def test_json_nesting_depth_limit(depth, opener, closed):
    closer = "]" if opener == "[" else "}"
    raw = (opener * depth + "0" + closer * depth if closed else opener * depth).encode()
    result = _parse(raw)
    if depth > 64:
        assert result is DocError
    elif closed:
        assert result is not DocError


@given(st.integers(1, 6000), st.booleans())
def test_json_integer_digit_limit(digits, negative):
    text = ("-" if negative else "") + "9" * digits
    result = _parse(text.encode())
    # 19 nines (9.99e18) is already beyond 2**63 (9.22e18): only up to 18 digits of nines pass
    assert (result is DocError) == (digits > MAX_INT_DIGITS or abs(int(text)) > 2**63)


@given(st.integers())
def test_json_integers_of_any_size(value):
    result = _parse(str(value).encode())
    assert (result is DocError) == (abs(value) > 2**63)


@given(st.text(min_size=1, max_size=10), json_values, json_values)
def test_json_duplicate_keys_rejected(key, a, b):
    raw = ("{" + json.dumps(key) + ":" + json.dumps(a) + "," + json.dumps(key) + ":" + json.dumps(b) + "}").encode()
    assert _parse(raw) is DocError


@given(json_values, st.data())
def test_json_non_utf8_bytes_rejected(value, data):
    raw = bytearray(json.dumps({"k": value, "s": "text"}).encode("utf-8"))
    at = data.draw(st.integers(0, len(raw)))
    bad = data.draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe9"]))
    raw[at:at] = bad
    assert _parse(bytes(raw)) is DocError


@given(json_values, st.data())
def test_json_mutated_documents(value, data):
    raw = bytearray(json.dumps(value).encode("utf-8"))
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
    _parse(bytes(raw))


@given(st.binary(max_size=300), st.integers(0, 400))
def test_json_size_limit_is_checked_first(raw, limit):
    result = _parse(raw, max_bytes=limit)
    if len(raw) > limit:
        assert result is DocError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for files written per example (overwritten each time)."""
    return tmp_path_factory.mktemp("fuzz")


@given(st.binary(max_size=2048))
def test_json_file_reader(scratch, raw):
    p = scratch / "doc.json"
    p.write_bytes(raw)
    try:
        value = read_json_document(p, DocError, "document")
    except DocError as err:
        assert str(p) in str(err)
    else:
        assert _is_json_value(value)


# ------------------------------------------------------------------------------ documents (field mutations)
def _paths(obj, prefix=()):
    """Every path to a value inside a JSON document (for mutation)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


hostile_leaves = (json_leaves | st.sampled_from([0, -1, 1e308, -1e308, 1e-308, 2**63, "", "A", "kv-geometry/1",
                                                 "fiducials/1", "bb-phantom/1", [], {}, [0, 0, 0], [1, 0, 0],
                                                 [0, 0, 0, 0], [[0, 0, 0, 0]] * 3, [1.0, 1.0], [0.0, 0.0]]))


@st.composite
def mutated(draw, doc):
    """``doc`` with 1-3 values replaced (or deleted) at random places."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        # deep copies: a drawn list must not be shared (a later mutation would edit the strategy's constant)
        if not path:
            doc = copy.deepcopy(draw(hostile_leaves | json_values))
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(draw(hostile_leaves | json_values))
    return doc


@given(mutated(GEOMETRY_DOC))
def test_geometry_documents(doc):
    try:
        geometry = geometry_from_json(doc)
    except GeometryFileError as err:  # SchemaError is one
        assert str(err)
    else:
        assert isinstance(geometry, StereoGeometry)


@given(st.binary(max_size=2048) | mutated(GEOMETRY_DOC).map(lambda d: json.dumps(d).encode()))
def test_geometry_files(scratch, raw):
    p = scratch / "geometry.json"
    p.write_bytes(raw)
    try:
        read_geometry(p)
    except GeometryFileError as err:
        assert str(p) in str(err)


@given(mutated(FIDUCIALS_DOC))
def test_fiducial_documents(doc):
    try:
        fiducials = fiducials_from_json(doc, "fid.json")
    except FiducialFileError as err:  # FiducialSchemaError is one
        assert "fid.json" in str(err)
    else:
        assert isinstance(fiducials, FiducialSet) and np.all(np.isfinite(fiducials.positions_lps_mm))


@given(st.binary(max_size=1024) | mutated(FIDUCIALS_DOC).map(lambda d: json.dumps(d).encode()))
def test_fiducial_files(scratch, raw):
    p = scratch / "fiducials.json"
    p.write_bytes(raw)
    try:
        read_fiducials(p)
    except FiducialFileError as err:
        assert str(p) in str(err)


@given(mutated(PHANTOM_DOC))
def test_phantom_documents(doc):
    try:
        phantom = phantom_from_json(doc)
    except PhantomFileError as err:
        assert str(err)
    else:
        assert isinstance(phantom, BBPhantom)


@given(st.binary(max_size=1024))
def test_phantom_files(scratch, raw):
    p = scratch / "phantom.json"
    p.write_bytes(raw)
    try:
        read_phantom(p)
    except PhantomFileError as err:
        assert str(p) in str(err)


QA_RECORD = {"schema": "qa-record/1", "performed_unix_s": 1.7e9, "status": "PASS", "centre_offset_distance_mm": 0.2,
             "imagers": {"A": {"rms_mm": 0.1}}}


@given(st.lists(st.binary(max_size=200) | mutated(QA_RECORD).map(lambda d: json.dumps(d).encode()), max_size=4))
def test_qa_history_files(scratch, lines):
    from spineguide.calibration.qa import trend

    p = scratch / "history.jsonl"
    p.write_bytes(b"\n".join(lines))
    try:
        records = read_history(p)
    except QAHistoryError as err:
        assert str(p) in str(err)
    else:
        trend(records)  # what `spineguide qa --trend` does with them: must not fail either


# ------------------------------------------------------------------------------ command-line values
@given(st.text(max_size=80) | st.lists(st.sampled_from(["1", "-2.5", "nan", "inf", "1e999", "", " ", "x", "1_0",
                                                        "-0", ".5", "1e-400", "9" * 400]),
                                       max_size=8).map(",".join))
def test_cli_triplet_and_six(text):
    for parse in (parse_triplet_mm, parse_six):
        try:
            value = parse(text, "--opt")
        except CliError as err:
            assert "--opt" in str(err)
        else:
            flat = list(value) if parse is parse_triplet_mm else [*value[0], *value[1]]
            assert len(flat) == (3 if parse is parse_triplet_mm else 6)
            assert all(isinstance(v, float) and math.isfinite(v) for v in flat)


PARSER = build_parser()
TOKENS = st.sampled_from([
    "register", "drr", "simulate", "qa", "calibrate", "import", "dicom-send", "demo", "--method", "fiducial",
    "anatomy", "--isocenter", "--iso", "--pose", "--roi-box", "--json", "--image", "A=a.mha", "--i0", "--seed",
    "--poses", "--max-correction-mm", "-v", "--verbose", "--", "-3.27,10,5", "-1", "-inf", "-nan,0,0", "1,2,3",
    "-1,0,0,0,0,0", "--out", "x", "--phantom", "cervical", "--geometry", "g.json", "--ct", "c.mha", "-x", "=", ""])


@given(st.lists(TOKENS | st.text(max_size=12).filter(lambda t: t not in ("-h", "--help") and not
                                                      t.startswith(("-h", "--h"))), max_size=14))
def test_cli_argument_parsing(argv):
    assume(not any(a.startswith(("-h", "--h")) for a in argv))
    joined = rejoin_negative_values(argv, PARSER)
    try:
        PARSER.parse_args(joined)
    except _UsageError as err:  # main() prints it as one line
        assert str(err).startswith("spineguide")


# ------------------------------------------------------------------------------ image and volume headers
ELEMENT_TYPES = ["MET_FLOAT", "MET_DOUBLE", "MET_UCHAR", "MET_SHORT", "MET_USHORT", "MET_INT", "MET_ULONG_LONG",
                 "MET_CHAR_ARRAY", "MET_OTHER", "MET_FLOAT_ARRAY", "garbage", ""]
dims = st.one_of(st.integers(-5, 40), st.integers(-(2**40), 2**40), st.sampled_from([0, 1, 2**31, 2**32, 2**63]))


def _check_image(path: Path):
    try:
        image = read_sitk_image(path, FrameError, "image", max_bytes=SMALL_MAX_BYTES)
    except FrameError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(image, sitk.Image)


@given(st.integers(-1, 5), st.lists(dims, min_size=0, max_size=4), st.sampled_from(ELEMENT_TYPES),
       st.sampled_from(["", "CompressedData = True\n", "CompressedData = False\n", "ElementNumberOfChannels = 3\n",
                        "ElementNumberOfChannels = 99999999\n", "HeaderSize = -1\n", "BinaryDataByteOrderMSB = True\n"]),
       st.sampled_from(["LOCAL", "LOCAL", "/etc/passwd", "../x.raw", "LIST", "img%03d.raw 0 9 1", ""]),
       st.binary(max_size=2048))
@example(-1, [], "MET_FLOAT", "", "LOCAL", b"")  # ITK's MetaIO never returns on NDims = -1: refused before it
@example(0, [], "MET_FLOAT", "", "LOCAL", b"")
@example(2, [2**31, 2**31], "MET_FLOAT", "", "LOCAL", b"\0" * 64)
def test_metaimage_headers(scratch, ndims, sizes, element, extra, data_file, data):
    header = (f"ObjectType = Image\nNDims = {ndims}\nDimSize = {' '.join(map(str, sizes))}\nElementType = {element}\n"
              f"{extra}ElementDataFile = {data_file}\n").encode()
    p = scratch / "frame.mha"
    p.write_bytes(header + data)
    _check_image(p)


@given(st.sampled_from(["float", "double", "uchar", "short", "int64", "block", "garbage"]), st.integers(-1, 4),
       st.lists(dims, max_size=4), st.sampled_from(["raw", "gzip", "ascii", "hex", "bzip2", "garbage"]),
       st.binary(max_size=2048))
def test_nrrd_headers(scratch, kind, dimension, sizes, encoding, data):
    header = (f"NRRD0004\ntype: {kind}\ndimension: {dimension}\nsizes: {' '.join(map(str, sizes))}\n"
              f"encoding: {encoding}\n\n").encode()
    p = scratch / "frame.nrrd"
    p.write_bytes(header + data)
    _check_image(p)


@given(st.sampled_from(["<f4", "<f8", "<u2", "|u1", "<i8", "|b1", "<c8", "|O", "<U4", "|V8", "[('a', '<f4')]",
                        "garbage", "<f16"]),
       st.booleans(), st.lists(dims, max_size=4), st.binary(max_size=2048), st.sampled_from([(1, 0), (2, 0), (3, 0)]))
def test_npy_headers(scratch, descr, fortran, shape, data, version):
    text = "{'descr': " + (descr if descr.startswith("[") else repr(descr)) + f", 'fortran_order': {fortran}, " \
           f"'shape': {tuple(shape)!r}, }}"
    head = text.encode("latin-1") + b" " * ((64 - (len(text) + 11) % 64) % 64) + b"\n"
    prefix = b"\x93NUMPY" + bytes(version) + (len(head).to_bytes(2, "little") if version == (1, 0)
                                              else len(head).to_bytes(4, "little"))
    p = scratch / "frame.npy"
    p.write_bytes(prefix + head + data)
    try:
        arr = load_npy(p, FrameError, "frame", max_bytes=SMALL_MAX_BYTES)
    except FrameError as err:
        assert str(p) in str(err)
    else:
        assert isinstance(arr, np.ndarray) and arr.nbytes <= SMALL_MAX_BYTES


@given(st.binary(max_size=512))
def test_npy_arbitrary_bytes(scratch, raw):
    p = scratch / "raw.npy"
    p.write_bytes(b"\x93NUMPY" + raw)
    try:
        load_npy(p, FrameError, "frame", max_bytes=SMALL_MAX_BYTES)
    except FrameError as err:
        assert str(p) in str(err)


# ------------------------------------------------------------------------------ DICOM
SMALL_IMAGER = default_stereo_geometry(panel_pixels=8, pixel_spacing_mm=51.2)["A"]


def _rt_image(rows=8, cols=8, bits=16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTIMAGE"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.arange(rows * cols, dtype=np.uint16).tobytes()
    return ds


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@st.composite
def mutated_dicom(draw, base: Dataset):
    ds = copy.deepcopy(base)
    # every value is drawn before any is applied: a mutation pydicom refuses must not change what is drawn
    # next (hypothesis replays the draws; a draw skipped by an exception makes the strategy inconsistent)
    mutations = [_draw_mutation(draw) for _ in range(draw(st.integers(0, 3)))]
    for field, value in mutations:
        with warnings.catch_warnings():  # pydicom warns (or refuses) on some values: such a mutation is skipped
            warnings.simplefilter("ignore")
            try:
                _apply_mutation(ds, field, value)
            except Exception:  # noqa: BLE001
                pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = _dicom_bytes(ds)
    except Exception:  # noqa: BLE001 - a mutation pydicom itself cannot write: write the base instead
        raw = _dicom_bytes(base)
    cut = draw(st.integers(0, 1 << 20))
    return raw[:cut % (len(raw) + 1)] if draw(st.integers(0, 4)) == 0 else raw


def _draw_mutation(draw) -> tuple[str, object]:
    field = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
                                  "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation",
                                  "PixelData", "TransferSyntax", "RescaleSlope", "delete"]))
    if field in ("Rows", "Columns"):
        value = draw(st.sampled_from([0, 1, 7, 8, 9, 4096, 65535]))
    elif field in ("BitsAllocated", "BitsStored"):
        value = draw(st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64, 65535]))
    elif field == "SamplesPerPixel":
        value = draw(st.sampled_from([0, 1, 3, 4, 65535]))
    elif field == "PixelRepresentation":
        value = draw(st.sampled_from([0, 1, 2]))
    elif field == "NumberOfFrames":
        value = draw(st.sampled_from(["0", "1", "2", "100000", "x"]))
    elif field == "PhotometricInterpretation":
        value = draw(st.sampled_from(["MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "", "garbage"]))
    elif field == "PixelData":
        value = (draw(st.integers(0, 1 << 20)), draw(st.binary(max_size=16)))  # (cut, tail)
    elif field == "TransferSyntax":
        value = draw(st.sampled_from([
            "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.3.4"]))
    elif field == "RescaleSlope":
        value = draw(st.sampled_from(["1", "0", "nan", "1e999", "-2", "x"]))
    else:
        value = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated", "PixelData", "SamplesPerPixel",
                                      "PhotometricInterpretation"]))
    return field, value


def _apply_mutation(ds: Dataset, field: str, value) -> None:
    if field == "PixelData":
        data = bytes(ds.PixelData)
        cut, tail = value
        ds.PixelData = data[:cut % (len(data) + 1)] + tail
    elif field == "TransferSyntax":
        ds.file_meta.TransferSyntaxUID = value
    elif field == "delete":
        if value in ds:
            delattr(ds, value)
    else:
        setattr(ds, field, value)


@given(mutated_dicom(_rt_image()))
def test_dicom_frames(scratch, raw):
    p = scratch / "frame.dcm"
    p.write_bytes(raw)
    with warnings.catch_warnings():  # pydicom warns about broken files; the CLI shows that only with -v
        warnings.simplefilter("ignore")
        try:
            frame = read_frame(p, SMALL_IMAGER)
        except FrameError as err:
            assert str(p) in str(err)
        else:
            assert isinstance(frame, KvFrame)


def _ct_slice(z_mm: float, series: str, frame: str) -> Dataset:
    ds = _rt_image()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, z_mm]
    ds.PixelSpacing = [1.0, 1.0]
    ds.PatientPosition = "HFS"
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    return ds


CT_SLICES = [_ct_slice(z, "1.2.3.1", "1.2.3.2") for z in (0.0, 2.0, 4.0)]


@given(mutated_dicom(CT_SLICES[1]), st.sampled_from(["ImagePositionPatient", "PatientPosition", "PixelSpacing",
                                                    "ImageOrientationPatient", None]), st.text(max_size=20))
def test_dicom_ct_series(scratch, raw, field, value):
    folder = scratch / "ct"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    (folder / "s0.dcm").write_bytes(_dicom_bytes(CT_SLICES[0]))
    (folder / "s1.dcm").write_bytes(raw)
    last = copy.deepcopy(CT_SLICES[2])
    if field is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(last, field, value)
                (folder / "s2.dcm").write_bytes(_dicom_bytes(last))
        except Exception:  # noqa: BLE001 - pydicom refused to write that value: keep the good slice
            (folder / "s2.dcm").write_bytes(_dicom_bytes(CT_SLICES[2]))
    else:
        (folder / "s2.dcm").write_bytes(_dicom_bytes(last))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ct = read_dicom_ct(folder, max_bytes=SMALL_MAX_BYTES)
        except (VolumeFileError, PatientPositionError) as err:
            assert str(folder) in str(err)
        else:
            assert isinstance(ct, CTVolume)


def _rtplan() -> Dataset:
    ds = _rt_image()
    for name in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                 "HighBit", "PixelRepresentation", "PixelData"):
        delattr(ds, name)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.Modality = "RTPLAN"
    ds.FrameOfReferenceUID = "1.2.3.2"
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    ds.PatientSetupSequence = [setup]
    cp = Dataset()
    cp.IsocenterPosition = [1.0, -2.0, 3.5]
    beam = Dataset()
    beam.BeamName = "B1"
    beam.ControlPointSequence = [cp]
    ds.BeamSequence = [beam]
    return ds


def _rtstruct() -> Dataset:
    ds = _rtplan()
    del ds.PatientSetupSequence, ds.BeamSequence
    ds.Modality = "RTSTRUCT"
    roi = Dataset()
    roi.ROINumber = 1
    roi.ROIName = "PTV"
    roi.ReferencedFrameOfReferenceUID = "1.2.3.2"
    ds.StructureSetROISequence = [roi]
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    contour.NumberOfContourPoints = 3
    contour.ContourData = [0, 0, 0, 10, 0, 0, 0, 10, 0]
    item = Dataset()
    item.ReferencedROINumber = 1
    item.ContourSequence = [contour]
    ds.ROIContourSequence = [item]
    return ds


def _byte_mutations(base: Dataset):
    raw = _dicom_bytes(base)

    @st.composite
    def build(draw):
        data = bytearray(raw)
        for _ in range(draw(st.integers(0, 6))):
            at = draw(st.integers(132, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        return bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    return build()


@given(_byte_mutations(_rtplan()))
def test_dicom_rtplan(scratch, raw):
    p = scratch / "RP.dcm"
    p.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            plan = read_rtplan(p)
        except (DicomRTError, PatientPositionError) as err:
            assert str(p) in str(err)
        else:
            assert isinstance(plan, RTPlanInfo)


@given(_byte_mutations(_rtstruct()))
def test_dicom_rtstruct(scratch, raw):
    p = scratch / "RS.dcm"
    p.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ss = read_rtstruct(p)
        except DicomRTError as err:
            assert str(p) in str(err)
        else:
            assert isinstance(ss, StructureSet)


def test_the_base_documents_are_valid():
    # The mutations start from valid inputs: each base reads without error.
    assert isinstance(geometry_from_json(GEOMETRY_DOC), StereoGeometry)
    assert isinstance(fiducials_from_json(FIDUCIALS_DOC), FiducialSet)
    assert isinstance(phantom_from_json(PHANTOM_DOC), BBPhantom)


def test_the_base_dicom_objects_are_valid(tmp_path):
    for name, ds in (("RP.dcm", _rtplan()), ("RS.dcm", _rtstruct()), ("frame.dcm", _rt_image())):
        (tmp_path / name).write_bytes(_dicom_bytes(ds))
    assert isinstance(read_rtplan(tmp_path / "RP.dcm"), RTPlanInfo)
    assert isinstance(read_rtstruct(tmp_path / "RS.dcm"), StructureSet)
    assert isinstance(read_frame(tmp_path / "frame.dcm", SMALL_IMAGER), KvFrame)
    folder = tmp_path / "ct"
    folder.mkdir()
    for i, ds in enumerate(CT_SLICES):
        (folder / f"s{i}.dcm").write_bytes(_dicom_bytes(ds))
    assert read_dicom_ct(folder).hu.shape == (3, 8, 8)

