"""bb-phantom/1 files and the built-in default phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_allclose

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.calibration.phantom import (
    MIN_MARKERS,
    BBPhantom,
    Marker,
    PhantomError,
    PhantomFileError,
    default_phantom,
    phantom_from_json,
    read_phantom,
    write_phantom,
)

EXACT_MM = 1e-12  # values written and read back as JSON floats are exact


def _doc(positions, names=None, diameter=2.0):
    names = names or [f"M{i}" for i in range(len(positions))]
    return {
        "schema": "bb-phantom/1",
        "markers": [
            {"name": n, "position_mm": list(p), "diameter_mm": diameter, "material": "tungsten"}
            for n, p in zip(names, positions)
        ],
    }


GOOD = [[0, 0, 0], [50, 0, 0], [0, 50, 0], [0, 0, 50], [-40, -40, 30], [30, -30, -40], [-20, 40, -50]]


def test_default_phantom_is_sixteen_tungsten_bbs_in_a_120_mm_cube_with_centre_at_isocentre():
    ph = default_phantom()
    assert ph.n_markers == 16
    assert set(ph.materials) == {"tungsten"}
    assert np.all((ph.diameters_mm >= 1.5) & (ph.diameters_mm <= 2.0))
    assert np.all(np.abs(ph.positions_mm) <= 60.0)
    assert_allclose(ph.positions_mm[ph.centre_index], [0.0, 0.0, 0.0], rtol=0, atol=0)


def test_default_phantom_projections_are_at_least_14_mm_apart_in_both_default_imagers():
    # The layout criterion of docs/CALIBRATION.md: 14 mm at isocentre scale, far
    # more than the matching gate and the few mm a rotated phantom moves.
    ph = default_phantom()
    for im in default_stereo_geometry().imagers:
        px = im.project(ph.positions_mm)
        mm = px * im.pixel_spacing_mm[0] / im.magnification
        d = np.linalg.norm(mm[:, None] - mm[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        assert d.min() >= 14.0


def test_write_then_read_gives_the_same_phantom(tmp_path):
    ph = BBPhantom(phantom_from_json(_doc(GOOD)).markers, "test", np.array([0.1, -0.2, 0.3]))
    back = read_phantom(write_phantom(ph, tmp_path / "p.json"))
    assert back.names == ph.names and back.name == "test"
    assert_allclose(back.positions_mm, ph.positions_mm, rtol=0, atol=EXACT_MM)
    assert_allclose(back.centre_offset_mm, [0.1, -0.2, 0.3], rtol=0, atol=EXACT_MM)


def test_placed_adds_centre_offset_and_couch_shift():
    ph = BBPhantom(phantom_from_json(_doc(GOOD)).markers, "t", np.array([0.5, 0.0, -0.5]))
    placed = ph.placed_mm([0.0, 50.0, 0.0])
    assert_allclose(placed, ph.positions_mm + [0.5, 50.0, -0.5], rtol=0, atol=EXACT_MM)


def test_unknown_schema_is_rejected():
    doc = _doc(GOOD)
    doc["schema"] = "bb-phantom/9"
    with pytest.raises(PhantomFileError, match="unknown phantom schema 'bb-phantom/9'"):
        phantom_from_json(doc)


def test_duplicate_marker_names_are_rejected():
    names = ["A", "B", "C", "D", "E", "F", "B"]
    with pytest.raises(PhantomFileError, match=r"duplicate marker names \['B'\]"):
        phantom_from_json(_doc(GOOD, names))


def test_non_finite_position_names_the_marker():
    pos = [list(p) for p in GOOD]
    pos[3][1] = float("nan")
    with pytest.raises(PhantomFileError, match="marker 'M3': position_mm is not finite"):
        phantom_from_json(_doc(pos))


def test_fewer_than_six_markers_are_rejected():
    with pytest.raises(PhantomFileError, match=f"5 markers, at least {MIN_MARKERS}"):
        phantom_from_json(_doc(GOOD[:5]))


def test_coplanar_phantom_is_rejected():
    flat = [[0, 0, 0], [50, 0, 0], [0, 50, 0], [-50, 20, 0], [30, -40, 0], [-20, -30, 0], [40, 40, 0]]
    with pytest.raises(PhantomFileError, match="coplanar"):
        phantom_from_json(_doc(flat))


def test_phantom_without_a_marker_at_the_isocentre_is_rejected():
    shifted = [[p[0] + 1.0, p[1], p[2]] for p in GOOD]
    with pytest.raises(PhantomFileError, match="exactly one marker must sit at the isocentre"):
        phantom_from_json(_doc(shifted))


def test_overlapping_markers_are_rejected():
    pos = [list(p) for p in GOOD] + [[50.5, 0.0, 0.0]]
    with pytest.raises(PhantomFileError, match="'M1' and 'M7' overlap"):
        phantom_from_json(_doc(pos))


def test_missing_field_names_the_marker():
    doc = _doc(GOOD)
    del doc["markers"][2]["diameter_mm"]
    with pytest.raises(PhantomFileError, match=r"markers\[2\] \(M2\): missing diameter_mm"):
        phantom_from_json(doc)


def test_negative_diameter_is_rejected():
    with pytest.raises(PhantomFileError, match="diameter_mm must be a positive number"):
        phantom_from_json(_doc(GOOD, diameter=-1.0))


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(PhantomFileError, match="bad.json: not valid JSON"):
        read_phantom(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(PhantomFileError, match="nope.json: cannot read phantom file"):
        read_phantom(tmp_path / "nope.json")


def test_schema_error_in_file_names_the_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema": "kv-geometry/1", "markers": []}))
    with pytest.raises(PhantomFileError, match="p.json: unknown phantom schema"):
        read_phantom(path)


def test_marker_rejects_empty_material():
    with pytest.raises(PhantomError, match="material must be a non-empty string"):
        Marker("X", [0, 0, 0], 2.0, "")


# ---------------------------------------------------------------- bodies (issue 13)
def test_phantom_files_without_a_body_stay_valid_and_have_none():
    ph = phantom_from_json(_doc(GOOD))
    assert ph.body is None and "body" not in ph.to_json()
    assert default_phantom().body is None


@pytest.mark.parametrize("name", ["pmma-cube-150", "pmma-cylinder-mixed", "pmma-cube-inserts"])
def test_built_in_bodied_phantoms_round_trip_and_hold_their_bbs(name, tmp_path):
    ph = read_phantom(f"calibration/data/{name}.json")
    assert ph.body is not None and ph.body.outer.material == "pmma"
    assert np.all(ph.body.outer.contains(ph.positions_mm))  # every BB sits in the body
    for f in ph.body.features:
        assert not np.any(f.contains(ph.positions_mm))  # ... and none in a hole or insert
    back = read_phantom(write_phantom(ph, tmp_path / "p.json"))
    assert back.to_json() == ph.to_json()


def test_mixed_phantom_has_several_sizes_and_materials():
    ph = read_phantom("calibration/data/pmma-cylinder-mixed.json")
    assert len(set(ph.diameters_mm.tolist())) >= 3 and set(ph.materials) == {"tungsten", "iron"}


@pytest.mark.parametrize(
    "body,message",
    [
        ({"shape": "sphere", "material": "pmma"}, "body shape must be one of box, cylinder"),
        ({"shape": "box", "material": "wood", "size_mm": [1, 1, 1]}, "body material must be one of"),
        ({"shape": "box", "material": "pmma", "size_mm": [100, -1, 100]}, "box size_mm must be positive"),
        ({"shape": "cylinder", "material": "pmma", "radius_mm": 50}, "cylinder length_mm must be a positive number"),
        ({"shape": "box", "material": "air", "size_mm": [200, 200, 200]}, "the body itself cannot be air"),
        ({"shape": "box", "material": "pmma", "size_mm": [200, 200, 200],
          "features": [{"shape": "box", "material": "air", "size_mm": [5, 5, 5], "centre_mm": [300, 0, 0]}]},
         r"features\[0\].*outside the body"),
        ({"shape": "box", "material": "pmma", "size_mm": [200, 200, 200], "features": "none"}, "'features' must be a list"),
    ],
)
def test_malformed_bodies_are_refused_with_the_problem_named(body, message):
    doc = _doc(GOOD)
    doc["body"] = body
    with pytest.raises(PhantomFileError, match=message):
        phantom_from_json(doc)
