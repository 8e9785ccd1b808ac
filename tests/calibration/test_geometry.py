"""Imaging geometry: projection, matrix <-> physical description, rays, epipolar lines, triangulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from spineguide.calibration import (
    GeometryError,
    GeometryFileError,
    ImagerGeometry,
    SchemaError,
    StereoGeometry,
    default_stereo_geometry,
    geometry_from_json,
    read_geometry,
    write_geometry,
)

CONVENTION_TOL_PX = 1e-6  # the worked vectors are given to 1e-9 px; float round-off of a 3x4 product
ROUND_TRIP_TOL_MM = 1e-6  # decomposition is exact algebra; 1e-6 mm is pure round-off
TRIANGULATION_TOL_MM = 1e-6  # noise-free pixels: exact up to round-off


@pytest.fixture(scope="module")
def example_geometry(data_dir):
    return read_geometry(data_dir / "geometry-example.json")


def test_example_projection_matches_worked_vectors(example_geometry, conventions_vectors):
    for case in conventions_vectors["projection"]["cases"]:
        imager = example_geometry[case["imager"]]
        for point in case["points"]:
            px = imager.project(np.array(point["room_mm"], dtype=float))
            assert_allclose(px, point["pixel_col_row"], rtol=0, atol=CONVENTION_TOL_PX)


def test_example_file_matrix_agrees_with_physical_description(example_geometry, data_dir):
    raw = json.loads((data_dir / "geometry-example.json").read_text(encoding="utf-8"))
    for entry in raw["imagers"]:
        assert example_geometry[entry["name"]].max_disagreement_px(entry["projection_matrix"]) < 1e-6


def test_isocentre_projects_to_panel_centre_in_default_room():
    geom = default_stereo_geometry()
    for imager in geom.imagers:
        assert_allclose(imager.project(np.zeros(3)), [511.5, 511.5], rtol=0, atol=1e-9)
        assert imager.source_to_isocentre_mm == pytest.approx(2200.0)
        assert imager.source_to_detector_mm == pytest.approx(3600.0)
    # 90 degrees between the central rays, each 45 degrees from vertical.
    a, b = geom["A"].normal, geom["B"].normal
    assert math.degrees(math.acos(a @ b)) == pytest.approx(90.0)
    for n in (a, b):
        assert math.degrees(math.acos(-n[2])) == pytest.approx(45.0)


def test_default_room_moves_image_the_expected_way():
    # Rows run along +Y (towards the gantry): a point moved +Y moves to larger rows in both views.
    geom = default_stereo_geometry()
    for imager in geom.imagers:
        d = imager.project([0.0, 10.0, 0.0]) - imager.project([0.0, 0.0, 0.0])
        assert d[1] > 0 and abs(d[0]) < 1e-9
        # Magnification 3600/2200 at 0.4 mm pixels: 10 mm -> 40.9 px.
        assert d[1] == pytest.approx(10 * 3600 / 2200 / 0.4, rel=1e-3)


def _random_imager(rng: np.random.Generator, name: str = "X") -> ImagerGeometry:
    # A plausible imager with random orientation: source 1500-2500 mm from the isocentre.
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    sad = rng.uniform(1500, 2500)
    sid = sad + rng.uniform(500, 1500)
    source = -sad * direction
    helper = np.array([0.0, 1.0, 0.0]) if abs(direction[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(helper, direction)
    u /= np.linalg.norm(u)
    v = np.cross(direction, u)
    ang = rng.uniform(0, 2 * np.pi)
    u, v = math.cos(ang) * u + math.sin(ang) * v, -math.sin(ang) * u + math.cos(ang) * v
    spacing = (rng.uniform(0.1, 0.8), rng.uniform(0.1, 0.8))
    rows, cols = int(rng.integers(200, 2000)), int(rng.integers(200, 2000))
    # A tilted panel (issue 17 item 6: this used to multiply the offset by a zero matrix and never tilt): the
    # panel plane turned up to 10 deg about a random in-plane axis, and its centre moved off the central ray.
    axis = rng.normal(size=2)
    axis = (axis[0] * u + axis[1] * v) / np.linalg.norm(axis)
    tilt = math.radians(rng.uniform(-10.0, 10.0))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    turn = np.eye(3) + math.sin(tilt) * k + (1.0 - math.cos(tilt)) * (k @ k)  # Rodrigues
    u, v = turn @ u, turn @ v
    centre = source + sid * direction + rng.normal(scale=20, size=2) @ np.stack([u, v])
    origin = centre - (cols - 1) / 2 * spacing[1] * u - (rows - 1) / 2 * spacing[0] * v + rng.uniform(-30, 30) * u
    return ImagerGeometry(name, source, origin, u, v, spacing, rows, cols)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(-5.0, 5.0).filter(lambda s: abs(s) > 1e-3))
def test_matrix_round_trip_recovers_physical_description(seed, scale):
    rng = np.random.default_rng(seed)
    imager = _random_imager(rng)
    matrix = imager.projection_matrix * scale  # any non-zero scale, either sign
    back = ImagerGeometry.from_projection_matrix(
        matrix, name="X", rows=imager.rows, cols=imager.cols, pixel_spacing_mm=imager.pixel_spacing_mm
    )
    assert_allclose(back.source_mm, imager.source_mm, rtol=0, atol=ROUND_TRIP_TOL_MM)
    assert_allclose(back.origin_mm, imager.origin_mm, rtol=0, atol=ROUND_TRIP_TOL_MM)
    assert_allclose(back.col_direction, imager.col_direction, rtol=0, atol=1e-9)
    assert_allclose(back.row_direction, imager.row_direction, rtol=0, atol=1e-9)
    assert_allclose(back.pixel_spacing_mm, imager.pixel_spacing_mm, rtol=1e-9, atol=0)


def test_matrix_decomposition_with_source_to_detector_distance_fixes_pixel_spacing():
    imager = default_stereo_geometry()["B"]
    back = ImagerGeometry.from_projection_matrix(
        imager.projection_matrix, name="B", rows=1024, cols=1024, source_to_detector_mm=3600.0
    )
    assert_allclose(back.pixel_spacing_mm, [0.4, 0.4], rtol=1e-12, atol=0)
    assert_allclose(back.origin_mm, imager.origin_mm, rtol=0, atol=ROUND_TRIP_TOL_MM)


def test_matrix_decomposition_needs_exactly_one_scale():
    p = default_stereo_geometry()["A"].projection_matrix
    with pytest.raises(GeometryError, match="exactly one"):
        ImagerGeometry.from_projection_matrix(p, name="A", rows=1024, cols=1024)
    with pytest.raises(GeometryError, match="exactly one"):
        ImagerGeometry.from_projection_matrix(
            p, name="A", rows=1024, cols=1024, pixel_spacing_mm=(0.4, 0.4), source_to_detector_mm=3600
        )


def test_matrix_decomposition_refuses_contradicting_aspect_ratio():
    p = default_stereo_geometry()["A"].projection_matrix
    with pytest.raises(GeometryError, match="imager 'A'.*row spacing"):
        ImagerGeometry.from_projection_matrix(p, name="A", rows=1024, cols=1024, pixel_spacing_mm=(0.5, 0.4))


def test_matrix_decomposition_refuses_singular_matrix():
    p = np.zeros((3, 4))
    p[:, :3] = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    with pytest.raises(GeometryError, match="singular"):
        ImagerGeometry.from_projection_matrix(p, name="Z", rows=10, cols=10, pixel_spacing_mm=(1, 1))


def test_backprojected_ray_passes_through_projected_point():
    rng = np.random.default_rng(1)
    imager = default_stereo_geometry()["A"]
    pts = rng.uniform(-100, 100, size=(50, 3))
    src, dirs = imager.backproject(imager.project(pts))
    to_pt = pts - src
    perp = to_pt - (to_pt * dirs).sum(axis=1, keepdims=True) * dirs
    assert_allclose(np.linalg.norm(perp, axis=1), 0, rtol=0, atol=1e-9)


def test_binned_imager_pixel_is_centre_of_its_bin():
    imager = default_stereo_geometry()["A"]
    binned = imager.binned(4)
    assert (binned.rows, binned.cols) == (256, 256)
    pt = np.array([12.0, -7.0, 30.0])
    full = imager.project(pt)
    # Full-resolution pixel p lies in bin (p - (b-1)/2) / b.
    assert_allclose(binned.project(pt), (full - 1.5) / 4, rtol=0, atol=1e-9)


def test_triangulation_recovers_points_exactly():
    geom = default_stereo_geometry()
    rng = np.random.default_rng(2)
    pts = rng.uniform(-80, 80, size=(20, 3))
    tri = geom.triangulate({name: geom[name].project(pts) for name in geom.names})
    assert_allclose(tri.points_mm, pts, rtol=0, atol=TRIANGULATION_TOL_MM)
    assert_allclose(tri.ray_distance_mm, 0, rtol=0, atol=1e-6)
    assert_allclose(tri.reprojection_px, 0, rtol=0, atol=1e-6)


def test_triangulation_ray_distance_measures_inconsistency():
    # Moving the B pixel 1 px along the row direction (perpendicular to the epipolar lines,
    # which run along columns in this room) separates the rays by 1 px at the isocentre
    # in B: 0.4 mm / magnification 1.636 = 0.244 mm.
    geom = default_stereo_geometry()
    pa = geom["A"].project([0.0, 0.0, 0.0])
    pb = geom["B"].project([0.0, 0.0, 0.0]) + [0.0, 1.0]
    tri = geom.triangulate({"A": pa[None], "B": pb[None]})
    assert tri.ray_distance_mm[0] == pytest.approx(0.4 * 2200 / 3600, rel=1e-3)


def test_triangulation_refinement_beats_midpoint_under_noise():
    geom = default_stereo_geometry()
    rng = np.random.default_rng(3)
    pts = rng.uniform(-50, 50, size=(400, 3))
    noisy = {n: geom[n].project(pts) + rng.normal(scale=0.3, size=(400, 2)) for n in geom.names}
    err_mid = np.linalg.norm(geom.triangulate(noisy, refine=False).points_mm - pts, axis=1)
    err_ml = np.linalg.norm(geom.triangulate(noisy, refine=True).points_mm - pts, axis=1)
    # 0.3 px noise at 0.244 mm/px at the isocentre: about 0.1 mm per axis in 3D.
    assert np.sqrt(np.mean(err_ml**2)) < 0.15
    assert np.mean(err_ml**2) <= np.mean(err_mid**2) * 1.001


def test_epipolar_line_of_a_point_passes_through_its_match():
    geom = default_stereo_geometry()
    rng = np.random.default_rng(4)
    pts = rng.uniform(-80, 80, size=(30, 3))
    pa, pb = geom["A"].project(pts), geom["B"].project(pts)
    dist = geom.epipolar_distance_px("A", "B", pa, pb)
    assert_allclose(np.diag(dist), 0, rtol=0, atol=1e-6)
    dist_back = geom.epipolar_distance_px("B", "A", pb, pa)
    assert_allclose(np.diag(dist_back), 0, rtol=0, atol=1e-6)
    # A different point is, in general, off the line.
    assert np.median(dist[~np.eye(30, dtype=bool)]) > 1.0


# ------------------------------------------------------------------ validation
def _imager_kwargs(**override):
    base = default_stereo_geometry()["A"]
    kw = dict(
        name="A",
        source_mm=base.source_mm,
        origin_mm=base.origin_mm,
        col_direction=base.col_direction,
        row_direction=base.row_direction,
        pixel_spacing_mm=base.pixel_spacing_mm,
        rows=base.rows,
        cols=base.cols,
    )
    kw.update(override)
    return kw


@pytest.mark.parametrize(
    "override, message",
    [
        ({"col_direction": [1.0, 0.0, 0.1]}, "unit vector"),
        ({"row_direction": [np.sqrt(0.5), np.sqrt(0.5), 0.0]}, "not perpendicular"),
        ({"source_mm": [np.nan, 0, 0]}, "not finite"),
        ({"pixel_spacing_mm": [0.4, -0.4]}, "pixel_spacing_mm"),
        ({"rows": 0}, "rows"),
        ({"cols": 10.5}, "cols"),
        ({"origin_mm": [1.0, 2.0]}, "3 numbers"),
    ],
)
def test_invalid_imager_is_refused_with_its_name(override, message):
    with pytest.raises(GeometryError, match=f"imager 'A'.*{message}"):
        ImagerGeometry(**_imager_kwargs(**override))


def test_source_in_panel_plane_is_degenerate():
    base = default_stereo_geometry()["A"]
    with pytest.raises(GeometryError, match="degenerate"):
        ImagerGeometry(**_imager_kwargs(source_mm=base.origin_mm))


def test_projecting_behind_the_source_is_an_error():
    imager = default_stereo_geometry()["A"]
    with pytest.raises(GeometryError, match="behind the source"):
        imager.project(imager.source_mm * 2)


def test_stereo_geometry_needs_two_unique_imagers():
    a = default_stereo_geometry()["A"]
    with pytest.raises(GeometryError, match="at least two"):
        StereoGeometry((a,))
    with pytest.raises(GeometryError, match="unique"):
        StereoGeometry((a, a))
    with pytest.raises(KeyError, match="no imager named 'C'"):
        default_stereo_geometry()["C"]


# ------------------------------------------------------------------------ files
def test_geometry_file_round_trip(tmp_path):
    geom = default_stereo_geometry()
    path = write_geometry(geom, tmp_path / "g.json")
    back = read_geometry(path)
    for name in geom.names:
        assert_allclose(back[name].projection_matrix, geom[name].projection_matrix, rtol=0, atol=1e-12)
    assert back.notes == geom.notes


def test_matrix_only_file_is_decomposed(tmp_path):
    doc = default_stereo_geometry().to_json()
    for entry in doc["imagers"]:
        for key in ("origin_mm", "col_direction", "row_direction"):
            del entry["detector"][key]
        del entry["source_mm"]
    geom = geometry_from_json(doc)
    assert_allclose(geom["A"].source_mm, default_stereo_geometry()["A"].source_mm, rtol=0, atol=1e-6)


def test_disagreeing_matrix_is_rejected_naming_imager_and_size(tmp_path):
    doc = default_stereo_geometry().to_json()
    # Adding 0.3 w_iso to the column row shifts a point at depth w by 0.3 w_iso / w px; the
    # nearest checked points sit at 30% of the source-panel distance: 0.3 * 2200 / 1080 = 0.611 px.
    doc["imagers"][1]["projection_matrix"][0][3] += 0.3 * doc["imagers"][1]["projection_matrix"][2][3]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(GeometryFileError, match=r"bad.json: imager 'B'.*disagree by 0\.611 px \(limit 0\.05 px\)"):
        read_geometry(path)


def test_small_disagreement_within_limit_is_accepted():
    doc = default_stereo_geometry().to_json()
    # Largest shift 0.02 * 2200 / 1080 = 0.041 px: inside the 0.05 px limit.
    doc["imagers"][0]["projection_matrix"][0][3] += 0.02 * doc["imagers"][0]["projection_matrix"][2][3]
    assert geometry_from_json(doc)["A"].max_disagreement_px(doc["imagers"][0]["projection_matrix"]) == pytest.approx(
        0.02 * 2200 / 1080, rel=1e-3
    )


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda d: d.update(schema="kv-geometry/2"), SchemaError, "unknown geometry schema 'kv-geometry/2'"),
        (lambda d: d.pop("schema"), SchemaError, "unknown geometry schema None"),
        (lambda d: d.update(imagers=d["imagers"][:1]), GeometryFileError, "at least two"),
        (lambda d: d["imagers"][0]["detector"].pop("rows"), GeometryFileError, "imager 'A': detector.rows is missing"),
        (lambda d: d["imagers"][1]["detector"].pop("origin_mm"), GeometryFileError, "imager 'B'.*missing origin_mm"),
        (
            lambda d: (d["imagers"][0].pop("source_mm"), d["imagers"][0].pop("projection_matrix")),
            GeometryFileError,
            "imager 'A'.*missing source_mm",
        ),
        (lambda d: d["imagers"][0].update(name=""), GeometryFileError, "imagers\\[0\\]: 'name'"),
        (lambda d: d.update(calibrated_unix_s="yesterday"), GeometryFileError, "calibrated_unix_s"),
        (lambda d: d["imagers"][1].update(name="A"), GeometryFileError, "unique"),
    ],
)
def test_bad_geometry_documents_are_refused(mutate, error, message):
    doc = default_stereo_geometry().to_json()
    mutate(doc)
    with pytest.raises(error, match=message):
        geometry_from_json(doc)


def test_unreadable_geometry_file_names_the_file(tmp_path):
    with pytest.raises(GeometryFileError, match="missing.json: cannot read"):
        read_geometry(tmp_path / "missing.json")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(GeometryFileError, match="broken.json: not valid JSON"):
        read_geometry(bad)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda im: im.__setitem__("source_mm", [1e308, 0.0, 0.0]), r"source_mm must hold finite numbers of magnitude"),
        (lambda im: im["detector"].__setitem__("origin_mm", [0.0, "x", 0.0]), r"detector\.origin_mm must hold finite"),
        (lambda im: im["detector"].__setitem__("pixel_spacing_mm", [1e-300, 0.4]), r"detector\.pixel_spacing_mm must be >="),
        (lambda im: im["detector"].__setitem__("pixel_spacing_mm", [0.4]), r"detector\.pixel_spacing_mm must be 2 numbers"),
        (lambda im: im.__setitem__("projection_matrix", [[1e300] * 4] * 3), r"projection_matrix must hold finite"),
        (lambda im: im.__setitem__("projection_matrix", [1, 2, 3]), r"projection_matrix must be a list of rows"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_imager(data_dir, tmp_path, edit, message):
    doc = json.loads((data_dir / "geometry-example.json").read_text(encoding="utf-8"))
    edit(doc["imagers"][1])
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    name = doc["imagers"][1]["name"]
    with pytest.raises(GeometryFileError, match=rf"g\.json: imager '{name}': {message}"):
        read_geometry(path)


def test_geometry_file_that_is_not_strict_json_is_refused(tmp_path):
    for name, raw, message in (("dup.json", b'{"schema": "kv-geometry/1", "schema": "x"}', "duplicate key 'schema'"),
                               ("latin1.json", '{"notes": "caf\xe9"}'.encode("latin-1"), "not UTF-8 text"),
                               ("deep.json", b"[" * 70 + b"]" * 70, "nested 70 levels deep"),
                               ("nan.json", b'{"calibrated_unix_s": NaN}', "NaN is not a JSON number")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(GeometryFileError, match=rf"{name}: .*{message}"):
            read_geometry(tmp_path / name)
    with pytest.raises(GeometryFileError, match=r"cannot read geometry file: is a directory"):
        read_geometry(tmp_path)
