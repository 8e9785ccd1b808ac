"""CT volumes: file round trips, patient position, LPS -> room mapping, resolution pyramid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from numpy.testing import assert_allclose

from spineguide.registration.ctfile import read_ct, write_ct
from spineguide.registration.errors import PatientPositionError, VolumeError, VolumeFileError
from spineguide.registration.volume import PATIENT_POSITION_KEY, CTVolume, PatientPosition, room_from_lps_matrix

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
VECTORS = json.loads((DATA_DIR / "conventions-vectors.json").read_text(encoding="utf-8"))
# The mapping is a signed permutation plus a subtraction: exact up to float64 rounding.
MAPPING_TOL_MM = 1e-9
# Files store float32 HU and float64 geometry: both come back bit for bit.
ROUND_TRIP_TOL = 0.0


def small_ct(position="HFS", seed=0) -> CTVolume:
    rng = np.random.default_rng(seed)
    a = np.deg2rad(20.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return CTVolume(
        hu=rng.uniform(-1000, 1500, size=(4, 5, 6)).astype(np.float32),
        spacing_mm=(0.7, 0.9, 2.0),
        origin_lps_mm=(-12.0, 30.5, -250.0),
        direction=direction,
        patient_position=position,
    )


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii"])
@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_file_round_trip_keeps_grid_values_and_position(tmp_path, suffix, position):
    ct = small_ct(position)
    back = read_ct(write_ct(ct, tmp_path / f"ct{suffix}"))
    assert back.patient_position is PatientPosition(position)
    assert_allclose(back.hu, ct.hu, rtol=0, atol=ROUND_TRIP_TOL)
    assert_allclose(back.spacing_mm, ct.spacing_mm, rtol=0, atol=1e-6)  # NIfTI stores float32 spacing
    assert_allclose(back.origin_lps_mm, ct.origin_lps_mm, rtol=0, atol=1e-5)  # and float32 qoffset
    assert_allclose(back.direction, ct.direction, rtol=0, atol=1e-6)


def test_file_without_position_needs_one(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    path = tmp_path / "bare.mha"
    sitk.WriteImage(img, str(path))
    with pytest.raises(PatientPositionError, match=r"bare\.mha: the file does not record the patient position"):
        read_ct(path)
    assert read_ct(path, patient_position="HFP").patient_position is PatientPosition.HFP


def test_position_contradicting_the_file(tmp_path):
    path = write_ct(small_ct("HFS"), tmp_path / "ct.mha")
    with pytest.raises(PatientPositionError, match=r"ct\.mha: file says patient position HFS, but FFS was given"):
        read_ct(path, patient_position="FFS")


@pytest.mark.parametrize("bad", ["HFDL", "FFDR", "", None, "supine"])
def test_unknown_or_decubitus_position_is_refused(bad):
    with pytest.raises(PatientPositionError, match="is not supported"):
        small_ct(bad)


def test_decubitus_in_a_file_is_refused_not_read_as_hfs(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
    img.SetMetaData(PATIENT_POSITION_KEY, "HFDL")
    path = tmp_path / "decub.mha"
    sitk.WriteImage(img, str(path))
    with pytest.raises(PatientPositionError, match=r"decub\.mha: patient position 'HFDL' is not supported"):
        read_ct(path)


def test_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(VolumeFileError, match="no such file or folder"):
        read_ct(tmp_path / "absent.mha")
    (tmp_path / "ct.txt").write_text("x")
    with pytest.raises(VolumeFileError, match=r"ct\.txt: unsupported CT format"):
        read_ct(tmp_path / "ct.txt")
    (tmp_path / "broken.mha").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(VolumeFileError, match=r"broken\.mha: cannot read volume"):
        read_ct(tmp_path / "broken.mha", patient_position="HFS")
    with pytest.raises(VolumeFileError, match=r"ct\.png: unsupported CT format for writing"):
        write_ct(small_ct(), tmp_path / "ct.png")


def test_invalid_grids_are_refused():
    with pytest.raises(VolumeError, match="3D array"):
        CTVolume(np.zeros((4, 5)), (1, 1, 1), (0, 0, 0), np.eye(3), "HFS")
    with pytest.raises(VolumeError, match="non-finite"):
        CTVolume(np.full((2, 2, 2), np.nan), (1, 1, 1), (0, 0, 0), np.eye(3), "HFS")
    with pytest.raises(VolumeError, match=r"spacing must be three positive numbers, got \[1\.0, 0\.0, 1\.0\]"):
        CTVolume(np.zeros((2, 2, 2)), (1, 0, 1), (0, 0, 0), np.eye(3), "HFS")
    sheared = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(VolumeError, match="not orthonormal"):
        CTVolume(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), sheared, "HFS")


@pytest.mark.parametrize("case", VECTORS["lps_to_room"], ids=lambda c: c["patient_position"])
def test_lps_to_room_matches_the_worked_vectors(case):
    position = PatientPosition(case["patient_position"])
    iso = case["isocentre_lps_mm"]
    assert_allclose(room_from_lps_matrix(position), case["room_from_lps_matrix"], rtol=0, atol=MAPPING_TOL_MM)
    ct = small_ct(position.value)
    lps = np.array([p["lps_mm"] for p in case["points"]])
    room = np.array([p["room_mm"] for p in case["points"]])
    assert_allclose(ct.lps_to_room(lps, iso), room, rtol=0, atol=MAPPING_TOL_MM)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_room_from_index_agrees_with_lps_to_room(position):
    ct = small_ct(position)
    iso = np.array([3.0, 31.0, -247.0])
    ijk = np.random.default_rng(1).uniform(-1, 6, size=(20, 3))
    via_index = np.hstack([ijk, np.ones((20, 1))]) @ ct.room_from_index(iso).T
    assert_allclose(via_index[:, :3], ct.lps_to_room(ct.index_to_lps(ijk), iso), rtol=0, atol=MAPPING_TOL_MM)
    assert_allclose(ct.lps_to_index(ct.index_to_lps(ijk)), ijk, rtol=0, atol=MAPPING_TOL_MM)
    with pytest.raises(VolumeError, match=r"isocentre must be three finite LPS numbers"):
        ct.room_from_index([0.0, np.nan, 0.0])


def block_ct() -> tuple[CTVolume, np.ndarray]:
    """A 1000 HU block of 4x4x4 voxels (aligned with the 2x and 4x bins) in air; its LPS centre."""
    hu = np.full((16, 20, 24), -1000.0, np.float32)
    hu[8:12, 4:8, 12:16] = 1000.0
    ct = CTVolume(hu, (0.5, 0.75, 1.5), (10.0, -20.0, 30.0), small_ct().direction, "HFS")
    centre = ct.index_to_lps(np.array([[13.5, 5.5, 9.5]]))[0]  # (i, j, k) block centre
    return ct, centre


def hu_centroid_lps(ct: CTVolume) -> np.ndarray:
    w = (ct.hu + 1000.0).astype(np.float64)
    k, j, i = np.indices(ct.hu.shape)
    ijk = np.stack([(w * a).sum() / w.sum() for a in (i, j, k)])
    return ct.index_to_lps(ijk[None])[0]


def test_downsampled_keeps_physical_positions():
    ct, centre = block_ct()
    for level in ct.pyramid(3):
        # Block averages of a block aligned with the bins: the bright block's centroid is exact.
        assert_allclose(hu_centroid_lps(level), centre, rtol=0, atol=MAPPING_TOL_MM * 1e3)
    half = ct.downsampled(2)
    assert half.hu.shape == (8, 10, 12)
    assert_allclose(half.spacing_mm, 2 * ct.spacing_mm, rtol=0, atol=1e-12)
    # New voxel (0,0,0) is the centre of old voxels 0..1: half a voxel further along each axis.
    assert_allclose(half.origin_lps_mm, ct.index_to_lps(np.array([[0.5, 0.5, 0.5]]))[0], rtol=0, atol=1e-9)
    aniso = ct.downsampled((2, 1, 4))
    assert aniso.hu.shape == (4, 20, 12)
    assert_allclose(hu_centroid_lps(aniso), centre, rtol=0, atol=1e-6)


def test_downsampled_refuses_bad_factors():
    ct, _ = block_ct()
    with pytest.raises(VolumeError, match=r"pyramid factor must be positive integers, got 0"):
        ct.downsampled(0)
    assert ct.downsampled(1) is ct


def test_contains_lps_mm_is_the_grid_extent_half_a_voxel_out():
    ct = CTVolume(np.zeros((4, 5, 6), np.float32), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), np.eye(3), "HFS")
    # Voxel centres run i 0..5 (x 10..15 mm), j 0..4 (y 20..28), k 0..3 (z 30..39); the extent adds half a voxel.
    inside = [[10.0, 20.0, 30.0], [15.5, 29.0, 40.5], [9.5, 19.0, 28.5], [12.0, 24.0, 33.0]]
    outside = [[15.51, 20.0, 30.0], [10.0, 18.99, 30.0], [10.0, 20.0, 40.51], [np.nan, 20.0, 30.0],
               [1e300, 0.0, 0.0]]
    assert ct.contains_lps_mm(np.array(inside)).tolist() == [True] * 4
    assert ct.contains_lps_mm(np.array(outside)).tolist() == [False] * 5
    assert ct.contains_lps_mm([12.0, 24.0, 33.0]).tolist() == [True]
    with pytest.raises(VolumeError, match=r"points must be \(N, 3\)"):
        ct.contains_lps_mm([1.0, 2.0])


def test_header_declaring_more_than_the_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "claims.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 600\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 2_300_000)
    with pytest.raises(VolumeFileError, match=r"claims\.mha: cannot read volume: declares 2400000000 bytes"):
        read_ct(path, patient_position="HFS")
    # Under the limit but more than the file holds: truncated, refused before ITK allocates it.
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100 100 60\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 1000)
    with pytest.raises(VolumeFileError, match=r"declares 2400000 bytes of uncompressed pixel data but the file holds"):
        read_ct(path, patient_position="HFS")
    # small_ct() is 6 x 5 x 4 float32 voxels, 480 bytes: a 400-byte limit refuses it, 480 reads it.
    with pytest.raises(VolumeFileError, match=r"declares 480 bytes of pixel data, more than the 400-byte limit"):
        read_ct(write_ct(small_ct(), tmp_path / "ok.mha"), max_bytes=400)
    assert read_ct(tmp_path / "ok.mha", max_bytes=480).hu.shape == (4, 5, 6)


def test_header_naming_another_file_is_refused(tmp_path):
    path = tmp_path / "elsewhere.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = /etc/passwd\n")
    with pytest.raises(VolumeFileError, match=r"elsewhere\.mha: cannot read volume: the header names a separate"):
        read_ct(path, patient_position="HFS")
    mhd = tmp_path / "detached.mhd"
    mhd.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\n"
                    b"ElementDataFile = ../detached.raw\n")
    with pytest.raises(VolumeFileError, match=r"data file must be a plain file name beside the header"):
        read_ct(mhd, patient_position="HFS")


# ------------------------------------------------------------- whole HU kept as int16
def _write_image(array: np.ndarray, path: Path, position: str = "HFS") -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.0))
    image.SetOrigin((-12.0, 30.5, -250.0))
    image.SetMetaData(PATIENT_POSITION_KEY, position)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float32, np.float64])
def test_whole_hu_files_can_stay_int16(tmp_path, dtype):
    rng = np.random.default_rng(3)
    lo = 0 if np.dtype(dtype).kind == "u" else -1024
    values = rng.integers(lo, 255 if np.dtype(dtype) == np.uint8 else 3071, size=(5, 6, 7)).astype(dtype)
    path = _write_image(values, tmp_path / "ct.mha")
    kept = read_ct(path, keep_integer_hu=True)
    assert kept.hu.dtype == np.int16 and not kept.hu.flags.writeable
    assert np.array_equal(kept.hu, values)  # the very numbers stored
    default = read_ct(path)
    assert default.hu.dtype == np.float32 and np.array_equal(default.hu, values)
    assert_allclose(kept.lps_from_index, default.lps_from_index, rtol=0, atol=0)


@pytest.mark.parametrize("values", [
    np.full((3, 4, 5), 0.5, np.float32),  # not whole HU
    np.full((3, 4, 5), 40000, np.int32),  # beyond int16
    np.full((3, 4, 5), -40000.0, np.float32),  # beyond int16, whole
], ids=["fractional", "int32-beyond", "float-beyond"])
def test_other_files_stay_float32(tmp_path, values):
    ct = read_ct(_write_image(values, tmp_path / "ct.mha"), keep_integer_hu=True)
    assert ct.hu.dtype == np.float32 and np.array_equal(ct.hu, values.astype(np.float32))


def test_non_finite_values_are_still_refused_with_keep_integer_hu(tmp_path):
    values = np.zeros((3, 4, 5), np.float32)
    values[1, 2, 3] = np.inf
    with pytest.raises(VolumeFileError, match="1 non-finite voxels"):
        read_ct(_write_image(values, tmp_path / "ct.mha"), keep_integer_hu=True)


def test_int16_volume_downsamples_like_its_float_copy():
    ct, _ = block_ct()
    hu16 = ct.hu.astype(np.int16)
    hu16[0, 0, :3] = (-1001, -999, 7)  # averages that are not whole numbers
    as_int = CTVolume(hu16, ct.spacing_mm, ct.origin_lps_mm, ct.direction, "HFS")
    as_float = CTVolume(hu16.astype(np.float32), ct.spacing_mm, ct.origin_lps_mm, ct.direction, "HFS")
    for factor in (2, (2, 1, 4)):
        a, b = as_int.downsampled(factor), as_float.downsampled(factor)
        assert a.hu.dtype == np.float32 and np.array_equal(a.hu, b.hu)
        assert_allclose(a.lps_from_index, b.lps_from_index, rtol=0, atol=0)


def test_ct_keeps_its_own_copy_of_a_writeable_array_only():
    source = np.zeros((2, 3, 4), np.int16)
    ct = CTVolume(source, (1, 1, 1), (0, 0, 0), np.eye(3), "HFS")
    source[:] = 5
    assert ct.hu.dtype == np.int16 and not ct.hu.any() and not ct.hu.flags.writeable
    handed_over = np.zeros((2, 3, 4), np.float32)
    handed_over.setflags(write=False)  # read-only and owning its memory: kept as is
    assert CTVolume(handed_over, (1, 1, 1), (0, 0, 0), np.eye(3), "HFS").hu is handed_over
