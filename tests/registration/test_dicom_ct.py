"""Reading CT series from DICOM folders: geometry, ordering, rescale and every refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from spineguide.registration.ctfile import read_ct
from spineguide.registration.dicom_ct import read_dicom_ct
from spineguide.registration.errors import PatientPositionError, VolumeFileError
from spineguide.registration.volume import PatientPosition

# The helper writes positions and cosines with 6 decimals (DICOM DS), +-5e-7 mm each; the
# reader estimates the slice step from those positions, so k steps can accumulate ~k * 1e-6 mm.
# 1e-5 mm covers the 5-slice series used here and is far below any meaningful geometric error.
GEOMETRY_TOL_MM = 1e-5
# HU from integer stored values and exact binary slopes/intercepts are exact in float32.
HU_TOL = 0.0


def write_series(
    folder: Path,
    *,
    n_slices: int = 5,
    rows: int = 6,
    cols: int = 7,
    pixel_spacing_mm=(0.8, 0.6),  # (row spacing, col spacing)
    slice_step_mm: float = 2.5,
    origin_lps_mm=(-20.0, -30.0, 100.0),
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    patient_position: str | None = "HFS",
    seed: int = 0,
    shuffle: bool = True,
    slopes=None,
    intercepts=None,
) -> dict:
    """Write a synthetic CT series into ``folder``; return its known truth.

    Slice ``k`` sits at ``origin + k * slice_step * normal``; stored values are
    seeded random uint16, HU = stored * slope_k + intercept_k. Files are named
    in a scrambled order so the reader cannot rely on file order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    orientation = tuple(round(float(v), 6) for v in orientation)  # what the file will say
    r = np.array(orientation[:3], dtype=float)
    c = np.array(orientation[3:], dtype=float)
    n = np.cross(r, c)
    series_uid, frame_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    slopes = [1.0] * n_slices if slopes is None else slopes
    intercepts = [-1024.0] * n_slices if intercepts is None else intercepts
    stored = rng.integers(0, 3000, size=(n_slices, rows, cols), dtype=np.uint16)
    names = [f"s{idx:03d}.dcm" for idx in (rng.permutation(n_slices) if shuffle else range(n_slices))]
    paths = []
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        if patient_position is not None:
            ds.PatientPosition = patient_position
        ds.InstanceNumber = n_slices - k  # deliberately opposite to the geometry
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        pos = np.array(origin_lps_mm) + k * slice_step_mm * n
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing_mm]
        ds.SliceThickness = f"{slice_step_mm:.6f}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        ds.PixelData = stored[k].tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    hu = stored.astype(np.float64) * np.array(slopes)[:, None, None] + np.array(intercepts)[:, None, None]
    return {"paths": paths, "hu": hu, "r": r, "c": c, "n": n, "series_uid": series_uid, "frame_uid": frame_uid}


def edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def test_voxel_centres_are_where_the_series_says(tmp_path):
    origin = np.array([-20.0, -30.0, 100.0])
    truth = write_series(tmp_path, pixel_spacing_mm=(0.8, 0.6), slice_step_mm=2.5, origin_lps_mm=origin)
    ct = read_dicom_ct(tmp_path)
    assert ct.hu.shape == truth["hu"].shape
    assert ct.patient_position is PatientPosition.HFS
    # voxel (i, j, k): i along the row direction at col spacing 0.6, j along columns at row spacing 0.8.
    ijk = np.array([[0, 0, 0], [6, 0, 0], [0, 5, 0], [0, 0, 4], [3, 2, 1]], dtype=float)
    expected = origin + ijk[:, :1] * 0.6 * truth["r"] + ijk[:, 1:2] * 0.8 * truth["c"] + ijk[:, 2:] * 2.5 * truth["n"]
    assert_allclose(ct.index_to_lps(ijk), expected, rtol=0, atol=GEOMETRY_TOL_MM)
    assert_allclose(ct.hu, truth["hu"], rtol=0, atol=HU_TOL)


def test_oblique_orientation_follows_the_cosines(tmp_path):
    # A series in a rotated frame (rows 30 deg off LPS x, columns along -z, normal r x c):
    # the voxel grid must follow the cosines, not the LPS axes.
    a = np.deg2rad(30.0)
    r = (np.cos(a), np.sin(a), 0.0)
    c = (0.0, 0.0, -1.0)
    truth = write_series(tmp_path, orientation=r + c, n_slices=4, origin_lps_mm=(5.0, 7.0, -3.0), slice_step_mm=1.25)
    ct = read_dicom_ct(tmp_path)
    expected = np.array([5.0, 7.0, -3.0]) + 2 * 0.6 * truth["r"] + 1 * 0.8 * truth["c"] + 3 * 1.25 * truth["n"]
    assert_allclose(ct.index_to_lps(np.array([[2.0, 1.0, 3.0]]))[0], expected, rtol=0, atol=GEOMETRY_TOL_MM)
    assert_allclose(ct.hu, truth["hu"], rtol=0, atol=HU_TOL)


def test_rescale_is_applied_per_slice(tmp_path):
    truth = write_series(tmp_path, n_slices=3, slopes=[1.0, 2.0, 0.5], intercepts=[-1024.0, -1000.0, 0.0])
    assert_allclose(read_dicom_ct(tmp_path).hu, truth["hu"], rtol=0, atol=HU_TOL)


def test_read_ct_dispatches_folders_and_checks_given_position(tmp_path):
    write_series(tmp_path, patient_position="FFP")
    assert read_ct(tmp_path).patient_position is PatientPosition.FFP
    with pytest.raises(PatientPositionError, match="series says patient position FFP, but HFS was given"):
        read_ct(tmp_path, patient_position="HFS")


def test_non_ct_objects_are_skipped(tmp_path):
    truth = write_series(tmp_path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    assert_allclose(read_dicom_ct(tmp_path).hu, truth["hu"], rtol=0, atol=HU_TOL)


# ----------------------------------------------------------------- refusals
def test_missing_folder(tmp_path):
    with pytest.raises(VolumeFileError, match="nowhere: not a folder"):
        read_dicom_ct(tmp_path / "nowhere")


def test_folder_without_ct(tmp_path):
    with pytest.raises(VolumeFileError, match=r"no CT series found \(0 files"):
        read_dicom_ct(tmp_path)


def test_mixed_series(tmp_path):
    write_series(tmp_path / "x", seed=1)
    write_series(tmp_path / "y", seed=2, n_slices=2)
    for p in (tmp_path / "y").iterdir():
        p.rename(tmp_path / "x" / ("y_" + p.name))
    with pytest.raises(VolumeFileError, match=r"2 CT series mixed"):
        read_dicom_ct(tmp_path / "x")


def test_mixed_frames_of_reference(tmp_path):
    truth = write_series(tmp_path)
    edit(truth["paths"][2], FrameOfReferenceUID=generate_uid())
    with pytest.raises(VolumeFileError, match=r"2 Frames of Reference mixed"):
        read_dicom_ct(tmp_path)


def test_corrupt_file_is_named(tmp_path):
    truth = write_series(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(VolumeFileError, match=r"junk\.dcm: unreadable or corrupt DICOM"):
        read_dicom_ct(tmp_path)
    (tmp_path / "junk.dcm").unlink()
    # Truncated pixel data: the header reads, the pixels do not.
    data = truth["paths"][1].read_bytes()
    truth["paths"][1].write_bytes(data[:-20])
    with pytest.raises(VolumeFileError, match=rf"{truth['paths'][1].name}: cannot decode pixel data"):
        read_dicom_ct(tmp_path)


def test_missing_slice_reports_gap(tmp_path):
    truth = write_series(tmp_path, n_slices=6, slice_step_mm=2.5)
    # Slice k=3 sits at z = 100 + 7.5; its neighbours at 105.0 and 110.0 leave a 5 mm gap.
    truth["paths"][3].unlink()
    with pytest.raises(
        VolumeFileError,
        match=r"missing slices: gap between s\d+\.dcm \(105\.000 mm along the normal\) and s\d+\.dcm "
        r"\(110\.000 mm\) is 5\.000 mm, expected spacing 2\.500 mm \(1 slice\(s\) missing\)",
    ):
        read_dicom_ct(tmp_path)


def test_non_uniform_spacing(tmp_path):
    truth = write_series(tmp_path, n_slices=6, slice_step_mm=2.5)
    edit(truth["paths"][5], ImagePositionPatient=["-20", "-30", "113.5"])
    # Slice 4 sits at 110 mm; slice 5 moved from 112.5 to 113.5 mm makes a 3.5 mm step.
    message = (
        r"non-uniform slice spacing: step between s\d+\.dcm \(110\.000 mm along the normal\) and "
        r"s\d+\.dcm \(113\.500 mm\) is 3\.500 mm, expected 2\.500 mm"
    )
    with pytest.raises(VolumeFileError, match=message):
        read_dicom_ct(tmp_path)


def test_duplicate_slice(tmp_path):
    truth = write_series(tmp_path, n_slices=4)
    edit(truth["paths"][2], ImagePositionPatient=["-20", "-30", "102.5"])
    with pytest.raises(VolumeFileError, match=r"duplicate slice position 102\.500 mm"):
        read_dicom_ct(tmp_path)


def test_gantry_tilt_tag(tmp_path):
    truth = write_series(tmp_path)
    edit(truth["paths"][0], GantryDetectorTilt="15")
    with pytest.raises(VolumeFileError, match=r"gantry tilt 15 deg \(0018,1120\)"):
        read_dicom_ct(tmp_path)


def test_sheared_stack_is_tilt_even_without_tag(tmp_path):
    truth = write_series(tmp_path, n_slices=4)
    # Each slice shifted 0.5 mm along y per slice: positions not along the normal.
    for k, p in enumerate(truth["paths"]):
        edit(p, ImagePositionPatient=["-20", f"{-30 + 0.5 * k}", f"{100 + 2.5 * k}"])
    with pytest.raises(VolumeFileError, match=r"not along the slice normal \(gantry tilt or sheared stack\)"):
        read_dicom_ct(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ImageOrientationPatient": ["1", "0", "0", "0", "0.9998", "0.02"]}, "inconsistent Image Orientation"),
        ({"Rows": 5, "PixelData": np.zeros((5, 7), np.uint16).tobytes()}, r"inconsistent slice size: .* is 5x7"),
        ({"PixelSpacing": ["0.8", "0.65"]}, r"inconsistent Pixel Spacing: .* has \[0\.8, 0\.65\] mm"),
    ],
)
def test_inconsistent_slices(tmp_path, change, message):
    truth = write_series(tmp_path)
    edit(truth["paths"][1], **change)
    with pytest.raises(VolumeFileError, match=message):
        read_dicom_ct(tmp_path)


def test_decubitus_position_is_refused(tmp_path):
    write_series(tmp_path, patient_position="HFDL")
    with pytest.raises(PatientPositionError, match=r"patient position 'HFDL' is not supported"):
        read_dicom_ct(tmp_path)


def test_missing_patient_position(tmp_path):
    write_series(tmp_path, patient_position=None)
    with pytest.raises(PatientPositionError, match=r"missing Patient Position \(0018,5100\)"):
        read_dicom_ct(tmp_path)


def test_inconsistent_patient_position(tmp_path):
    truth = write_series(tmp_path)
    edit(truth["paths"][0], PatientPosition="FFS")
    with pytest.raises(PatientPositionError, match=r"slices disagree on Patient Position .*'FFS', 'HFS'"):
        read_dicom_ct(tmp_path)


def test_single_slice_is_not_a_volume(tmp_path):
    write_series(tmp_path, n_slices=1)
    with pytest.raises(VolumeFileError, match="only one slice"):
        read_dicom_ct(tmp_path)


def test_missing_rescale(tmp_path):
    truth = write_series(tmp_path)
    edit(truth["paths"][2], RescaleSlope=None)
    with pytest.raises(VolumeFileError, match=r"missing Rescale Slope \(0028,1053\)"):
        read_dicom_ct(tmp_path)
