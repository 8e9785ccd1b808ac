"""Offline kV frame reading and validation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from spineguide.calibration import default_stereo_geometry
from spineguide.tracking.errors import FrameError
from spineguide.tracking.frames import KvFrame, parse_image_args, read_frame, read_stereo_frames

GEOM = default_stereo_geometry(panel_pixels=64, pixel_spacing_mm=6.4)


def _frame(value=1000):
    return np.full((64, 64), value, dtype=np.uint16)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".tif", ".npy"])
def test_frame_formats_round_trip(tmp_path, suffix):
    pixels = np.random.default_rng(0).integers(0, 60000, size=(64, 64)).astype(np.uint16)
    path = tmp_path / f"a{suffix}"
    if suffix == ".npy":
        np.save(path, pixels)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    frame = read_frame(path, GEOM["A"], i0=20000)
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert frame.pixels.dtype == np.uint16 and frame.i0 == 20000.0 and frame.imager == "A"
    assert not frame.pixels.flags.writeable


def test_wrong_size_names_file_imager_and_sizes(tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.zeros((64, 32), np.uint16))
    with pytest.raises(FrameError, match=r"b.npy: image is 64x32 \(rows x cols\) but imager 'B' has a 64x64 panel"):
        read_frame(path, GEOM["B"])


def test_nan_and_negative_pixels_are_refused(tmp_path):
    bad = _frame().astype(np.float32)
    bad[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(FrameError, match="nan.npy: 1 pixels are NaN or infinite"):
        read_frame(tmp_path / "nan.npy", GEOM["A"])
    neg = _frame().astype(np.float32)
    neg[0, :2] = -1
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(FrameError, match="2 pixels are negative"):
        read_frame(tmp_path / "neg.npy", GEOM["A"])


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FrameError, match="no such image file"):
        read_frame(tmp_path / "none.mha", GEOM["A"])
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"not an image")
    with pytest.raises(FrameError, match="junk.mha: cannot read image"):
        read_frame(junk, GEOM["A"])
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FrameError, match="obj.npy: cannot read .npy frame"):
        read_frame(pickled, GEOM["A"])


def test_bad_i0_is_refused():
    with pytest.raises(FrameError, match="i0 must be a positive finite number"):
        KvFrame("A", _frame(), i0=0.0)
    with pytest.raises(FrameError, match="i0 must be a positive finite number"):
        KvFrame("A", _frame(), i0=float("nan"))


def test_image_arguments(tmp_path):
    assert parse_image_args(["A=x.mha", "B=y.mha"]) == {"A": tmp_path.__class__("x.mha"), "B": tmp_path.__class__("y.mha")}
    with pytest.raises(FrameError, match="NAME=FILE"):
        parse_image_args(["A:x.mha"])
    with pytest.raises(FrameError, match="twice"):
        parse_image_args(["A=x.mha", "A=y.mha"])


def test_stereo_set_must_match_the_geometry(tmp_path):
    np.save(tmp_path / "a.npy", _frame())
    with pytest.raises(FrameError, match=r"no image given for imager\(s\) \['B'\]"):
        read_stereo_frames({"A": tmp_path / "a.npy"}, GEOM)
    with pytest.raises(FrameError, match=r"unknown imager\(s\) \['C'\]"):
        read_stereo_frames({"A": tmp_path / "a.npy", "C": tmp_path / "a.npy"}, GEOM)
