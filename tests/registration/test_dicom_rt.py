"""RTSTRUCT contours -> masks (pixel-centre rule, even-odd holes), point ROIs, RTPLAN isocentres; refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_allclose
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from spineguide.registration.dicom_rt import (
    SUPERSAMPLE,
    ContourType,
    DicomRTError,
    rasterise_contours,
    read_rtplan,
    read_rtstruct,
    scan_dicom_folder,
)
from spineguide.registration.errors import PatientPositionError
from spineguide.registration.volume import CTVolume, PatientPosition

# A pixel centre within 1 / (2 F) px of a contour line may go either way (module docstring); the
# circle test leaves out that band plus the polygon's sagitta (r (1 - cos(pi / n)) = 8e-4 px here).
BAND_PX = 1.0 / (2 * SUPERSAMPLE) + 1e-3
LPS_EXACT_MM = 1e-9  # DS strings written with repr-level precision


def _ct(ni=40, nj=30, nk=4, spacing=(0.5, 0.8, 2.0), origin=(-10.0, 20.0, 100.0)) -> CTVolume:
    return CTVolume(np.zeros((nk, nj, ni), np.float32), spacing, origin, np.eye(3), PatientPosition.HFS)


def _lps(ct: CTVolume, ij, k: float) -> np.ndarray:
    ij = np.asarray(ij, dtype=float)
    return ct.index_to_lps(np.column_stack([ij, np.full(len(ij), float(k))]))


def _square(lo, hi):
    return [[lo, lo], [hi, lo], [hi, hi], [lo, hi]]


@pytest.mark.parametrize(("lo", "hi"), [(0.6, 3.4), (0.4, 3.6), (0.5001, 3.4999), (0.99, 3.01)])
def test_rectangle_takes_exactly_the_pixels_whose_centres_are_inside(lo, hi):
    # Pixel centres 1, 2, 3 lie inside every one of these squares; 0 and 4 lie outside
    # (plain cv2.fillPoly would take 0..4 for (0.4, 3.6): it rounds vertices to whole pixels).
    ct = _ct()
    mask = rasterise_contours([_lps(ct, _square(lo, hi), 2)], ct)
    expected = np.zeros_like(mask)
    expected[2, 1:4, 1:4] = True
    np.testing.assert_array_equal(mask, expected)


def test_circle_matches_centre_inside_rule_away_from_the_line():
    ct = _ct(ni=48, nj=44)
    centre, r = np.array([20.2, 19.7]), 10.3
    a = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    poly = centre + r * np.column_stack([np.cos(a), np.sin(a)])
    mask = rasterise_contours([_lps(ct, poly, 1)], ct)[1]
    jj, ii = np.mgrid[0:44, 0:48]
    d = np.hypot(ii - centre[0], jj - centre[1])
    clear = np.abs(d - r) > BAND_PX
    np.testing.assert_array_equal(mask[clear], (d < r)[clear])


def test_hole_and_island_follow_even_odd_rule():
    ct = _ct()
    contours = [_lps(ct, _square(1.5, 12.5), 0), _lps(ct, _square(3.5, 10.5), 0), _lps(ct, _square(5.5, 8.5), 0)]
    mask = rasterise_contours(contours, ct)[0]
    expected = np.zeros((30, 40), bool)
    expected[2:13, 2:13] = True  # outer: centres 2..12
    expected[4:11, 4:11] = False  # hole: centres 4..10
    expected[6:9, 6:9] = True  # island: centres 6..8
    np.testing.assert_array_equal(mask, expected)


def test_two_contours_on_one_slice_and_contours_on_several_slices():
    ct = _ct()
    mask = rasterise_contours(
        [_lps(ct, _square(0.5, 2.5), 1), _lps(ct, _square(20.5, 22.5), 1), _lps(ct, _square(0.5, 2.5), 3)], ct
    )
    assert mask[1].sum() == 8 and mask[3].sum() == 4 and mask[0].sum() == 0 and mask[2].sum() == 0


def test_contour_partly_outside_the_image_is_clipped():
    ct = _ct()
    mask = rasterise_contours([_lps(ct, _square(-5.5, 1.5), 0)], ct)
    assert mask[0, :2, :2].all() and mask.sum() == 4


def test_contour_off_the_slice_plane_is_refused():
    ct = _ct()
    pts = _lps(ct, _square(1, 3), 1)
    pts[2, 2] += 0.3  # 0.3 mm out of the plane
    with pytest.raises(DicomRTError, match=r"ROI 'body' contour #0 is not in a CT slice plane: .*0\.300 mm"):
        rasterise_contours([pts], ct, "body")


def test_contour_outside_the_slices_is_refused():
    ct = _ct()
    with pytest.raises(DicomRTError, match=r"contour #0 lies on slice 7, outside the CT's 4 slices"):
        rasterise_contours([_lps(ct, _square(1, 3), 7)], ct, "body")


# --------------------------------------------------------------------------- files
def _save(ds: Dataset, path, sop_class: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.save_as(path, enforce_file_format=True)


def _rtstruct(path, rois, frame_uid=None, frames=None):
    """rois: list of (number, name, type, geometric_type, list of point arrays)."""
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    frame_uid = frame_uid or generate_uid()
    decl, cont, obs = DicomSequence(), DicomSequence(), DicomSequence()
    for i, (number, name, itype, gtype, pts_list) in enumerate(rois):
        d = Dataset()
        d.ROINumber, d.ROIName = number, name
        d.ReferencedFrameOfReferenceUID = frames[i] if frames else frame_uid
        decl.append(d)
        o = Dataset()
        o.ObservationNumber, o.ReferencedROINumber, o.RTROIInterpretedType = number, number, itype
        obs.append(o)
        rc = Dataset()
        rc.ReferencedROINumber = number
        items = []
        for pts in pts_list:
            c = Dataset()
            c.ContourGeometricType = gtype
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.6f}" for v in np.ravel(pts)]
            items.append(c)
        rc.ContourSequence = DicomSequence(items)
        cont.append(rc)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = decl, cont, obs
    _save(ds, path, "1.2.840.10008.5.1.4.1.1.481.3")
    return ds


def test_rtstruct_points_become_fiducials(tmp_path):
    ct = _ct()
    _rtstruct(tmp_path / "rs.dcm", [
        (1, "body", "EXTERNAL", "CLOSED_PLANAR", [_lps(ct, _square(1, 3), 1)]),
        (2, "F1", "MARKER", "POINT", [np.array([[1.5, -2.25, 100.0]])]),
        (3, "F2", "MARKER", "POINT", [np.array([[-3.0, 4.0, 102.0]])]),
    ])
    ss = read_rtstruct(tmp_path / "rs.dcm")
    fid = ss.point_fiducials()
    assert fid.names == ("F1", "F2")
    assert_allclose(fid.positions_lps_mm, [[1.5, -2.25, 100.0], [-3.0, 4.0, 102.0]], rtol=0, atol=LPS_EXACT_MM)
    assert ss.roi("body").geometric_type is ContourType.CLOSED_PLANAR and ss.roi("body").interpreted_type == "EXTERNAL"


def test_rtstruct_refusals(tmp_path):
    ct = _ct()
    sq = [_lps(ct, _square(1, 3), 1)]
    _rtstruct(tmp_path / "a.dcm", [(1, "x", "", "CLOSED_PLANAR", sq), (2, "y", "", "CLOSED_PLANAR", sq)],
              frames=[generate_uid(), generate_uid()])
    with pytest.raises(DicomRTError, match=r"a\.dcm: ROIs on 2 frames of reference"):
        read_rtstruct(tmp_path / "a.dcm")
    ds = _rtstruct(tmp_path / "b.dcm", [(1, "x", "", "CLOSED_PLANAR", sq)])
    ds.ROIContourSequence[0].ReferencedROINumber = 9
    _save(ds, tmp_path / "b.dcm", ds.SOPClassUID)
    with pytest.raises(DicomRTError, match="refers to ROI number 9, which is not declared"):
        read_rtstruct(tmp_path / "b.dcm")
    ds.ROIContourSequence[0].ReferencedROINumber = 1
    ds.ROIContourSequence[0].ContourSequence[0].NumberOfContourPoints = 5
    _save(ds, tmp_path / "c.dcm", ds.SOPClassUID)
    with pytest.raises(DicomRTError, match="Number of Contour Points says 5, Contour Data holds 4"):
        read_rtstruct(tmp_path / "c.dcm")
    ds.ROIContourSequence[0].ContourSequence[0].NumberOfContourPoints = 4
    ds.ROIContourSequence[0].ContourSequence[0].ContourGeometricType = "OPEN_PLANAR"
    _save(ds, tmp_path / "d.dcm", ds.SOPClassUID)
    with pytest.raises(DicomRTError, match="contour type 'OPEN_PLANAR' is not supported"):
        read_rtstruct(tmp_path / "d.dcm")
    _rtstruct(tmp_path / "e.dcm", [(1, "F1", "MARKER", "POINT", [np.zeros((2, 3))])])
    with pytest.raises(DicomRTError, match="point ROI 'F1' must hold exactly one point, got 2"):
        read_rtstruct(tmp_path / "e.dcm").point_fiducials()
    _rtstruct(tmp_path / "f.dcm", [(1, "x", "", "CLOSED_PLANAR", sq), (2, "x", "", "CLOSED_PLANAR", sq)])
    with pytest.raises(DicomRTError, match=r"duplicate ROI names \['x'\]"):
        read_rtstruct(tmp_path / "f.dcm")
    _rtstruct(tmp_path / "g.dcm", [(1, "x", "", "CLOSED_PLANAR", sq)])
    with pytest.raises(DicomRTError, match="no ROI named 'nope'"):
        read_rtstruct(tmp_path / "g.dcm").roi("nope")


def _rtplan(path, isocentres, positions=("HFS",), frame_uid="1.2.3", drop_iso=False):
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    ds.FrameOfReferenceUID = frame_uid
    ds.RTPlanLabel = "test"
    setups = []
    for i, pos in enumerate(positions):
        s = Dataset()
        s.PatientSetupNumber = i + 1
        s.PatientPosition = pos
        setups.append(s)
    ds.PatientSetupSequence = DicomSequence(setups)
    beams = []
    for b, iso in enumerate(isocentres):
        cp = Dataset()
        cp.ControlPointIndex = 0
        if not drop_iso:
            cp.IsocenterPosition = [f"{v:.6f}" for v in iso]
        beam = Dataset()
        beam.BeamNumber, beam.BeamName = b + 1, f"B{b + 1}"
        beam.ControlPointSequence = DicomSequence([cp])
        beams.append(beam)
    ds.BeamSequence = DicomSequence(beams)
    _save(ds, path, "1.2.840.10008.5.1.4.1.1.481.5")


def test_rtplan_isocentres_are_merged_per_beam(tmp_path):
    _rtplan(tmp_path / "p.dcm", [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-4.5, 0.0, 7.25]])
    rp = read_rtplan(tmp_path / "p.dcm")
    assert_allclose(rp.isocentres_lps_mm, [[1, 2, 3], [-4.5, 0, 7.25]], rtol=0, atol=LPS_EXACT_MM)
    assert rp.beams_per_isocentre == (("B1", "B2"), ("B3",))
    assert rp.patient_positions == (PatientPosition.HFS,)


def test_rtplan_refusals(tmp_path):
    _rtplan(tmp_path / "a.dcm", [[0, 0, 0]], drop_iso=True)
    with pytest.raises(DicomRTError, match=r"beam 'B1' has no Isocenter Position \(300A,012C\)"):
        read_rtplan(tmp_path / "a.dcm")
    _rtplan(tmp_path / "b.dcm", [])
    with pytest.raises(DicomRTError, match="no beam with an isocentre"):
        read_rtplan(tmp_path / "b.dcm")
    _rtplan(tmp_path / "c.dcm", [[0, 0, 0]], positions=("HFDL",))
    with pytest.raises(PatientPositionError, match="patient position 'HFDL' is not supported"):
        read_rtplan(tmp_path / "c.dcm")
    _rtplan(tmp_path / "d.dcm", [[0, 0, 0]], positions=())
    with pytest.raises(DicomRTError, match=r"no Patient Setup Sequence"):
        read_rtplan(tmp_path / "d.dcm")
    with pytest.raises(DicomRTError, match="not an RT Structure Set"):
        read_rtstruct(tmp_path / "d.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    with pytest.raises(DicomRTError, match=r"junk\.dcm: unreadable or corrupt DICOM"):
        read_rtplan(tmp_path / "junk.dcm")


def test_scan_groups_files_and_lists_non_dicom(tmp_path):
    (tmp_path / "sub").mkdir()
    _rtplan(tmp_path / "sub" / "p.dcm", [[0, 0, 0]])
    (tmp_path / "notes.txt").write_text("hello")
    inv = scan_dicom_folder(tmp_path)
    assert [p.name for p in inv.plans] == ["p.dcm"] and [p.name for p in inv.not_dicom] == ["notes.txt"]
    assert inv.ct_series == () and inv.structure_sets == ()
    with pytest.raises(DicomRTError, match="not a folder"):
        scan_dicom_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomRTError, match="holds no files"):
        scan_dicom_folder(tmp_path / "empty")
    assert pydicom.dcmread(inv.plans[0]).Modality == "RTPLAN"
